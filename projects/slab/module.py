"""SLAB's LightningModules: image classification (the DeiT/Swin recipe) and the language-model experiment.

Both drive PRepBN from the optimiser step (`PRepBNSchedule`): before every training batch, lambda is set from
`global_step` and the run's total steps, the LN -> RepBN handover ending at `prepbn_end` (0.8) of training after
an optional LN-only warm-up (`prepbn_warmup`, a fraction of training). Lambda is a function of the step alone,
so a resumed run continues the schedule exactly. After the last step the BN statistics are recalibrated with
frozen weights for `recalibration_steps` batches (the paper's final phase; 0 turns it off), `last.ckpt` is
rewritten with them, and the test then runs on the recalibrated model.
"""

from __future__ import annotations

import math
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from projects.slab.model import SlabLlama, build_model
from projects.slab.norms import handover_steps, prepbn_modules, recalibrate_bn, repbn_modules, set_prepbn_step
from shared.lit.classification import ClassificationModule
from shared.lit.errors import ConfigError
from shared.lit.module import PaperModule, count_forward_flops


class PRepBNSchedule:
    """Mixin for a LightningModule with `self.model`: the PRepBN schedule and the BN recalibration phase."""

    prepbn_warmup: float
    prepbn_end: float
    recalibration_steps: int
    recalibration_epochs: float
    recalibration_momentum: float | None

    def _set_schedule(self, prepbn_warmup: float, prepbn_end: float, recalibration_steps: int,
                      recalibration_epochs: float, recalibration_momentum: float | None) -> None:
        """Store and check the schedule's arguments (the `SlabModule` docstring describes them)."""
        self.prepbn_warmup, self.prepbn_end = prepbn_warmup, prepbn_end
        self.recalibration_steps, self.recalibration_epochs = recalibration_steps, recalibration_epochs
        self.recalibration_momentum = recalibration_momentum
        if not 0.0 <= self.prepbn_warmup < self.prepbn_end <= 1.0:
            raise ConfigError(f"model.prepbn_warmup={self.prepbn_warmup} and model.prepbn_end={self.prepbn_end} "
                              "must satisfy 0 <= warmup < end <= 1 (fractions of the training steps)")
        if self.recalibration_steps < 0 or self.recalibration_epochs < 0:
            raise ConfigError(f"model.recalibration_steps={self.recalibration_steps} and model.recalibration_epochs="
                              f"{self.recalibration_epochs} must be >= 0")
        self._recalibrated = False
        self._prepbn_steps: tuple[int, int] | None = None

    def prepbn_steps(self) -> tuple[int, int]:
        """(warm-up steps, handover steps) for this run's length."""
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(self.prepbn_warmup * total)
        return warmup, handover_steps(total, warmup, self.prepbn_end)

    def on_train_start(self) -> None:
        self._prepbn_steps = self.prepbn_steps() if prepbn_modules(self.model) else None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._prepbn_steps is None:
            return
        warmup, handover = self._prepbn_steps
        lam = set_prepbn_step(self.model, self.global_step, warmup, handover)  # 1 during the warm-up
        self.log("train/prepbn_lambda", lam, on_step=True, on_epoch=False)

    def recalibration_inputs(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def on_train_end(self) -> None:
        if self.global_step < int(self.trainer.estimated_stepping_batches):
            return  # stopped early (preempted, interrupted): the resumed run recalibrates when it finishes
        loader = self.trainer.datamodule.train_dataloader()
        steps = self.recalibration_steps or math.ceil(self.recalibration_epochs * len(loader))
        if steps == 0 or self._recalibrated or next(repbn_modules(self.model), None) is None:
            return
        device = self.device
        batches = islice(_cycle(loader), steps)
        inputs = (self.recalibration_inputs(batch).to(device) for batch in batches)
        recalibrate_bn(self.model, inputs, self.recalibration_momentum)
        self._recalibrated = True
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None) and getattr(ckpt, "save_last", False):
            self.trainer.save_checkpoint(Path(ckpt.dirpath) / "last.ckpt")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["slab_bn_recalibrated"] = self._recalibrated

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._recalibrated = bool(checkpoint.get("slab_bn_recalibrated", False))


def _cycle(loader):
    """Batches of `loader`, epoch after epoch (recalibration may be longer than one epoch)."""
    while True:
        yield from loader


class SlabModule(PRepBNSchedule, ClassificationModule):
    """Image classification with a SLAB model (see `projects.slab.model.MODELS`).

    Args:
        model: factory name, e.g. slab_swin_t, slab_deit_t, swin_t_prepbn.
        model_kwargs: overrides of the factory's arguments (sizes of the embedded-data model, norm, drop path).
        num_classes, img_size: the task.
        prepbn_warmup, prepbn_end: the schedule, as fractions of the training steps (module docstring).
        recalibration_steps: batches of BN-statistics recalibration after training.
        recalibration_epochs: the same in epochs of the training loader (paper: 10), used when steps is 0.
        recalibration_momentum: None = average over the recalibration batches; else BN's running average.
        optimizer, scheduler, label_smoothing, mixup, grad_clip, seed: see `ClassificationModule`.
    """

    def __init__(self, model: str = "slab_swin_t", model_kwargs: dict[str, Any] | None = None, num_classes: int = 1000,
                 img_size: int = 224, prepbn_warmup: float = 0.0, prepbn_end: float = 0.8,
                 recalibration_steps: int = 0, recalibration_epochs: float = 0.0,
                 recalibration_momentum: float | None = None,
                 optimizer: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None,
                 label_smoothing: float = 0.1, mixup: dict[str, Any] | None = None,
                 grad_clip: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(optimizer or {"name": "adamw", "lr": 5e-4, "weight_decay": 0.05}, scheduler,
                         num_classes=num_classes, img_size=img_size, label_smoothing=label_smoothing, mixup=mixup,
                         grad_clip=grad_clip, seed=seed)
        self.save_hyperparameters()
        self._set_schedule(prepbn_warmup, prepbn_end, recalibration_steps, recalibration_epochs,
                           recalibration_momentum)
        try:
            self.model = build_model(model, num_classes=num_classes, img_size=img_size, **(model_kwargs or {}))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.model={model!r}, model.model_kwargs={model_kwargs}: {err}") from None


class SlabLMModule(PRepBNSchedule, PaperModule):
    """The language-model experiment: next-token cross-entropy; `val/loss`, `val/bpb` (bits per byte).

    Args:
        model_kwargs: `SlabLlama` arguments (vocab_size, dim, depth, num_heads, hidden_dim, max_len, attention, norm).
        bytes_per_token: converts nats per token into bits per byte (1 for byte-level text).
        prepbn_warmup, prepbn_end, recalibration_steps, recalibration_epochs, recalibration_momentum: see
            `SlabModule`.
        optimizer, scheduler: see `PaperModule`.
    """

    def __init__(self, model_kwargs: dict[str, Any] | None = None, bytes_per_token: float = 1.0,
                 prepbn_warmup: float = 0.0, prepbn_end: float = 0.8, recalibration_steps: int = 0,
                 recalibration_epochs: float = 0.0, recalibration_momentum: float | None = None,
                 optimizer: dict[str, Any] | None = None,
                 scheduler: dict[str, Any] | None = None) -> None:
        super().__init__(optimizer or {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}, scheduler)
        self.save_hyperparameters()
        self._set_schedule(prepbn_warmup, prepbn_end, recalibration_steps, recalibration_epochs,
                           recalibration_momentum)
        try:
            self.model = SlabLlama(**(model_kwargs or {}))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.model_kwargs={model_kwargs}: {err}") from None
        self.bytes_per_token = bytes_per_token
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self._flops: float | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, on_step=True, on_epoch=False)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> None:
        metric = getattr(self, f"{split}_loss")
        metric.update(self._loss(batch), weight=batch[1].numel())
        self.log(f"{split}/loss", metric, on_step=False, on_epoch=True, prog_bar=True)

    def _log_bpb(self, split: str) -> None:
        loss = getattr(self, f"{split}_loss").compute()
        self.log(f"{split}/bpb", loss / math.log(2) / self.bytes_per_token, on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_bpb("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_bpb("test")

    def tokens_in(self, batch: Any) -> int:
        return int(batch[0].numel())

    def flops_per_sample(self) -> float | None:
        if self._flops is None:
            example = torch.zeros(1, self.model.max_len, dtype=torch.long)
            self._flops = 3 * count_forward_flops(self.model, example)
        return self._flops
