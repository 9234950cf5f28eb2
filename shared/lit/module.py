"""`PaperModule`: the base of every project's LightningModule.

A project's module takes plain values only (numbers, strings, lists, dicts of those), builds its `nn.Module`
from them, and calls `self.save_hyperparameters()`; checkpoints then load with `weights_only=True` and resume.
The base class turns the `optimizer` / `scheduler` dicts into an optimiser and a per-step schedule, and gives
the throughput callback what it needs (`flops_per_sample`; projects may add `samples_in`, `tokens_in`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from shared.lit.optim import build_optimizer, build_scheduler


class PaperModule(pl.LightningModule):
    """Args:
    optimizer: kwargs of `shared.lit.optim.build_optimizer` (name, lr, weight_decay, betas, ...).
    scheduler: kwargs of `shared.lit.optim.build_scheduler` (name, warmup_steps, milestones, ...).
    """

    def __init__(self, optimizer: dict[str, Any], scheduler: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.optimizer_config = dict(optimizer)
        self.scheduler_config = dict(scheduler or {"name": "constant"})

    def optimized_module(self) -> nn.Module:
        """The module whose parameters are trained (`self.model` when the project has one)."""
        return getattr(self, "model", self)

    def global_batch_size(self) -> int | None:
        dm = getattr(self.trainer, "datamodule", None)
        batch = getattr(dm, "batch_size", None)
        if batch is None:
            return None
        return batch * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.optimized_module(), global_batch=self.global_batch_size(),
                                    **self.optimizer_config)
        total, steps_per_epoch = training_steps(self.trainer)
        scheduler = build_scheduler(optimizer, total_steps=total, steps_per_epoch=steps_per_epoch,
                                    **self.scheduler_config)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # The throughput callback also reads `samples_in(batch)` and `tokens_in(batch)` when a project defines them
    # (default: the first tensor's batch dimension, no tokens).
    def flops_per_sample(self) -> float | None:
        """Training FLOPs (forward + backward) of one sample, or None when the project does not declare them."""
        return None


def training_steps(trainer: pl.Trainer) -> tuple[int, int | None]:
    """(total optimiser steps of the run, steps per epoch) for schedules.

    Computed from the datamodule's loader length rather than `trainer.estimated_stepping_batches`, which would
    build and start the trainer's own training loader before a checkpoint is restored, so that a resumed run
    would begin from the wrong place in the data.
    """
    steps_per_epoch = None
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and type(dm).train_dataloader is not pl.LightningDataModule.train_dataloader:
        batches = len(dm.train_dataloader())
        limit = trainer.limit_train_batches
        batches = int(batches * limit) if isinstance(limit, float) else min(batches, int(limit))
        steps_per_epoch = max(1, batches // trainer.accumulate_grad_batches)
    by_epochs = steps_per_epoch * trainer.max_epochs if steps_per_epoch and trainer.max_epochs > 0 else None
    by_steps = trainer.max_steps if trainer.max_steps > 0 else None
    candidates = [n for n in (by_epochs, by_steps) if n]
    if not candidates:
        from shared.lit.errors import ConfigError

        raise ConfigError("the run has no length: set trainer.max_steps or trainer.max_epochs")
    return min(candidates), steps_per_epoch


def count_forward_flops(model: nn.Module, *inputs: torch.Tensor) -> float:
    """FLOPs of one forward pass, counted on the meta device (instant, no memory, no random numbers drawn)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    meta_model = copy.deepcopy(model).to("meta").eval()
    meta_inputs = [x.to("meta") for x in inputs]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model(*meta_inputs)
    return float(counter.get_total_flops())
