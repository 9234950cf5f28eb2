"""Segmented attention with persistent and long-term-memory tokens (Titans MAC, Behrouz et al. 2025, eqs. 22-23,
Fig. 3a).

The sequence is cut into segments of `segment_len` tokens; each segment attends causally within itself, to the
`num_persistent` persistent tokens (visible to every segment) and to its own long-term-memory tokens. Keys and
values are laid out as

    [p_1 .. p_Np] || [h^(1) || S^(1)] || [h^(2) || S^(2)] || ...

(h^(s): the segment's memory tokens, S^(s): its tokens); queries are the tokens S only, since only their outputs
are used (y_t = Attn(S~^(t)) restricted to the segment). With `aligned_memory=True` the memory tokens are one per
token (Titans' h_t = M*_{t-1}(q_t) with q_t = S^(t) W_Q, so h_j is a function of token j) and token j sees h_i only
for i <= j: otherwise a token would read a function of a later token. With `aligned_memory=False` the memory
tokens are a fixed number that depends on the past only, and every token of the segment sees all of them.

Like `sliding_window.py`, a FlexAttention path (cached BlockMask, compiled on GPU) and an SDPA dense-mask path
are driven by one mask predicate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shared.blocks.attention.sliding_window import BACKENDS, MASK_MODS, dense_mask, flex_attend, resolve_backend
from shared.blocks.attention.softmax import SelfAttention, masked_sdpa
from shared.blocks.rope import RotaryEmbedding, apply_rotary


def segmented_mask_mod(segment_len: int, num_persistent: int, num_memory: int, aligned_memory: bool):
    """Mask predicate (b, h, q_idx, kv_idx) -> bool for token queries against the [P || (h || S)...] key layout."""
    unit = num_memory + segment_len  # keys per segment

    def mask_mod(b, h, q_idx, kv_idx):
        q_seg, q_time = q_idx // segment_len, q_idx % segment_len
        r = kv_idx - num_persistent
        k_seg, local = r // unit, r % unit
        is_memory = local < num_memory
        k_time = torch.where(is_memory, local, local - num_memory)
        visible = k_time <= q_time
        if not aligned_memory:
            visible = visible | is_memory
        return (kv_idx < num_persistent) | ((r >= 0) & (k_seg == q_seg) & visible)

    return mask_mod


MASK_MODS["segmented"] = segmented_mask_mod


def segmented_attention(q: Tensor, k: Tensor, v: Tensor, segment_len: int, num_persistent: int = 0,
                        num_memory: int = 0, aligned_memory: bool = True, backend: str = "auto") -> Tensor:
    """q: (B, nh, N, hd) token queries; k, v: (B, nh, Np + n_seg * (Nl + segment_len), hd) in the layout of the
    module docstring, with N = n_seg * segment_len. Returns (B, nh, N, hd)."""
    n, n_kv = q.shape[-2], k.shape[-2]
    if n % segment_len:
        raise ValueError(f"{n} tokens are not a whole number of segments of {segment_len}")
    expected = num_persistent + (n // segment_len) * (num_memory + segment_len)
    if n_kv != expected:
        raise ValueError(f"segmented attention expects {expected} keys (Np={num_persistent} + segments x "
                         f"(Nl={num_memory} + {segment_len})), got {n_kv}")
    if aligned_memory and num_memory not in (0, segment_len):
        raise ValueError(f"aligned memory tokens are one per token: num_memory={num_memory} != "
                         f"segment_len={segment_len}")
    args = (segment_len, num_persistent, num_memory, aligned_memory)
    if resolve_backend(backend, q) == "flex":
        return flex_attend(q, k, v, ("segmented", *args))
    mask = dense_mask(segmented_mask_mod(*args), n, n_kv, q.device)
    return masked_sdpa(q, k, v, mask)


class SegmentedAttention(SelfAttention):
    """Multi-head attention of Titans MAC over [persistent || memory tokens || segment] (see the module docstring).

    Args (besides `SelfAttention`'s):
        segment_len: tokens per segment (MAC's C).
        aligned_memory: one memory token per token, seen causally (Titans' h_t); else a fixed set seen by all.
        rope: RoPE inside each segment: persistent tokens take positions 0..Np-1, then token j (and its memory
            token, when aligned) position Np + j; unaligned memory tokens come before the tokens.
        backend: "auto" | "flex" | "sdpa".
    """

    def __init__(self, dim: int, num_heads: int, *, segment_len: int, aligned_memory: bool = True, rope: bool = True,
                 rope_base: float = 10_000.0, max_len: int = 4096, backend: str = "auto", qkv_dim: int | None = None,
                 bias: bool = False) -> None:
        super().__init__(dim, num_heads, qkv_dim=qkv_dim, bias=bias)
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.segment_len, self.aligned_memory, self.backend = segment_len, aligned_memory, backend
        self.rotary = RotaryEmbedding(self.head_dim, base=rope_base, max_seq_len=max_len) if rope else None

    def positions(self, num_persistent: int, num_memory: int, segment_len: int, n_seg: int,
                  device: torch.device) -> tuple[Tensor, Tensor]:
        """RoPE positions of the token queries (N,) and of the keys (Np + n_seg * (Nl + C),)."""
        tokens = torch.arange(segment_len, device=device) + num_persistent + (0 if self.aligned_memory else num_memory)
        memory = torch.arange(num_memory, device=device) + num_persistent
        unit = torch.cat([memory, tokens])
        keys = torch.cat([torch.arange(num_persistent, device=device), unit.repeat(n_seg)])
        return tokens.repeat(n_seg), keys

    def forward(self, x: Tensor, memory: Tensor | None = None, persistent: Tensor | None = None) -> Tensor:
        """x: (B, N, C) tokens, N a multiple of segment_len (or one shorter segment); memory: (B, n_seg * Nl, C)
        memory tokens, segment by segment, or None; persistent: (Np, C) or None. Returns (B, N, C)."""
        b, n, c = x.shape
        seg = min(self.segment_len, n)
        n_seg = -(-n // seg)
        num_memory = 0 if memory is None else memory.shape[1] // n_seg
        num_persistent = 0 if persistent is None else persistent.shape[0]
        parts = [x.view(b, n_seg, seg, c)]  # (B, n_seg, C_seg, C)
        if memory is not None:
            parts.insert(0, memory.view(b, n_seg, num_memory, c))  # (B, n_seg, Nl, C)
        kv_in = torch.cat(parts, dim=2).reshape(b, -1, c)  # (B, n_seg * (Nl + C_seg), C)
        if persistent is not None:
            kv_in = torch.cat([persistent.to(x.dtype).expand(b, -1, -1), kv_in], dim=1)  # (B, Np + ..., C)
        q, k, v = self._heads(self.query(x)), self._heads(self.key(kv_in)), self._heads(self.value(kv_in))
        if self.rotary is not None:
            q_pos, k_pos = self.positions(num_persistent, num_memory, seg, n_seg, x.device)
            end = num_persistent + num_memory + seg
            q = apply_rotary(q, *self.rotary.at(q_pos, end))
            k = apply_rotary(k, *self.rotary.at(k_pos, end))
        y = segmented_attention(q, k, v, seg, num_persistent, num_memory, self.aligned_memory, self.backend)
        return self.out(y.transpose(1, 2).reshape(b, n, self.qkv_dim))  # (B, N, C)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, segment_len={self.segment_len}, aligned_memory={self.aligned_memory}"
