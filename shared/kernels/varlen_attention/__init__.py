"""Variable-length attention over packed tokens: `varlen_attention(q, k, v, cu_seqlens, max_seqlen)`.

    from shared.kernels.varlen_attention import pack_info, pack, unpack, varlen_attention
    info = pack_info(attention_mask)                       # prefix sums of the mask (ByteTransformer)
    x = pack(hidden, info)                                 # (total_tokens, d): valid tokens only
    out = varlen_attention(q, k, v, info.cu_seqlens, info.max_seqlen)   # q, k, v: (total_tokens, H, D)
    hidden = unpack(x, info)                               # (B, L, d), zeros at padded positions

Backends (`backend=`):
- `reference`: plain PyTorch, one sequence at a time (`reference.py`, the spec; any device, autograd);
- `torch`: PyTorch's varlen FlashAttention (`torch.nn.attention.varlen.varlen_attn`, feature-detected in
  `torch_varlen.py`; CUDA fp16/bf16, autograd);
- `triton`: our fused kernel (`triton_varlen.py`; forward only; on CPU it needs `TRITON_INTERPRET=1`);
- `auto`: the reference off CUDA and for fp32; with gradients PyTorch's path (the Triton kernel has no
  backward); for inference the Triton kernel while the longest sequence is at most `TRITON_MAX_SEQLEN` (1024:
  up to there it beat PyTorch's kernel inside BERT-base on the H200 at every batch size and length measured, see
  projects/bytetransformer/README.md; longer sequences were not measured), PyTorch's beyond.
`FORMERLAB_VARLEN_ATTENTION=reference|torch|triton` overrides `auto` (debugging, or a GPU without Triton).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from shared.kernels.varlen_attention.packing import PackInfo, pack, pack_info, unpack
from shared.kernels.varlen_attention.reference import check_inputs, varlen_attention_reference

__all__ = ["varlen_attention", "varlen_attention_reference", "choose_backend", "PackInfo", "pack_info", "pack",
           "unpack", "BACKENDS", "TRITON_MAX_SEQLEN"]

BACKENDS = ("auto", "reference", "torch", "triton")
ENV_VAR = "FORMERLAB_VARLEN_ATTENTION"
TRITON_MAX_SEQLEN = 1024


def choose_backend(q: Tensor, max_seqlen: int, needs_grad: bool, backend: str = "auto") -> str:
    """The backend `varlen_attention` runs for these arguments (see the module docstring)."""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"varlen_attention backend {backend!r} (or ${ENV_VAR}) is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    if not q.is_cuda or q.dtype == torch.float32:
        return "reference"
    from shared.kernels.varlen_attention.torch_varlen import supports

    if needs_grad:
        return "torch" if supports(q) else "reference"
    if max_seqlen <= TRITON_MAX_SEQLEN or not supports(q):
        return "triton"
    return "torch"


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """softmax(scale q k^T) v within each packed sequence (scale defaults to 1/sqrt(D)).

    q, k, v: (total_tokens, H, D); cu_seqlens: (N + 1,) int32 prefix sums of the lengths; max_seqlen >= every
    length. Returns (total_tokens, H, D) in q's dtype.
    """
    check_inputs(q, k, v, cu_seqlens)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    chosen = choose_backend(q, max_seqlen, needs_grad, backend)
    if chosen == "torch":
        from shared.kernels.varlen_attention.torch_varlen import varlen_attention_torch

        return varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    if chosen == "triton":
        if needs_grad:
            raise RuntimeError("varlen_attention backend='triton' is forward-only: use 'torch' or 'auto' to train")
        from shared.kernels.varlen_attention.triton_varlen import varlen_attention_triton

        return varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, scale=scale)
