"""LightningModule for the LRA tasks: cross-entropy training, accuracy (the paper's metric) on val and test, and a
`results.json` in the run directory at the end of testing, which `scripts/lra_table.py` collects into Table 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from projects.lra.model import create_model
from projects.lra.tasks import task_info
from shared.lit.module import PaperModule, count_forward_flops


class LRAModule(PaperModule):
    """Args:
    task: the LRA task (it fixes the number of classes and the example length for FLOP counting).
    arch: a factory of `projects.lra.model.MODELS` (default: the task's paper configuration).
    attention: {"name": variant, **options} of `shared.blocks.attention` (the `attention` config group).
    model_kwargs: overrides of the factory's hyper-parameters (the per-variant LRA configs change dims/pooling).
    seq_len: the input length FLOPs are counted at (default: the model's max_len).
    optimizer, scheduler: see `shared.lit.module.PaperModule`.
    """

    def __init__(self, task: str = "listops", arch: str | None = None, attention: dict[str, Any] | None = None,
                 model_kwargs: dict[str, Any] | None = None, seq_len: int | None = None,
                 optimizer: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None) -> None:
        super().__init__(optimizer or {"name": "adamw", "lr": 1e-3}, scheduler)
        self.save_hyperparameters()
        self.info = task_info(task)
        self.task = task
        self.arch = arch or self.info.model
        self.attention_name = (attention or {}).get("name", "softmax")
        self.model = create_model(self.arch, attention=attention, **(model_kwargs or {}))
        self.seq_len = seq_len or self.model.encoder.max_len
        classes = self.info.num_classes
        self.val_accuracy = MulticlassAccuracy(classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(classes, average="micro")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.info.pair:
            return self.model(batch["inputs1"], batch["inputs2"])
        return self.model(batch["inputs"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), batch["targets"])
        accuracy = (logits.argmax(-1) == batch["targets"]).float().mean()
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/accuracy", accuracy)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), batch["targets"])
        metric.update(logits, batch["targets"])
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(batch["targets"]))
        self.log(f"{stage}/accuracy", metric, prog_bar=True, batch_size=len(batch["targets"]))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)

    def on_test_end(self) -> None:
        """Write `results.json` (the numbers `scripts/lra_table.py` reads) into the run directory."""
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
        if not self.trainer.is_global_zero or not metrics:
            return
        results = {"task": self.task, "attention": self.attention_name, "arch": self.arch,
                   "params": sum(p.numel() for p in self.model.parameters()), "step": int(self.global_step),
                   "weights": Path(self.trainer.ckpt_path).name if self.trainer.ckpt_path else "final", **metrics}
        path = Path(self.trainer.default_root_dir) / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return sum(int(v.numel()) for k, v in batch.items() if k.startswith("inputs"))

    def flops_per_sample(self) -> float:
        example = torch.ones(1, self.seq_len, dtype=torch.long)
        inputs = (example, example) if self.info.pair else (example,)
        return 3 * count_forward_flops(self.model, *inputs)
