"""EfficientViT (Liu et al., CVPR 2023): sandwich blocks with cascaded group attention in local windows.

Module names, constructor arguments and state-dict keys are those of the official code
(microsoft/Cream, `EfficientViT/classification/model/efficientvit.py`), so official checkpoints load strictly:

    patch_embed.{0,2,4,6}.{c,bn}                       four stride-2 Conv2d_BN (16x down), ReLU between
    blocks1.{k}.{dw0,ffn0,mixer,dw1,ffn1}.m.*          EfficientViTBlock (mixer.m.attn = CascadedGroupAttention)
    blocks2.{0,1,2}.*, blocks3.{0,1,2}.*               stage transition: [Residual DW, Residual FFN], PatchMerging,
                                                       [Residual DW, Residual FFN]; then the stage's blocks
    head.{bn,l}                                        BN_Linear (and head_dist with distillation)

Besides the architecture this file has what deployment and interop need: `fuse_bn` (the official
`replace_batchnorm`), `fold_residual_dw` (a further exact re-parameterisation for speed), strict loading of
official checkpoints at any `img_size` (`load_official_checkpoint`), a converter from timm's `efficientvit_m*`
(`convert_timm_state_dict`), and registration with `timm.create_model` as `formerlab_efficientvit_m0..m5`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import SqueezeExcite, trunc_normal_
from torch import nn

from shared.lit.errors import CheckpointError, ConfigError

__all__ = [
    "Conv2d_BN", "BN_Linear", "PatchMerging", "Residual", "FFN", "CascadedGroupAttention", "LocalWindowAttention",
    "EfficientViTBlock", "EfficientViT", "efficientvit_m0", "efficientvit_m1", "efficientvit_m2", "efficientvit_m3",
    "efficientvit_m4", "efficientvit_m5", "fuse_bn", "fold_residual_dw", "load_official_checkpoint",
    "load_official_state_dict", "convert_timm_state_dict", "resize_attention_biases",
]


class Conv2d_BN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (keys `c`, `bn`); every convolution of EfficientViT is one.

    `bn_weight_init=0` starts a residual branch as the identity (the official init of the branch-final convs).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """The equivalent Conv2d with bias (uses the BN running statistics: eval-mode semantics)."""
        c, bn = self.c, self.bn
        scale = bn.weight / (bn.running_var + bn.eps) ** 0.5  # (out,)
        fused = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                          bias=True, device=c.weight.device, dtype=c.weight.dtype)
        fused.weight.copy_(c.weight * scale[:, None, None, None])
        # the official expression order, so fused models equal the official fused ones bit for bit
        fused.bias.copy_(bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps) ** 0.5)
        return fused


class BN_Linear(nn.Sequential):
    """BatchNorm1d followed by Linear (keys `bn`, `l`): the classifier head, weights trunc-normal(0.02)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = 0.02) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.l = nn.Linear(in_features, out_features, bias=bias)
        trunc_normal_(self.l.weight, std=std)
        if bias:
            nn.init.zeros_(self.l.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        """The equivalent Linear: W' = W diag(s), b' = W (beta - mu s) + b with s = gamma / sqrt(var + eps)."""
        bn, l = self.bn, self.l
        scale = bn.weight / (bn.running_var + bn.eps) ** 0.5  # (in,)
        shift = bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps) ** 0.5  # (in,)
        fused = nn.Linear(l.in_features, l.out_features, device=l.weight.device, dtype=l.weight.dtype)
        fused.weight.copy_(l.weight * scale[None, :])
        bias = (l.weight @ shift[:, None]).view(-1)  # (out,); a (out, 1) product, as the official code rounds it
        fused.bias.copy_(bias if l.bias is None else bias + l.bias)
        return fused


class PatchMerging(nn.Module):
    """Down-sampling between stages (§3.2): 1x1 expand x4, 3x3 depth-wise stride 2, squeeze-excite (ratio 0.25,
    timm's SqueezeExcite, keys `se.fc1` / `se.fc2`), 1x1 project to the next stage's width."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        hidden = 4 * dim
        self.conv1 = Conv2d_BN(dim, hidden, 1)
        self.act = nn.ReLU()
        self.conv2 = Conv2d_BN(hidden, hidden, 3, 2, 1, groups=hidden)
        self.se = SqueezeExcite(hidden, 0.25)
        self.conv3 = Conv2d_BN(hidden, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


class Residual(nn.Module):
    """x + m(x), with the official per-sample stochastic depth `drop` (0 in every released configuration)."""

    def __init__(self, m: nn.Module, drop: float = 0.0) -> None:
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop > 0:
            keep = torch.rand(x.size(0), 1, 1, 1, device=x.device).ge_(self.drop).div(1 - self.drop)  # (B, 1, 1, 1)
            return x + self.m(x) * keep
        return x + self.m(x)


class FFN(nn.Module):
    """The feed-forward layer of the sandwich (§3.1): 1x1 conv to `h` (= 2 x dim, the paper's reduced FFN
    ratio), ReLU, 1x1 conv back (BN weight initialised to 0)."""

    def __init__(self, ed: int, h: int) -> None:
        super().__init__()
        self.pw1 = Conv2d_BN(ed, h)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(h, ed, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))


def attention_bias_index(resolution: int) -> torch.Tensor:
    """(N, N) index of the LeViT attention bias of each query/key pair of an r x r window (N = r^2).

    Offsets (|dy|, |dx|) are numbered in order of first appearance scanning query (0, 0) against all keys, i.e.
    row-major over the r x r grid of offsets, so a head's table viewed as (r, r) is a map over (|dy|, |dx|).
    """
    points = list(itertools.product(range(resolution), range(resolution)))
    offsets: dict[tuple[int, int], int] = {}
    index = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            index.append(offsets.setdefault(offset, len(offsets)))
    return torch.tensor(index, dtype=torch.long).view(len(points), len(points))  # (N, N)


def use_fused_attention(setting: bool | None, x: torch.Tensor) -> bool:
    """`fused_attn=None` picks `F.scaled_dot_product_attention` on CUDA (one kernel instead of five passes over the
    (B, N, N) attention matrix) and the explicit product elsewhere (faster on CPU at these sizes, and bit-identical
    to the official code). On the H200 at batch 2048 (channels-last, fp16) the explicit product was still 3-4 % faster
    for M1-M5 and SDPA 5 % faster for M0 (projects/efficientvit/README.md, Throughput)."""
    return x.is_cuda if setting is None else setting


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention (§3.1, "Cascaded Group Attention").

    The input's channels are split into `num_heads` groups; head j attends over its group plus the previous head's
    output (the cascade: X'_j = X_j + X~_{j-1}), with a 1x1 q/k/v projection, a depth-wise `kernels[j]` conv on
    the queries, and a LeViT attention bias over the window's (|dy|, |dx|) offsets. The heads' outputs are
    concatenated and projected back by ReLU + 1x1 conv.

    Args:
        dim: channels C; key_dim: q/k channels per head; attn_ratio: value channels per head / key_dim
            (C / (key_dim * num_heads), so values have C / num_heads channels); resolution: the window side r;
        kernels: depth-wise query kernel per head; fused_attn: SDPA (True), explicit (False), auto (None).
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int = 8, attn_ratio: float = 4, resolution: int = 14,
                 kernels: Sequence[int] = (5, 5, 5, 5), fused_attn: bool | None = None) -> None:
        super().__init__()
        if len(kernels) < num_heads:
            raise ConfigError(f"kernels={list(kernels)} has fewer entries than num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.attn_ratio = attn_ratio
        self.resolution = resolution
        self.fused_attn = fused_attn
        self.qkvs = nn.ModuleList(Conv2d_BN(dim // num_heads, 2 * key_dim + self.d) for _ in range(num_heads))
        self.dws = nn.ModuleList(
            Conv2d_BN(key_dim, key_dim, kernels[i], 1, kernels[i] // 2, groups=key_dim) for i in range(num_heads)
        )
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(self.d * num_heads, dim, bn_weight_init=0.0))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))  # (h, #offsets)
        self.register_buffer("attention_bias_idxs", attention_bias_index(resolution))  # (N, N)
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None

    def attention_bias(self) -> torch.Tensor:
        """The (h, N, N) bias. Without autograd in eval mode the gather is cached; the cache is keyed on the table's
        identity, version, storage, device and dtype, so loading weights, an optimiser step, `.to()` or `.half()`
        all refresh it (the official cache, made in `train(False)`, goes stale when weights are loaded after
        `eval()`)."""
        table = self.attention_biases
        if self.training or torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return table[:, self.attention_bias_idxs]
        key = (id(table), table._version, table.data_ptr(), table.device, table.dtype,
               self.attention_bias_idxs.data_ptr())
        if self._bias_cache is None or self._bias_cache[0] != key:
            self._bias_cache = (key, table[:, self.attention_bias_idxs])
        return self._bias_cache[1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """softmax(q^T k * scale + bias) applied to v for one head; q, k: (B, key_dim, H, W), v: (B, d, H, W)."""
        B, d, H, W = v.shape
        if use_fused_attention(self.fused_attn, v):
            # Channels-last maps give (B, N, c) views with unit channel stride for free; others are made so.
            q, k, v = (t.flatten(2).transpose(1, 2) for t in (q, k, v))  # (B, N, c)
            q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
            out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                                 attn_mask=bias.to(q.dtype), scale=self.scale)  # (B, 1, N, d)
            return out.squeeze(1).transpose(1, 2).reshape(B, d, H, W)
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)  # (B, c, N)
        # The official op sequence, so outputs are bit-identical to it; in place, as the matmul's backward needs
        # only q and k. (baddbmm would fold scale and bias into the GEMM but rounds differently for some N.)
        attn = (q.transpose(-2, -1) @ k).mul_(self.scale).add_(bias)  # (B, N, N)
        attn = attn.softmax(dim=-1)
        if v.stride(1) == 1:  # channels-last maps: compute (B, N, d) so the heads' outputs stay channels-last
            return (attn @ v.transpose(-2, -1)).transpose(-2, -1).view(B, d, H, W)
        return (v @ attn.transpose(-2, -1)).view(B, d, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        bias = self.attention_bias()
        feats_in = x.chunk(self.num_heads, dim=1)  # h x (B, C/h, H, W)
        feats_out = []
        feat = feats_in[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + feats_in[i]  # the cascade: the previous head's output refines this head's input
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.d], dim=1)
            feat = self.attend(dw(q), k, v, bias[i])  # (B, d, H, W)
            feats_out.append(feat)
        return self.proj(torch.cat(feats_out, dim=1))

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> CascadedGroupAttention:
        self._bias_cache = None
        return super()._apply(fn, *args, **kwargs)


class LocalWindowAttention(nn.Module):
    """Cascaded group attention in non-overlapping `window_resolution` windows (padding bottom/right), or over the
    whole map when it is no larger than a window. The map side must be the `resolution` the model was built for."""

    def __init__(self, dim: int, key_dim: int, num_heads: int = 8, attn_ratio: float = 4, resolution: int = 14,
                 window_resolution: int = 7, kernels: Sequence[int] = (5, 5, 5, 5),
                 fused_attn: bool | None = None) -> None:
        super().__init__()
        if window_resolution <= 0:
            raise ConfigError(f"window_size={window_resolution} must be > 0")
        self.dim = dim
        self.num_heads = num_heads
        self.resolution = resolution
        self.window_resolution = window_resolution
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio, min(window_resolution, resolution),
                                           kernels, fused_attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if H != self.resolution or W != self.resolution:
            raise ValueError(f"EfficientViT was built for {self.resolution}x{self.resolution} feature maps here, got "
                             f"{H}x{W}: build it with the img_size of the input (load_official_checkpoint resizes)")
        ws = self.window_resolution
        if H <= ws and W <= ws:
            return self.attn(x)
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pH, pW = H + pad_b, W + pad_r
        nH, nW = pH // ws, pW // ws
        x = x.view(B, nH, ws, nW, ws, C).transpose(2, 3).reshape(B * nH * nW, ws, ws, C)  # (B nH nW, ws, ws, C)
        x = self.attn(x.permute(0, 3, 1, 2))  # (B nH nW, C, ws, ws)
        x = x.permute(0, 2, 3, 1).view(B, nH, nW, ws, ws, C).transpose(2, 3).reshape(B, pH, pW, C)  # (B, pH, pW, C)
        if pad_b or pad_r:
            x = x[:, :H, :W].contiguous()
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


def _dw_ffn(dim: int) -> nn.Sequential:
    """[Residual(3x3 depth-wise), Residual(FFN)]: the half-sandwich around each PatchMerging."""
    return nn.Sequential(Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim)), Residual(FFN(dim, 2 * dim)))


class EfficientViTBlock(nn.Module):
    """The sandwich layout (§3.1): DW conv, FFN, one cascaded-group-attention token mixer, DW conv, FFN, each
    residual. `type` is the official token-mixer code; 's' (self-attention) is the only one it defines."""

    def __init__(self, type: str, ed: int, kd: int, nh: int = 8, ar: float = 4, resolution: int = 14,
                 window_resolution: int = 7, kernels: Sequence[int] = (5, 5, 5, 5),
                 fused_attn: bool | None = None) -> None:
        super().__init__()
        if type != "s":
            raise ConfigError(f"stages entry {type!r}: the only EfficientViT token mixer is 's' (self-attention)")
        self.dw0 = Residual(Conv2d_BN(ed, ed, 3, 1, 1, groups=ed, bn_weight_init=0.0))
        self.ffn0 = Residual(FFN(ed, 2 * ed))
        self.mixer = Residual(LocalWindowAttention(ed, kd, nh, ar, resolution, window_resolution, kernels, fused_attn))
        self.dw1 = Residual(Conv2d_BN(ed, ed, 3, 1, 1, groups=ed, bn_weight_init=0.0))
        self.ffn1 = Residual(FFN(ed, 2 * ed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class EfficientViT(nn.Module):
    """EfficientViT (§3.2): a 16x overlapping conv patch embedding, three stages of sandwich blocks joined by
    PatchMerging transitions, global average pooling and a BN-Linear head (plus a distillation head if asked).

    Arguments are the official ones. `fused_attn` (not official) picks the attention kernel, see
    `use_fused_attention`. The model is tied to `img_size` (the attention windows and bias tables follow it).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        stages: Sequence[str] = ("s", "s", "s"),
        embed_dim: Sequence[int] = (64, 128, 192),
        key_dim: Sequence[int] = (16, 16, 16),
        depth: Sequence[int] = (1, 2, 3),
        num_heads: Sequence[int] = (4, 4, 4),
        window_size: Sequence[int] = (7, 7, 7),
        kernels: Sequence[int] = (5, 5, 5, 5),
        down_ops: Sequence[Sequence[Any]] = (("subsample", 2), ("subsample", 2), ("",)),
        distillation: bool = False,
        fused_attn: bool | None = None,
    ) -> None:
        super().__init__()
        if patch_size != 16:
            raise ConfigError(f"patch_size={patch_size}: the EfficientViT stem is four stride-2 convs (16)")
        lengths = {len(v) for v in (stages, embed_dim, key_dim, depth, num_heads, window_size, down_ops)}
        if len(lengths) != 1:
            raise ConfigError("stages, embed_dim, key_dim, depth, num_heads, window_size and down_ops must have the "
                              "same length (one entry per stage)")
        if any(ed % nh for ed, nh in zip(embed_dim, num_heads)):
            raise ConfigError(f"embed_dim={list(embed_dim)} must be divisible by num_heads={list(num_heads)}")
        self.img_size, self.num_classes, self.distillation = img_size, num_classes, distillation
        e0 = embed_dim[0]
        self.patch_embed = nn.Sequential(
            Conv2d_BN(in_chans, e0 // 8, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 8, e0 // 4, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 4, e0 // 2, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 2, e0, 3, 2, 1),
        )
        resolution = img_size // patch_size
        blocks: list[list[nn.Module]] = [[] for _ in embed_dim]
        for i, (stg, ed, kd, dpth, nh, wd, do) in enumerate(
            zip(stages, embed_dim, key_dim, depth, num_heads, window_size, down_ops)
        ):
            ar = ed / (kd * nh)
            for _ in range(dpth):
                blocks[i].append(EfficientViTBlock(stg, ed, kd, nh, ar, resolution, wd, kernels, fused_attn))
            if do[0] == "subsample":
                if i + 1 >= len(embed_dim):
                    raise ConfigError("down_ops: the last stage cannot subsample (there is no next stage)")
                # The transition lives at the start of the next stage's blocks (official key layout).
                blocks[i + 1] += [_dw_ffn(ed), PatchMerging(ed, embed_dim[i + 1])]
                resolution = (resolution - 1) // do[1] + 1
                blocks[i + 1].append(_dw_ffn(embed_dim[i + 1]))
        if len(blocks) != 3:
            raise ConfigError(f"EfficientViT has three stages (blocks1..3), got {len(blocks)}")
        self.blocks1, self.blocks2, self.blocks3 = (nn.Sequential(*b) for b in blocks)
        self.head = BN_Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        if distillation:
            self.head_dist = BN_Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if "attention_biases" in name}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, C3, S/64, S/64)
        return self.blocks3(self.blocks2(self.blocks1(self.patch_embed(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1)  # (B, C3)
        if not self.distillation:
            return self.head(x)
        logits, logits_dist = self.head(x), self.head_dist(x)
        if self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2


# ------------------------------------------------------------------------------------------------------------------
# Paper configurations (Table 7 of the paper; `EfficientViT_m0..m5` in the official build.py)


def efficientvit_m0(**kwargs: Any) -> EfficientViT:
    """EfficientViT-M0: 2.3 M parameters, 79 M FLOPs, 63.2 % ImageNet top-1."""
    return EfficientViT(**{**dict(img_size=224, patch_size=16, embed_dim=[64, 128, 192], depth=[1, 2, 3],
                                  num_heads=[4, 4, 4], window_size=[7, 7, 7], kernels=[5, 5, 5, 5]), **kwargs})


def efficientvit_m1(**kwargs: Any) -> EfficientViT:
    """EfficientViT-M1: 3.0 M parameters, 167 M FLOPs, 68.4 % ImageNet top-1."""
    return EfficientViT(**{**dict(img_size=224, patch_size=16, embed_dim=[128, 144, 192], depth=[1, 2, 3],
                                  num_heads=[2, 3, 3], window_size=[7, 7, 7], kernels=[7, 5, 3, 3]), **kwargs})


def efficientvit_m2(**kwargs: Any) -> EfficientViT:
    """EfficientViT-M2: 4.2 M parameters, 201 M FLOPs, 70.8 % ImageNet top-1."""
    return EfficientViT(**{**dict(img_size=224, patch_size=16, embed_dim=[128, 192, 224], depth=[1, 2, 3],
                                  num_heads=[4, 3, 2], window_size=[7, 7, 7], kernels=[7, 5, 3, 3]), **kwargs})


def efficientvit_m3(**kwargs: Any) -> EfficientViT:
    """EfficientViT-M3: 6.9 M parameters, 263 M FLOPs, 73.4 % ImageNet top-1."""
    return EfficientViT(**{**dict(img_size=224, patch_size=16, embed_dim=[128, 240, 320], depth=[1, 2, 3],
                                  num_heads=[4, 3, 4], window_size=[7, 7, 7], kernels=[5, 5, 5, 5]), **kwargs})


def efficientvit_m4(**kwargs: Any) -> EfficientViT:
    """EfficientViT-M4: 8.8 M parameters, 299 M FLOPs, 74.3 % ImageNet top-1."""
    return EfficientViT(**{**dict(img_size=224, patch_size=16, embed_dim=[128, 256, 384], depth=[1, 2, 3],
                                  num_heads=[4, 4, 4], window_size=[7, 7, 7], kernels=[7, 5, 3, 3]), **kwargs})


def efficientvit_m5(**kwargs: Any) -> EfficientViT:
    """EfficientViT-M5: 12.4 M parameters, 522 M FLOPs, 77.1 % ImageNet top-1."""
    return EfficientViT(**{**dict(img_size=224, patch_size=16, embed_dim=[192, 288, 384], depth=[1, 3, 4],
                                  num_heads=[3, 3, 4], window_size=[7, 7, 7], kernels=[7, 5, 3, 3]), **kwargs})


VARIANTS: dict[str, Callable[..., EfficientViT]] = {
    "m0": efficientvit_m0, "m1": efficientvit_m1, "m2": efficientvit_m2,
    "m3": efficientvit_m3, "m4": efficientvit_m4, "m5": efficientvit_m5,
}


def build(variant: str, **kwargs: Any) -> EfficientViT:
    """The paper configuration `variant` (m0..m5) with `kwargs` overriding the constructor arguments."""
    if variant not in VARIANTS:
        raise ConfigError(f"model.variant={variant!r} is not one of {', '.join(VARIANTS)}")
    return VARIANTS[variant](**kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Deployment re-parameterisation


def fuse_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm into the conv / linear before it, in place (the official `replace_batchnorm`):
    each Conv2d_BN becomes a Conv2d with bias, each BN_Linear a Linear. Eval-mode outputs are unchanged up to float
    rounding; the model has fewer parameters (M0: 2,349,436 -> 2,334,916) and can no longer train its BNs."""
    for name, child in model.named_children():
        if isinstance(child, (Conv2d_BN, BN_Linear)):
            setattr(model, name, child.fuse())
        elif isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.Identity())
        else:
            fuse_bn(child)
    return model


@torch.no_grad()
def fold_residual_dw(model: nn.Module) -> nn.Module:
    """After `fuse_bn`: turn every `Residual(depth-wise 3x3 Conv2d)` into one conv by adding 1 to the centre tap
    (x + w * x == (w + delta) * x), in place. Same function up to float rounding, same parameter count, and one
    fewer read-add-write pass over the feature map per folded residual (two per block, four per transition)."""
    for name, child in model.named_children():
        conv = child.m if isinstance(child, Residual) else None
        if (isinstance(conv, nn.Conv2d) and conv.bias is not None and conv.groups == conv.in_channels
                == conv.out_channels and conv.stride == (1, 1) and conv.kernel_size == (3, 3)
                and conv.padding == (1, 1) and not (child.training and child.drop > 0)):
            conv.weight[:, 0, 1, 1] += 1.0
            setattr(model, name, conv)
        else:
            fold_residual_dw(child)
    return model


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints: official layout, other image sizes, timm


def resize_attention_biases(table: torch.Tensor, resolution: int) -> torch.Tensor:
    """An (h, r^2) bias table resampled to (h, resolution^2): each head's table is a map over the (|dy|, |dx|)
    offset grid (see `attention_bias_index`), interpolated bicubically with antialiasing (LeViT / timm's rule)."""
    heads, offsets = table.shape
    side = round(offsets**0.5)
    if side * side != offsets:
        raise CheckpointError(f"attention_biases of shape {tuple(table.shape)} is not an (heads, r*r) table")
    if side == resolution:
        return table
    grid = table.float().view(1, heads, side, side)  # (1, h, r, r)
    resized = F.interpolate(grid, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True)
    return resized.view(heads, resolution * resolution).to(table.dtype)  # (h, r'^2)


def load_official_state_dict(model: EfficientViT, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict"
                             ) -> EfficientViT:
    """Load a state dict in the official key layout, strictly.

    As the official `build.py` does, 2-D weights of 1x1 convs are given their trailing (1, 1). Bias tables trained
    at another `img_size` are resized to this model's windows and the index buffers are rebuilt, so a 224 checkpoint
    loads into a model built for another resolution. Any other mismatch raises CheckpointError naming the key.
    """
    target = model.state_dict()
    missing = sorted(set(target) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(target))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this EfficientViT ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    converted = {}
    for key, value in state_dict.items():
        want = target[key].shape
        if key.endswith("attention_bias_idxs"):
            value = target[key]  # a function of the window size: rebuilt, not loaded
        elif key.endswith("attention_biases") and value.shape != want:
            if value.shape[0] != want[0]:
                raise CheckpointError(f"{source}: {key} has {value.shape[0]} heads, this model {want[0]}")
            value = resize_attention_biases(value, round(want[1] ** 0.5))
        elif value.ndim == 2 and len(want) == 4 and tuple(want[2:]) == (1, 1):
            value = value[:, :, None, None]
        if value.shape != want:
            raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, this model {tuple(want)}")
        converted[key] = value
    model.load_state_dict(converted, strict=True)
    return model


def load_official_checkpoint(model: EfficientViT, path: str | Path) -> EfficientViT:
    """Load an official EfficientViT checkpoint file (`{'model': state_dict}`, e.g. efficientvit_m4.pth) strictly."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise CheckpointError(f"{path}: cannot read it as a torch checkpoint ({err.__class__.__name__})") from None
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path}: expected {{'model': state_dict}} (the official layout)")
    return load_official_state_dict(model, state_dict, source=str(path))


def convert_timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm `efficientvit_m*` (`EfficientVitMsra`) state dict in the official key layout.

    timm groups each stage as `stages.i.{downsample.{res1,patchmerge,res2}, blocks.k}`, names the stem
    `patch_embed.conv{1..4}`, the Conv2d_BN conv `conv` and the head linear `linear`; its bias index buffers are not
    saved, so they are rebuilt from the table sizes.
    """
    downsampled = {int(k.split(".")[1]) for k in state_dict if k.startswith("stages.") and ".downsample." in k}
    transition = {"res1": 0, "patchmerge": 1, "res2": 2}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "patch_embed":  # patch_embed.conv{n}.conv.w -> patch_embed.{2(n-1)}.c.w
            parts = ["patch_embed", str(2 * (int(parts[1][4:]) - 1)), *parts[2:]]
        elif parts[0] == "stages":
            stage = int(parts[1])
            if parts[2] == "downsample":
                parts = [f"blocks{stage + 1}", str(transition[parts[3]]), *parts[4:]]
            else:  # stages.i.blocks.k -> blocks{i+1}.{k + 3 if the stage starts with a transition}
                offset = 3 if stage in downsampled else 0
                parts = [f"blocks{stage + 1}", str(int(parts[3]) + offset), *parts[4:]]
        elif parts[0] == "head" and parts[1] == "linear":
            parts = ["head", "l", *parts[2:]]
        parts = ["c" if p == "conv" and i == len(parts) - 2 else p for i, p in enumerate(parts)]
        out[".".join(parts)] = value
        if parts[-1] == "attention_biases":
            side = round(value.shape[1] ** 0.5)
            out[".".join([*parts[:-1], "attention_bias_idxs"])] = attention_bias_index(side)
    return out


# ------------------------------------------------------------------------------------------------------------------
# timm registry: `timm.create_model("formerlab_efficientvit_m0")` (timm's own `efficientvit_m0` stays timm's)


def _register_with_timm() -> None:
    from timm.models import register_model

    for variant, factory in VARIANTS.items():
        def entrypoint(pretrained: bool = False, _factory: Callable[..., EfficientViT] = factory,
                       **kwargs: Any) -> EfficientViT:
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(key, None)
            if pretrained:
                raise CheckpointError("formerlab EfficientViT downloads no weights: build it with pretrained=False and "
                                      "call projects.efficientvit.model.load_official_checkpoint(model, path)")
            return _factory(**kwargs)

        entrypoint.__name__ = entrypoint.__qualname__ = f"formerlab_efficientvit_{variant}"
        entrypoint.__module__ = __name__
        entrypoint.__doc__ = factory.__doc__
        globals()[entrypoint.__name__] = entrypoint
        register_model(entrypoint)


_register_with_timm()
