"""Normalisation layers shared by the sequence models.

`RMSNorm` (Zhang & Sennrich 2019), as LLaMA uses it: x / sqrt(mean(x^2) + eps) * g, computed in float32 and
cast back, so bf16 activations do not lose the small-variance directions before the scale is applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension with an optional learnable gain `weight` (init 1).

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square; LLaMA uses 1e-5 (LLaMA-1: 1e-6).
        elementwise_affine: learn the per-channel gain.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32 at least, whatever the autocast dtype; the gain is applied in the input dtype (LLaMA).
        y = F.rms_norm(x.to(torch.promote_types(x.dtype, torch.float32)), (self.dim,), eps=self.eps).type_as(x)
        return y * self.weight.to(x.dtype) if self.weight is not None else y

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.weight is not None}"
