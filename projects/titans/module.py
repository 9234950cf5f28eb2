"""LightningModule for Titans and its baseline: next-token cross-entropy; perplexity and bits per byte for language
modelling, exact-match accuracy for the recall tasks (S-NIAH, MQAR)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric

from projects.titans.model import MODELS, TitansLM
from shared.lit.errors import ConfigError
from shared.lit.module import PaperModule, count_forward_flops

IGNORE = -100


def build_model(net: dict[str, Any]) -> TitansLM:
    """`net = {name: <factory in projects.titans.model.MODELS>, **overrides}`."""
    net = dict(net)
    name = net.pop("name", None)
    if name not in MODELS:
        raise ConfigError(f"model.net.name must be one of {sorted(MODELS)}, got {name!r}")
    try:
        return MODELS[name](**net)
    except TypeError as exc:
        raise ConfigError(f"model.net: {exc}") from exc


class TitansLitModule(PaperModule):
    """Args:
    net: the model, `{name: titans_mac_tiny, **overrides}` (see `projects.titans.model`).
    task: "lm" (logs loss, ppl, bpb) or "niah" / "mqar" (logs loss and exact-match accuracy over the answers).
    seq_len: tokens per sample (for the FLOP count).
    bytes_per_token: converts nats per token into bits per byte (1 for bytes; None: no bpb, e.g. token files).
    optimizer, scheduler: see `shared.lit.optim`.
    cuda_graph: capture the model's training forward and backward as CUDA graphs at the first step and replay
        them (one GPU, fixed batch shape). The memory's chunk loop is hundreds of small kernels whose launches, not
        their work, bound an eager step; evaluation stays eager.
    test_lengths: the data's `test_lengths` (one test loader per length); each length's metrics are logged as
        `test/<metric>_<length>`, e.g. `test/acc_4096`.
    """

    def __init__(self, net: dict[str, Any], task: str = "lm", seq_len: int = 256, bytes_per_token: float | None = 1.0,
                 optimizer: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None,
                 cuda_graph: bool = False, test_lengths: list[int] | None = None) -> None:
        super().__init__(optimizer or {"name": "adamw", "lr": 4e-4, "weight_decay": 0.1}, scheduler)
        self.save_hyperparameters()
        self.model = build_model(net)
        self.task, self.seq_len, self.bytes_per_token = task, seq_len, bytes_per_token
        self.cuda_graph, self._graphed = cuda_graph, False
        self.test_lengths = list(test_lengths) if test_lengths else None
        # the metrics of each test loader, and the suffix of its logged names
        self.test_splits = {f"test{n}": f"_{n}" for n in self.test_lengths} if self.test_lengths else {"test": ""}
        self.metrics = torch.nn.ModuleDict({
            f"{split}_{name}": metric() for split in ("val", *self.test_splits)
            for name, metric in (("loss", SumMetric), ("tokens", SumMetric), ("correct", SumMetric),
                                 ("answers", SumMetric), ("token_acc", MeanMetric))})

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def on_train_start(self) -> None:
        if self.cuda_graph and self.device.type != "cuda":
            raise ConfigError(f"model.cuda_graph=true needs a GPU; this run trains on {self.device.type}")
        if self.cuda_graph and self.trainer.world_size > 1:
            raise ConfigError("model.cuda_graph=true captures one GPU's step; use it without DDP")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.cuda_graph and not self._graphed:
            # captured under the precision plugin's autocast (weight-cast cache off), replayed under it; a module in
            # eval mode runs its eager forward
            self.model = torch.cuda.make_graphed_callables(self.model, (x,))
            self._graphed = True
        loss = F.cross_entropy(self.model(x).flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> None:
        x, y = batch
        logits = self.model(x).float()
        target = y != IGNORE
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none")
        hit = (logits.argmax(-1) == y) & target  # (B, T)
        m = self.metrics
        m[f"{split}_loss"].update(losses.sum())
        m[f"{split}_tokens"].update(target.sum())
        m[f"{split}_token_acc"].update(hit.sum() / target.sum().clamp(min=1), weight=target.sum())
        # A sample is right when every target of it is (RULER's exact match; all values of an MQAR sample).
        m[f"{split}_correct"].update(((hit | ~target).all(-1) & target.any(-1)).sum())
        m[f"{split}_answers"].update(target.any(-1).sum())

    def _log_epoch(self, split: str, stage: str, suffix: str = "") -> None:
        """Logs the metrics of `split` as `<stage>/<metric><suffix>` and resets them."""
        m = self.metrics
        loss = m[f"{split}_loss"].compute() / m[f"{split}_tokens"].compute().clamp(min=1)
        values = {"loss": loss, "token_acc": m[f"{split}_token_acc"].compute()}
        if self.task == "lm":
            values["ppl"] = loss.exp()
            if self.bytes_per_token:
                values["bpb"] = loss / math.log(2) / self.bytes_per_token
        else:
            values["acc"] = m[f"{split}_correct"].compute() / m[f"{split}_answers"].compute().clamp(min=1)
        self.log_dict({f"{stage}/{k}{suffix}": v for k, v in values.items()}, prog_bar=stage == "val")
        for name in ("loss", "tokens", "token_acc", "correct", "answers"):
            m[f"{split}_{name}"].reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        split = list(self.test_splits)[dataloader_idx]
        if self.test_lengths and batch[0].shape[1] + 1 != self.test_lengths[dataloader_idx]:
            raise ConfigError(f"test loader {dataloader_idx} has samples of {batch[0].shape[1] + 1} tokens, but "
                              f"model.test_lengths[{dataloader_idx}] = {self.test_lengths[dataloader_idx]}: "
                              "set model.test_lengths to data.test_lengths")
        self._evaluate(batch, split)

    def on_test_epoch_end(self) -> None:
        for split, suffix in self.test_splits.items():
            self._log_epoch(split, "test", suffix)

    def tokens_in(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return int(batch[0].numel())

    def flops_per_sample(self) -> float:
        """3 x the forward FLOPs of one sequence (the usual model-FLOPs convention; the backward through the inner
        gradient costs more than 2x forward, so MFU here is a lower bound on hardware utilisation)."""
        return 3 * count_forward_flops(self.model, torch.zeros(1, self.seq_len, dtype=torch.long))
