"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", §3.1 and their generator).

A sequence starts with `num_kv_pairs` key-value pairs `k_1 v_1 k_2 v_2 ...` (keys distinct, from the lower half of
the vocabulary, values from the upper half); the rest is filler (token 0) with every key queried once at a later
position, each query followed by its value. The model must predict the value after each queried key, so the
targets are IGNORE except there. As in Zoology, query positions are drawn with a power law that favours short
gaps (p(gap) proportional to gap^(alpha - 1)), and a sample is correct when all its values are predicted.
Everything is a function of (seed, index).
"""

from __future__ import annotations

import numpy as np

VERSION = 1
IGNORE = -100


def mqar_example(length: int, num_kv_pairs: int, vocab_size: int, rng: np.random.Generator,
                 power_a: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """One sample: inputs (length - 1,) and targets (length - 1,) int64 (next-token prediction)."""
    half = vocab_size // 2
    if num_kv_pairs > half - 1:
        raise ValueError(f"MQAR: {num_kv_pairs} distinct keys do not fit in keys 1..{half - 1} of vocab {vocab_size}")
    context = 2 * num_kv_pairs
    slots = (length - context) // 2  # a query takes two positions: the key, then its value
    if slots < num_kv_pairs:
        raise ValueError(f"MQAR: length {length} leaves {slots} query slots for {num_kv_pairs} pairs")
    keys = rng.choice(np.arange(1, half), size=num_kv_pairs, replace=False)
    values = rng.choice(np.arange(half, vocab_size), size=num_kv_pairs, replace=True)
    tokens = np.zeros(length, dtype=np.int64)
    tokens[0:context:2], tokens[1:context:2] = keys, values
    gaps = np.arange(1, slots + 1, dtype=np.float64)
    p = power_a * gaps ** (power_a - 1)
    slot = rng.choice(slots, size=num_kv_pairs, replace=False, p=p / p.sum())
    order = rng.permutation(num_kv_pairs)
    pos = context + 2 * slot  # (num_kv_pairs,) positions of the query keys
    tokens[pos], tokens[pos + 1] = keys[order], values[order]
    y = np.full(length - 1, IGNORE, dtype=np.int64)
    y[pos] = values[order]  # the target at a query key's position is the next token, its value
    return tokens[:-1], y


def mqar_batch(length: int, num_kv_pairs: int, vocab_size: int, num_samples: int, seed: int,
               power_a: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """`num_samples` examples, the i-th drawn from the generator seeded by (seed, i): (N, length - 1) each."""
    pairs = [mqar_example(length, num_kv_pairs, vocab_size, np.random.default_rng([seed, i]), power_a)
             for i in range(num_samples)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
