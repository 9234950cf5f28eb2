"""Optimiser and learning-rate schedule factories, configured by plain values (so checkpoints stay loadable).

    optimizer: {name: adamw, lr: 1e-3, weight_decay: 0.05, betas: [0.9, 0.999], lr_reference_batch: 512}
    scheduler: {name: cosine, warmup_epochs: 5, min_lr: 1e-5}
    scheduler: {name: multistep, milestones: [250000, 400000], gamma: 0.5}

Schedules step once per optimiser step. Weight decay skips 1-D parameters (norms, biases) and the names a model
lists in `no_weight_decay()` (timm's convention: position tables, attention biases).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from shared.lit.errors import ConfigError

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the 1-D / listed parameters that are not decayed."""
    skip: set[str] = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            skip |= {f"{prefix}.{name}" if prefix else name for name in module.no_weight_decay()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.9,
    lr_reference_batch: int | None = None,
    global_batch: int | None = None,
) -> torch.optim.Optimizer:
    """The optimiser `name` over `model`'s trainable parameters.

    With `lr_reference_batch`, the learning rate is scaled linearly by `global_batch / lr_reference_batch`
    (the DeiT/Swin/EfficientViT rule).
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"model.optimizer.name={name!r} is not one of {sorted(OPTIMIZERS)}")
    if lr_reference_batch:
        if not global_batch:
            raise ConfigError("model.optimizer.lr_reference_batch needs the global batch size")
        lr = lr * global_batch / lr_reference_batch
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return OPTIMIZERS[name](groups, lr=lr, betas=tuple(betas), eps=eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int | None = None,
    name: str = "constant",
    warmup_steps: int = 0,
    warmup_epochs: float = 0.0,
    warmup_start_factor: float = 0.0,
    min_lr: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> LRScheduler:
    """A per-step schedule: `constant`; `cosine` or `linear` (BERT) decay to `min_lr`; `multistep` (x`gamma` at
    `milestones`); `rsqrt` (LRA's linear warm-up then 1/sqrt(step) decay). All with an optional linear warm-up."""
    if warmup_epochs:
        if not steps_per_epoch:
            raise ConfigError("model.scheduler.warmup_epochs needs an epoch-based run (trainer.max_epochs)")
        warmup_steps = round(warmup_epochs * steps_per_epoch)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    floor = [min_lr / lr if lr else 0.0 for lr in base_lrs]
    milestones = sorted(int(m) for m in milestones)

    def warm(step: int) -> float:
        return warmup_start_factor + (1 - warmup_start_factor) * step / warmup_steps

    def factor(step: int, group: int) -> float:
        if name == "rsqrt":
            warmup = max(warmup_steps, 1)
            return min(1.0, (step + 1) / warmup) * math.sqrt(warmup / max(step + 1, warmup))
        if step < warmup_steps:
            return warm(step)
        if name == "constant":
            return 1.0
        if name == "cosine":
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return floor[group] + (1 - floor[group]) * 0.5 * (1 + math.cos(math.pi * progress))
        if name == "linear":
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return floor[group] + (1 - floor[group]) * (1 - progress)
        if name == "multistep":
            return gamma ** sum(step >= m for m in milestones)
        raise ConfigError(f"model.scheduler.name={name!r} is not one of constant, cosine, linear, multistep, rsqrt")

    factor(0, 0)  # fail on a bad name now, not at the first step
    return LambdaLR(optimizer, [lambda s, g=g: factor(s, g) for g in range(len(base_lrs))])
