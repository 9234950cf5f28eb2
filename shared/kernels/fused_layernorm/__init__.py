"""Fused add-bias + residual + LayerNorm: `add_layernorm(x, residual, weight, bias, eps, x_bias=None)`.

    y = add_layernorm(h @ W.T, residual, ln.weight, ln.bias, ln.eps, x_bias=dense.bias)   # post-LN sub-layer end

Dispatch: CUDA tensors without gradients go to the Triton kernel (`triton_layernorm.py`, forward only; one pass
instead of three); training and every other device use the PyTorch reference (`reference.py`, the spec, autograd).
`FORMERLAB_FUSED_LAYERNORM=reference|triton` forces a path (on CPU `triton` needs `TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from shared.kernels.fused_layernorm.reference import add_layernorm_reference

__all__ = ["add_layernorm", "add_layernorm_reference"]

ENV_VAR = "FORMERLAB_FUSED_LAYERNORM"


def add_layernorm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float, x_bias: Tensor | None = None
) -> Tensor:
    """LayerNorm(x + x_bias + residual) over the last dimension (see the module docstring)."""
    forced = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if forced not in ("auto", "reference", "triton"):
        raise ValueError(f"{ENV_VAR}={forced!r}: expected auto, reference or triton")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, weight, bias, x_bias)
    )
    if forced == "triton" and needs_grad:
        raise RuntimeError(f"{ENV_VAR}=triton is forward-only: unset it to train")
    if forced == "triton" or (forced == "auto" and x.is_cuda and not needs_grad):
        from shared.kernels.fused_layernorm.triton_layernorm import add_layernorm_triton

        return add_layernorm_triton(x, residual, weight, bias, eps, x_bias)
    return add_layernorm_reference(x, residual, weight, bias, eps, x_bias)
