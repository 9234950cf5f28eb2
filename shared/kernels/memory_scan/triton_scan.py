"""The memory scan of `reference.py` as one Triton kernel (forward only): a program per memory (batch x head) walks
the chunks in order with the memory's weights W_1 (d_0 x d_h), W_2 (d_h x d_out) and momenta S_1, S_2 held in
float32 registers, so a sequence of nc chunks is one launch instead of about 20 small kernels per chunk. Per chunk:

    z = k W_1, a = silu(z), delta_2 = a W_2 - v, delta_1 = (delta_2 W_2^T) silu'(z)    (clipped per token, optional)
    W_l <- A W_l + D S_l + a_{l-1}^T (delta_l * end_M),   S_l <- E S_l + a_{l-1}^T (delta_l * end_S)

and it writes the chunk's start state and its factors (a, delta_1, delta_2) for the reads. Products take the
inputs' dtype (bf16 under autocast, as the reference's matmuls do) and accumulate in float32; the element-wise
work between them stays in float32, where the reference rounds to the input dtype after each operation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shared.kernels.memory_scan.reference import ScanResult
from shared.kernels.triton_common import dot_options, interpreting, triton

if triton is not None:
    import triton.language as tl

    from shared.kernels.triton_common import dot

    @triton.jit
    def _matrix(ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
        """Offsets of a contiguous (ROWS, COLS) matrix at `ptr`."""
        return ptr + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]

    @triton.jit
    def _memory_scan_fwd(
        k_ptr, v_ptr, end_ptr, decay_ptr,                  # (BH, NC, N, D0) (BH, NC, N, DO) (BH, NC, N, 2) (BH, NC, 3)
        w1_ptr, w2_ptr, s1_ptr, s2_ptr,                    # the state: in at the start, out at the end
        w1_start_ptr, w2_start_ptr, s1_start_ptr, s2_start_ptr,  # (BH, NC, ...): every chunk's start state
        a_ptr, d1_ptr, d2_ptr,                             # (BH, NC, N, DH), (BH, NC, N, DH), (BH, NC, N, DO)
        NC, max_norm,
        N: tl.constexpr, D0: tl.constexpr, DH: tl.constexpr, DO: tl.constexpr, CLIP: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        dt = k_ptr.dtype.element_ty
        rows = tl.arange(0, N)
        w1 = tl.load(_matrix(w1_ptr + bh * D0 * DH, D0, DH))
        s1 = tl.load(_matrix(s1_ptr + bh * D0 * DH, D0, DH))
        w2 = tl.load(_matrix(w2_ptr + bh * DH * DO, DH, DO))
        s2 = tl.load(_matrix(s2_ptr + bh * DH * DO, DH, DO))
        for c in range(NC):
            chunk = bh * NC + c
            tl.store(_matrix(w1_start_ptr + chunk * D0 * DH, D0, DH), w1)
            tl.store(_matrix(s1_start_ptr + chunk * D0 * DH, D0, DH), s1)
            tl.store(_matrix(w2_start_ptr + chunk * DH * DO, DH, DO), w2)
            tl.store(_matrix(s2_start_ptr + chunk * DH * DO, DH, DO), s2)
            k = tl.load(_matrix(k_ptr + chunk * N * D0, N, D0))  # (N, D0)
            v = tl.load(_matrix(v_ptr + chunk * N * DO, N, DO)).to(tl.float32)  # (N, DO)
            end_w = tl.load(end_ptr + chunk * N * 2 + rows * 2).to(tl.float32)  # (N,)
            end_s = tl.load(end_ptr + chunk * N * 2 + rows * 2 + 1).to(tl.float32)
            keep_w = tl.load(decay_ptr + chunk * 3)  # A_n
            keep_s = tl.load(decay_ptr + chunk * 3 + 1)  # D_n
            keep_m = tl.load(decay_ptr + chunk * 3 + 2)  # E_n
            # the memory's forward pass and its backward pass written out
            z = dot(k, w1.to(dt), None, PRECISION, UPCAST)  # (N, DH)
            sig = tl.sigmoid(z)
            a = z * sig
            delta2 = dot(a.to(dt), w2.to(dt), None, PRECISION, UPCAST) - v  # (N, DO)
            delta1 = dot(delta2.to(dt), tl.trans(w2.to(dt)), None, PRECISION, UPCAST) * (sig * (1 + z * (1 - sig)))
            if CLIP:  # ||u_j||^2 = 4 (|k_j|^2 |delta1_j|^2 + |a_j|^2 |delta2_j|^2)
                kf = k.to(tl.float32)
                sq = tl.sum(kf * kf, 1) * tl.sum(delta1 * delta1, 1) + tl.sum(a * a, 1) * tl.sum(delta2 * delta2, 1)
                sq = 4 * sq
                scale = max_norm / tl.sqrt(tl.maximum(sq, max_norm * max_norm))
                delta1 = delta1 * scale[:, None]
                delta2 = delta2 * scale[:, None]
            tl.store(_matrix(a_ptr + chunk * N * DH, N, DH), a.to(dt))
            tl.store(_matrix(d1_ptr + chunk * N * DH, N, DH), delta1.to(dt))
            tl.store(_matrix(d2_ptr + chunk * N * DO, N, DO), delta2.to(dt))
            # both updates of both layers: a_{l-1}^T (delta_l * end)
            kt, at = tl.trans(k), tl.trans(a.to(dt))
            u1w = dot(kt, (delta1 * end_w[:, None]).to(dt), None, PRECISION, UPCAST)
            u1s = dot(kt, (delta1 * end_s[:, None]).to(dt), None, PRECISION, UPCAST)
            u2w = dot(at, (delta2 * end_w[:, None]).to(dt), None, PRECISION, UPCAST)
            u2s = dot(at, (delta2 * end_s[:, None]).to(dt), None, PRECISION, UPCAST)
            w1, s1 = keep_w * w1 + keep_s * s1 + u1w, keep_m * s1 + u1s
            w2, s2 = keep_w * w2 + keep_s * s2 + u2w, keep_m * s2 + u2s
        tl.store(_matrix(w1_ptr + bh * D0 * DH, D0, DH), w1)
        tl.store(_matrix(s1_ptr + bh * D0 * DH, D0, DH), s1)
        tl.store(_matrix(w2_ptr + bh * DH * DO, DH, DO), w2)
        tl.store(_matrix(s2_ptr + bh * DH * DO, DH, DO), s2)


def _power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def supports(weights: tuple[Tensor, ...], k: Tensor, act: str) -> bool:
    """A 2-layer SiLU memory whose chunk length and widths are powers of two >= 16, state in float32, and at most
    128 x 128 weights (the four state matrices of a program live in registers)."""
    if len(weights) != 2 or act != "silu" or any(w.dtype != torch.float32 for w in weights):
        return False
    (d0, dh), (_, do) = weights[0].shape[1:], weights[1].shape[1:]
    return all(_power_of_two(n) for n in (k.shape[2], d0, dh, do)) and d0 * dh <= 128 * 128 and dh * do <= 128 * 128


@torch.no_grad()
def memory_scan_triton(weights: tuple[Tensor, ...], momentum: tuple[Tensor, ...], k: Tensor, v: Tensor,
                       end: Tensor, decay: Tensor, max_surprise_norm: float | None = None) -> ScanResult:
    """`memory_scan_reference` for a 2-layer SiLU memory (see `supports`), without autograd."""
    bh, nc, n, d0 = k.shape
    dh, do = weights[0].shape[2], weights[1].shape[2]
    k, v, end = k.contiguous(), v.to(k.dtype).contiguous(), end.contiguous()
    decay = decay.float().contiguous()
    w1, w2 = (w.float().clone().contiguous() for w in weights)  # updated in place to the final state
    s1, s2 = (s.float().clone().contiguous() for s in momentum)
    state = dict(device=k.device, dtype=torch.float32)
    starts = [torch.empty(bh, nc, d0, dh, **state), torch.empty(bh, nc, dh, do, **state)]
    momentum_starts = [torch.empty(bh, nc, d0, dh, **state), torch.empty(bh, nc, dh, do, **state)]
    a = k.new_empty(bh, nc, n, dh)
    delta1, delta2 = k.new_empty(bh, nc, n, dh), k.new_empty(bh, nc, n, do)
    opts = {} if interpreting() else {"num_warps": 4 if dh <= 64 else 8}
    _memory_scan_fwd[(bh,)](
        k, v, end, decay, w1, w2, s1, s2, starts[0], starts[1], momentum_starts[0], momentum_starts[1],
        a, delta1, delta2, nc, float(max_surprise_norm or 0.0),
        N=n, D0=d0, DH=dh, DO=do, CLIP=max_surprise_norm is not None, **dot_options(k.dtype), **opts,
    )
    return ScanResult((w1, w2), (s1, s2), starts, momentum_starts, [a], [delta1, delta2])
