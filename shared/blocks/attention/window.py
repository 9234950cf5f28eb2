"""Window multi-head self-attention with a relative position bias (Swin Transformer, Liu et al., ICCV 2021, §3.2).

Tokens attend only inside non-overlapping `Wh x Ww` windows; every head adds a learned bias `B` gathered from a
table of `(2Wh - 1)(2Ww - 1)` relative offsets (Swin eq. 4): `Attention(Q, K, V) = SoftMax(Q K^T / sqrt(d) + B) V`.
Shifted windows (SW-MSA) roll the feature map by half a window and mask the pairs of tokens that the roll brought
together from distant image regions with -100 (Swin's and HAT's value, not -inf: the softmax stays finite, and the
numbers match the official models to float32 rounding).

Two paths compute the same thing. The fused path hands the bias (plus the shift mask) to PyTorch's
`F.scaled_dot_product_attention` as an additive float mask, so that a fused kernel can run on GPU; the math path
writes the equation out and is the readable reference the fused path is tested against. `use_fused_attn(head_dim)`
gives the default: the fused path where a fused SDPA kernel can take the head size (a multiple of 8), the math path
otherwise. Measured on an H200 (torch 2.11, `scripts/bench_hat.py`, 2026-11-29): with HAT's head size 30 every fused
kernel declines, SDPA runs its own math kernel, and that is 9-18 % slower than the explicit math path. The
environment variable `FORMERLAB_FUSED_ATTN=1` / `=0` forces one path everywhere (as timm's `TIMM_FUSED_ATTN`); each
module keeps its choice in a `fused_attn` attribute that `set_fused_attn` flips.

Used by: Swin-style window attention (SLAB), HAT's hybrid attention block (which keeps the index as a model-level
buffer and passes it in as `rpi`, so its state_dict matches the official one key for key).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from shared.blocks.attention.softmax import masked_sdpa


def use_fused_attn(head_dim: int | None = None) -> bool:
    """The default attention path for heads of `head_dim` channels (module docstring)."""
    setting = os.environ.get("FORMERLAB_FUSED_ATTN", "auto").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return head_dim is None or head_dim % 8 == 0


def set_fused_attn(module: nn.Module, enabled: bool) -> None:
    """Choose the fused (True) or math (False) attention path for every submodule of `module` that has one."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = enabled


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def window_partition(x: torch.Tensor, window_size: int | tuple[int, int]) -> torch.Tensor:
    """Cut `(B, H, W, C)` into windows `(B * nW, Wh, Ww, C)`, window-major within each image (row by row)."""
    wh, ww = _pair(window_size)
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c)  # (B, H/Wh, Wh, W/Ww, Ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, wh, ww, c)  # (B * nW, Wh, Ww, C)


def window_reverse(windows: torch.Tensor, window_size: int | tuple[int, int], height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: `(B * nW, Wh, Ww, C)` back to `(B, H, W, C)`."""
    wh, ww = _pair(window_size)
    c = windows.shape[-1]
    x = windows.view(-1, height // wh, width // ww, wh, ww, c)  # (B, H/Wh, W/Ww, Wh, Ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, height, width, c)  # (B, H, W, C)


def relative_position_index(window_size: int | tuple[int, int]) -> torch.Tensor:
    """Swin's index into the bias table for every (query, key) pair of a window: `(Wh*Ww, Wh*Ww)` int64.

    The offset (dy, dx) in [-(Wh-1), Wh-1] x [-(Ww-1), Ww-1] maps to `(dy + Wh - 1) * (2Ww - 1) + (dx + Ww - 1)`.
    """
    wh, ww = _pair(window_size)
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2): query minus key
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def _shift_regions(window: int, shift: int) -> tuple[slice, ...]:
    # Along one axis: no shift leaves one region; a shift leaves three (see shifted_window_mask).
    if shift == 0:
        return (slice(None),)
    return slice(0, -window), slice(-window, -shift), slice(-shift, None)


def shifted_window_mask(
    height: int,
    width: int,
    window_size: int | tuple[int, int],
    shift_size: int | tuple[int, int],
    fill: float = -100.0,
) -> torch.Tensor:
    """The additive SW-MSA mask `(nW, N, N)` for a `height x width` map rolled by `-shift_size` (Swin §3.2, fig. 4).

    The rolled map is labelled in up to 3 x 3 regions (the bulk, the last window minus the shift, the wrapped-around
    shift); a pair of tokens from different regions gets `fill`, a pair from the same region 0.
    """
    wh, ww = _pair(window_size)
    sh, sw = _pair(shift_size)
    labels = torch.zeros(1, height, width, 1)
    region = 0
    for rows in _shift_regions(wh, sh):
        for cols in _shift_regions(ww, sw):
            labels[:, rows, cols, :] = region
            region += 1
    windows = window_partition(labels, (wh, ww)).view(-1, wh * ww)  # (nW, N)
    different = windows.unsqueeze(1) != windows.unsqueeze(2)  # (nW, N, N)
    return torch.zeros(different.shape).masked_fill(different, fill)


def biased_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    fused: bool = True,
) -> torch.Tensor:
    """`softmax(q k^T * scale + bias) v` for q `(..., nh, Nq, hd)`, k and v `(..., nh, Nk, hd)`, and a float `bias`
    broadcastable to `(..., nh, Nq, Nk)`. Returns `(..., nh, Nq, hd)`.

    The math path multiplies q by the scale first (as Swin and HAT do) and broadcasts the bias without copying it.
    The fused path flattens the leading dims to SDPA's 4-d layout, materialising the bias only where it varies over
    them (e.g. per-window shift masks), and casts it to q's dtype as SDPA requires under autocast.
    """
    if not fused:
        attn = (q * scale) @ k.transpose(-2, -1) + bias  # (..., nh, Nq, Nk)
        attn = attn.softmax(dim=-1)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        return attn @ v
    if q.dim() == 4:
        return masked_sdpa(q, k, v, bias.to(q.dtype), dropout_p=dropout_p, scale=scale)
    *lead, nh, nq, hd = q.shape
    nk = k.shape[-2]
    bias = bias.expand(*lead, nh, nq, nk).reshape(-1, nh, nq, nk)  # (prod(lead), nh, Nq, Nk)
    out = masked_sdpa(
        q.reshape(-1, nh, nq, hd), k.reshape(-1, nh, nk, hd), v.reshape(-1, nh, nk, hd),
        bias.to(q.dtype), dropout_p=dropout_p, scale=scale,
    )  # (prod(lead), nh, Nq, hd)
    return out.view(*lead, nh, nq, hd)


class WindowAttention(nn.Module):
    """(Shifted) window multi-head self-attention with a relative position bias (Swin eq. 4).

    Args:
        dim: channels C of the tokens.
        window_size: Wh (= Ww when an int) or (Wh, Ww).
        num_heads: heads; head_dim = C / num_heads.
        qkv_bias: learn a bias for the q, k, v projections.
        qk_scale: overrides the default scale head_dim ** -0.5.
        attn_drop: dropout on the attention weights. proj_drop: dropout after the output projection.
        own_index: register the relative position index as this module's buffer `relative_position_index`
            (Swin's layout); off, the caller passes it as `rpi` (HAT keeps one index for the whole model).

    Parameters carry the official names: `relative_position_bias_table` ((2Wh-1)(2Ww-1), nh), `qkv`, `proj`.
    """

    def __init__(
        self,
        dim: int,
        window_size: int | tuple[int, int],
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        own_index: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = _pair(window_size)
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        if own_index:
            self.register_buffer("relative_position_index", relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = use_fused_attn(dim // num_heads)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self, rpi: torch.Tensor | None = None) -> torch.Tensor:
        """The bias B of every head for every (query, key) pair of a window: `(nh, N, N)`."""
        if rpi is None:
            rpi = getattr(self, "relative_position_index", None)
            if rpi is None:
                raise ValueError("WindowAttention built with own_index=False needs the relative position index `rpi`")
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[rpi.reshape(-1)].view(n, n, -1)  # (N, N, nh)
        return bias.permute(2, 0, 1)  # (nh, N, N)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, rpi: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: windows of tokens `(B * nW, N, C)`; mask: additive shift mask `(nW, N, N)` or None;
        rpi: relative position index `(N, N)` (None: the module's own buffer). Returns `(B * nW, N, C)`."""
        b_, n, c = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).reshape(b_, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)  # (3, B*nW, nh, N, hd)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias(rpi)  # (nh, N, N)
        if mask is not None:
            nw = mask.shape[0]
            # Group the windows of each image so the per-window mask broadcasts over the batch.
            q, k, v = (t.view(b_ // nw, nw, nh, n, -1) for t in (q, k, v))  # (B, nW, nh, N, hd)
            bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)  # (nW, nh, N, N)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = biased_attention(q, k, v, bias, self.scale, dropout_p, fused=self.fused_attn)  # (..., nh, N, hd)
        x = x.reshape(b_, nh, n, c // nh).transpose(1, 2).reshape(b_, n, c)  # (B*nW, N, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, fused={self.fused_attn}"
