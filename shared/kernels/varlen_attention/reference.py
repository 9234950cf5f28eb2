"""Variable-length (block-diagonal) attention over packed tokens, in plain PyTorch: the specification.

The tokens of N sequences lie back to back in one `(total_tokens, H, D)` tensor (ByteTransformer's padding-free
layout, Zhai et al. 2023; FlashAttention's "varlen" API). `cu_seqlens` (N + 1,) holds the prefix sums of
the lengths, so sequence i is rows `cu_seqlens[i]:cu_seqlens[i + 1]`. Every token attends to the tokens of its
own sequence only:

    out_t = softmax(scale * q_t K_s^T) V_s,   s = the sequence of token t,   scale = 1 / sqrt(D) by default

which equals BERT's padded attention with an additive -inf mask on the padded keys, evaluated on the valid
queries. Rows past `cu_seqlens[-1]` (a bucket's spare capacity) belong to no sequence: zeros here, unspecified
in the fast paths.
Arithmetic is float32 for half inputs (float64 stays float64); the result has q's dtype. Differentiable.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_inputs(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> None:
    """One clear error for tensors the varlen kernels cannot take."""
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"varlen_attention expects q, k, v of one shape (total_tokens, H, D), got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"varlen_attention: cu_seqlens must be a 1-D int32 tensor of N + 1 prefix sums, got "
                         f"shape {tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"varlen_attention: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")


def varlen_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int | None = None, *, scale: float | None = None
) -> Tensor:
    """Softmax attention within each packed sequence. q, k, v: (total_tokens, H, D); returns (total_tokens, H, D).

    `max_seqlen` is accepted for the dispatcher's signature and unused: the loop reads each length itself.
    """
    check_inputs(q, k, v, cu_seqlens)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(q.shape, dtype=compute, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].to(compute).transpose(0, 1) for t in (q, k, v))  # (H, len, D)
        weights = torch.softmax(scale * qs @ ks.transpose(-2, -1), dim=-1)  # (H, len, len)
        out[start:end] = (weights @ vs).transpose(0, 1)  # (len, H, D)
    return out.to(q.dtype)
