"""ListOps as Long Range Arena generates, tokenises and stores it (Tay et al., ICLR 2021, §3.1; Nangia & Bowman 2018).

An example is a nested expression over the digits 0-9 with the operators MAX, MIN, MED (median, rounded down)
and SM (sum modulo 10); its label is the value, 0-9. The generator follows the official `data/listops.py`:

- a node is a leaf with probability 1 - VALUE_P = 0.75 (always at `max_depth` = 10), a uniform digit;
  otherwise an operator with `randint(2, max_args)` (max_args = 10) children drawn first and the operator drawn
  after them (`random.choice(OPERATORS)`); FIRST and LAST exist in the official code but are disabled;
- the length counts tokens (a digit 1, an operator node 2 + its children: the operator and its `]`), and a tree
  is kept when `min_length < length < max_length` (500 < length < 2000);
- trees are deduplicated, and the first `num_train`, then `num_val`, then `num_test` distinct trees form the
  splits (96,000 / 2,000 / 2,000 officially).

The random calls are Python's `random` in the official order, so a `random.Random(seed)` stream yields the trees
the official script yields after `random.seed(seed)`. (The official script then iterates a `set`, whose order
depends on the process's hash seed; here the splits keep the order in which trees were found.)

Source strings are written exactly as the official `to_string` writes its nested tuples, e.g.
`( ( ( [MAX 2 ) 9 ) ] )`. The official pipeline renames `]` to `X`, drops the parentheses and splits on
whitespace; its vocabulary is the set of tokens seen in the validation split (in set order, so not reproducible),
with id 0 for padding and one out-of-vocabulary bucket after the tokens. Here the same 15 tokens have a fixed
order (`TOKENS`: ids 1-15), id 0 is padding and id 16 the OOV bucket: 17 ids, as the official encoder has.

Files: `basic_train.tsv`, `basic_val.tsv`, `basic_test.tsv` (the release's `listops-1000/` folder), tab-separated
with the header `Source	Target`.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

VERSION = 1

MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VALUES = range(10)
VALUE_P = 0.25

# The official vocabulary has exactly these tokens (after `]` -> `X`); ids 1..15 in this order.
TOKENS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", MIN, MAX, MED, SUM_MOD, "X")
PAD_ID = 0
OOV_ID = len(TOKENS) + 1
VOCAB_SIZE = len(TOKENS) + 2
TOKEN_TO_ID = {token: i + 1 for i, token in enumerate(TOKENS)}
NUM_CLASSES = 10

SPLIT_FILES = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}


def _apply(op: str, args: list[int]) -> int:
    if op == MIN:
        return min(args)
    if op == MAX:
        return max(args)
    if op == MED:  # int(np.median(args)): the mean of the two middle values, rounded down, for even counts
        s = sorted(args)
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2
    return sum(args) % 10


def generate_tree(rng: random.Random, depth: int = 1, max_depth: int = 10, max_args: int = 10) -> tuple[str, int, int]:
    """One random expression: (source string, value, length in tokens).

    The random draws are the official `generate_tree`'s, in its order; the string is what its `to_string` writes
    for the nested tuples `((...((op, a0), a1)...), ])`: k + 1 opening parentheses, then `op a0 )`, ` ai )` for
    every further argument, and `] )`.
    """
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        value = rng.choice(VALUES)
        return str(value), value, 1
    num_args = rng.randint(2, max_args)
    parts, values, length = [], [], 2
    for _ in range(num_args):
        source, value, sub_length = generate_tree(rng, depth + 1, max_depth, max_args)
        parts.append(source)
        values.append(value)
        length += sub_length
    op = rng.choice(OPERATORS)
    source = "( " * (num_args + 1) + op + " " + " ) ".join(parts) + " ) ] )"
    return source, _apply(op, values), length


def generate(num_samples: int, seed: int, *, max_depth: int = 10, max_args: int = 10, min_length: int = 500,
             max_length: int = 2000, exclude: Iterable[str] = ()) -> list[tuple[str, int]]:
    """`num_samples` distinct (source, label) pairs whose length lies strictly between the bounds.

    `exclude`: sources that must not appear (the other splits, when splits are generated separately).
    """
    rng = random.Random(seed)
    seen = set(exclude)
    rows: list[tuple[str, int]] = []
    while len(rows) < num_samples:
        source, value, length = generate_tree(rng, 1, max_depth, max_args)
        if min_length < length < max_length and source not in seen:
            seen.add(source)
            rows.append((source, value))
    return rows


def generate_splits(num_train: int = 96_000, num_val: int = 2_000, num_test: int = 2_000, seed: int = 0,
                    **kwargs) -> dict[str, list[tuple[str, int]]]:
    """The official three splits: one stream of distinct trees, cut into train, val and test in that order."""
    rows = generate(num_train + num_val + num_test, seed, **kwargs)
    return {"train": rows[:num_train], "val": rows[num_train:num_train + num_val],
            "test": rows[num_train + num_val:]}


def tokenize(source: str) -> list[str]:
    """The official input pipeline: `]` -> `X`, parentheses removed, split on whitespace."""
    return source.replace("]", "X").replace("(", "").replace(")", "").split()


def encode(source: str, max_length: int = 2000) -> list[int]:
    """Token ids of a source string (1-15, OOV 16), truncated to `max_length` as the official pipeline does."""
    return [TOKEN_TO_ID.get(token, OOV_ID) for token in tokenize(source)][:max_length]


def write_tsv(path: str | Path, rows: Sequence[tuple[str, int]]) -> None:
    """Write rows in the release layout: tab-separated, header `Source	Target`."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["Source", "Target"])
        writer.writerows(rows)


def read_tsv(path: str | Path) -> list[tuple[str, int]]:
    """Rows of a release TSV; ValueError naming the file and line when it does not follow the layout."""
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header != ["Source", "Target"]:
            raise ValueError(f"{path}: the first line must be the header 'Source<TAB>Target', got {header!r}")
        rows = []
        for line, fields in enumerate(reader, start=2):
            if len(fields) != 2 or not fields[1].strip().lstrip("-").isdigit():
                raise ValueError(f"{path}:{line}: expected '<source><TAB><integer label>', got {fields!r}")
            rows.append((fields[0], int(fields[1])))
    return rows
