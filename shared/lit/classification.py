"""`ClassificationModule`: the LightningModule of image classification papers trained with the DeiT recipe.

A project subclasses it and builds `self.model` (an `nn.Module` mapping `(B, 3, H, W)` to logits, or to a pair of
logits `(class head, distillation head)` in training when it has a distillation token/head):

    class EfficientViTModule(ClassificationModule):
        def __init__(self, variant: str = "m0", num_classes: int = 10, img_size: int = 64, ..., optimizer=..., ...):
            super().__init__(optimizer, scheduler, num_classes=num_classes, img_size=img_size, ...)
            self.save_hyperparameters()
            self.model = build(variant, num_classes=num_classes, img_size=img_size)

What the base does (DeiT's `main.py` / `engine.py`, which EfficientViT, SLAB and most ViT papers train with):
* loss: cross-entropy with label smoothing; under mixup/cutmix (timm `Mixup`, smoothing folded into the soft
  targets) soft-target cross-entropy. Mixup's random draws are seeded from `(seed, global_step, rank)`, so a step's
  mixing is the same after a resume; it needs an even batch (timm mixes a batch with its reverse).
* optional knowledge distillation (DeiT's `DistillationLoss`: none / soft / hard, `alpha`, `tau`) from a timm
  teacher with a local checkpoint; the teacher is frozen, in eval mode, and not part of the checkpoint.
* gradient clipping: `agc` (adaptive gradient clipping, Brock et al. 2021, as timm's `adaptive_clip_grad`),
  `norm` or `value`, applied after AMP unscaling in `configure_gradient_clipping`.
* metrics: `val/top1`, `val/top5`, `val/loss` (and `test/...`), torchmetrics, reduced over ranks.
* `flops_per_sample`: 3 x the forward FLOPs of one image (forward + backward), for the MFU callback.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from shared.lit.errors import CheckpointError, ConfigError
from shared.lit.module import PaperModule, count_forward_flops

Batch = tuple[torch.Tensor, torch.Tensor]


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output unit (rows of a linear / filters of a conv); of the whole tensor for 0-D/1-D."""
    if x.ndim <= 1:
        return x.norm(2)
    return x.norm(2, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(parameters: Any, clip_factor: float, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (Brock et al., "High-Performance Large-Scale Image Recognition Without
    Normalization", 2021, eq. 3): per unit, scale the gradient to `clip_factor * max(||W||, eps) / ||G||` where it
    exceeds that. EfficientViT trains with `clip_factor=0.02` on all parameters (timm `--clip-mode agc`)."""
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(p.grad)
        clipped = p.grad * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.copy_(torch.where(grad_norm < max_norm, p.grad, clipped))


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a distribution over classes (mixup / cutmix targets), averaged over the batch."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


class ClassificationModule(PaperModule):
    """Args:
    optimizer, scheduler: see `PaperModule` (AdamW, cosine with warm-up, `lr_reference_batch: 512` for DeiT scaling).
    num_classes, img_size, in_chans: the classification task and input size (for FLOPs and checks).
    label_smoothing: smoothing of the one-hot targets (DeiT / EfficientViT: 0.1).
    mixup: None (off) or kwargs of timm `Mixup` (mixup_alpha, cutmix_alpha, prob, switch_prob, mode, ...);
        `label_smoothing` and `num_classes` are filled in.
    grad_clip: None, or {mode: agc | norm | value, value: float}; EfficientViT: {mode: agc, value: 0.02}.
    distillation: None, or {type: soft | hard, alpha: 0.5, tau: 1.0, teacher: <timm model name>,
        teacher_checkpoint: <path to a state_dict (or {'model': ...}) for it>}.
    seed: seeds mixup per step (with the global step and rank).
    """

    def __init__(
        self,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        *,
        num_classes: int,
        img_size: int,
        in_chans: int = 3,
        label_smoothing: float = 0.1,
        mixup: dict[str, Any] | None = None,
        grad_clip: dict[str, Any] | None = None,
        distillation: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.num_classes, self.img_size, self.in_chans = num_classes, img_size, in_chans
        self.label_smoothing = label_smoothing
        self.seed = seed
        self.grad_clip = self._check_grad_clip(grad_clip)
        self.distillation = self._check_distillation(distillation)
        self.mixup_fn = self._build_mixup(mixup)
        self._teacher: list[nn.Module] = []  # a list keeps the frozen teacher out of state_dict and parameters()
        self._flops: float | None = None
        top5 = min(5, num_classes)
        for split in ("val", "test"):
            setattr(self, f"{split}_top1", MulticlassAccuracy(num_classes, top_k=1, average="micro"))
            setattr(self, f"{split}_top5", MulticlassAccuracy(num_classes, top_k=top5, average="micro"))

    # ---- configuration checks --------------------------------------------------------------------------------------
    @staticmethod
    def _check_grad_clip(grad_clip: dict[str, Any] | None) -> dict[str, Any] | None:
        if not grad_clip or grad_clip.get("mode") in (None, "none"):
            return None
        if grad_clip.get("mode") not in ("agc", "norm", "value") or "value" not in grad_clip:
            raise ConfigError(f"model.grad_clip={grad_clip} must be {{mode: agc|norm|value, value: <float>}}")
        return {"mode": grad_clip["mode"], "value": float(grad_clip["value"])}

    @staticmethod
    def _check_distillation(distillation: dict[str, Any] | None) -> dict[str, Any] | None:
        if not distillation or distillation.get("type") in (None, "none"):
            return None
        cfg = {"alpha": 0.5, "tau": 1.0, "teacher_checkpoint": None, **distillation}
        if cfg["type"] not in ("soft", "hard") or not cfg.get("teacher"):
            raise ConfigError(
                f"model.distillation={distillation} must be {{type: soft|hard, teacher: <timm name>, alpha, tau, "
                "teacher_checkpoint}}"
            )
        return cfg

    def _build_mixup(self, mixup: dict[str, Any] | None):
        if not mixup or not (mixup.get("mixup_alpha", 0) > 0 or mixup.get("cutmix_alpha", 0) > 0
                             or mixup.get("cutmix_minmax") is not None):
            return None
        from timm.data import Mixup

        return Mixup(**{**mixup, "label_smoothing": self.label_smoothing, "num_classes": self.num_classes})

    # ---- training --------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        batch = getattr(dm, "batch_size", None)
        if self.mixup_fn is not None and batch is not None and batch % 2:
            raise ConfigError(
                f"data.batch_size={batch} must be even with mixup/cutmix (a batch is mixed with its reverse)"
            )
        if self.distillation and not self._teacher:
            self._teacher.append(self._build_teacher().to(self.device))

    def _build_teacher(self) -> nn.Module:
        import timm

        cfg = self.distillation
        teacher = timm.create_model(cfg["teacher"], pretrained=False, num_classes=self.num_classes)
        path = cfg["teacher_checkpoint"]
        if path:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError) as err:
                raise CheckpointError(f"model.distillation.teacher_checkpoint={path}: cannot read it ({err})") from None
            state = state.get("model", state)
            missing, unexpected = teacher.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise CheckpointError(
                    f"{path} does not fit teacher {cfg['teacher']} ({len(missing)} missing keys, e.g. "
                    f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
                )
        teacher.requires_grad_(False)
        return teacher.eval()

    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/cutmix with draws seeded from (seed, global_step, rank), leaving NumPy's global state as it was."""
        if self.mixup_fn is None:
            return images, labels
        if images.shape[0] % 2:
            raise ConfigError(f"mixup/cutmix needs an even batch, got {images.shape[0]} images")
        state = np.random.get_state()
        try:
            np.random.seed(np.random.SeedSequence([self.seed, self.global_step, self.global_rank]).generate_state(1))
            return self.mixup_fn(images, labels)
        finally:
            np.random.set_state(state)

    def classification_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Soft-target CE for mixed (2-D) targets, label-smoothed CE for class indices."""
        if target.ndim == 2:
            return soft_target_cross_entropy(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def distillation_loss(self, images: torch.Tensor, outputs: Any, target: torch.Tensor) -> torch.Tensor:
        """DeiT's `DistillationLoss`: (1 - alpha) * base + alpha * teacher term on the distillation head
        (soft: KL at temperature tau, scaled by tau^2; hard: CE against the teacher's argmax)."""
        logits, logits_kd = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        base = self.classification_loss(logits, target)
        if self.distillation is None:
            return base
        with torch.no_grad():
            teacher_logits = self._teacher[0](images)
        alpha, tau = self.distillation["alpha"], self.distillation["tau"]
        if self.distillation["type"] == "soft":
            kd = F.kl_div(F.log_softmax(logits_kd / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                          reduction="sum", log_target=True) * (tau * tau) / logits_kd.numel()
        else:
            kd = F.cross_entropy(logits_kd, teacher_logits.argmax(dim=1))
        return base * (1 - alpha) + kd * alpha

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        images, target = self.mix(images, labels)
        loss = self.distillation_loss(images, self.model(images), target)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, on_step=True, on_epoch=False)
        return loss

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if self.grad_clip is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        mode, value = self.grad_clip["mode"], self.grad_clip["value"]
        if mode == "agc":
            adaptive_clip_grad_(params, value)
        elif mode == "norm":
            torch.nn.utils.clip_grad_norm_(params, value)
        else:
            torch.nn.utils.clip_grad_value_(params, value)

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def _evaluate(self, batch: Batch, split: str) -> None:
        images, labels = batch
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        top1, top5 = getattr(self, f"{split}_top1"), getattr(self, f"{split}_top5")
        top1.update(logits, labels)
        top5.update(logits, labels)
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=labels.shape[0])
        self.log(f"{split}/top1", top1, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{split}/top5", top5, on_step=False, on_epoch=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # ---- throughput ------------------------------------------------------------------------------------------------
    def flops_per_sample(self) -> float | None:
        if self._flops is None:
            example = torch.zeros(1, self.in_chans, self.img_size, self.img_size)
            self._flops = 3 * count_forward_flops(self.model, example)
        return self._flops if math.isfinite(self._flops) else None
