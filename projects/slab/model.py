"""SLAB: simplified linear attention (SLA) and PRepBN in DeiT, Swin, PVT and CSWin, and a LLaMA-style decoder.

Guo, Chen, Tang, Wang (ICML 2024), "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive
Re-parameterized Batch Normalization", arXiv:2405.11582. Official code: github.com/xinghaochen/SLAB.

SLA (section 3.2, eq. 6-7): with ReLU as the kernel and a learned positional encoding added to the keys,

    O = ReLU(Q) (ReLU(K + P)^T V) / (ReLU(Q) sum_j ReLU(K + P)_j) + DWC(V)

per head, where DWC is one depth-wise 5x5 convolution over V's tokens laid out as an image, shared by the heads.
The attention runs through `shared.kernels.linear_attention` (the chunked Triton kernel on GPU), in float32 with
autocast off as the official SLAB-Swin/DeiT code does (its PVT/CSWin versions run in the input dtype).

Every model keeps the official parameter names, so `load_official(model, path)` loads a released
`checkpoint['model']` strictly; `fold_norms(model)` folds every RepBN into the adjacent linear/conv layer for
deployment (eq. 4). Norms and the schedule live in `projects.slab.norms`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from torch import nn

from projects.slab.norms import fold_after_conv, fold_into_linear, norm_factory
from shared.blocks.attention.window import WindowAttention, shifted_window_mask, window_partition, window_reverse
from shared.kernels.linear_attention import linear_attention
from shared.lit.errors import CheckpointError

NormFactory = Callable[[int], nn.Module]


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0.0 else nn.Identity()


def _drop_path_rates(rate: float, n: int) -> list[float]:
    """Stochastic depth growing linearly from 0 to `rate` over `n` blocks (plain floats: builds on `meta`)."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A region without autocast on `device` (SLA runs in float32), a no-op where autocast does not exist (meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _init_linear(m: nn.Module) -> None:
    """timm / Swin initialisation of the official models: truncated normal (std 0.02) linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------------------
# Simplified linear attention


def simplified_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positional_encoding: torch.Tensor, dwc: nn.Conv2d,
    num_heads: int, size: tuple[int, int], float32: bool,
) -> torch.Tensor:
    """SLA (eq. 6-7) on tokens q, k, v (B, N, C) laid out as an image `size` = (H, W), N = H W; before the output
    projection. Returns (B, N, C)."""
    b, n, c = q.shape
    d = c // num_heads
    q, k = F.relu(q), F.relu(k + positional_encoding)
    q, k, v = (t.reshape(b, n, num_heads, d).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
    if float32:
        with autocast_off(q.device):
            q, k, v = q.float(), k.float(), v.float()
            out = linear_attention(q, k, v, causal=False, normalize=True, eps=1e-6)  # (B, h, N, d)
    else:
        out = linear_attention(q, k, v, causal=False, normalize=True, eps=1e-6)
    feature_map = v.reshape(b * num_heads, n, d).transpose(1, 2).reshape(b * num_heads, d, *size)  # (B h, d, H, W)
    feature_map = dwc(feature_map).reshape(b, num_heads, d, n).transpose(2, 3)  # (B, h, N, d)
    out = out + feature_map
    return out.transpose(1, 2).reshape(b, n, c)  # (B, N, C)


class SimplifiedLinearAttention(nn.Module):
    """SLA with its projections (SLAB-Swin / SLAB-DeiT / SLAB-PVT).

    Args:
        dim: channels C. num_heads: heads h (head dim C / h).
        size: (H, W) of the token grid (a Swin window, the DeiT patch grid, a PVT stage).
        qkv_bias: biases of the q/k/v projections.
        proj_drop: dropout after the output projection.
        kernel_size: of the depth-wise convolution on V (5).
        float32: compute the attention in float32 with autocast off (SLAB-Swin/DeiT; not PVT).
        separate_q: q and kv as two projections `q`, `kv` (PVT's layout) instead of one `qkv`.

    Keys: `qkv` (or `q`, `kv`), `proj`, `dwc`, `positional_encoding` (1, H W, C).
    """

    def __init__(self, dim: int, num_heads: int, size: tuple[int, int], qkv_bias: bool = True,
                 proj_drop: float = 0.0, kernel_size: int = 5, float32: bool = True, separate_q: bool = False) -> None:
        super().__init__()
        self.dim, self.num_heads, self.size, self.float32 = dim, num_heads, tuple(size), float32
        head_dim = dim // num_heads
        if separate_q:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.size[0] * self.size[1], dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C). `mask` (Swin's shift mask) is ignored, as in the official SLA."""
        b, n, c = x.shape
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)  # each (B, N, C)
        else:
            q = self.q(x)
            k, v = self.kv(x).reshape(b, n, 2, c).unbind(2)  # each (B, N, C)
        x = simplified_linear_attention(q, k, v, self.positional_encoding, self.dwc, self.num_heads, self.size,
                                        self.float32)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, num_heads={self.num_heads}, float32={self.float32}"


# ----------------------------------------------------------------------------------------------------------------
# DeiT


class SoftmaxAttention(nn.Module):
    """DeiT's multi-head softmax attention (the PRepBN-only ablation), through SDPA. Keys: `qkv`, `proj`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        x = F.scaled_dot_product_attention(*qkv.unbind(0))  # (B, h, N, d)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class DeiTBlock(nn.Module):
    """Pre-norm transformer block; keys `norm1`, `attn`, `norm2`, `mlp.fc1`, `mlp.fc2`."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], attention: str, mlp_ratio: float,
                 qkv_bias: bool, drop: float, drop_path: float, norm: NormFactory) -> None:
        super().__init__()
        self.norm1 = norm(dim)
        if attention == "linear":
            self.attn: nn.Module = SimplifiedLinearAttention(dim, num_heads, grid, qkv_bias, drop)
        else:
            self.attn = SoftmaxAttention(dim, num_heads, qkv_bias, drop)
        self.drop_path = _drop_path(drop_path)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution, optionally normalised; keys `proj`, `norm`."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 norm: NormFactory | None = None) -> None:
        super().__init__()
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.grid = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.patch_size)
        self.norm = norm(embed_dim) if norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])} but the model is built for {self.img_size}")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))  # (B, H' W', C)

    def fold(self) -> None:
        if not isinstance(self.norm, nn.Identity):
            self.proj, self.norm = fold_after_conv(self.proj, self.norm), nn.Identity()


class SlabDeiT(nn.Module):
    """DeiT with PRepBN and SLA (SLAB-DeiT) or softmax attention (the PRepBN-only DeiT of Table 5).

    Linear attention: no class token in the forward pass (global average pooling; the official model still holds
    an unused `cls_token`), `pos_embed` (1, N, C). Softmax attention: the class token is prepended and classified
    (`pos_embed` (1, N + 1, C)), as in the official `deit.py`.

    Args:
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: DeiT's.
        attention: "linear" (SLA) or "softmax".
        norm: "prepbn", "repbn" or "layernorm" (see `projects.slab.norms.norm_factory`); LN eps 1e-6.
        prepbn_step: the PRepBN handover length before the schedule sets it (official: 60,000; 300,000 in deit.py).
        drop_rate, drop_path_rate: dropout and stochastic depth.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, attention: str = "linear", norm: str = "prepbn", prepbn_step: int = 60000,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if attention not in ("linear", "softmax"):
            raise ValueError(f"attention={attention!r} is not one of linear, softmax")
        self.attention, self.num_classes = attention, num_classes
        norm_layer = norm_factory(norm, eps=1e-6, step=prepbn_step)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid
        num_tokens = grid[0] * grid[1] + (attention == "softmax")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = _drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            DeiTBlock(embed_dim, num_heads, grid, attention, mlp_ratio, qkv_bias, drop_rate, dpr[i], norm_layer)
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, C)
        if self.attention == "softmax":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, C)
        x = self.blocks(self.pos_drop(x + self.pos_embed))
        x = self.norm(x)
        return x[:, 0] if self.attention == "softmax" else x.mean(dim=1)  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def fold_norms(self) -> None:
        for blk in self.blocks:
            blk.attn.qkv, blk.norm1 = fold_into_linear(blk.norm1, blk.attn.qkv), nn.Identity()
            blk.mlp.fc1, blk.norm2 = fold_into_linear(blk.norm2, blk.mlp.fc1), nn.Identity()
        self.head, self.norm = fold_into_linear(self.norm, self.head), nn.Identity()


# ----------------------------------------------------------------------------------------------------------------
# Swin


class SwinBlock(nn.Module):
    """Swin block with SLA ('L') or shifted-window softmax attention ('S').

    As in Swin, a window at least as large as the feature map becomes the whole map and is not shifted; SLAB's
    'L' blocks use window 56, i.e. global attention at 224 input. Shifted 'S' blocks keep their mask in the
    persistent buffer `attn_mask` (it is in the official state dict).
    """

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window_size: int, shift_size: int,
                 attn_type: str, mlp_ratio: float, qkv_bias: bool, drop: float, drop_path: float,
                 norm: NormFactory, kernel_size: int) -> None:
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= window_size:
            window_size, shift_size = min(resolution), 0
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = norm(dim)
        if attn_type == "L":
            self.attn: nn.Module = SimplifiedLinearAttention(dim, num_heads, (window_size, window_size), qkv_bias,
                                                             drop, kernel_size, float32=True)
        elif attn_type == "S":
            self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, proj_drop=drop, own_index=True)
        else:
            raise ValueError(f"attn_type {attn_type!r}: each block is 'L' (linear) or 'S' (softmax window)")
        self.drop_path = _drop_path(drop_path)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        mask = shifted_window_mask(*resolution, window_size, shift_size) if shift_size > 0 else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, n, c = x.shape
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, ws).view(-1, ws * ws, c)  # (B nW, ws ws, C)
        windows = self.attn(windows, mask=self.attn_mask)
        x = window_reverse(windows.view(-1, ws, ws, c), ws, h, w)  # (B, H, W, C)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(b, n, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def fold(self) -> None:
        self.attn.qkv, self.norm1 = fold_into_linear(self.norm1, self.attn.qkv), nn.Identity()
        self.mlp.fc1, self.norm2 = fold_into_linear(self.norm2, self.mlp.fc1), nn.Identity()


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (4C), normalised, reduced to 2C; keys `reduction`, `norm`."""

    def __init__(self, resolution: tuple[int, int], dim: int, norm: NormFactory) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        # the official order of the four neighbours: (0,0), (1,0), (0,1), (1,1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = x.view(b, -1, 4 * c)  # (B, H W / 4, 4C)
        return self.reduction(self.norm(x))  # (B, H W / 4, 2C)

    def fold(self) -> None:
        self.reduction, self.norm = fold_into_linear(self.norm, self.reduction), nn.Identity()


class SwinStage(nn.Module):
    """Blocks of one resolution, then patch merging; keys `blocks`, `downsample`."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window_size: int,
                 attn_type: str, mlp_ratio: float, qkv_bias: bool, drop: float, drop_path: Sequence[float],
                 norm: NormFactory, downsample: bool, kernel_size: int) -> None:
        super().__init__()
        # SLAB keeps its large window for 'L' blocks and uses Swin's 7 (12 for windows above 56) for 'S' blocks.
        ws = window_size if attn_type == "L" else (7 if window_size <= 56 else 12)
        self.blocks = nn.ModuleList([
            SwinBlock(dim, resolution, num_heads, ws, 0 if i % 2 == 0 else ws // 2, attn_type, mlp_ratio, qkv_bias,
                      drop, drop_path[i], norm, kernel_size)
            for i in range(depth)
        ])
        self.downsample = PatchMerging(resolution, dim, norm) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class SlabSwin(nn.Module):
    """Swin Transformer with SLA stages ('L') and window-softmax stages ('S'), every norm a PRepBN (SLAB-Swin);
    with `attn_type="SSSS"`, `window_size=7` it is the PRepBN Swin of Table 5.

    Args:
        img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads, mlp_ratio, qkv_bias: Swin's.
        window_size: window of the 'L' stages (SLAB: 56, global at 224 input); 'S' stages use 7.
        attn_type: one letter per stage, 'L' or 'S' (SLAB: "LLSS").
        norm: "prepbn", "repbn" or "layernorm"; LN eps 1e-5. prepbn_step: see `SlabDeiT`.
        kernel_size: SLA's depth-wise convolution. ape, patch_norm: Swin's options.
        drop_rate, drop_path_rate: dropout and stochastic depth.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 56, attn_type: str = "LLSS", mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm: str = "prepbn", prepbn_step: int = 60000, kernel_size: int = 5, ape: bool = False,
                 patch_norm: bool = True, drop_rate: float = 0.0, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        if len(attn_type) != len(depths):
            raise ValueError(f"attn_type={attn_type!r} needs one letter per stage ({len(depths)} stages)")
        self.num_classes = num_classes
        norm_layer = norm_factory(norm, eps=1e-5, step=prepbn_step)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        grid = self.patch_embed.grid
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = _drop_path_rates(drop_path_rate, sum(depths))
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(SwinStage(
                embed_dim * 2**i, (grid[0] // 2**i, grid[1] // 2**i), depth, num_heads[i], window_size, attn_type[i],
                mlp_ratio, qkv_bias, drop_rate, dpr[sum(depths[:i]) : sum(depths[: i + 1])], norm_layer,
                downsample=i < len(depths) - 1, kernel_size=kernel_size,
            ))
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_linear)

    def no_weight_decay(self) -> set[str]:
        names = {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}
        return names | ({"absolute_pos_embed"} if hasattr(self, "absolute_pos_embed") else set())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, C)
        if hasattr(self, "absolute_pos_embed"):
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).mean(dim=1)  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def fold_norms(self) -> None:
        self.patch_embed.fold()
        for layer in self.layers:
            for blk in layer.blocks:
                blk.fold()
            if layer.downsample is not None:
                layer.downsample.fold()
        self.head, self.norm = fold_into_linear(self.norm, self.head), nn.Identity()


# ----------------------------------------------------------------------------------------------------------------
# PVT


class PVTBlock(nn.Module):
    """PVT block with SLA (no spatial reduction: SLAB-PVT's `la_sr_ratios` are all 1); keys `norm1`,
    `attn.{q,kv,proj,dwc,positional_encoding}`, `norm2`, `mlp`."""

    def __init__(self, dim: int, grid: tuple[int, int], num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float,
                 drop_path: float, norm: NormFactory, kernel_size: int) -> None:
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = SimplifiedLinearAttention(dim, num_heads, grid, qkv_bias, drop, kernel_size, float32=False,
                                              separate_q=True)
        self.drop_path = _drop_path(drop_path)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def fold(self) -> None:
        a = self.norm1
        self.attn.q, self.attn.kv = fold_into_linear(a, self.attn.q), fold_into_linear(a, self.attn.kv)
        self.norm1 = nn.Identity()
        self.mlp.fc1, self.norm2 = fold_into_linear(self.norm2, self.mlp.fc1), nn.Identity()


class SlabPVT(nn.Module):
    """Pyramid Vision Transformer with SLA in every stage and PRepBN (SLAB-PVT, attention type "LLLL").

    Four stages, each a patch embedding (`patch_embed{i}`: conv + norm), a position embedding `pos_embed{i}` and
    blocks `block{i}`; no final norm; the head classifies the mean token. LN eps 1e-6; the official PRepBN step
    is 300,000 here.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 320, 512), num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), depths: Sequence[int] = (2, 2, 2, 2),
                 qkv_bias: bool = True, norm: str = "prepbn", prepbn_step: int = 300000, kernel_size: int = 5,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes, self.num_stages = num_classes, len(depths)
        norm_layer = norm_factory(norm, eps=1e-6, step=prepbn_step)
        dpr = _drop_path_rates(drop_path_rate, sum(depths))
        for i in range(self.num_stages):
            embed = PatchEmbed(img_size // (patch_size * 2 ** (i - 1)) if i else img_size,
                               patch_size if i == 0 else 2, in_chans if i == 0 else embed_dims[i - 1], embed_dims[i],
                               norm_layer)
            grid = embed.grid
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dims[i])))
            setattr(self, f"pos_drop{i + 1}", nn.Dropout(drop_rate))
            setattr(self, f"block{i + 1}", nn.ModuleList([
                PVTBlock(embed_dims[i], grid, num_heads[i], mlp_ratios[i], qkv_bias, drop_rate,
                         dpr[sum(depths[:i]) + j], norm_layer, kernel_size)
                for j in range(depths[i])
            ]))
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        for i in range(self.num_stages):
            trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        self.apply(_init_linear)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}  # the official list (PVT decays its position embeddings)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        for i in range(1, self.num_stages + 1):
            embed = getattr(self, f"patch_embed{i}")
            x = getattr(self, f"pos_drop{i}")(embed(x) + getattr(self, f"pos_embed{i}"))  # (B, N_i, C_i)
            for blk in getattr(self, f"block{i}"):
                x = blk(x)
            if i < self.num_stages:
                x = x.reshape(b, *embed.grid, -1).permute(0, 3, 1, 2)  # (B, C_i, H_i, W_i)
        return x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def fold_norms(self) -> None:
        for i in range(1, self.num_stages + 1):
            getattr(self, f"patch_embed{i}").fold()
            for blk in getattr(self, f"block{i}"):
                blk.fold()


# ----------------------------------------------------------------------------------------------------------------
# CSWin


def img2stripes(x: torch.Tensor, size: tuple[int, int], stripe: tuple[int, int]) -> torch.Tensor:
    """(B, H W, C) tokens -> (B nS, Hs Ws, C) stripes of `stripe` = (Hs, Ws), stripe-major, row-major inside."""
    b, _, c = x.shape
    (h, w), (hs, ws) = size, stripe
    x = x.view(b, h // hs, hs, w // ws, ws, c)  # (B, H/Hs, Hs, W/Ws, Ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, hs * ws, c)  # (B nS, Hs Ws, C)


def stripes2img(x: torch.Tensor, size: tuple[int, int], stripe: tuple[int, int]) -> torch.Tensor:
    """Inverse of `img2stripes`: (B nS, Hs Ws, C) -> (B, H W, C)."""
    (h, w), (hs, ws) = size, stripe
    c = x.shape[-1]
    x = x.view(-1, h // hs, w // ws, hs, ws, c)  # (B, H/Hs, W/Ws, Hs, Ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h * w, c)  # (B, H W, C)


class CSWinBranch(nn.Module):
    """One CSWin branch: attention inside horizontal (idx 1) or vertical (idx 0) stripes of width `split`, or over
    the whole map (idx -1), plus LePE (a 3x3 depth-wise conv `get_v` of V inside each stripe).

    `linear=True` is SLAB's SLA branch (keys `get_v`, `dwc`, `scale` (unused, kept for the official layout),
    `positional_encoding`); otherwise CSWin's LePE softmax attention (key `get_v`). Input: q, k, v (B, H W, C').
    """

    def __init__(self, dim: int, resolution: int, idx: int, split: int, num_heads: int, linear: bool,
                 kernel_size: int) -> None:
        super().__init__()
        self.resolution, self.num_heads, self.linear = resolution, num_heads, linear
        self.stripe = {-1: (resolution, resolution), 0: (resolution, split), 1: (split, resolution)}[idx]
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        head_dim = dim // num_heads
        if linear:
            self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
            self.scale = nn.Parameter(torch.zeros(1, 1, dim))
            self.positional_encoding = nn.Parameter(torch.zeros(1, self.stripe[0] * self.stripe[1], dim))
        else:
            self.softmax_scale = head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, c = q.shape
        size, (hs, ws) = (self.resolution, self.resolution), self.stripe
        h, d = self.num_heads, c // self.num_heads
        q, k, v = (img2stripes(t, size, self.stripe) for t in (q, k, v))  # (B', Hs Ws, C)
        bs = q.shape[0]
        v_map = v.transpose(1, 2).reshape(bs, c, hs, ws)  # (B', C, Hs, Ws)
        lepe = self.get_v(v_map).reshape(bs, c, hs * ws).transpose(1, 2)  # (B', N', C)
        if self.linear:
            x = simplified_linear_attention(q, k, v, self.positional_encoding, self.dwc, h, (hs, ws), float32=False)
        else:
            q, k, v = (t.reshape(bs, hs * ws, h, d).transpose(1, 2) for t in (q, k, v))  # (B', h, N', d)
            x = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale)
            x = x.transpose(1, 2).reshape(bs, hs * ws, c)  # (B', N', C)
        return stripes2img(x + lepe, size, self.stripe)  # (B, H W, C)


class CSWinBlock(nn.Module):
    """CSWin block: shared `qkv`, two stripe branches on half the channels each (one over the whole map when the
    stripe covers it, or in the last stage), `proj`, MLP."""

    def __init__(self, dim: int, resolution: int, num_heads: int, split: int, attn_type: str, mlp_ratio: float,
                 qkv_bias: bool, drop: float, drop_path: float, norm: NormFactory, last_stage: bool,
                 kernel_size: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm1 = norm(dim)
        whole = last_stage or split >= resolution  # official: ==; larger stripes only arise in small models
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        linear = attn_type == "L"
        if whole:
            branches = [CSWinBranch(dim, resolution, -1, split, num_heads, linear, kernel_size)]
        else:
            branches = [CSWinBranch(dim // 2, resolution, i, split, num_heads // 2, linear, kernel_size)
                        for i in (0, 1)]
        self.attns = nn.ModuleList(branches)
        self.drop_path = _drop_path(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.norm2 = norm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, c).unbind(2)  # each (B, N, C)
        if len(self.attns) == 1:
            attended = self.attns[0](q, k, v)
        else:
            half = c // 2
            attended = torch.cat([self.attns[0](q[..., :half], k[..., :half], v[..., :half]),
                                  self.attns[1](q[..., half:], k[..., half:], v[..., half:])], dim=-1)
        x = x + self.drop_path(self.proj_drop(self.proj(attended)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def fold(self) -> None:
        self.qkv, self.norm1 = fold_into_linear(self.norm1, self.qkv), nn.Identity()
        self.mlp.fc1, self.norm2 = fold_into_linear(self.norm2, self.mlp.fc1), nn.Identity()


class TokensFromMap(nn.Module):
    """(B, C, H, W) -> (B, H W, C) (einops' `Rearrange('b c h w -> b (h w) c')` of the official stem)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class MergeBlock(nn.Module):
    """CSWin's downsampling: 3x3 stride-2 conv on the token map, then norm; keys `conv`, `norm`."""

    def __init__(self, dim: int, dim_out: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = norm(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        side = math.isqrt(n)
        x = self.conv(x.transpose(1, 2).reshape(b, c, side, side))  # (B, C', H/2, W/2)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, H W / 4, C')

    def fold(self) -> None:
        self.conv, self.norm = fold_after_conv(self.conv, self.norm), nn.Identity()


class SlabCSWin(nn.Module):
    """CSWin Transformer with SLA stages (SLAB-CSWin: "LLSS", linear stripes 56-28-14-7, i.e. global SLA in the
    first two stages at 224 input) and PRepBN (LN eps 1e-5, official step 120,000)."""

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 64,
                 depth: Sequence[int] = (2, 4, 18, 1), split_size: Sequence[int] = (1, 2, 7, 7),
                 la_split_size: Sequence[int] = (56, 28, 14, 7), num_heads: Sequence[int] = (2, 4, 8, 16),
                 attn_type: str = "LLSS", mlp_ratio: float = 4.0, qkv_bias: bool = True, norm: str = "prepbn",
                 prepbn_step: int = 120000, kernel_size: int = 5, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        norm_layer = norm_factory(norm, eps=1e-5, step=prepbn_step)
        self.stage1_conv_embed = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 7, 4, 2), TokensFromMap(),
                                               norm_layer(embed_dim))
        dpr = _drop_path_rates(drop_path_rate, sum(depth))
        dim = embed_dim
        for i in range(4):
            if i:
                setattr(self, f"merge{i}", MergeBlock(dim, 2 * dim, norm_layer))
                dim *= 2
            split = la_split_size[i] if attn_type[i] == "L" else split_size[i]
            setattr(self, f"stage{i + 1}", nn.ModuleList([
                CSWinBlock(dim, img_size // 2 ** (i + 2), num_heads[i], split, attn_type[i], mlp_ratio, qkv_bias,
                           drop_rate, dpr[sum(depth[:i]) + j], norm_layer, last_stage=i == 3, kernel_size=kernel_size)
                for j in range(depth[i])
            ]))
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_linear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1_conv_embed(x)  # (B, N, C)
        for i in range(1, 5):
            if i > 1:
                x = getattr(self, f"merge{i - 1}")(x)
            for blk in getattr(self, f"stage{i}"):
                x = blk(x)
        return self.norm(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def fold_norms(self) -> None:
        conv, _, norm = self.stage1_conv_embed
        self.stage1_conv_embed[0], self.stage1_conv_embed[2] = fold_after_conv(conv, norm), nn.Identity()
        for i in range(1, 5):
            if i > 1:
                getattr(self, f"merge{i - 1}").fold()
            for blk in getattr(self, f"stage{i}"):
                blk.fold()
        self.head, self.norm = fold_into_linear(self.norm, self.head), nn.Identity()


# ----------------------------------------------------------------------------------------------------------------
# Folding and official checkpoints


@torch.no_grad()
def fold_norms(model: nn.Module) -> nn.Module:
    """Fold every RepBN / PRepBN (evaluation form) into the neighbouring linear or convolution, in place (SLAB
    eq. 4): the deployed model has no normalisation left. The model must be in eval mode, its statistics final;
    the outputs are unchanged up to float rounding."""
    if model.training:
        raise RuntimeError("fold_norms: call model.eval() first (folding uses the running statistics)")
    model.fold_norms()  # a LayerNorm model raises here: only RepBN is a fixed affine map
    return model


def prepbn_to_repbn_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PRepBN state dict in the layout of a RepBN-only model (the evaluation form): for each PRepBN prefix `p`,
    `p.norm2.*` becomes `p.*` and the LayerNorm `p.norm1.*` and schedule buffers are dropped."""
    prefixes = {k[: -len(".total_step")] for k in state if k.endswith(".total_step")}
    out = {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p + ".")), None)
        if prefix is None:
            out[key] = value
            continue
        rest = key[len(prefix) + 1 :]
        if rest.startswith("norm2."):
            out[f"{prefix}.{rest[len('norm2.'):]}"] = value
    return out


def load_official(model: nn.Module, checkpoint: str | Mapping[str, Any]) -> nn.Module:
    """Load a released SLAB checkpoint (a path or a loaded dict; `checkpoint['model']` or a bare state dict)
    strictly: every key and shape must match (the official `eval.py` loads with strict=False, which hides
    mismatches). A PRepBN checkpoint loads into a RepBN-only model through `prepbn_to_repbn_state_dict`."""
    if isinstance(checkpoint, str):
        try:
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as err:
            raise CheckpointError(f"{checkpoint}: cannot read it ({err})") from None
    state = dict(checkpoint.get("model", checkpoint))
    ours = model.state_dict()
    if not any(k.endswith(".total_step") for k in ours) and any(k.endswith(".total_step") for k in state):
        state = prepbn_to_repbn_state_dict(state)
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    wrong = [k for k in set(ours) & set(state) if tuple(ours[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                  f"(e.g. {unexpected[:2]}), {len(wrong)} of another shape (e.g. {sorted(wrong)[:2]})")
        raise CheckpointError(f"the checkpoint does not fit {type(model).__name__}: {detail}")
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Paper configurations (official cfgs/*.yaml and model factories)


def slab_deit_t(**kw: Any) -> SlabDeiT:
    """SLAB-DeiT-T: 6,198,401 parameters, 74.3% top-1."""
    return SlabDeiT(**{"embed_dim": 192, "depth": 12, "num_heads": 3, "attention": "linear", **kw})


def slab_deit_s(**kw: Any) -> SlabDeiT:
    """SLAB-DeiT-S: 22,992,641 parameters, 80.0% top-1."""
    return SlabDeiT(**{"embed_dim": 384, "depth": 12, "num_heads": 6, "attention": "linear", **kw})


def deit_t_prepbn(**kw: Any) -> SlabDeiT:
    """DeiT-T with softmax attention and PRepBN (Table 5): 5,717,441 parameters in the released layout (RepBN
    only; pass norm="prepbn" to train it), 73.6% top-1."""
    return SlabDeiT(**{"embed_dim": 192, "depth": 12, "num_heads": 3, "attention": "softmax", "norm": "repbn", **kw})


def deit_s_prepbn(**kw: Any) -> SlabDeiT:
    """DeiT-S with softmax attention and PRepBN: 22,069,889 parameters (official step 300,000), 80.2% top-1."""
    return SlabDeiT(**{"embed_dim": 384, "depth": 12, "num_heads": 6, "attention": "softmax",
                       "prepbn_step": 300000, **kw})


def slab_swin_t(**kw: Any) -> SlabSwin:
    """SLAB-Swin-T: 29,216,605 parameters, 81.8% top-1 (drop path 0.2)."""
    return SlabSwin(**{"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "window_size": 56,
                       "attn_type": "LLSS", "drop_path_rate": 0.2, **kw})


def slab_swin_s(**kw: Any) -> SlabSwin:
    """SLAB-Swin-S: 50,552,965 parameters, 83.6% top-1 (drop path 0.3)."""
    return SlabSwin(**{"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24), "window_size": 56,
                       "attn_type": "LLSS", "drop_path_rate": 0.3, **kw})


def slab_swin_b(**kw: Any) -> SlabSwin:
    """SLAB-Swin-B: 89,029,373 parameters (official config; no released result)."""
    return SlabSwin(**{"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "window_size": 56,
                       "attn_type": "LLSS", "drop_path_rate": 0.5, **kw})


def swin_t_prepbn(**kw: Any) -> SlabSwin:
    """Swin-T with window softmax attention and PRepBN (Table 5): 28,288,383 parameters in the released layout
    (RepBN only; pass norm="prepbn" to train it), 81.4% top-1."""
    return SlabSwin(**{"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "window_size": 7,
                       "attn_type": "SSSS", "norm": "repbn", "drop_path_rate": 0.1, **kw})


def slab_pvt_t(**kw: Any) -> SlabPVT:
    """SLAB-PVT-T: 12,157,692 parameters, 76.5% top-1."""
    return SlabPVT(**{"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "mlp_ratios": (8, 8, 4, 4),
                      "depths": (2, 2, 2, 2), **kw})


def slab_cswin_t(**kw: Any) -> SlabCSWin:
    """SLAB-CSWin-T: 21,227,807 parameters, 82.8% top-1."""
    return SlabCSWin(**{"embed_dim": 64, "depth": (2, 4, 18, 1), "num_heads": (2, 4, 8, 16), "attn_type": "LLSS",
                        "la_split_size": (56, 28, 14, 7), "drop_path_rate": 0.1, **kw})


MODELS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f for f in (slab_deit_t, slab_deit_s, deit_t_prepbn, deit_s_prepbn, slab_swin_t, slab_swin_s,
                            slab_swin_b, swin_t_prepbn, slab_pvt_t, slab_cswin_t)
}


def build_model(name: str, **kw: Any) -> nn.Module:
    """A paper model by factory name (see `MODELS`), with keyword overrides (num_classes, img_size, ...)."""
    if name not in MODELS:
        raise ValueError(f"unknown SLAB model {name!r}; one of {', '.join(MODELS)}")
    return MODELS[name](**kw)


# ----------------------------------------------------------------------------------------------------------------
# Language model (section 4.4: LLaMA-350M with PRepBN)


class CausalSLA(nn.Module):
    """SLA for autoregressive decoding: ReLU(q), ReLU(k + P), causal normalised linear attention (the shared
    kernel, float32, autocast off as in the vision SLA), plus a causal depth-wise convolution on V (kernel 5,
    shared by the heads, left padding only), the one-dimensional counterpart of SLA's DWC. Keys `q_proj`,
    `k_proj`, `v_proj`, `o_proj` (LLaMA's), `dwc`, `positional_encoding` (1, max_len, C).

    The official LLaMA experiment keeps softmax attention and changes only the norms (`attention="softmax"`);
    this module is the issue's "causal SLA" variant, our construction (see the project README)."""

    def __init__(self, dim: int, num_heads: int, max_len: int, kernel_size: int = 5) -> None:
        super().__init__()
        self.num_heads, self.kernel_size = num_heads, kernel_size
        head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.dwc = nn.Conv1d(head_dim, head_dim, kernel_size, groups=head_dim)
        self.positional_encoding = nn.Parameter(torch.zeros(1, max_len, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        q = F.relu(self.q_proj(x))
        k = F.relu(self.k_proj(x) + self.positional_encoding[:, :t])
        v = self.v_proj(x)
        q, k, v = (z.view(b, t, h, d).transpose(1, 2) for z in (q, k, v))  # (B, h, T, d)
        with autocast_off(x.device):
            out = linear_attention(q.float(), k.float(), v.float(), causal=True, normalize=True, eps=1e-6)
        conv_in = F.pad(v.reshape(b * h, t, d).transpose(1, 2), (self.kernel_size - 1, 0))  # (B h, d, K - 1 + T)
        out = out + self.dwc(conv_in).view(b, h, d, t).transpose(2, 3)  # (B, h, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c).to(x.dtype))


class CausalSelfAttention(nn.Module):
    """LLaMA's softmax attention with rotary embeddings (the official LLaMA-350M attention)."""

    def __init__(self, dim: int, num_heads: int, max_len: int) -> None:
        super().__init__()
        from shared.blocks.rope import RotaryEmbedding

        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.rotary_emb = RotaryEmbedding(dim // num_heads, max_seq_len=max_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.rotary_emb(q, k)  # (B, h, T, d)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class LlamaBlock(nn.Module):
    """Pre-norm decoder layer with LLaMA's names: `input_layernorm`, `self_attn`, `post_attention_layernorm`,
    `mlp` (SwiGLU)."""

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, max_len: int, attention: str,
                 norm: NormFactory) -> None:
        super().__init__()
        from shared.blocks.mlp import SwiGLU

        self.input_layernorm = norm(dim)
        self.self_attn = (CausalSLA(dim, num_heads, max_len) if attention == "sla"
                          else CausalSelfAttention(dim, num_heads, max_len))
        self.post_attention_layernorm = norm(dim)
        self.mlp = SwiGLU(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class SlabLlama(nn.Module):
    """A LLaMA-style decoder whose RMSNorms are PRepBN (RMSNorm -> RepBN, as the official LLaMA code: RepBN with
    alpha = 0 and zero BN affine at init, epsilon 1e-6 in both branches), with causal SLA or softmax attention.

    Args:
        vocab_size, dim, depth, num_heads, hidden_dim (SwiGLU width), max_len: the decoder.
        attention: "sla" (causal SLA) or "softmax" (RoPE softmax, the official experiment).
        norm: "prepbn" or "rmsnorm" (the LLaMA baseline).
        prepbn_step: handover length before the schedule sets it (official: 18,000 after 10,000 warm-up).
    """

    def __init__(self, vocab_size: int = 256, dim: int = 128, depth: int = 4, num_heads: int = 4,
                 hidden_dim: int | None = None, max_len: int = 256, attention: str = "sla", norm: str = "prepbn",
                 prepbn_step: int = 18000) -> None:
        super().__init__()
        from functools import partial

        from projects.slab.norms import PRepBN
        from shared.blocks.norms import RMSNorm

        if attention not in ("sla", "softmax"):
            raise ValueError(f"attention={attention!r} is not one of sla, softmax")
        if norm == "prepbn":
            norm_layer: NormFactory = partial(PRepBN, norm1="rmsnorm", eps=1e-6, bn_eps=1e-6, step=prepbn_step,
                                              alpha_init=0.0, zero_init=True)
        elif norm == "rmsnorm":
            norm_layer = partial(RMSNorm, eps=1e-6)
        else:
            raise ValueError(f"norm={norm!r} is not one of prepbn, rmsnorm")
        self.max_len = max_len
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList([LlamaBlock(dim, num_heads, hidden_dim or 4 * dim, max_len, attention, norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)  # LLaMA's initializer_range

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab)."""
        if idx.shape[1] > self.max_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens; the model is built for at most {self.max_len}")
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))

    def fold_norms(self) -> None:
        for layer in self.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, fold_into_linear(layer.input_layernorm, getattr(attn, name)))
            layer.input_layernorm = nn.Identity()
            mlp = layer.mlp
            mlp.gate_proj = fold_into_linear(layer.post_attention_layernorm, mlp.gate_proj)
            mlp.up_proj = fold_into_linear(layer.post_attention_layernorm, mlp.up_proj)
            layer.post_attention_layernorm = nn.Identity()
        self.lm_head, self.norm = fold_into_linear(self.norm, self.lm_head), nn.Identity()


def slab_llama_350m(**kw: Any) -> SlabLlama:
    """The paper's LLaMA-350M (official config.json: hidden 1024, 18 layers, 8 heads, SwiGLU 4096, 32,000 tokens,
    context 2048) with PRepBN; attention "softmax" as released, "sla" for causal SLA."""
    return SlabLlama(**{"vocab_size": 32000, "dim": 1024, "depth": 18, "num_heads": 8, "hidden_dim": 4096,
                        "max_len": 2048, "attention": "softmax", **kw})


MODELS["slab_llama_350m"] = slab_llama_350m


def slab_swin_micro(**kw: Any) -> SlabSwin:
    """A small SLAB-Swin for the embedded digits on a CPU (our configuration, not the paper's): 32x32 input,
    patches of 4, widths 32-64-128, depths 2-2-2, global SLA in the first two stages ('LLS'); 0.58 M parameters."""
    return SlabSwin(**{"img_size": 32, "patch_size": 4, "embed_dim": 32, "depths": (2, 2, 2), "num_heads": (1, 2, 4),
                       "window_size": 8, "attn_type": "LLS", "drop_path_rate": 0.0, **kw})


MODELS["slab_swin_micro"] = slab_swin_micro
