"""Local (block) attention, the "Local Attention" baseline of Long Range Arena (Tay et al., ICLR 2021, §4).

The sequence is cut into non-overlapping blocks of `block_size` tokens and softmax attention runs inside each
block only, so time and memory are O(N * block_size). The sequence is padded at the end to a multiple of the
block size; those positions are masked keys like any padding.

The official Flax implementation reshapes `(B, N, ...)` to `(B, block_size, N / block_size, ...)` and attends
along the block_size axis, which groups tokens i, i + N/b, i + 2N/b, ... (a strided pattern) rather than
neighbours, and it needs N to be a multiple of the block size. This module attends over contiguous blocks, the
local attention the paper describes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from shared.blocks.attention import register_attention
from shared.blocks.attention.softmax import SelfAttention, keep_nonempty_rows, sdpa


class LocalAttention(SelfAttention):
    """Softmax attention inside contiguous blocks of `block_size` tokens (see the module docstring)."""

    def __init__(self, dim: int, num_heads: int, *, block_size: int = 50, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.block_size = block_size

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        b, nh, n, hd = q.shape
        w = self.block_size
        pad = -n % w
        if mask is None:
            mask = q.new_ones(b, n, dtype=bool)
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, nh, N + pad, hd)
            mask = F.pad(mask, (0, pad), value=False)  # (B, N + pad)
        nb = (n + pad) // w
        q, k, v = (t.reshape(b, nh * nb, w, hd) for t in (q, k, v))  # (B, nh * nb, w, hd): one row per block
        block_mask = keep_nonempty_rows(mask.view(b, 1, nb, w))  # (B, 1, nb, w)
        block_mask = block_mask.expand(b, nh, nb, w).reshape(b, nh * nb, 1, w)  # (B, nh * nb, 1, w)
        dropout_p = self.attn_drop if self.training else 0.0
        y = sdpa(q, k, v, block_mask, dropout_p)  # (B, nh * nb, w, hd)
        return y.reshape(b, nh, nb * w, hd)[:, :, :n]  # (B, nh, N, hd)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"


@register_attention("local")
def local_attention(dim: int, num_heads: int, *, block_size: int = 50, qkv_dim: int | None = None,
                    bias: bool = True, attn_drop: float = 0.0) -> LocalAttention:
    """Block-local softmax attention; LRA's default block size is 50."""
    return LocalAttention(dim, num_heads, block_size=block_size, qkv_dim=qkv_dim, bias=bias, attn_drop=attn_drop)
