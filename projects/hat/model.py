"""HAT: Hybrid Attention Transformer (Chen et al., "Activating More Pixels in Image Super-Resolution Transformer",
CVPR 2023; extended as "HAT: Hybrid Attention Transformer for Image Restoration", arXiv 2309.05239).

The network (paper fig. 4): a 3x3 conv extracts shallow features F0; `len(depths)` Residual Hybrid Attention Groups
(RHAG) and a conv give deep features F_DF; the reconstruction head upsamples F0 + F_DF (pixel shuffle). Each RHAG is
a run of Hybrid Attention Blocks (HAB: (shifted) window self-attention in parallel with a channel-attention block
scaled by a small alpha, eq. 3-4), one Overlapping Cross-Attention Block (OCAB, §3.2.3) and a conv, with a residual
over the group.

Module and parameter names follow the official `hat/archs/hat_arch.py` (XPixelGroup/HAT), so the official
checkpoints (`params_ema`) load with strict=True; the constructor takes the official arguments by name, so an
official option file's `network_g` maps 1:1 onto `HAT(**network_g)`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from shared.blocks.attention.window import (
    WindowAttention,
    biased_attention,
    relative_position_index,
    shifted_window_mask,
    use_fused_attn,
    window_partition,
    window_reverse,
)
from shared.lit.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# DIV2K's RGB mean, subtracted from 3-channel inputs as in EDSR / SwinIR / HAT.
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drop a residual branch for a whole sample with probability p,
    scaling the kept samples by 1 / (1 - p)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ...)
        return x * mask / keep


class Mlp(nn.Module):
    """The transformer's feed-forward network: fc1, GELU, dropout, fc2, dropout (official names fc1 / fc2)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: type[nn.Module] = nn.GELU,
                 drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ChannelAttention(nn.Module):
    """RCAN's channel attention: squeeze by global average pooling, excite by a bottleneck of two 1x1 convs."""

    def __init__(self, num_feat: int, squeeze_factor: int = 16) -> None:
        super().__init__()
        # Indices 0..4 are part of the official key names (attention.1, attention.3).
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat, num_feat // squeeze_factor, 1, padding=0),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat // squeeze_factor, num_feat, 1, padding=0),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CAB(nn.Module):
    """Channel Attention Block (paper eq. 4): conv 3x3 (C -> C/compress_ratio), GELU, conv 3x3 back to C, channel
    attention. The squeeze in the middle keeps the conv branch cheap next to the attention branch."""

    def __init__(self, num_feat: int, compress_ratio: int = 3, squeeze_factor: int = 30) -> None:
        super().__init__()
        self.cab = nn.Sequential(
            nn.Conv2d(num_feat, num_feat // compress_ratio, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(num_feat // compress_ratio, num_feat, 3, 1, 1),
            ChannelAttention(num_feat, squeeze_factor),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cab(x)


class HAB(nn.Module):
    """Hybrid Attention Block (paper eq. 3): X_N = LN(X); X_M = (S)W-MSA(X_N) + alpha * CAB(X_N) + X;
    Y = MLP(LN(X_M)) + X_M, with alpha = `conv_scale` (0.01) and stochastic depth on the two residual branches.

    Blocks alternate plain and shifted windows (`shift_size` 0 or window_size // 2). As in Swin, a map no larger
    than the window at build time (`input_resolution`) gets one window of its size and no shift.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        compress_ratio: int = 3,
        squeeze_factor: int = 30,
        conv_scale: float = 0.01,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.shift_size = shift_size
        if min(input_resolution) <= window_size:
            self.shift_size = 0
            self.window_size = min(input_resolution)
        if not 0 <= self.shift_size < self.window_size:
            raise ConfigError(f"HAB shift_size {self.shift_size} must lie in [0, window_size={self.window_size})")

        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, self.window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.conv_scale = conv_scale
        self.conv_block = CAB(dim, compress_ratio, squeeze_factor)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(
        self, x: torch.Tensor, x_size: tuple[int, int], rpi_sa: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x: tokens `(B, H*W, C)`; rpi_sa: the window's relative position index; attn_mask: the shift mask of
        this input size (used by shifted blocks only)."""
        h, w = x_size
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)  # (B, H, W, C)

        conv_x = self.conv_block(x.permute(0, 3, 1, 2))  # (B, C, H, W)
        conv_x = conv_x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, H*W, C)

        ws, shift = self.window_size, self.shift_size
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, ws).view(-1, ws * ws, c)  # (B*nW, ws*ws, C)
        windows = self.attn(windows, mask=attn_mask if shift > 0 else None, rpi=rpi_sa)  # (B*nW, ws*ws, C)
        attn_x = window_reverse(windows.view(-1, ws, ws, c), ws, h, w)  # (B, H, W, C)
        if shift > 0:
            attn_x = torch.roll(attn_x, shifts=(shift, shift), dims=(1, 2))
        attn_x = attn_x.reshape(b, h * w, c)  # (B, H*W, C)

        x = shortcut + self.drop_path(attn_x) + conv_x * self.conv_scale
        return x + self.drop_path(self.mlp(self.norm2(x)))


class OCAB(nn.Module):
    """Overlapping Cross-Attention Block (paper §3.2.3, fig. 5): queries from non-overlapping M x M windows attend to
    keys/values from overlapping windows of size M_o = (1 + gamma) M (gamma = `overlap_ratio`) around them, cut by
    `nn.Unfold` with zero padding; a relative position bias of (M + M_o - 1)^2 entries per head; then an MLP.
    Unlike HAB there is no conv branch and no stochastic depth."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        window_size: int,
        overlap_ratio: float,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        mlp_ratio: float = 2.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.overlap_win_size = int(window_size * overlap_ratio) + window_size
        ows = self.overlap_win_size

        self.norm1 = norm_layer(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.unfold = nn.Unfold(kernel_size=(ows, ows), stride=window_size, padding=(ows - window_size) // 2)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((window_size + ows - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.fused_attn = use_fused_attn(dim // num_heads)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], rpi: torch.Tensor) -> torch.Tensor:
        h, w = x_size
        b, _, c = x.shape
        ws, ows, nh = self.window_size, self.overlap_win_size, self.num_heads
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)  # (B, H, W, C)

        qkv = self.qkv(x).reshape(b, h, w, 3, c).permute(3, 0, 4, 1, 2)  # (3, B, C, H, W)
        q = qkv[0].permute(0, 2, 3, 1)  # (B, H, W, C)
        kv = torch.cat((qkv[1], qkv[2]), dim=1)  # (B, 2C, H, W)

        q_windows = window_partition(q, ws).view(-1, ws * ws, c)  # (B*nW, ws*ws, C)
        kv_windows = self.unfold(kv)  # (B, 2C*ows*ows, nW): unfold orders a column as (channel, row, col)
        nw = kv_windows.shape[-1]
        kv_windows = kv_windows.view(b, 2, c, ows * ows, nw).permute(1, 0, 4, 3, 2)  # (2, B, nW, ows*ows, C)
        kv_windows = kv_windows.reshape(2, b * nw, ows * ows, c)  # (2, B*nW, ows*ows, C)

        d = c // nh
        q = q_windows.view(-1, ws * ws, nh, d).transpose(1, 2)  # (B*nW, nh, ws*ws, d)
        k = kv_windows[0].view(-1, ows * ows, nh, d).transpose(1, 2)  # (B*nW, nh, ows*ows, d)
        v = kv_windows[1].view(-1, ows * ows, nh, d).transpose(1, 2)  # (B*nW, nh, ows*ows, d)
        bias = self.relative_position_bias_table[rpi.reshape(-1)].view(ws * ws, ows * ows, nh)  # (Nq, Nk, nh)
        out = biased_attention(q, k, v, bias.permute(2, 0, 1), self.scale, fused=self.fused_attn)  # (B*nW, nh, Nq, d)
        out = out.transpose(1, 2).reshape(-1, ws, ws, c)  # (B*nW, ws, ws, C)
        x = window_reverse(out, ws, h, w).reshape(b, h * w, c)  # (B, H*W, C)

        x = self.proj(x) + shortcut
        return x + self.mlp(self.norm2(x))


class AttenBlocks(nn.Module):
    """The attention part of one RHAG: `depth` HABs (plain and shifted windows alternating), then one OCAB."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        compress_ratio: int,
        squeeze_factor: int,
        conv_scale: float,
        overlap_ratio: float,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float | Sequence[float] = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            HAB(
                dim=dim,
                input_resolution=input_resolution,
                num_heads=num_heads,
                window_size=window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                compress_ratio=compress_ratio,
                squeeze_factor=squeeze_factor,
                conv_scale=conv_scale,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, Sequence) else drop_path,
                norm_layer=norm_layer,
            )
            for i in range(depth)
        )
        self.overlap_attn = OCAB(
            dim=dim,
            input_resolution=input_resolution,
            window_size=window_size,
            overlap_ratio=overlap_ratio,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            mlp_ratio=mlp_ratio,
            norm_layer=norm_layer,
        )

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], params: dict[str, torch.Tensor]) -> torch.Tensor:
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                # Activation checkpointing: recompute each block in the backward pass (same numbers, less memory).
                x = torch.utils.checkpoint.checkpoint(
                    blk, x, x_size, params["rpi_sa"], params["attn_mask"], use_reentrant=False
                )
            else:
                x = blk(x, x_size, params["rpi_sa"], params["attn_mask"])
        return self.overlap_attn(x, x_size, params["rpi_oca"])


class PatchEmbed(nn.Module):
    """Feature map `(B, C, H, W)` to tokens `(B, H*W, C)` (patch size 1), optionally layer-normed."""

    def __init__(self, embed_dim: int, norm_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return self.norm(x) if self.norm is not None else x


class PatchUnEmbed(nn.Module):
    """Tokens `(B, H*W, C)` back to a feature map `(B, C, H, W)`."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], self.embed_dim, x_size[0], x_size[1])  # (B, C, H, W)


class RHAG(nn.Module):
    """Residual Hybrid Attention Group (paper fig. 4): F_{i} = Conv(AttenBlocks(F_{i-1})) + F_{i-1}."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        compress_ratio: int,
        squeeze_factor: int,
        conv_scale: float,
        overlap_ratio: float,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float | Sequence[float] = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        use_checkpoint: bool = False,
        resi_connection: str = "1conv",
    ) -> None:
        super().__init__()
        self.residual_group = AttenBlocks(
            dim, input_resolution, depth, num_heads, window_size, compress_ratio, squeeze_factor, conv_scale,
            overlap_ratio, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path, norm_layer, use_checkpoint,
        )
        self.conv = _residual_conv(resi_connection, dim)
        self.patch_embed = PatchEmbed(dim)
        self.patch_unembed = PatchUnEmbed(dim)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], params: dict[str, torch.Tensor]) -> torch.Tensor:
        y = self.patch_unembed(self.residual_group(x, x_size, params), x_size)  # (B, C, H, W)
        return self.patch_embed(self.conv(y)) + x


def _residual_conv(resi_connection: str, dim: int) -> nn.Module:
    # The official code offers '1conv' (all released models) and 'identity'.
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == "identity":
        return nn.Identity()
    raise ConfigError(f"HAT resi_connection must be '1conv' or 'identity', got '{resi_connection}'")


class Upsample(nn.Sequential):
    """Sub-pixel upsampling: log2(scale) x [conv 3x3 (C -> 4C), PixelShuffle(2)] for scale 2^n, or one
    [conv 3x3 (C -> 9C), PixelShuffle(3)] for scale 3."""

    def __init__(self, scale: int, num_feat: int) -> None:
        layers: list[nn.Module] = []
        if scale >= 2 and scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ConfigError(f"HAT pixel-shuffle upscale must be 2^n or 3, got {scale}")
        super().__init__(*layers)


def oca_relative_position_index(window_size: int, overlap_ratio: float) -> torch.Tensor:
    """Index of OCAB's bias table for (query in the M window, key in the M_o window): `(M^2, M_o^2)`.

    This reproduces the official definition exactly, index values included, so the buffer in official checkpoints
    is the same tensor. Its offsets are not centred (key minus query coordinates plus M - M_o + 1), so some entries
    are negative and address the table from the end (Python indexing); over the (M + M_o - 1)^2 table this is
    still one distinct entry per distinct offset, i.e. the same model as a centred index.
    """
    ws = window_size
    ows = window_size + int(overlap_ratio * window_size)
    ori = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, ws^2)
    ext = torch.stack(torch.meshgrid(torch.arange(ows), torch.arange(ows), indexing="ij")).flatten(1)  # (2, ows^2)
    rel = (ext[:, None, :] - ori[:, :, None]).permute(1, 2, 0) + (ws - ows + 1)  # (ws^2, ows^2, 2)
    return rel[..., 0] * (ws + ows - 1) + rel[..., 1]


class HAT(nn.Module):
    """Hybrid Attention Transformer. Arguments and defaults are the official ones (`hat_arch.HAT`).

    Args:
        img_size: training patch size (LR); only decides whether a window fits (see HAB). patch_size: 1.
        in_chans: image channels. embed_dim: C. depths / num_heads: HABs and heads per RHAG.
        window_size: M. compress_ratio / squeeze_factor: CAB's conv squeeze and channel-attention squeeze.
        conv_scale: alpha weighting CAB in HAB. overlap_ratio: gamma of OCAB. mlp_ratio: MLP hidden = C * ratio.
        qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate (linearly increasing over the blocks),
        norm_layer, ape (absolute position embedding), patch_norm (LayerNorm after embedding),
        use_checkpoint: activation checkpointing per HAB (the official code accepts it but never checkpoints).
        upscale: 1 (restoration), 2, 3, 4 (2^n). img_range: 1. or 255.
        upsampler: 'pixelshuffle' (classical SR, every released model) or '' (upscale 1: image-space residual,
            see README: the official code has no restoration head; ours is SwinIR's, which HAT builds on).
        resi_connection: '1conv' or 'identity'.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        patch_size: int = 1,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6),
        window_size: int = 7,
        compress_ratio: int = 3,
        squeeze_factor: int = 30,
        conv_scale: float = 0.01,
        overlap_ratio: float = 0.5,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        upscale: int = 2,
        img_range: float = 1.0,
        upsampler: str = "",
        resi_connection: str = "1conv",
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            # The official class swallows unknown arguments; a typo here would silently build another model.
            raise ConfigError(f"HAT got unknown arguments: {', '.join(sorted(kwargs))}")
        if patch_size != 1:
            raise ConfigError(f"HAT works on pixels: patch_size must be 1, got {patch_size}")
        if upsampler not in ("pixelshuffle", ""):
            raise ConfigError(f"HAT upsampler must be 'pixelshuffle' or '' (upscale 1), got '{upsampler}'")
        if (upsampler == "") != (upscale == 1):
            raise ConfigError(f"HAT upscale {upscale} needs upsampler {'pixelshuffle' if upscale > 1 else ''!r}")
        if len(depths) != len(num_heads):
            raise ConfigError(f"HAT depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.overlap_ratio = overlap_ratio
        self.in_chans = in_chans
        self.upscale = upscale
        self.upsampler = upsampler
        self.img_range = img_range
        self.embed_dim = embed_dim
        self.ape = ape
        num_feat = 64
        mean = DIV2K_RGB_MEAN if in_chans == 3 else (0.0,) * in_chans
        # Not in the official state_dict (it is a plain attribute there): a non-persistent buffer.
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        self.register_buffer("relative_position_index_SA", relative_position_index(window_size))  # Swin's index
        self.register_buffer("relative_position_index_OCA", oca_relative_position_index(window_size, overlap_ratio))
        self._masks: dict[tuple[int, int, torch.device], torch.Tensor] = {}

        # 1. shallow feature extraction
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)

        # 2. deep feature extraction
        res = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_embed = PatchEmbed(embed_dim, norm_layer if patch_norm else None)
        self.patch_unembed = PatchUnEmbed(embed_dim)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, res[0] * res[1], embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # stochastic depth grows with depth
        self.layers = nn.ModuleList(
            RHAG(
                dim=embed_dim,
                input_resolution=res,
                depth=depths[i],
                num_heads=num_heads[i],
                window_size=window_size,
                compress_ratio=compress_ratio,
                squeeze_factor=squeeze_factor,
                conv_scale=conv_scale,
                overlap_ratio=overlap_ratio,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                norm_layer=norm_layer,
                use_checkpoint=use_checkpoint,
                resi_connection=resi_connection,
            )
            for i in range(len(depths))
        )
        self.norm = norm_layer(embed_dim)
        self.conv_after_body = _residual_conv(resi_connection, embed_dim)

        # 3. reconstruction
        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True)
            )
            self.upsample = Upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        else:
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}

    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}

    def attention_mask(self, x_size: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The shifted-window mask for an input of this size, computed once per (size, device)."""
        key = (x_size[0], x_size[1], device)
        if key not in self._masks:
            if len(self._masks) >= 16:  # inputs of ever new sizes (e.g. a test set): keep the cache bounded
                self._masks.clear()
            mask = shifted_window_mask(x_size[0], x_size[1], self.window_size, self.shift_size)
            self._masks[key] = mask.to(device)
        return self._masks[key]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x_size = (x.shape[2], x.shape[3])
        params = {
            "attn_mask": self.attention_mask(x_size, x.device),
            "rpi_sa": self.relative_position_index_SA,
            "rpi_oca": self.relative_position_index_OCA,
        }
        x = self.patch_embed(x)  # (B, H*W, C)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x, x_size, params)
        x = self.norm(x)
        return self.patch_unembed(x, x_size)  # (B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: images `(B, in_chans, H, W)` in [0, 1] with H, W multiples of window_size (see `inference.pad_to_window`
        for other sizes). Returns `(B, in_chans, upscale*H, upscale*W)`."""
        h, w = x.shape[-2:]
        if h % self.window_size or w % self.window_size:
            raise ValueError(
                f"HAT input {h}x{w} is not a multiple of window_size {self.window_size}: pad it "
                "(projects.hat.inference.super_resolve does, and crops back)"
            )
        x = (x - self.mean) * self.img_range
        if self.upsampler == "pixelshuffle":
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x)) + x
            x = self.conv_before_upsample(x)
            x = self.conv_last(self.upsample(x))
        else:
            first = self.conv_first(x)
            x = x + self.conv_last(self.conv_after_body(self.forward_features(first)) + first)
        return x / self.img_range + self.mean

    def load_official_state_dict(self, path: str | Path, key: str | None = None, strict: bool = True) -> str:
        """Load an official `.pth` (`params_ema`, else `params`) or one of our Lightning checkpoints.

        strict: every key and shape must match, else one CheckpointError names the differences. Non-strict
        (BasicSR's `strict_load_g: false`, e.g. x4 fine-tuned from x2) loads the tensors whose name and shape
        match and logs the rest, which keep their initial values. Returns the key the weights were read from.
        """
        state, used = read_state_dict(path, key)
        if strict:
            check_state_dict(self, state, path)
            self.load_state_dict(state, strict=True)
            return used
        own = self.state_dict()
        matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(matching, strict=False)
        skipped = sorted(set(own) - set(matching))
        if skipped:
            log.info(f"{path}: {len(matching)} tensors loaded; kept the initial values of {', '.join(skipped)}")
        return used


def read_state_dict(path: str | Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The HAT weights inside `path`: an official BasicSR file (`params_ema`, else `params`, or `key`), a Lightning
    checkpoint of ours (`state_dict` with the `model.` prefix), or a bare state_dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with arbitrary objects, a truncated file, ...
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({exc})") from exc
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(blob).__name__}")
    candidates = [key] if key else ["params_ema", "params", "state_dict"]
    for name in candidates:
        if name in blob and isinstance(blob[name], dict):
            state = blob[name]
            if name == "state_dict":  # Lightning: the network is the module's `model` attribute
                state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            return dict(state), name
    if key:
        raise CheckpointError(f"{path}: has no key '{key}' (keys: {', '.join(map(str, blob))})")
    if blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return dict(blob), ""
    raise CheckpointError(
        f"{path}: no weights found; expected 'params_ema' or 'params' (official HAT) or 'state_dict' (Lightning), "
        f"found keys: {', '.join(map(str, blob))}"
    )


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise one CheckpointError if `state` does not fit `model` key for key and shape for shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

        parts = [f"missing keys: {show(missing)}" if missing else "",
                 f"unexpected keys: {show(unexpected)}" if unexpected else "",
                 f"shape mismatches (checkpoint vs model): {show(shapes)}" if shapes else ""]
        raise CheckpointError(
            f"{path}: does not match this HAT configuration; " + "; ".join(p for p in parts if p)
            + " (check embed_dim, depths, window_size, upscale, compress_ratio against the checkpoint's options)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Paper configurations (official options/*.yml). Every released model: img_size 64, window 16, conv_scale 0.01,
# overlap 0.5, mlp_ratio 2, pixel shuffle, '1conv'.


def _hat(upscale: int, embed_dim: int, depth: int, compress_ratio: int, squeeze_factor: int, **kw) -> HAT:
    args = dict(
        upscale=upscale, in_chans=3, img_size=64, window_size=16, compress_ratio=compress_ratio,
        squeeze_factor=squeeze_factor, conv_scale=0.01, overlap_ratio=0.5, img_range=1.0, depths=[6] * depth,
        embed_dim=embed_dim, num_heads=[6] * depth, mlp_ratio=2.0, upsampler="pixelshuffle", resi_connection="1conv",
    )
    return HAT(**{**args, **kw})


def hat_s_x2(**kw) -> HAT:
    """HAT-S x2: 9,473,471 parameters."""
    return _hat(2, 144, 6, 24, 24, **kw)


def hat_s_x3(**kw) -> HAT:
    """HAT-S x3: 9,658,111 parameters."""
    return _hat(3, 144, 6, 24, 24, **kw)


def hat_s_x4(**kw) -> HAT:
    """HAT-S x4: 9,621,183 parameters."""
    return _hat(4, 144, 6, 24, 24, **kw)


def hat_x2(**kw) -> HAT:
    """HAT x2: 20,624,795 parameters."""
    return _hat(2, 180, 6, 3, 30, **kw)


def hat_x3(**kw) -> HAT:
    """HAT x3: 20,809,435 parameters."""
    return _hat(3, 180, 6, 3, 30, **kw)


def hat_x4(**kw) -> HAT:
    """HAT x4: 20,772,507 parameters (also the architecture of Real_HAT_GAN_SRx4)."""
    return _hat(4, 180, 6, 3, 30, **kw)


def hat_l_x2(**kw) -> HAT:
    """HAT-L x2: 40,698,863 parameters (12 RHAGs)."""
    return _hat(2, 180, 12, 3, 30, **kw)


def hat_l_x3(**kw) -> HAT:
    """HAT-L x3: 40,883,503 parameters."""
    return _hat(3, 180, 12, 3, 30, **kw)


def hat_l_x4(**kw) -> HAT:
    """HAT-L x4: 40,846,575 parameters."""
    return _hat(4, 180, 12, 3, 30, **kw)


def _tiny(upscale: int, **kw) -> HAT:
    # Not a paper model: the CPU default. HAT's structure at a size that trains in minutes (window 8, 2 RHAGs).
    args = dict(
        upscale=upscale, in_chans=3, img_size=32, window_size=8, compress_ratio=3, squeeze_factor=12,
        conv_scale=0.01, overlap_ratio=0.5, img_range=1.0, depths=[2, 2], embed_dim=36, num_heads=[3, 3],
        mlp_ratio=2.0, upsampler="pixelshuffle" if upscale > 1 else "", resi_connection="1conv", drop_path_rate=0.0,
    )
    return HAT(**{**args, **kw})


def hat_tiny_x2(**kw) -> HAT:
    """A tiny HAT for CPU runs and tests (not in the paper)."""
    return _tiny(2, **kw)


def hat_tiny_x4(**kw) -> HAT:
    """A tiny HAT x4 for CPU runs and tests (not in the paper)."""
    return _tiny(4, **kw)


CONFIGS = {
    f.__name__: f
    for f in (hat_s_x2, hat_s_x3, hat_s_x4, hat_x2, hat_x3, hat_x4, hat_l_x2, hat_l_x3, hat_l_x4, hat_tiny_x2,
              hat_tiny_x4)
}


def build_hat(name: str, **kw) -> HAT:
    """A named configuration (`hat_x4`, ...) with keyword overrides of HAT's arguments."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown HAT configuration '{name}'; available: {', '.join(CONFIGS)}")
    return CONFIGS[name](**kw)
