"""Rotary position embedding (RoPE; Su et al. 2021, "RoFormer", eq. 34), LLaMA's positional scheme.

Pairs of channels are rotated by the angle `position * base^(-2i/d)`. We pair channel i with channel i + d/2
(the "rotate half" layout of GPT-NeoX and Hugging Face LLaMA) rather than adjacent channels (Meta's complex
layout): the two are the same map up to a fixed permutation of the q/k projection rows.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (..., T, head_dim) by the angles whose cos/sin are (T, head_dim) (broadcast over the rest)."""
    # Rotate in float32 and cast back once, so bf16 inputs are rounded once rather than after each product.
    return (x.float() * cos + rotate_half(x.float()) * sin).type_as(x)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for one head size; `forward(q, k, offset)` returns the rotated q and k.

    Args:
        head_dim: channels per head (even).
        base: the wavelength base theta (10,000 in RoFormer and LLaMA-1/2).
        max_seq_len: length of the precomputed tables; longer inputs compute theirs on the fly.
    """

    def __init__(self, head_dim: int, base: float = 10_000.0, max_seq_len: int = 4096) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim, self.base, self.max_seq_len = head_dim, base, max_seq_len
        cos, sin = self._tables(max_seq_len, None)  # default device: building on `meta` stays free
        # Not saved in checkpoints: the tables are a function of (head_dim, base); buffers follow .to(device).
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, length: int, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim)
        freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)  # (T, hd/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim): channels i and i + d/2 share an angle
        return angles.cos(), angles.sin()

    def cos_sin(self, length: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of positions offset .. offset + length - 1, each (length, head_dim), float32."""
        end = offset + length
        if end <= self.max_seq_len:
            return self.cos[offset:end], self.sin[offset:end]
        cos, sin = self._tables(end, self.cos.device)
        return cos[offset:], sin[offset:]

    def at(self, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at arbitrary integer `positions` (N,) below `end`, each (N, head_dim), float32 (e.g. tokens
        that share a position). `end` is given rather than read from the tensor: no device sync, works on meta."""
        cos, sin = self.cos_sin(end)
        return cos[positions], sin[positions]

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: (B, nh, T, head_dim) -> rotated q, k of the same shapes and dtype; `offset` is the first position."""
        cos, sin = self.cos_sin(q.shape[-2], offset)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, max_seq_len={self.max_seq_len}"
