"""The memory scan of `reference.py` as Triton kernels, forward and backward: a program per memory (batch x head) walks
the chunks in order with the memory's weights W_1 (d_0 x d_h), W_2 (d_h x d_out) and momenta S_1, S_2 held in
float32 registers, so a sequence of nc chunks is one launch instead of about 20 small kernels per chunk. Per chunk:

    z = k W_1, a = silu(z), delta_2 = a W_2 - v, delta_1 = (delta_2 W_2^T) silu'(z)    (clipped per token, optional)
    W_l <- A W_l + D S_l + a_{l-1}^T (delta_l * end_M),   S_l <- E S_l + a_{l-1}^T (delta_l * end_S)

and it writes the chunk's start state and its factors (a, delta_1, delta_2) for the reads. Products take the
inputs' dtype (bf16 under autocast, as the reference's matmuls do) and accumulate in float32; the element-wise
work between them stays in float32, where the reference rounds to the input dtype after each operation.
"""

from __future__ import annotations

import functools

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
    def _load_state(w1_ptr, w2_ptr, s1_ptr, s2_ptr, index, D0: tl.constexpr, DH: tl.constexpr, DO: tl.constexpr):
        """The `index`-th (W_1, W_2, S_1, S_2) of four arrays of (D0, DH) and (DH, DO) matrices."""
        w1 = tl.load(_matrix(w1_ptr + index * D0 * DH, D0, DH))
        w2 = tl.load(_matrix(w2_ptr + index * DH * DO, DH, DO))
        s1 = tl.load(_matrix(s1_ptr + index * D0 * DH, D0, DH))
        s2 = tl.load(_matrix(s2_ptr + index * DH * DO, DH, DO))
        return w1, w2, s1, s2

    @triton.jit
    def _store_state(w1_ptr, w2_ptr, s1_ptr, s2_ptr, index, w1, w2, s1, s2, D0: tl.constexpr, DH: tl.constexpr,
                     DO: tl.constexpr):
        tl.store(_matrix(w1_ptr + index * D0 * DH, D0, DH), w1)
        tl.store(_matrix(w2_ptr + index * DH * DO, DH, DO), w2)
        tl.store(_matrix(s1_ptr + index * D0 * DH, D0, DH), s1)
        tl.store(_matrix(s2_ptr + index * DH * DO, DH, DO), s2)

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
        w1, w2, s1, s2 = _load_state(w1_ptr, w2_ptr, s1_ptr, s2_ptr, bh, D0, DH, DO)
        for c in range(NC):
            chunk = bh * NC + c
            _store_state(w1_start_ptr, w2_start_ptr, s1_start_ptr, s2_start_ptr, chunk, w1, w2, s1, s2, D0, DH, DO)
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
        _store_state(w1_ptr, w2_ptr, s1_ptr, s2_ptr, bh, w1, w2, s1, s2, D0, DH, DO)

    @triton.jit
    def _memory_scan_bwd(
        k_ptr, v_ptr, end_ptr, decay_ptr,
        w1_start_ptr, w2_start_ptr, s1_start_ptr, s2_start_ptr,      # the forward's chunk-start states
        gw1_start_ptr, gw2_start_ptr, gs1_start_ptr, gs2_start_ptr,  # their gradients (from the reads)
        ga_ptr, gd1_ptr, gd2_ptr,                                    # gradients of the factors (from the reads)
        dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr,  # in: gradients of the final state; out: of the initial state
        dk_ptr, dv_ptr, dend_ptr, ddecay_ptr,
        NC, max_norm,
        N: tl.constexpr, D0: tl.constexpr, DH: tl.constexpr, DO: tl.constexpr, CLIP: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """The chunks in reverse: recompute a chunk's forward from its saved start state, back-propagate the
        gradients of its end state and of its outputs, and carry the state's gradient to the chunk before."""
        bh = tl.program_id(0).to(tl.int64)
        dt = k_ptr.dtype.element_ty
        rows = tl.arange(0, N)
        dw1, dw2, ds1, ds2 = _load_state(dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr, bh, D0, DH, DO)
        for i in range(NC):
            chunk = bh * NC + NC - 1 - i
            w1, w2, s1, s2 = _load_state(w1_start_ptr, w2_start_ptr, s1_start_ptr, s2_start_ptr, chunk, D0, DH, DO)
            k = tl.load(_matrix(k_ptr + chunk * N * D0, N, D0))
            v = tl.load(_matrix(v_ptr + chunk * N * DO, N, DO)).to(tl.float32)
            end_w = tl.load(end_ptr + chunk * N * 2 + rows * 2).to(tl.float32)
            end_s = tl.load(end_ptr + chunk * N * 2 + rows * 2 + 1).to(tl.float32)
            keep_w = tl.load(decay_ptr + chunk * 3)
            keep_s = tl.load(decay_ptr + chunk * 3 + 1)
            keep_m = tl.load(decay_ptr + chunk * 3 + 2)
            # the chunk's forward again
            z = dot(k, w1.to(dt), None, PRECISION, UPCAST)
            sig = tl.sigmoid(z)
            a = (z * sig).to(dt).to(tl.float32)  # as stored and used by the forward
            slope = sig * (1 + z * (1 - sig))  # silu'(z)
            delta2_raw = dot(a.to(dt), w2.to(dt), None, PRECISION, UPCAST) - v
            back = dot(delta2_raw.to(dt), tl.trans(w2.to(dt)), None, PRECISION, UPCAST)
            delta1_raw = back * slope
            if CLIP:
                kf = k.to(tl.float32)
                kk, aa = tl.sum(kf * kf, 1), tl.sum(a * a, 1)
                dd1, dd2 = tl.sum(delta1_raw * delta1_raw, 1), tl.sum(delta2_raw * delta2_raw, 1)
                sq = 4 * (kk * dd1 + aa * dd2)
                scale = max_norm / tl.sqrt(tl.maximum(sq, max_norm * max_norm))
                delta1 = (delta1_raw * scale[:, None]).to(dt).to(tl.float32)
                delta2 = (delta2_raw * scale[:, None]).to(dt).to(tl.float32)
            else:
                delta1 = delta1_raw.to(dt).to(tl.float32)
                delta2 = delta2_raw.to(dt).to(tl.float32)
            # the decays: W' = A W + D S + U_W, S' = E S + U_S
            d_keep_w = tl.sum(tl.sum(dw1 * w1, 1), 0) + tl.sum(tl.sum(dw2 * w2, 1), 0)
            d_keep_s = tl.sum(tl.sum(dw1 * s1, 1), 0) + tl.sum(tl.sum(dw2 * s2, 1), 0)
            d_keep_m = tl.sum(tl.sum(ds1 * s1, 1), 0) + tl.sum(tl.sum(ds2 * s2, 1), 0)
            tl.store(ddecay_ptr + chunk * 3, d_keep_w)
            tl.store(ddecay_ptr + chunk * 3 + 1, d_keep_s)
            tl.store(ddecay_ptr + chunk * 3 + 2, d_keep_m)
            # the updates U = a_{l-1}^T (delta_l * end): gradients of delta, a_{l-1} and end
            k_dw1 = dot(k, dw1.to(dt), None, PRECISION, UPCAST)  # (N, DH)
            k_ds1 = dot(k, ds1.to(dt), None, PRECISION, UPCAST)
            a_dw2 = dot(a.to(dt), dw2.to(dt), None, PRECISION, UPCAST)  # (N, DO)
            a_ds2 = dot(a.to(dt), ds2.to(dt), None, PRECISION, UPCAST)
            g_delta1 = k_dw1 * end_w[:, None] + k_ds1 * end_s[:, None]
            g_delta1 += tl.load(_matrix(gd1_ptr + chunk * N * DH, N, DH)).to(tl.float32)
            g_delta2 = a_dw2 * end_w[:, None] + a_ds2 * end_s[:, None]
            g_delta2 += tl.load(_matrix(gd2_ptr + chunk * N * DO, N, DO)).to(tl.float32)
            d_end_w = tl.sum(k_dw1 * delta1, 1) + tl.sum(a_dw2 * delta2, 1)
            d_end_s = tl.sum(k_ds1 * delta1, 1) + tl.sum(a_ds2 * delta2, 1)
            tl.store(dend_ptr + chunk * N * 2 + rows * 2, d_end_w.to(dend_ptr.dtype.element_ty))
            tl.store(dend_ptr + chunk * N * 2 + rows * 2 + 1, d_end_s.to(dend_ptr.dtype.element_ty))
            dk = dot((delta1 * end_w[:, None]).to(dt), tl.trans(dw1.to(dt)), None, PRECISION, UPCAST)
            dk = dot((delta1 * end_s[:, None]).to(dt), tl.trans(ds1.to(dt)), dk, PRECISION, UPCAST)  # (N, D0)
            da = dot((delta2 * end_w[:, None]).to(dt), tl.trans(dw2.to(dt)), None, PRECISION, UPCAST)
            da = dot((delta2 * end_s[:, None]).to(dt), tl.trans(ds2.to(dt)), da, PRECISION, UPCAST)  # (N, DH)
            da += tl.load(_matrix(ga_ptr + chunk * N * DH, N, DH)).to(tl.float32)
            # the clip: delta = delta_raw * scale(||u||^2)
            if CLIP:
                g_delta1_raw = g_delta1 * scale[:, None]
                g_delta2_raw = g_delta2 * scale[:, None]
                d_scale = tl.sum(g_delta1 * delta1_raw, 1) + tl.sum(g_delta2 * delta2_raw, 1)
                d_sq = tl.where(sq > max_norm * max_norm, -0.5 * d_scale * scale / sq, 0.0)  # d scale / d sq
                dk += (8 * d_sq * dd1)[:, None] * kf
                g_delta1_raw += (8 * d_sq * kk)[:, None] * delta1_raw
                da += (8 * d_sq * dd2)[:, None] * a
                g_delta2_raw += (8 * d_sq * aa)[:, None] * delta2_raw
            else:
                g_delta1_raw, g_delta2_raw = g_delta1, g_delta2
            # delta1_raw = (delta2_raw W_2^T) silu'(z), delta2_raw = a W_2 - v, a = silu(z), z = k W_1
            g_back = g_delta1_raw * slope
            dz = g_delta1_raw * back * sig * (1 - sig) * (2 + z * (1 - 2 * sig))  # silu''(z)
            g_delta2_raw += dot(g_back.to(dt), w2.to(dt), None, PRECISION, UPCAST)
            dw2_mlp = dot(tl.trans(g_back.to(dt)), delta2_raw.to(dt), None, PRECISION, UPCAST)  # (DH, DO)
            da += dot(g_delta2_raw.to(dt), tl.trans(w2.to(dt)), None, PRECISION, UPCAST)
            dw2_mlp = dot(tl.trans(a.to(dt)), g_delta2_raw.to(dt), dw2_mlp, PRECISION, UPCAST)
            dz += da * slope
            dk = dot(dz.to(dt), tl.trans(w1.to(dt)), dk, PRECISION, UPCAST)
            dw1_mlp = dot(tl.trans(k), dz.to(dt), None, PRECISION, UPCAST)  # (D0, DH)
            tl.store(_matrix(dk_ptr + chunk * N * D0, N, D0), dk.to(dk_ptr.dtype.element_ty))
            tl.store(_matrix(dv_ptr + chunk * N * DO, N, DO), (-g_delta2_raw).to(dv_ptr.dtype.element_ty))
            # the state's gradient at the chunk start
            gw1, gw2, gs1, gs2 = _load_state(gw1_start_ptr, gw2_start_ptr, gs1_start_ptr, gs2_start_ptr, chunk,
                                             D0, DH, DO)
            ds1 = keep_s * dw1 + keep_m * ds1 + gs1
            dw1 = keep_w * dw1 + dw1_mlp + gw1
            ds2 = keep_s * dw2 + keep_m * ds2 + gs2
            dw2 = keep_w * dw2 + dw2_mlp + gw2
        _store_state(dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr, bh, dw1, dw2, ds1, ds2, D0, DH, DO)


def _power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def supports(weights: tuple[Tensor, ...], k: Tensor, act: str) -> bool:
    """A 2-layer SiLU memory whose chunk length and widths are powers of two >= 16, state in float32, at most
    128 x 128 weights (the four state matrices of a program live in registers), and, on a GPU, kernels that fit its
    shared memory (`fits_shared_memory`)."""
    if len(weights) != 2 or act != "silu" or any(w.dtype != torch.float32 for w in weights):
        return False
    (d0, dh), (_, do) = weights[0].shape[1:], weights[1].shape[1:]
    n = k.shape[2]
    if not (all(_power_of_two(x) for x in (n, d0, dh, do)) and d0 * dh <= 128 * 128 and dh * do <= 128 * 128):
        return False
    if not k.is_cuda or interpreting():
        return True
    dtype = product_dtype(k)
    return fits_shared_memory(k.device.index or 0, dtype, dot_options(dtype)["PRECISION"], n, d0, dh, do)


def product_dtype(k: Tensor) -> torch.dtype:
    """The dtype the kernels multiply in: autocast's when it is on (the reference's matmuls run in it; CUDA autocast
    leaves the l2-normalised keys in float32), else the keys'."""
    if torch.is_autocast_enabled(k.device.type):
        return torch.get_autocast_dtype(k.device.type)
    return k.dtype


def launch_options(dh: int) -> dict:
    """num_stages=1: the chunk loop is sequential, and pipelining it multiplies the shared-memory buffers of the
    products (the backward at d_0 = 64, d_h = 128 in bf16 asks for 262 KB with 3 stages, 131 KB with 1)."""
    return {} if interpreting() else {"num_warps": 4 if dh <= 64 else 8, "num_stages": 1}


@functools.cache
def fits_shared_memory(device_index: int, dtype: torch.dtype, precision: str, n: int, d0: int, dh: int,
                       do: int) -> bool:
    """Whether both kernels, compiled for this GPU (with the clip, the larger variant), ask for no more shared memory
    than it has: the backward keeps about eight state-sized operands of its products there (at 64 x 128: 131 KB in
    bf16, 311 KB in float32, against 227 KB on an H100 / H200)."""
    f32 = torch.float32
    nc = 16  # Triton specializes integers divisible by 16, as the chunk counts of power-of-two lengths >= 16 b are:
    # the same specialization as those launches, rather than one compiled for this check alone
    options = dict(N=n, D0=d0, DH=dh, DO=do, CLIP=True, PRECISION=precision, UPCAST=False, **launch_options(dh))
    with torch.cuda.device(device_index):
        forward = _memory_scan_fwd.warmup(dtype, dtype, dtype, f32, *[f32] * 8, dtype, dtype, dtype, nc, 1.0,
                                          grid=(1,), **options)
        backward = _memory_scan_bwd.warmup(dtype, dtype, dtype, f32, *[f32] * 8, dtype, dtype, dtype, *[f32] * 4,
                                           dtype, dtype, dtype, f32, nc, 1.0, grid=(1,), **options)
    limit = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return max(forward.metadata.shared, backward.metadata.shared) <= limit


class MemoryScanFunction(torch.autograd.Function):
    """Autograd wrapper of the two kernels. Inputs: the state (w1, w2, s1, s2) float32, k, v, end of one dtype,
    decay float32, all contiguous; outputs: the final state, every chunk's start state, and the factors."""

    @staticmethod
    def forward(ctx, w1: Tensor, w2: Tensor, s1: Tensor, s2: Tensor, k: Tensor, v: Tensor, end: Tensor,
                decay: Tensor, max_norm: float | None) -> tuple[Tensor, ...]:
        bh, nc, n, d0 = k.shape
        dh, do = w1.shape[2], w2.shape[2]
        final = [t.clone() for t in (w1, w2, s1, s2)]  # updated in place to the final state
        w1_start, w2_start = w1.new_empty(bh, nc, d0, dh), w1.new_empty(bh, nc, dh, do)
        s1_start, s2_start = w1.new_empty(bh, nc, d0, dh), w1.new_empty(bh, nc, dh, do)
        a, delta1, delta2 = k.new_empty(bh, nc, n, dh), k.new_empty(bh, nc, n, dh), k.new_empty(bh, nc, n, do)
        _memory_scan_fwd[(bh,)](
            k, v, end, decay, *final, w1_start, w2_start, s1_start, s2_start, a, delta1, delta2,
            nc, float(max_norm or 0.0), N=n, D0=d0, DH=dh, DO=do, CLIP=max_norm is not None,
            **dot_options(k.dtype), **launch_options(dh),
        )
        ctx.save_for_backward(k, v, end, decay, w1_start, w2_start, s1_start, s2_start)
        ctx.max_norm = max_norm
        return (*final, w1_start, w2_start, s1_start, s2_start, a, delta1, delta2)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        k, v, end, decay, w1_start, w2_start, s1_start, s2_start = ctx.saved_tensors
        bh, nc, n, d0 = k.shape
        dh, do = w1_start.shape[3], w2_start.shape[3]
        like = (w1_start[:, 0], w2_start[:, 0], s1_start[:, 0], s2_start[:, 0], w1_start, w2_start, s1_start,
                s2_start, k.new_empty(bh, nc, n, dh), k.new_empty(bh, nc, n, dh), k.new_empty(bh, nc, n, do))
        grads = [torch.zeros_like(t) if g is None else g.contiguous() for g, t in zip(grads, like)]
        state_grads = [g.float().clone() for g in grads[:4]]  # carried back to the initial state in place
        dk, dv, dend = torch.empty_like(k), torch.empty_like(v), torch.empty_like(end)
        ddecay = torch.empty_like(decay)
        _memory_scan_bwd[(bh,)](
            k, v, end, decay, w1_start, w2_start, s1_start, s2_start, *grads[4:], *state_grads,
            dk, dv, dend, ddecay, nc, float(ctx.max_norm or 0.0), N=n, D0=d0, DH=dh, DO=do,
            CLIP=ctx.max_norm is not None, **dot_options(k.dtype), **launch_options(dh),
        )
        return (*state_grads, dk, dv, dend, ddecay, None)


def memory_scan_triton(weights: tuple[Tensor, ...], momentum: tuple[Tensor, ...], k: Tensor, v: Tensor,
                       end: Tensor, decay: Tensor, max_surprise_norm: float | None = None) -> ScanResult:
    """`memory_scan_reference` for a 2-layer SiLU memory (see `supports`), forward and backward."""
    (w1, w2), (s1, s2) = ((t.float().contiguous() for t in pair) for pair in (weights, momentum))
    dtype = product_dtype(k)
    k, v, end = (t.to(dtype).contiguous() for t in (k, v, end))
    out = MemoryScanFunction.apply(w1, w2, s1, s2, k, v, end, decay.float().contiguous(), max_surprise_norm)
    w1, w2, s1, s2, w1_start, w2_start, s1_start, s2_start, a, delta1, delta2 = out
    return ScanResult((w1, w2), (s1, s2), [w1_start, w2_start], [s1_start, s2_start], [a], [delta1, delta2])
