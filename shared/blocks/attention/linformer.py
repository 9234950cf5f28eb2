"""Linformer self-attention (Wang et al., 2020, "Linformer: Self-Attention with Linear Complexity", §4, eq. 7).

Keys and values are projected along the sequence axis to `k` rows before softmax attention:
`softmax(Q (E K)^T / sqrt(d)) (F V)`, with E, F of shape (k, N), so time and memory are O(N k). As in the
Long Range Arena code, one projection is learned per layer and shared by keys and values and by all heads (the
paper's "key-value sharing" and "headwise sharing", §4), stored as `lr_kernel` of shape (max_len, k); a shorter
sequence uses its first N rows.

Padding: the official LRA code ignores the padding mask. Here padded keys and values are zeroed before the
projection, so padding cannot change the outputs at real positions (which is what a key-padding mask promises).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from shared.blocks.attention import register_attention
from shared.blocks.attention.softmax import SelfAttention, sdpa


class LinformerAttention(SelfAttention):
    """Softmax attention over `k` learned sequence-axis projections of the keys and values."""

    def __init__(self, dim: int, num_heads: int, *, max_len: int, k: int = 16, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.max_len, self.k = max_len, k
        self.lr_kernel = nn.Parameter(torch.empty(max_len, k))
        nn.init.xavier_uniform_(self.lr_kernel)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        n = k.shape[-2]
        if n > self.max_len:
            raise ValueError(f"Linformer was built for max_len={self.max_len} tokens, got {n}")
        if mask is not None:
            keep = mask[:, None, :, None].to(k.dtype)  # (B, 1, N, 1)
            k, v = k * keep, v * keep
        proj = self.lr_kernel[:n].to(k.dtype)  # (N, k)
        k = torch.einsum("bhnd,nr->bhrd", k, proj)  # (B, nh, k, hd)
        v = torch.einsum("bhnd,nr->bhrd", v, proj)  # (B, nh, k, hd)
        dropout_p = self.attn_drop if self.training else 0.0
        return sdpa(q, k, v, None, dropout_p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_len={self.max_len}, k={self.k}"


@register_attention("linformer")
def linformer_attention(dim: int, num_heads: int, *, max_len: int, k: int = 16, qkv_dim: int | None = None,
                        bias: bool = True, attn_drop: float = 0.0) -> LinformerAttention:
    """Linformer with one shared (max_len, k) projection per layer; LRA's default rank is k = 16."""
    return LinformerAttention(dim, num_heads, max_len=max_len, k=k, qkv_dim=qkv_dim, bias=bias, attn_drop=attn_drop)
