from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from shared.lit.module import PaperModule, count_forward_flops
from tests.toyproject.model import toy_mlp


class ToyModule(PaperModule):
    def __init__(self, hidden: int = 32, dropout: float = 0.1, nan_at_step: int | None = None,
                 nan_grad_at_step: int | None = None, optimizer: dict | None = None,
                 scheduler: dict | None = None) -> None:
        super().__init__(optimizer or {"name": "adamw", "lr": 1e-2}, scheduler)
        self.save_hyperparameters()
        self.model = toy_mlp(hidden=hidden, dropout=dropout)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.model(x).squeeze(-1), y)
        if self.hparams.nan_at_step is not None and self.global_step >= self.hparams.nan_at_step:
            loss = loss * float("nan")
        if self.hparams.nan_grad_at_step is not None and self.global_step >= self.hparams.nan_grad_at_step:
            # finite (0 * sqrt(0)) forward, NaN (0 * inf) gradient
            loss = loss + 0.0 * torch.sqrt(self.model[0].weight.sum() * 0.0)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_loss.update(F.mse_loss(self.model(x).squeeze(-1), y, reduction="none"))
        self.log("val/loss", self.val_loss, on_epoch=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_loss.update(F.mse_loss(self.model(x).squeeze(-1), y, reduction="none"))
        self.log("test/loss", self.test_loss, on_epoch=True)

    def flops_per_sample(self) -> float:
        return 3 * count_forward_flops(self.model, torch.zeros(1, 8))
