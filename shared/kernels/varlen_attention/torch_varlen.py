"""PyTorch's own variable-length FlashAttention, found by feature detection.

In order of preference:
1. `torch.nn.attention.varlen.varlen_attn` (public since torch 2.10): the FlashAttention-2 varlen kernel behind a
   custom op, with autograd. Whether it takes `scale=` changed between releases, so the signature is inspected;
   without it a non-default scale is folded into q (softmax(c q k^T) = softmax((c sqrt(D)) q k^T / sqrt(D))).
2. `torch.ops.aten._flash_attention_forward` with cumulative sequence lengths (older releases): the same kernel,
   forward only.
Both need CUDA, fp16/bf16 and a head size that is a multiple of 8 up to 256.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor


@functools.cache
def _varlen_attn() -> tuple[Callable, bool] | None:
    """(varlen_attn, takes_scale) when this torch has the public API, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, "scale" in inspect.signature(varlen_attn).parameters


def torch_varlen_api() -> str | None:
    """Which PyTorch varlen path this torch offers: 'varlen_attn', 'aten_flash' or None."""
    if _varlen_attn() is not None:
        return "varlen_attn"
    if hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "aten_flash"
    return None


def supports(q: Tensor) -> bool:
    """Whether the PyTorch varlen kernel takes these tensors."""
    head_dim = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256
            and torch_varlen_api() is not None)


def varlen_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, scale: float | None = None
) -> Tensor:
    """FlashAttention over packed sequences; (total_tokens, H, D) in and out, as the reference."""
    api = torch_varlen_api()
    if api is None or not supports(q):
        raise RuntimeError(f"PyTorch's varlen attention needs CUDA fp16/bf16 tensors, head size a multiple of 8 "
                           f"(<= 256) and torch >= 2.10; got {q.device} {q.dtype} head size {q.shape[-1]} on "
                           f"torch {torch.__version__}")
    cu_seqlens = cu_seqlens.to(torch.int32)
    if api == "varlen_attn":
        fn, takes_scale = _varlen_attn()
        if scale is not None and not takes_scale:
            q, scale = q * (scale * math.sqrt(q.shape[-1])), None
        kwargs = {"scale": scale} if scale is not None else {}
        return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False, False, scale=scale
    )
    return out[0]
