"""Single needle-in-a-haystack tasks (S-NIAH) at the byte level, in the shapes of RULER (Hsieh et al. 2024, §3)
as Titans' Table 2 uses them: passkey (PK), number (N) and word (W).

A sample is exactly `length` bytes: a haystack with one needle sentence inserted at a random depth (at a sentence
boundary), then a question, then the answer. Only the answer bytes are targets; a sample counts as correct when
every answer byte is predicted (teacher-forced argmax), RULER's exact match.

- "passkey": the repeated noise haystack of RULER's niah_single_1 ("The grass is green. The sky is blue. ..."),
  a 7-digit number as the value;
- "number": a natural-text haystack (any text: the embedded Wikipedia excerpt by default), a 7-digit number
  (niah_single_2);
- "word": the same haystack, a word as the value (RULER's niah_single_3 uses a UUID; Titans names the column
  "W").

The needle and question follow RULER's template: "One of the special magic {numbers|words} for {key} is: {value}."
and "What is the special magic {number|word} for {key} mentioned in the provided text? The special magic
{number|word} for {key} mentioned in the provided text is ". Keys are words from the haystack text's vocabulary.
Everything is a function of (seed, index): samples are reproducible and need no download.
"""

from __future__ import annotations

import re

import numpy as np

VERSION = 1
TASKS = ("passkey", "number", "word")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
IGNORE = -100


def word_list(text: str, min_len: int = 4, max_len: int = 10, min_count: int = 3) -> list[str]:
    """Lower-case alphabetic words of `text` that occur at least `min_count` times, sorted (deterministic)."""
    counts: dict[str, int] = {}
    for w in re.findall(r"\b[a-z]+\b", text):
        if min_len <= len(w) <= max_len:
            counts[w] = counts.get(w, 0) + 1
    return sorted(w for w, c in counts.items() if c >= min_count)


def _haystack(task: str, text: str, size: int, rng: np.random.Generator) -> str:
    """`size` characters of haystack: the noise sentences repeated, or a window of `text` from a random offset."""
    if task == "passkey":
        return (NOISE * (size // len(NOISE) + 1))[:size]
    if len(text) <= size:
        raise ValueError(f"haystack text has {len(text)} characters, fewer than the {size} a sample needs")
    start = int(rng.integers(0, len(text) - size))
    return text[start : start + size]


def niah_sample(task: str, length: int, rng: np.random.Generator, text: str, words: list[str]
                ) -> tuple[np.ndarray, int, int]:
    """One S-NIAH sample: (bytes (length,) uint8, answer start, answer length)."""
    if task not in TASKS:
        raise ValueError(f"NIAH task must be one of {TASKS}, got {task!r}")
    kind = "word" if task == "word" else "number"
    key = words[int(rng.integers(len(words)))]
    if kind == "number":
        value = str(int(rng.integers(1_000_000, 10_000_000)))
    else:
        value = words[int(rng.integers(len(words)))]
        while value == key:
            value = words[int(rng.integers(len(words)))]
    needle = f" One of the special magic {kind}s for {key} is: {value}."
    question = (f"\nWhat is the special magic {kind} for {key} mentioned in the provided text? "
                f"The special magic {kind} for {key} mentioned in the provided text is ")
    fixed = len(needle) + len(question) + len(value)
    if fixed >= length:
        raise ValueError(f"NIAH length {length} is shorter than the needle, question and answer ({fixed} bytes)")
    hay = _haystack(task, text, length - fixed, rng).encode("ascii", "replace").decode("ascii")
    # Insert right after a sentence's period at a uniformly random depth (RULER sweeps depths; we draw them).
    cut = hay.rfind(".", 0, int(rng.integers(0, len(hay) + 1))) + 1
    sample = (hay[:cut] + needle + hay[cut:] + question + value).encode("ascii")
    return np.frombuffer(sample, dtype=np.uint8).copy(), length - len(value), len(value)


def niah_example(task: str, length: int, rng: np.random.Generator, text: str, words: list[str]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One sample as next-byte prediction: inputs (length - 1,) and targets (length - 1,) int64, the targets
    IGNORE except at the answer bytes."""
    tokens, start, n = niah_sample(task, length, rng, text, words)
    y = np.full(length - 1, IGNORE, dtype=np.int64)
    y[start - 1 : start - 1 + n] = tokens[start : start + n]
    return tokens[:-1].astype(np.int64), y


def niah_batch(task: str, length: int, num_samples: int, seed: int, text: str = "",
               words: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`num_samples` examples, the i-th drawn from the generator seeded by (seed, i): (N, length - 1) each."""
    words = words if words is not None else word_list(text or NOISE, min_count=1)
    pairs = [niah_example(task, length, np.random.default_rng([seed, i]), text, words) for i in range(num_samples)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
