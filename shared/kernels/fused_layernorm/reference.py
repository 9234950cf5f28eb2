"""Add-bias + residual + LayerNorm in plain PyTorch: the specification.

A post-LN transformer layer (BERT, Devlin et al. 2019; Vaswani et al. 2017 §3.1) ends each sub-layer with

    y = LayerNorm(x + b + residual)

where x = h W^T is the sub-layer's output projection before its bias b. ByteTransformer (Zhai et al. 2023,
`layernorm.cu`) fuses the bias, the residual and the normalisation into one kernel; this is the same
function with float32 statistics (float64 for float64 inputs), returned in x's dtype. Differentiable by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def add_layernorm_reference(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float, x_bias: Tensor | None = None
) -> Tensor:
    """LayerNorm(x + x_bias + residual) over the last dimension, with affine `weight`, `bias`."""
    compute = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute) + residual.to(compute)
    if x_bias is not None:
        h = h + x_bias.to(compute)
    return F.layer_norm(h, h.shape[-1:], weight.to(compute), bias.to(compute), eps).to(x.dtype)
