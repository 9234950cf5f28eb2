"""The memory scan of `reference.py` as Triton kernels, forward and backward: a program per memory (batch x head) walks
the chunks in order with the memory's weights W_1 (d_0 x d_h), W_2 (d_h x d_out) and momenta S_1, S_2 held in
float32 registers, so a sequence of nc chunks is one launch instead of about 20 small kernels per chunk. Per chunk:

    z = k W_1, a = silu(z), delta_2 = a W_2 - v, delta_1 = (delta_2 W_2^T) silu'(z)    (clipped per token, optional)
    W_l <- A W_l + D S_l + a_{l-1}^T (delta_l * end_M),   S_l <- E S_l + a_{l-1}^T (delta_l * end_S)

and it writes the chunk's start state and its factors (a, delta_1, delta_2) for the reads. Within a chunk every row
(token) is independent given the chunk-start weights, so the kernels take its rows `R` at a time (`block_rows`), adding
each block's part of the update to the state: what lives in registers beside the state is R rows of activations, not the
chunk's (the backward of the `small` memory, compiled for Hopper, spilled 6.3 KB of stack a thread with its 64 rows at
once, 0.35 KB with 16; the forward takes 32 rows without spilling).

The backward is two kernels. The sequential one walks the chunks in reverse, carrying the state's gradient from each
chunk's end to its start, and computes beside it only what needs the recomputed forward of the rows (d z, d v, the
clip's factor); it writes the carried gradient at every chunk boundary to (BH, NC + 1, ...) arrays, as large as the
forward's chunk-start states. A second kernel, a program per chunk, then derives from them and the forward's factors
what no later chunk needs: the decays', `end`'s and the keys' gradients. Splitting it so shortened the sequential
chain by a quarter on an H100 (1.52 -> 1.14 ms at T = 1,024, 4.88 -> 3.51 ms at 8,192 for a layer of the `small`
memory at 32,768 tokens) for about 0.45 ms of parallel work and, at 8,192, 315 MB more peak memory per layer.

Products take the inputs' dtype (bf16 under autocast, as the reference's matmuls do) and accumulate in float32; the
element-wise work between them stays in float32, where the reference rounds to the input dtype after each
operation.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from shared.kernels.memory_scan.reference import ScanResult, product_dtype
from shared.kernels.triton_common import dot_options, interpreting, triton

if triton is not None:
    import triton.language as tl

    from shared.kernels.triton_common import dot

    @triton.jit
    def _matrix(ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
        """Offsets of a contiguous (ROWS, COLS) matrix at `ptr`."""
        return ptr + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]

    @triton.jit
    def _ld(ptr, index, ROWS: tl.constexpr, COLS: tl.constexpr):
        """The `index`-th of an array of contiguous (ROWS, COLS) matrices at `ptr`."""
        return tl.load(_matrix(ptr + index * ROWS * COLS, ROWS, COLS))

    @triton.jit
    def _st(ptr, index, x, ROWS: tl.constexpr, COLS: tl.constexpr):
        tl.store(_matrix(ptr + index * ROWS * COLS, ROWS, COLS), x)

    @triton.jit
    def _load_state(w1_ptr, w2_ptr, s1_ptr, s2_ptr, index, D0: tl.constexpr, DH: tl.constexpr, DO: tl.constexpr):
        """The `index`-th (W_1, W_2, S_1, S_2) of four arrays of (D0, DH) and (DH, DO) matrices."""
        return (_ld(w1_ptr, index, D0, DH), _ld(w2_ptr, index, DH, DO), _ld(s1_ptr, index, D0, DH),
                _ld(s2_ptr, index, DH, DO))

    @triton.jit
    def _store_state(w1_ptr, w2_ptr, s1_ptr, s2_ptr, index, w1, w2, s1, s2, D0: tl.constexpr, DH: tl.constexpr,
                     DO: tl.constexpr):
        _st(w1_ptr, index, w1, D0, DH)
        _st(w2_ptr, index, w2, DH, DO)
        _st(s1_ptr, index, s1, D0, DH)
        _st(s2_ptr, index, s2, DH, DO)

    @triton.jit
    def _load_ends(end_ptr, row, R: tl.constexpr):
        """Rows row..row+R of `end`: each token's factor of its update to the weights and to the momentum."""
        rows = row + tl.arange(0, R)
        return tl.load(end_ptr + rows * 2).to(tl.float32), tl.load(end_ptr + rows * 2 + 1).to(tl.float32)

    @triton.jit
    def _carry_before_rows(w_start_ptr, gw_start_ptr, gs_start_ptr, dw_ptr, ds_ptr, chunk, carried,
                           keep_w, keep_s, keep_m, dt: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        """One layer's part of carrying the state's gradient over a chunk that needs no row. From the gradients
        dW, dS of the chunk's end state (the `carried`-th of the (BH, NC + 1) arrays at dw_ptr, ds_ptr; W' = A W +
        D S + U_W, S' = E S + U_S): the momentum's gradient at the chunk start, stored one index lower, and the
        weights' gradient at the chunk start but for the rows' part, A dW + gW (the rows add theirs), with the
        product-dtype copies of W, dW and dS that the rows use."""
        dw = _ld(dw_ptr, carried, ROWS, COLS)
        ds = _ld(ds_ptr, carried, ROWS, COLS)
        _st(ds_ptr, carried - 1, keep_s * dw + keep_m * ds + _ld(gs_start_ptr, chunk, ROWS, COLS), ROWS, COLS)
        dw_start = keep_w * dw + _ld(gw_start_ptr, chunk, ROWS, COLS)
        return _ld(w_start_ptr, chunk, ROWS, COLS).to(dt), dw.to(dt), ds.to(dt), dw_start

    @triton.jit
    def _decay_gradients(w_start_ptr, s_start_ptr, dw_ptr, ds_ptr, chunk, carried, ROWS: tl.constexpr,
                         COLS: tl.constexpr):
        """One layer's gradients dW, dS of a chunk's end state and its part of the decays' gradients (d A, d D, d E
        as a (4,) vector, the last 0; W' = A W + D S + U_W, S' = E S + U_S)."""
        w = _ld(w_start_ptr, chunk, ROWS, COLS)
        s = _ld(s_start_ptr, chunk, ROWS, COLS)
        dw = _ld(dw_ptr, carried, ROWS, COLS)
        ds = _ld(ds_ptr, carried, ROWS, COLS)
        d_keep = tl.where(tl.arange(0, 4) == 0, tl.sum(tl.sum(dw * w, 1), 0), 0.0)
        d_keep += tl.where(tl.arange(0, 4) == 1, tl.sum(tl.sum(dw * s, 1), 0), 0.0)
        d_keep += tl.where(tl.arange(0, 4) == 2, tl.sum(tl.sum(ds * s, 1), 0), 0.0)
        return dw, ds, d_keep

    @triton.jit
    def _memory_scan_fwd(
        k_ptr, v_ptr, end_ptr, decay_ptr,                  # (BH, NC, N, D0) (BH, NC, N, DO) (BH, NC, N, 2) (BH, NC, 3)
        w1_ptr, w2_ptr, s1_ptr, s2_ptr,                    # the state: in at the start, out at the end
        w1_start_ptr, w2_start_ptr, s1_start_ptr, s2_start_ptr,  # (BH, NC, ...): every chunk's start state
        a_ptr, d1_ptr, d2_ptr,                             # (BH, NC, N, DH), (BH, NC, N, DH), (BH, NC, N, DO)
        NC, max_norm,
        N: tl.constexpr, R: tl.constexpr, D0: tl.constexpr, DH: tl.constexpr, DO: tl.constexpr, CLIP: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        dt = k_ptr.dtype.element_ty
        w1, w2, s1, s2 = _load_state(w1_ptr, w2_ptr, s1_ptr, s2_ptr, bh, D0, DH, DO)
        for c in range(NC):
            chunk = bh * NC + c
            _store_state(w1_start_ptr, w2_start_ptr, s1_start_ptr, s2_start_ptr, chunk, w1, w2, s1, s2, D0, DH, DO)
            w1_dt, w2_dt = w1.to(dt), w2.to(dt)  # the chunk-start weights every token's gradient is taken at
            keep_w = tl.load(decay_ptr + chunk * 3)  # A_n
            keep_s = tl.load(decay_ptr + chunk * 3 + 1)  # D_n
            keep_m = tl.load(decay_ptr + chunk * 3 + 2)  # E_n
            # the decayed state; the rows' updates a_{l-1}^T (delta_l * end) are accumulated onto it
            w1, s1 = keep_w * w1 + keep_s * s1, keep_m * s1
            w2, s2 = keep_w * w2 + keep_s * s2, keep_m * s2
            for r in range(N // R):  # R rows at a time: their activations, not the chunk's, live in registers
                row = chunk * N + r * R
                k = tl.load(_matrix(k_ptr + row * D0, R, D0))  # (R, D0)
                v = tl.load(_matrix(v_ptr + row * DO, R, DO)).to(tl.float32)  # (R, DO)
                end_w, end_s = _load_ends(end_ptr, row, R)  # (R,)
                # the memory's forward pass and its backward pass written out
                z = dot(k, w1_dt, None, PRECISION, UPCAST)  # (R, DH)
                sig = tl.sigmoid(z)
                a = z * sig
                delta2 = dot(a.to(dt), w2_dt, None, PRECISION, UPCAST) - v  # (R, DO)
                delta1 = dot(delta2.to(dt), tl.trans(w2_dt), None, PRECISION, UPCAST) * (sig * (1 + z * (1 - sig)))
                if CLIP:  # ||u_j||^2 = 4 (|k_j|^2 |delta1_j|^2 + |a_j|^2 |delta2_j|^2)
                    kf = k.to(tl.float32)
                    sq = tl.sum(kf * kf, 1) * tl.sum(delta1 * delta1, 1) + tl.sum(a * a, 1) * tl.sum(delta2 * delta2, 1)
                    sq = 4 * sq
                    scale = max_norm / tl.sqrt(tl.maximum(sq, max_norm * max_norm))
                    delta1 = delta1 * scale[:, None]
                    delta2 = delta2 * scale[:, None]
                tl.store(_matrix(a_ptr + row * DH, R, DH), a.to(dt))
                tl.store(_matrix(d1_ptr + row * DH, R, DH), delta1.to(dt))
                tl.store(_matrix(d2_ptr + row * DO, R, DO), delta2.to(dt))
                kt, at = tl.trans(k), tl.trans(a.to(dt))
                w1 = dot(kt, (delta1 * end_w[:, None]).to(dt), w1, PRECISION, UPCAST)
                s1 = dot(kt, (delta1 * end_s[:, None]).to(dt), s1, PRECISION, UPCAST)
                w2 = dot(at, (delta2 * end_w[:, None]).to(dt), w2, PRECISION, UPCAST)
                s2 = dot(at, (delta2 * end_s[:, None]).to(dt), s2, PRECISION, UPCAST)
        _store_state(w1_ptr, w2_ptr, s1_ptr, s2_ptr, bh, w1, w2, s1, s2, D0, DH, DO)

    @triton.jit
    def _memory_scan_bwd(
        k_ptr, v_ptr, end_ptr, decay_ptr,
        w1_start_ptr, w2_start_ptr,                                  # the forward's chunk-start weights
        gw1_start_ptr, gw2_start_ptr, gs1_start_ptr, gs2_start_ptr,  # the chunk-start states' gradients (reads)
        ga_ptr, gd1_ptr, gd2_ptr,                                    # gradients of the factors (from the reads)
        dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr,  # (BH, NC + 1, ...): in at NC the final state's gradient, out at c < NC
                                             # the gradient of chunk c's start state
        dz_ptr, dv_ptr, clip_ptr,            # (BH, NC, N, DH) d z, (BH, NC, N, DO) d v, (BH, NC, N) the clip's d k / k
        NC, max_norm,
        N: tl.constexpr, R: tl.constexpr, D0: tl.constexpr, DH: tl.constexpr, DO: tl.constexpr, CLIP: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """The sequential half of the backward: the chunks in reverse, each recomputing its forward from its saved
        start state and carrying the state's gradient from its end to its start through the decays and through every
        row's update. It computes only what the carry needs, and what no later chunk needs but only it can give
        (d z, d v, the clip's factor); `_memory_scan_bwd_outputs` derives the rest in parallel over the chunks. The
        carried gradient lives in dw1_ptr..ds2_ptr (L1 / L2), so that only its product-dtype copies and the two
        accumulated gradients stay in registers through the chunk's rows."""
        bh = tl.program_id(0).to(tl.int64)
        dt = k_ptr.dtype.element_ty
        for i in range(NC):
            chunk = bh * NC + NC - 1 - i
            carried = chunk + bh + 1  # chunk c's end state in the (BH, NC + 1) arrays: bh (NC + 1) + c + 1
            keep_w = tl.load(decay_ptr + chunk * 3)
            keep_s = tl.load(decay_ptr + chunk * 3 + 1)
            keep_m = tl.load(decay_ptr + chunk * 3 + 2)
            w1_dt, dw1_dt, ds1_dt, dw1 = _carry_before_rows(w1_start_ptr, gw1_start_ptr, gs1_start_ptr, dw1_ptr,
                                                            ds1_ptr, chunk, carried, keep_w, keep_s, keep_m, dt, D0, DH)
            w2_dt, dw2_dt, ds2_dt, dw2 = _carry_before_rows(w2_start_ptr, gw2_start_ptr, gs2_start_ptr, dw2_ptr,
                                                            ds2_ptr, chunk, carried, keep_w, keep_s, keep_m, dt, DH, DO)
            for r in range(N // R):
                row = chunk * N + r * R
                k = tl.load(_matrix(k_ptr + row * D0, R, D0))
                v = tl.load(_matrix(v_ptr + row * DO, R, DO)).to(tl.float32)
                end_w, end_s = _load_ends(end_ptr, row, R)
                # the rows' forward again
                z = dot(k, w1_dt, None, PRECISION, UPCAST)
                sig = tl.sigmoid(z)
                a = (z * sig).to(dt).to(tl.float32)  # as stored and used by the forward
                slope = sig * (1 + z * (1 - sig))  # silu'(z)
                delta2_raw = dot(a.to(dt), w2_dt, None, PRECISION, UPCAST) - v
                back = dot(delta2_raw.to(dt), tl.trans(w2_dt), None, PRECISION, UPCAST)
                delta1_raw = back * slope
                if CLIP:
                    kf = k.to(tl.float32)
                    kk, aa = tl.sum(kf * kf, 1), tl.sum(a * a, 1)
                    dd1, dd2 = tl.sum(delta1_raw * delta1_raw, 1), tl.sum(delta2_raw * delta2_raw, 1)
                    sq = 4 * (kk * dd1 + aa * dd2)
                    scale = max_norm / tl.sqrt(tl.maximum(sq, max_norm * max_norm))
                    delta2 = (delta2_raw * scale[:, None]).to(dt).to(tl.float32)
                else:
                    delta2 = delta2_raw.to(dt).to(tl.float32)
                # the updates U = a_{l-1}^T (delta_l * end): gradients of delta and a (layer 2's input)
                g_delta1 = (dot(k, dw1_dt, None, PRECISION, UPCAST) * end_w[:, None]
                            + dot(k, ds1_dt, None, PRECISION, UPCAST) * end_s[:, None])  # (R, DH)
                g_delta1 += tl.load(_matrix(gd1_ptr + row * DH, R, DH)).to(tl.float32)
                g_delta2 = (dot(a.to(dt), dw2_dt, None, PRECISION, UPCAST) * end_w[:, None]
                            + dot(a.to(dt), ds2_dt, None, PRECISION, UPCAST) * end_s[:, None])  # (R, DO)
                g_delta2 += tl.load(_matrix(gd2_ptr + row * DO, R, DO)).to(tl.float32)
                da = dot((delta2 * end_w[:, None]).to(dt), tl.trans(dw2_dt), None, PRECISION, UPCAST)
                da = dot((delta2 * end_s[:, None]).to(dt), tl.trans(ds2_dt), da, PRECISION, UPCAST)  # (R, DH)
                da += tl.load(_matrix(ga_ptr + row * DH, R, DH)).to(tl.float32)
                # the clip: delta = delta_raw * scale(||u||^2)
                if CLIP:
                    g_delta1_raw = g_delta1 * scale[:, None]
                    g_delta2_raw = g_delta2 * scale[:, None]
                    d_scale = tl.sum(g_delta1 * delta1_raw, 1) + tl.sum(g_delta2 * delta2_raw, 1)
                    # d scale / d sq; the divisor is sq where the clip binds, and never 0 (a padded row's sq is)
                    bound = tl.maximum(sq, max_norm * max_norm)
                    d_sq = tl.where(sq > max_norm * max_norm, -0.5 * d_scale * scale / bound, 0.0)
                    tl.store(clip_ptr + row + tl.arange(0, R), 8 * d_sq * dd1)  # d k += this * k
                    g_delta1_raw += (8 * d_sq * kk)[:, None] * delta1_raw
                    da += (8 * d_sq * dd2)[:, None] * a
                    g_delta2_raw += (8 * d_sq * aa)[:, None] * delta2_raw
                else:
                    g_delta1_raw, g_delta2_raw = g_delta1, g_delta2
                # delta1_raw = (delta2_raw W_2^T) silu'(z), delta2_raw = a W_2 - v, a = silu(z), z = k W_1
                g_back = g_delta1_raw * slope
                dz = g_delta1_raw * back * sig * (1 - sig) * (2 + z * (1 - 2 * sig))  # silu''(z)
                g_delta2_raw += dot(g_back.to(dt), w2_dt, None, PRECISION, UPCAST)
                dw2 = dot(tl.trans(g_back.to(dt)), delta2_raw.to(dt), dw2, PRECISION, UPCAST)  # (DH, DO)
                da += dot(g_delta2_raw.to(dt), tl.trans(w2_dt), None, PRECISION, UPCAST)
                dw2 = dot(tl.trans(a.to(dt)), g_delta2_raw.to(dt), dw2, PRECISION, UPCAST)
                dz = (dz + da * slope).to(dt)
                dw1 = dot(tl.trans(k), dz, dw1, PRECISION, UPCAST)  # (D0, DH)
                tl.store(_matrix(dz_ptr + row * DH, R, DH), dz)
                tl.store(_matrix(dv_ptr + row * DO, R, DO), (-g_delta2_raw).to(dv_ptr.dtype.element_ty))
            _st(dw1_ptr, carried - 1, dw1, D0, DH)
            _st(dw2_ptr, carried - 1, dw2, DH, DO)
            tl.debug_barrier()  # the next chunk reads the carried gradient back

    @triton.jit
    def _memory_scan_bwd_outputs(
        k_ptr, end_ptr, a_ptr, d1_ptr, d2_ptr, dz_ptr, clip_ptr,   # the forward's factors, the sequential half's
        w1_start_ptr, w2_start_ptr, s1_start_ptr, s2_start_ptr,   # d z and clip factor
        dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr,                       # (BH, NC + 1, ...): the carried gradients
        dk_ptr, dend_ptr, ddecay_ptr,
        NC,
        N: tl.constexpr, R: tl.constexpr, D0: tl.constexpr, DH: tl.constexpr, DO: tl.constexpr, CLIP: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """The parallel half of the backward, a program per chunk once `_memory_scan_bwd` has carried the state's
        gradient to every chunk's end: the gradients of the decays, of `end` and of the keys. With P_l = delta_l dW_l^T
        and Q_l = delta_l dS_l^T, row j's update to the state, a_{l-1,j}^T delta_{l,j} (end_W,j | end_S,j), gives
        d end_W,j = sum_l a_{l-1,j} . P_l,j, d end_S,j the same with Q, and d k_j = end_W,j P_1,j + end_S,j Q_1,j
        + d z_j W_1^T (+ the clip's part)."""
        chunk = tl.program_id(0).to(tl.int64)
        carried = chunk + chunk // NC + 1  # chunk c of memory bh ends at bh (NC + 1) + c + 1
        dt = k_ptr.dtype.element_ty
        dw1, ds1, d_keep_1 = _decay_gradients(w1_start_ptr, s1_start_ptr, dw1_ptr, ds1_ptr, chunk, carried, D0, DH)
        dw2, ds2, d_keep_2 = _decay_gradients(w2_start_ptr, s2_start_ptr, dw2_ptr, ds2_ptr, chunk, carried, DH, DO)
        tl.store(ddecay_ptr + chunk * 3 + tl.arange(0, 4), d_keep_1 + d_keep_2, mask=tl.arange(0, 4) < 3)
        dw1_dt, ds1_dt, dw2_dt, ds2_dt = dw1.to(dt), ds1.to(dt), dw2.to(dt), ds2.to(dt)
        w1_dt = _ld(w1_start_ptr, chunk, D0, DH).to(dt)
        for r in range(N // R):
            row = chunk * N + r * R
            k = tl.load(_matrix(k_ptr + row * D0, R, D0))
            a = tl.load(_matrix(a_ptr + row * DH, R, DH))
            delta1 = tl.load(_matrix(d1_ptr + row * DH, R, DH))
            delta2 = tl.load(_matrix(d2_ptr + row * DO, R, DO))
            end_w, end_s = _load_ends(end_ptr, row, R)
            p1 = dot(delta1, tl.trans(dw1_dt), None, PRECISION, UPCAST)  # (R, D0)
            q1 = dot(delta1, tl.trans(ds1_dt), None, PRECISION, UPCAST)
            p2 = dot(delta2, tl.trans(dw2_dt), None, PRECISION, UPCAST)  # (R, DH)
            q2 = dot(delta2, tl.trans(ds2_dt), None, PRECISION, UPCAST)
            kf, af = k.to(tl.float32), a.to(tl.float32)
            rows = row + tl.arange(0, R)
            tl.store(dend_ptr + rows * 2, (tl.sum(kf * p1, 1) + tl.sum(af * p2, 1)).to(dend_ptr.dtype.element_ty))
            tl.store(dend_ptr + rows * 2 + 1, (tl.sum(kf * q1, 1) + tl.sum(af * q2, 1)).to(dend_ptr.dtype.element_ty))
            dk = p1 * end_w[:, None] + q1 * end_s[:, None]
            dk = dot(tl.load(_matrix(dz_ptr + row * DH, R, DH)), tl.trans(w1_dt), dk, PRECISION, UPCAST)
            if CLIP:
                dk += tl.load(clip_ptr + rows)[:, None] * kf
            tl.store(_matrix(dk_ptr + row * D0, R, D0), dk.to(dk_ptr.dtype.element_ty))


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


BLOCK_ROWS = {"_memory_scan_fwd": 32, "_memory_scan_bwd": 16, "_memory_scan_bwd_outputs": 64}


def block_rows(n: int, kernel) -> int:
    """The rows of a chunk `kernel` takes at a time (`R`): the activations of R rows live in registers beside the
    state, those of a whole chunk of 64 would spill. Compiled for Hopper at the `small` memory the forward holds 32
    rows without spilling (10.8 µs a chunk on an H100 against 13.5 at 16), the backward's sequential half 16 (at 32
    it spills 1 KB a thread and ran slower: 1.24 against 1.14 ms at T = 1,024), its parallel half, which holds no
    state, a whole chunk of 64 (0.43 ms at T = 8,192 on an H100, against 0.47-0.53 at 16 or 32)."""
    return min(n, BLOCK_ROWS[kernel.fn.__name__])


def launch_options(dh: int) -> dict:
    """num_stages=1: the chunk loop is sequential, and pipelining it multiplies the shared-memory buffers of the
    products (beyond what Hopper has at d_0 = 64, d_h = 128)."""
    return {} if interpreting() else {"num_warps": 4 if dh <= 64 else 8, "num_stages": 1}


@functools.cache
def fits_shared_memory(device_index: int, dtype: torch.dtype, precision: str, n: int, d0: int, dh: int,
                       do: int) -> bool:
    """Whether the three kernels, compiled for this GPU (with the clip, the larger variant), ask for no more shared
    memory than it has: the backward's sequential half keeps the product-dtype copies of W, dW and dS of both layers
    (and their transposes) there through a chunk's rows: at 64 x 128 in bf16 160 KB (Triton 3.8) of the 227 KB of an
    H100 / H200. The backward before its split asked for 204 KB in bf16 and 220 KB in float32 with IEEE products;
    float32 with TF32 products asked for more, and an H100 sent it to the reference."""
    f32 = torch.float32
    nc = 16  # Triton specializes integers divisible by 16, as the chunk counts of power-of-two lengths >= 16 b are:
    # the same specialization as those launches, rather than one compiled for this check alone
    options = dict(N=n, D0=d0, DH=dh, DO=do, CLIP=True, PRECISION=precision, UPCAST=False, **launch_options(dh))
    with torch.cuda.device(device_index):
        forward = _memory_scan_fwd.warmup(dtype, dtype, dtype, f32, *[f32] * 8, dtype, dtype, dtype, nc, 1.0,
                                          grid=(1,), R=block_rows(n, _memory_scan_fwd), **options)
        backward = _memory_scan_bwd.warmup(dtype, dtype, dtype, f32, *[f32] * 6, dtype, dtype, dtype, *[f32] * 4,
                                           dtype, dtype, f32, nc, 1.0, grid=(1,), R=block_rows(n, _memory_scan_bwd),
                                           **options)
        outputs = _memory_scan_bwd_outputs.warmup(*[dtype] * 6, f32, *[f32] * 8, dtype, dtype, f32, nc, grid=(1,),
                                                  R=block_rows(n, _memory_scan_bwd_outputs), **options)
    limit = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return max(kernel.metadata.shared for kernel in (forward, backward, outputs)) <= limit


class MemoryScanFunction(torch.autograd.Function):
    """Autograd wrapper of the kernels, forward and backward. Inputs: the state (w1, w2, s1, s2) float32, k, v, end of
    one dtype, decay float32, all contiguous; outputs: the final state, every chunk's start state, and the factors."""

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
            nc, float(max_norm or 0.0), N=n, R=block_rows(n, _memory_scan_fwd), D0=d0, DH=dh, DO=do,
            CLIP=max_norm is not None, **dot_options(k.dtype), **launch_options(dh),
        )
        ctx.save_for_backward(k, v, end, decay, w1_start, w2_start, s1_start, s2_start, a, delta1, delta2)
        ctx.max_norm = max_norm
        return (*final, w1_start, w2_start, s1_start, s2_start, a, delta1, delta2)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        k, v, end, decay, w1_start, w2_start, s1_start, s2_start, a, delta1, delta2 = ctx.saved_tensors
        bh, nc, n, d0 = k.shape
        dh, do = w1_start.shape[3], w2_start.shape[3]
        starts = (w1_start, w2_start, s1_start, s2_start)
        like = (*(t[:, 0] for t in starts), *starts, a, delta1, delta2)
        grads = [torch.zeros_like(t) if g is None else g.contiguous() for g, t in zip(grads, like)]
        # the state's gradient at every chunk boundary, [:, c] at chunk c's start: the final state's in, the rest
        # filled by the sequential half (as much memory as the forward's chunk-start states, for the parallel half)
        carried = [t.new_empty(bh, nc + 1, *t.shape[2:]) for t in starts]
        for boundaries, g in zip(carried, grads[:4]):
            boundaries[:, nc] = g
        dz, dv = k.new_empty(bh, nc, n, dh), torch.empty_like(v)
        clipping = ctx.max_norm is not None
        ddecay = torch.empty_like(decay)
        clip_rows = k.new_empty(bh, nc, n, dtype=torch.float32) if clipping else ddecay  # unread without the clip
        options = dict(N=n, D0=d0, DH=dh, DO=do, CLIP=clipping, **dot_options(k.dtype), **launch_options(dh))
        _memory_scan_bwd[(bh,)](k, v, end, decay, w1_start, w2_start, *grads[4:], *carried, dz, dv, clip_rows, nc,
                                float(ctx.max_norm or 0.0), R=block_rows(n, _memory_scan_bwd), **options)
        dk, dend = torch.empty_like(k), torch.empty_like(end)
        _memory_scan_bwd_outputs[(bh * nc,)](k, end, a, delta1, delta2, dz, clip_rows, *starts, *carried, dk, dend,
                                             ddecay, nc, R=block_rows(n, _memory_scan_bwd_outputs), **options)
        return (*(boundaries[:, 0].contiguous() for boundaries in carried), dk, dv, dend, ddecay, None)


def memory_scan_triton(weights: tuple[Tensor, ...], momentum: tuple[Tensor, ...], k: Tensor, v: Tensor,
                       end: Tensor, decay: Tensor, max_surprise_norm: float | None = None) -> ScanResult:
    """`memory_scan_reference` for a 2-layer SiLU memory (see `supports`), forward and backward."""
    (w1, w2), (s1, s2) = ((t.float().contiguous() for t in pair) for pair in (weights, momentum))
    dtype = product_dtype(k)
    k, v, end = (t.to(dtype).contiguous() for t in (k, v, end))
    out = MemoryScanFunction.apply(w1, w2, s1, s2, k, v, end, decay.float().contiguous(), max_surprise_norm)
    w1, w2, s1, s2, w1_start, w2_start, s1_start, s2_start, a, delta1, delta2 = out
    return ScanResult((w1, w2), (s1, s2), [w1_start, w2_start], [s1_start, s2_start], [a], [delta1, delta2])
