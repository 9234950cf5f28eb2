"""The environment switch of the kernel dispatchers (kept apart from `triton_common`, which imports Triton)."""

from __future__ import annotations

import os


def forced_backend(env_var: str, default: str) -> str:
    """A kernel dispatcher's environment switch: `auto`, `reference` or `triton` (`default` when unset)."""
    value = os.environ.get(env_var, default).strip().lower()
    if value not in ("auto", "reference", "triton"):
        raise ValueError(f"{env_var}={value!r}: expected auto, reference or triton")
    return value
