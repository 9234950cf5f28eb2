"""Gated feed-forward blocks. For a plain two-layer MLP use `timm.layers.Mlp`.

`SwiGLU` is the feed-forward of LLaMA (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6):
FFN(x) = W_down (SiLU(W_gate x) * (W_up x)), without biases. Parameter names follow Hugging Face LLaMA
(`gate_proj`, `up_proj`, `down_proj`), so its checkpoints map one-to-one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def llama_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA's hidden width: 2/3 of 4*dim (same parameters as a 4x GELU MLP), times an optional multiplier,
    rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """Args:
    dim: input and output width.
    hidden_dim: inner width (default: `llama_hidden_dim(dim)`).
    bias: biases on the three projections (LLaMA: none).
    dropout: on the output.
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        hidden_dim = hidden_dim or llama_hidden_dim(dim)
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))
