"""Rank-zero logging: one line per event, not one per process, and no line printed twice under Hydra."""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_only


def get_logger(name: str) -> logging.LoggerAdapter:
    """A logger whose records are emitted by global rank 0 only."""
    return _RankZeroAdapter(logging.getLogger(name), {})


class _RankZeroAdapter(logging.LoggerAdapter):
    def log(self, level: int, msg: object, *args, **kwargs) -> None:
        if rank_zero_only.rank == 0:
            super().log(level, msg, *args, **kwargs)


def route_lightning_logs_through_hydra() -> None:
    """Lightning installs its own console handlers; under Hydra each message would print twice."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
