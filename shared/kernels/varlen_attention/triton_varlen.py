"""Our fused variable-length attention in Triton (forward only): ByteTransformer's fused MHA for packed tokens.

ByteTransformer (Zhai et al. 2023, "fused MHA") never materialises the padded (B, H, L, L) score tensor: a
short-sequence kernel keeps one sequence's scores in shared memory and a long-sequence one fuses the softmax
into a grouped GEMM. Here one kernel covers both regimes in FlashAttention's way (online softmax over key
blocks, Dao et al. 2022, Alg. 1), reading q, k, v straight from the packed (total_tokens, H, D) layout:

- the grid is (query blocks of the longest sequence, sequence x head); a program whose query block starts past
  its sequence's end returns at once, so no work is spent on padding;
- a program's key loop stops at its own sequence's length, so a short sequence costs one or two key blocks: the
  short-sequence regime the paper's register/shared-memory kernel targets;
- q, k, v may be strided views of one fused QKV projection (the last dimension must be contiguous): no copies.

Block sizes are autotuned on CUDA, keyed by the power-of-two bucket of the longest sequence and of the number of
(sequence, head) pairs. Softmax statistics are float32 in the log2 domain; the two matrix products take the
input dtype (fp16/bf16; fp32 inputs use TF32 on the GPU). There is no backward: training takes PyTorch's varlen
path (see the dispatcher in `__init__.py`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634


@triton.jit
def _varlen_attention_fwd(
    Q, K, V, Out, cu_seqlens, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_heads, seqlen_key, pairs_key,  # the last two key the autotuner only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block_m = tl.program_id(0)
    pair = tl.program_id(1)
    seq = pair // num_heads
    head = pair % num_heads
    start = tl.load(cu_seqlens + seq)
    length = tl.load(cu_seqlens + seq + 1) - start
    if block_m * BLOCK_M >= length:  # past this sequence's end: the padding ByteTransformer never computes
        return

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < length
    q_rows = (start + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < length
        kv_rows = (start + cols).to(tl.int64)
        k_t = tl.load(K + kv_rows[None, :] * stride_kt + head * stride_kh + offs_d[:, None],
                      mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        scores = tl.dot(q, k_t) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        correction = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(p, 1)
        v = tl.load(V + kv_rows[:, None] * stride_vt + head * stride_vh + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)
        row_max = new_max

    out = acc / row_sum[:, None]
    tl.store(Out + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3),
                         (64, 32, 4, 2), (32, 64, 4, 2)]
]
_varlen_attention_fwd_tuned = triton.autotune(_CONFIGS, key=["seqlen_key", "pairs_key", "HEAD_DIM"])(
    _varlen_attention_fwd
)

# Under TRITON_INTERPRET=1 (CPU tests) blocks are tiny so short test sequences still span several of them.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def varlen_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, scale: float | None = None
) -> Tensor:
    """Softmax attention within each packed sequence; (total_tokens, H, D) in and out, as the reference.

    `max_seqlen` must be >= every length (it sizes the grid). Forward only: the result carries no gradient.
    """
    total, num_heads, head_dim = q.shape
    if head_dim > 256:
        raise ValueError(f"varlen_attention_triton: head size {head_dim} > 256")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(total, num_heads, head_dim, dtype=q.dtype, device=q.device)
    batch = cu_seqlens.numel() - 1
    if total == 0 or batch == 0 or max_seqlen == 0:
        return out.zero_()
    qk_scale = (1.0 / math.sqrt(head_dim) if scale is None else scale) * LOG2E
    args = (q, k, v, out, cu_seqlens.to(torch.int32), qk_scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            num_heads, triton.next_power_of_2(max_seqlen), triton.next_power_of_2(batch * num_heads))
    block_d = max(16, triton.next_power_of_2(head_dim))
    if q.is_cuda:
        def grid(meta):
            return triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch * num_heads

        _varlen_attention_fwd_tuned[grid](*args, HEAD_DIM=head_dim, BLOCK_D=block_d)
    else:
        grid = (triton.cdiv(max_seqlen, _INTERPRETER_BLOCKS["BLOCK_M"]), batch * num_heads)
        _varlen_attention_fwd[grid](*args, HEAD_DIM=head_dim, BLOCK_D=block_d, **_INTERPRETER_BLOCKS)
    return out
