"""Causal sliding-window attention with an always-visible prefix (Titans, Behrouz et al. 2025, Fig. 3b, eq. 27).

Query i attends to key j when j <= i and either j is one of the first `prefix` positions (Titans' persistent
memory tokens, eq. 19) or j lies in the last `window` positions up to i (i - j < window). `window=None` is plain
causal attention (the Transformer++ baseline), `prefix=0` plain sliding-window attention (Titans MAL, eq. 31).

Two paths compute the same thing from one mask predicate (`sliding_window_mask_mod`):
- "flex": PyTorch FlexAttention with a cached `BlockMask` (torch.compile'd on GPU), which skips the blocks that the
  window masks out, so time is O(N * (window + prefix)) instead of O(N^2);
- "sdpa": `F.scaled_dot_product_attention` with the dense boolean mask (the CPU path; `is_causal` when nothing
  but causality is masked, which selects the flash kernel on GPU).
`backend="auto"` takes flex on CUDA and SDPA elsewhere (FlexAttention has no CPU backward in torch 2.14; its eager
CPU forward exists and is what the tests compare the SDPA path with).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.blocks.attention import register_attention
from shared.blocks.attention.softmax import SelfAttention, keep_nonempty_rows, masked_sdpa
from shared.blocks.rope import RotaryEmbedding

BACKENDS = ("auto", "flex", "sdpa")


def sliding_window_mask_mod(window: int | None, prefix: int):
    """FlexAttention mask predicate (b, h, q_idx, kv_idx) -> bool of the causal window-with-prefix mask.

    It is written with tensor ops only, so it also evaluates on broadcast index grids (the dense SDPA mask).
    """

    def mask_mod(b, h, q_idx, kv_idx):
        causal = kv_idx <= q_idx
        if window is None:
            return causal
        return causal & ((kv_idx < prefix) | (q_idx - kv_idx < window))

    return mask_mod


def dense_mask(mask_mod, q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """Evaluate a mask predicate on all (query, key) pairs: (q_len, kv_len) bool, True where attention is allowed."""
    q_idx = torch.arange(q_len, device=device)[:, None]
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    return mask_mod(0, 0, q_idx, kv_idx)


@lru_cache(maxsize=64)
def _block_mask(key: tuple, q_len: int, kv_len: int, device: str):
    """BlockMasks are built once per (mask, lengths, device): building one scans all blocks."""
    from torch.nn.attention.flex_attention import create_block_mask

    kind, *args = key
    mask_mod = MASK_MODS[kind](*args)
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, mask_key: tuple) -> Tensor:
    """FlexAttention with the cached block mask of `mask_key` = (kind, *args) (see MASK_MODS).

    On CUDA the compiled kernel runs; elsewhere FlexAttention's eager reference (forward only in torch 2.14).
    """
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = _block_mask(mask_key, q.shape[-2], k.shape[-2], str(q.device))
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask)


# kind -> mask-predicate factory; the key of a cached BlockMask is (kind, *factory args). Other files add theirs.
MASK_MODS = {"sliding_window": sliding_window_mask_mod}


def resolve_backend(backend: str, q: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "flex" if q.is_cuda else "sdpa"
    return backend


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None = None, prefix: int = 0,
                             backend: str = "auto") -> Tensor:
    """q, k, v: (B, nh, N, hd) -> (B, nh, N, hd); causal, a window of `window` keys, the first `prefix` keys
    always visible."""
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of tokens or None, got {window}")
    n = q.shape[-2]
    if window is None or window + prefix >= n:
        # The window covers the whole sequence: plain causal attention, which SDPA runs with its flash kernel.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if resolve_backend(backend, q) == "flex":
        return flex_attend(q, k, v, ("sliding_window", window, prefix))
    mask = dense_mask(sliding_window_mask_mod(window, prefix), n, n, q.device)
    return masked_sdpa(q, k, v, mask)


class SlidingWindowAttention(SelfAttention):
    """Causal multi-head self-attention over a sliding window with an always-visible prefix, with RoPE.

    Args (besides `SelfAttention`'s):
        window: keys each query sees (itself included); None = full causal attention.
        prefix: leading positions every later query sees (Titans' persistent memory tokens).
        rope: rotate queries and keys by their positions (RoPE, as LLaMA; Titans follows its recipe).
        rope_base: RoPE's theta.
        max_len: length of the precomputed RoPE table.
        backend: "auto" | "flex" | "sdpa" (see the module docstring).
    """

    def __init__(self, dim: int, num_heads: int, *, window: int | None = None, prefix: int = 0, rope: bool = True,
                 rope_base: float = 10_000.0, max_len: int = 4096, backend: str = "auto",
                 qkv_dim: int | None = None, bias: bool = False) -> None:
        super().__init__(dim, num_heads, qkv_dim=qkv_dim, bias=bias)
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.window, self.prefix, self.backend = window, prefix, backend
        self.rotary = RotaryEmbedding(self.head_dim, base=rope_base, max_seq_len=max_len) if rope else None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q, k, v: (B, nh, N, hd); mask: (B, N) bool key-padding mask (True = real) or None."""
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        if mask is None:
            return sliding_window_attention(q, k, v, self.window, self.prefix, self.backend)
        n = q.shape[-2]
        allowed = dense_mask(sliding_window_mask_mod(self.window, self.prefix), n, n, q.device)  # (N, N)
        allowed = keep_nonempty_rows(allowed[None, None] & mask[:, None, None, :])  # (B, 1, N, N)
        return masked_sdpa(q, k, v, allowed)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, prefix={self.prefix}, backend={self.backend}"


@register_attention("sliding_window")
def sliding_window(dim: int, num_heads: int, *, window: int | None = 256, prefix: int = 0, rope: bool = True,
                   max_len: int = 4096, qkv_dim: int | None = None, bias: bool = False,
                   backend: str = "auto") -> SlidingWindowAttention:
    """Causal sliding-window attention with RoPE and an optional always-visible prefix (Titans' SW-Attn*)."""
    return SlidingWindowAttention(dim, num_heads, window=window, prefix=prefix, rope=rope, max_len=max_len,
                                  qkv_dim=qkv_dim, bias=bias, backend=backend)
