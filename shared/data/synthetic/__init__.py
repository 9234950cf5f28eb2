"""Deterministic generators of synthetic tasks, seeded and versioned (each module has a `VERSION`; bump it when
the output for a given seed changes, so caches are rebuilt).

- `listops`: Long Range Arena's ListOps (nested MAX / MIN / MED / SUM_MOD expressions), the official algorithm,
  tokeniser, vocabulary and TSV layout.
- `pathfinder`: the Pathfinder contour-integration images of Linsley et al. (snakes2), in numpy and PIL.

Import submodules directly; this package imports nothing.
"""
