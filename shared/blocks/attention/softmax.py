"""Softmax multi-head self-attention (Vaswani et al., NeurIPS 2017, eq. 1): `softmax(Q K^T / sqrt(d)) V`.

`SelfAttention` holds what every variant here shares: the `query`, `key`, `value` and `out` projections (named as
in the Flax models of Long Range Arena, so a converted state dict maps key for key), the split into heads and the
merge back. A variant subclasses it and overrides `attend(q, k, v, mask)`, the part that differs. This file's own
core runs PyTorch's `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU); it is the LRA
"Transformer" baseline.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from shared.blocks.attention import register_attention

# Backends allowed when a mask is passed and the key length is not a multiple of CUDNN_KEY_TILE: all but cuDNN.
# On H100/H200, PyTorch >= 2.11 prefers cuDNN attention (its bundled cuDNN passed the version gate), and cuDNN's
# backward with an explicit mask returns NaN in dQ when the key length is 64 modulo 128 and some query row's
# logsumexp is below ln(FLT_MAX) ~ -88.7: the padded half of the last key tile is scored 0 instead of -inf and
# exp(0 - lse) overflows (pytorch/pytorch#196678). Padded batches of variable length meet the first condition about
# every 100 steps and attention logits grown at a high learning rate the second (LRA ListOps went NaN at the
# warm-up peak). The memory-efficient kernel takes the same masks and is clean. Flash stays listed: on the CPU it is
# the kernel that takes masks. A key length that fills whole tiles has no padded tile, and there cuDNN is kept: it
# is 2.6x faster than the memory-efficient kernel on Pathfinder's masked 1,024-pixel attention (H200, heads of 8).
MASKED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
CUDNN_KEY_TILE = 128


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, **kwargs) -> Tensor:
    """`F.scaled_dot_product_attention` with an explicit (bool or additive) mask, on cuDNN only for key lengths
    that are multiples of CUDNN_KEY_TILE (above). Every attention of the repository that passes SDPA a mask goes
    through here."""
    if k.shape[-2] % CUDNN_KEY_TILE == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)
    with sdpa_kernel(MASKED_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)


def keep_nonempty_rows(mask: Tensor) -> Tensor:
    """A (..., N) key mask in which every row that masks all its keys is opened fully instead.

    Such a row belongs to a padded query only (a real query is always its own real key), and a fully masked
    softmax row is NaN, which would then leak through `0 * NaN` into the real positions of the next layer.
    """
    return mask | ~mask.any(dim=-1, keepdim=True)


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
         align: int | None = None) -> Tensor:
    """`F.scaled_dot_product_attention` with the 1/sqrt(head_dim) scale, also fast for small heads.

    On CUDA the fused kernels need head dims that are multiples of 8; LRA's models use 2, 4 and 8 channels per head.
    Zero channels change neither q . k nor the kept channels of the output, so heads are zero-padded to a multiple
    of `align` (default: 8 on CUDA, no padding elsewhere), with the scale of the true head dim, instead of falling
    back to the O(N^2)-memory math path. With a mask, cuDNN attention runs only on whole key tiles
    (see `MASKED_BACKENDS`).
    """
    hd = q.shape[-1]
    pad = -hd % (align or (8 if q.is_cuda else 1))
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    if attn_mask is None:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=hd ** -0.5)
    else:
        y = masked_sdpa(q, k, v, attn_mask, dropout_p=dropout_p, scale=hd ** -0.5)
    return y[..., :hd] if pad else y


class SelfAttention(nn.Module):
    """Multi-head self-attention: x -> (query, key, value) -> `attend` per head -> `out`.

    Args:
        dim: channels C of the tokens.
        num_heads: heads; head_dim = qkv_dim / num_heads.
        qkv_dim: width of the query/key/value projections (LRA's `qkv_dim`; default C).
        bias: learn biases in the four projections (LRA's models use none).
        attn_drop: dropout on the attention weights while training (variants without explicit weights ignore it).
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_dim: int | None = None, bias: bool = True,
                 attn_drop: float = 0.0) -> None:
        super().__init__()
        qkv_dim = qkv_dim or dim
        if qkv_dim % num_heads:
            raise ValueError(f"qkv_dim={qkv_dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.qkv_dim = dim, num_heads, qkv_dim
        self.head_dim = qkv_dim // num_heads
        self.attn_drop = attn_drop
        self.query = nn.Linear(dim, qkv_dim, bias=bias)
        self.key = nn.Linear(dim, qkv_dim, bias=bias)
        self.value = nn.Linear(dim, qkv_dim, bias=bias)
        self.out = nn.Linear(qkv_dim, dim, bias=bias)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, N, C); mask: (B, N) bool, True on real tokens, or None. Returns (B, N, C)."""
        b, n, _ = x.shape
        if mask is not None and mask.shape != (b, n):
            raise ValueError(f"attention mask has shape {tuple(mask.shape)}, expected {(b, n)}")
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        y = self.attend(q, k, v, mask)  # (B, nh, N, hd)
        y = y.transpose(1, 2).reshape(b, n, self.qkv_dim)  # (B, N, qkv_dim)
        return self.out(y)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q, k, v: (B, nh, N, hd); mask: (B, N) or None. Returns (B, nh, N, hd)."""
        attn_mask = None if mask is None else keep_nonempty_rows(mask)[:, None, None, :]  # (B, 1, 1, N)
        dropout_p = self.attn_drop if self.training else 0.0
        return sdpa(q, k, v, attn_mask, dropout_p)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, qkv_dim={self.qkv_dim}"


@register_attention("softmax")
def softmax_attention(dim: int, num_heads: int, *, qkv_dim: int | None = None, bias: bool = True,
                      attn_drop: float = 0.0) -> SelfAttention:
    """Full softmax attention through SDPA, O(N^2) time; the LRA Transformer baseline."""
    return SelfAttention(dim, num_heads, qkv_dim=qkv_dim, bias=bias, attn_drop=attn_drop)

