"""EfficientViT image classification: the DeiT recipe of the paper (§4.1) on `ClassificationModule`."""

from __future__ import annotations

from typing import Any

from projects.efficientvit.model import build, load_official_checkpoint
from shared.lit.classification import ClassificationModule


class EfficientViTModule(ClassificationModule):
    """An EfficientViT (`variant` m0..m5, `model_kwargs` overriding its constructor arguments) trained with
    cross-entropy, label smoothing, optional mixup/cutmix and distillation, and AGC clipping (0.02, the paper's).

    Args:
        variant: paper configuration m0..m5.
        num_classes, img_size: the task; the model is built for `img_size` (attention windows follow it).
        model_kwargs: EfficientViT constructor overrides (embed_dim, depth, num_heads, kernels, fused_attn, ...).
        pretrained: an official checkpoint (`{'model': state_dict}`, e.g. efficientvit_m4.pth) to start from; bias
            tables are resized when `img_size` differs from 224. Its head must have `num_classes` outputs.
        label_smoothing, mixup, grad_clip, distillation, seed, optimizer, scheduler: see `ClassificationModule`;
            with `distillation` the model gets its distillation head (`head_dist`), as the official code does.
    """

    def __init__(
        self,
        variant: str = "m0",
        num_classes: int = 1000,
        img_size: int = 224,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        label_smoothing: float = 0.1,
        mixup: dict[str, Any] | None = None,
        grad_clip: dict[str, Any] | None = None,
        distillation: dict[str, Any] | None = None,
        seed: int = 0,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            optimizer or {"name": "adamw", "lr": 1e-3, "weight_decay": 0.025, "lr_reference_batch": 512},
            scheduler, num_classes=num_classes, img_size=img_size, label_smoothing=label_smoothing, mixup=mixup,
            grad_clip=grad_clip, distillation=distillation, seed=seed,
        )
        self.save_hyperparameters()
        self.model = build(variant, num_classes=num_classes, img_size=img_size,
                           distillation=self.distillation is not None, **(model_kwargs or {}))
        if pretrained:
            load_official_checkpoint(self.model, pretrained)
