"""Chunked linear attention in Triton: forward and backward, causal and non-causal, with or without normaliser.

The sequence is cut into chunks of `BC` tokens. Inside a chunk the attention is the small masked product
(Q_t K_t^T) V_t; across chunks it goes through the running state S = sum_j k_j^T v_j (Dk x Dv) and the
normaliser state z = sum_j k_j (Dk), kept in float32 (Katharopoulos et al. 2020, eq. 8-10; the chunked form of
Yang et al. 2024, "Gated Linear Attention", section 3.2, without gates):

    num_t = (Q_t K_t^T * M) V_t + Q_t S_{t-1},   den_t = rowsum(Q_t K_t^T * M) + Q_t z_{t-1} + eps
    out_t = num_t / den_t,                         S_t = S_{t-1} + K_t^T V_t,   z_t = z_{t-1} + 1^T K_t

with M lower-triangular (causal) or, for non-causal attention, S and z summed over the whole sequence first.

Backward. With dn = dout / den and g = -rowsum(dout * out) / den (the gradient reaching the denominator), the
denominator is linear attention with a value column of ones, so it folds into the same products:

    P = dn V^T + g 1^T                      (masked like the scores)
    dQ_t = (P * M) K_t + dn S_{t-1}^T + g z_{t-1}^T
    dK_t = (P * M)^T Q_t + V_t dS_{t+1}^T + 1 dz_{t+1}^T,   dV_t = (Q_t K_t^T * M)^T dn + K_t dS_{t+1}

where dS, dz are the reverse states sum_{later i} q_i^T dn_i and q_i g_i. The causal kernels scan the chunks of
one (batch, head) per program (forward scan for out and dQ, reverse scan for dK and dV); the non-causal kernels
reduce the states over sequence slices in parallel and then treat every chunk independently.

Matrix products take the inputs' dtype (bf16/fp16 tensor cores, as FlashAttention and flash-linear-attention do)
and accumulate in float32; float32 inputs follow `torch.get_float32_matmul_precision()` as PyTorch's own matmuls
do ('highest', the default: exact IEEE products; 'high'/'medium': TF32). The states and the normaliser stay float32.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from shared.kernels.linear_attention.reference import check_inputs
from shared.kernels.triton_common import dot_options, interpreting, triton

if triton is not None:
    import triton.language as tl

    from shared.kernels.triton_common import dot as _dot


MAX_HEAD_DIM = 128  # the (Dk, Dv) state of a program lives in registers


def supports(q: Tensor, v: Tensor) -> bool:
    """Whether the kernel takes these shapes (head sizes up to MAX_HEAD_DIM, one dtype)."""
    return q.shape[-1] <= MAX_HEAD_DIM and v.shape[-1] <= MAX_HEAD_DIM and q.dtype == v.dtype


if triton is not None:

    @triton.jit
    def _load_chunk(ptr, rows, n, offs_d, d: tl.constexpr):
        """Rows `rows` of a contiguous (n, d) matrix, zero outside."""
        mask = (rows[:, None] < n) & (offs_d[None, :] < d)
        return tl.load(ptr + rows[:, None] * d + offs_d[None, :], mask=mask, other=0.0)

    @triton.jit
    def _store_chunk(ptr, value, rows, n, offs_d, d: tl.constexpr):
        mask = (rows[:, None] < n) & (offs_d[None, :] < d)
        tl.store(ptr + rows[:, None] * d + offs_d[None, :], value.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _output_grads(do_ptr, o_ptr, den_ptr, rows, n, offs_v, DV: tl.constexpr, BC: tl.constexpr,
                      NORMALIZE: tl.constexpr):
        """dn = dout / den and g = -rowsum(dout * out) / den for one chunk (g = 0 without normaliser)."""
        do = _load_chunk(do_ptr, rows, n, offs_v, DV).to(tl.float32)
        if NORMALIZE:
            o = _load_chunk(o_ptr, rows, n, offs_v, DV).to(tl.float32)
            den = tl.load(den_ptr + rows, mask=rows < n, other=1.0)
            dn = do / den[:, None]
            g = -tl.sum(do * o, axis=1) / den
        else:
            dn = do
            g = tl.zeros([BC], dtype=tl.float32)
        return dn, g

    # ------------------------------------------------------------------------------------------------ causal

    @triton.jit
    def _causal_fwd_kernel(
        Q, K, V, O, DEN, n, eps,
        DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
        NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        bh = tl.program_id(0)
        Q += bh * n * DK
        K += bh * n * DK
        V += bh * n * DV
        O += bh * n * DV
        DEN += bh * n
        offs_c = tl.arange(0, BC)
        offs_k = tl.arange(0, BK)
        offs_v = tl.arange(0, BV)
        causal = offs_c[:, None] >= offs_c[None, :]
        state = tl.zeros([BK, BV], dtype=tl.float32)  # S_{t-1}
        z = tl.zeros([BK], dtype=tl.float32)  # z_{t-1}
        for start in range(0, n, BC):
            rows = start + offs_c
            q = _load_chunk(Q, rows, n, offs_k, DK)
            k = _load_chunk(K, rows, n, offs_k, DK)
            v = _load_chunk(V, rows, n, offs_v, DV)
            scores = _dot(q, tl.trans(k), None, PRECISION, UPCAST)  # (BC, BC)
            scores = tl.where(causal, scores, 0.0)
            num = _dot(scores.to(v.dtype), v, None, PRECISION, UPCAST)
            num = _dot(q, state.to(q.dtype), num, PRECISION, UPCAST)
            if NORMALIZE:
                den = tl.sum(scores, axis=1) + tl.sum(q.to(tl.float32) * z[None, :], axis=1) + eps
                num = num / den[:, None]
                tl.store(DEN + rows, den, mask=rows < n)
            _store_chunk(O, num, rows, n, offs_v, DV)
            state = _dot(tl.trans(k), v, state, PRECISION, UPCAST)
            z += tl.sum(k.to(tl.float32), axis=0)

    @triton.jit
    def _causal_bwd_dq_kernel(
        K, V, O, DO, DEN, DQ, n,
        DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
        NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        bh = tl.program_id(0)
        K += bh * n * DK
        DQ += bh * n * DK
        V += bh * n * DV
        O += bh * n * DV
        DO += bh * n * DV
        DEN += bh * n
        offs_c = tl.arange(0, BC)
        offs_k = tl.arange(0, BK)
        offs_v = tl.arange(0, BV)
        causal = offs_c[:, None] >= offs_c[None, :]
        state = tl.zeros([BK, BV], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
        for start in range(0, n, BC):
            rows = start + offs_c
            k = _load_chunk(K, rows, n, offs_k, DK)
            v = _load_chunk(V, rows, n, offs_v, DV)
            dn, g = _output_grads(DO, O, DEN, rows, n, offs_v, DV, BC, NORMALIZE)
            p = _dot(dn.to(v.dtype), tl.trans(v), None, PRECISION, UPCAST) + g[:, None]  # (BC, BC)
            p = tl.where(causal, p, 0.0)
            dq = _dot(p.to(k.dtype), k, None, PRECISION, UPCAST)
            dq = _dot(dn.to(k.dtype), tl.trans(state).to(k.dtype), dq, PRECISION, UPCAST)
            dq += g[:, None] * z[None, :]
            _store_chunk(DQ, dq, rows, n, offs_k, DK)
            state = _dot(tl.trans(k), v, state, PRECISION, UPCAST)
            z += tl.sum(k.to(tl.float32), axis=0)

    @triton.jit
    def _causal_bwd_dkv_kernel(
        Q, K, V, O, DO, DEN, DK_, DV_, n,
        DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
        NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        bh = tl.program_id(0)
        Q += bh * n * DK
        K += bh * n * DK
        DK_ += bh * n * DK
        V += bh * n * DV
        O += bh * n * DV
        DO += bh * n * DV
        DV_ += bh * n * DV
        DEN += bh * n
        offs_c = tl.arange(0, BC)
        offs_k = tl.arange(0, BK)
        offs_v = tl.arange(0, BV)
        causal = offs_c[:, None] >= offs_c[None, :]
        dstate = tl.zeros([BK, BV], dtype=tl.float32)  # dS_{t+1}
        dz = tl.zeros([BK], dtype=tl.float32)  # dz_{t+1}
        n_chunks = tl.cdiv(n, BC)
        for t in range(0, n_chunks):
            rows = (n_chunks - 1 - t) * BC + offs_c
            q = _load_chunk(Q, rows, n, offs_k, DK)
            k = _load_chunk(K, rows, n, offs_k, DK)
            v = _load_chunk(V, rows, n, offs_v, DV)
            dn, g = _output_grads(DO, O, DEN, rows, n, offs_v, DV, BC, NORMALIZE)
            dn_lo = dn.to(v.dtype)
            scores = tl.where(causal, _dot(q, tl.trans(k), None, PRECISION, UPCAST), 0.0)
            p = _dot(dn_lo, tl.trans(v), None, PRECISION, UPCAST) + g[:, None]
            p = tl.where(causal, p, 0.0)
            dk = _dot(tl.trans(p).to(q.dtype), q, None, PRECISION, UPCAST)
            dk = _dot(v, tl.trans(dstate).to(v.dtype), dk, PRECISION, UPCAST)
            dk += dz[None, :]
            dv = _dot(tl.trans(scores).to(q.dtype), dn_lo, None, PRECISION, UPCAST)
            dv = _dot(k, dstate.to(k.dtype), dv, PRECISION, UPCAST)
            _store_chunk(DK_, dk, rows, n, offs_k, DK)
            _store_chunk(DV_, dv, rows, n, offs_v, DV)
            dstate = _dot(tl.trans(q), dn_lo, dstate, PRECISION, UPCAST)
            dz += tl.sum(q.to(tl.float32) * g[:, None], axis=0)

    # -------------------------------------------------------------------------------------------- non-causal

    @triton.jit
    def _state_kernel(
        A, B, O, DO, DEN, S, Z, n, chunks_per_split,
        DA: tl.constexpr, DB: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr,
        GRAD: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """Partial sums over one slice of the sequence: S = A^T B and Z = A^T 1 (forward: A = k, B = v), or
        S = A^T dn and Z = A^T g (backward: A = q, B = dn computed from dout, out, den)."""
        split = tl.program_id(0)
        bh = tl.program_id(1)
        n_splits = tl.num_programs(0)
        A += bh * n * DA
        B += bh * n * DB
        O += bh * n * DB
        DO += bh * n * DB
        DEN += bh * n
        offs_c = tl.arange(0, BC)
        offs_a = tl.arange(0, BA)
        offs_b = tl.arange(0, BB)
        state = tl.zeros([BA, BB], dtype=tl.float32)
        z = tl.zeros([BA], dtype=tl.float32)
        for c in range(0, chunks_per_split):
            rows = (split * chunks_per_split + c) * BC + offs_c
            a = _load_chunk(A, rows, n, offs_a, DA)
            if GRAD:
                dn, g = _output_grads(DO, O, DEN, rows, n, offs_b, DB, BC, NORMALIZE)
                state = _dot(tl.trans(a), dn.to(a.dtype), state, PRECISION, UPCAST)
                z += tl.sum(a.to(tl.float32) * g[:, None], axis=0)
            else:
                b = _load_chunk(B, rows, n, offs_b, DB)
                state = _dot(tl.trans(a), b, state, PRECISION, UPCAST)
                z += tl.sum(a.to(tl.float32), axis=0)
        S += (bh * n_splits + split) * BA * BB
        Z += (bh * n_splits + split) * BA
        tl.store(S + offs_a[:, None] * BB + offs_b[None, :], state)
        tl.store(Z + offs_a, z)

    @triton.jit
    def _noncausal_fwd_kernel(
        Q, S, Z, O, DEN, n, eps,
        DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
        NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        chunk = tl.program_id(0)
        bh = tl.program_id(1)
        offs_c = tl.arange(0, BC)
        offs_k = tl.arange(0, BK)
        offs_v = tl.arange(0, BV)
        rows = chunk * BC + offs_c
        q = _load_chunk(Q + bh * n * DK, rows, n, offs_k, DK)
        state = tl.load(S + bh * BK * BV + offs_k[:, None] * BV + offs_v[None, :])
        num = _dot(q, state.to(q.dtype), None, PRECISION, UPCAST)
        if NORMALIZE:
            z = tl.load(Z + bh * BK + offs_k)
            den = tl.sum(q.to(tl.float32) * z[None, :], axis=1) + eps
            num = num / den[:, None]
            tl.store(DEN + bh * n + rows, den, mask=rows < n)
        _store_chunk(O + bh * n * DV, num, rows, n, offs_v, DV)

    @triton.jit
    def _noncausal_bwd_kernel(
        K, V, O, DO, DEN, S, Z, DS, DZ, DQ, DK_, DV_, n,
        DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
        NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        chunk = tl.program_id(0)
        bh = tl.program_id(1)
        offs_c = tl.arange(0, BC)
        offs_k = tl.arange(0, BK)
        offs_v = tl.arange(0, BV)
        rows = chunk * BC + offs_c
        k = _load_chunk(K + bh * n * DK, rows, n, offs_k, DK)
        v = _load_chunk(V + bh * n * DV, rows, n, offs_v, DV)
        dn, g = _output_grads(DO + bh * n * DV, O + bh * n * DV, DEN + bh * n, rows, n, offs_v, DV, BC, NORMALIZE)
        matrix = offs_k[:, None] * BV + offs_v[None, :]
        state = tl.load(S + bh * BK * BV + matrix)
        dstate = tl.load(DS + bh * BK * BV + matrix)
        dq = _dot(dn.to(k.dtype), tl.trans(state).to(k.dtype), None, PRECISION, UPCAST)
        dk = _dot(v, tl.trans(dstate).to(v.dtype), None, PRECISION, UPCAST)
        dv = _dot(k, dstate.to(k.dtype), None, PRECISION, UPCAST)
        if NORMALIZE:
            dq += g[:, None] * tl.load(Z + bh * BK + offs_k)[None, :]
            dk += tl.load(DZ + bh * BK + offs_k)[None, :]
        _store_chunk(DQ + bh * n * DK, dq, rows, n, offs_k, DK)
        _store_chunk(DK_ + bh * n * DK, dk, rows, n, offs_k, DK)
        _store_chunk(DV_ + bh * n * DV, dv, rows, n, offs_v, DV)


# ---------------------------------------------------------------------------------------------------- launch

# Launch settings that override the defaults below (benchmark sweeps set them; None keeps the default).
TUNING: dict[str, int | None] = {"chunk": None, "num_warps": None, "num_stages": None}


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _meta(q: Tensor, v: Tensor, chunk: int | None) -> dict:
    dk, dv = q.shape[-1], v.shape[-1]
    bk, bv = max(16, triton.next_power_of_2(dk)), max(16, triton.next_power_of_2(dv))
    chunk = chunk or TUNING["chunk"]
    if chunk is None:
        chunk = 64 if max(bk, bv) <= 64 else 32  # keeps the (BK, BV) state and (BC, BC) scores in registers
    return {
        "DK": dk, "DV": dv, "BK": bk, "BV": bv, "BC": chunk,
        **dot_options(q.dtype),
    }


def _launch_options(meta: dict) -> dict:
    if interpreting():
        return {}
    warps = TUNING["num_warps"] or (4 if max(meta["BK"], meta["BV"]) <= 64 else 8)
    return {"num_warps": warps, "num_stages": TUNING["num_stages"] or 2}


def _n_splits(bh: int, n_chunks: int, device: torch.device) -> int:
    """Sequence slices per (batch, head) for the state reduction: enough programs to fill the GPU twice."""
    if device.type != "cuda":
        return min(n_chunks, 2)  # the interpreter still exercises the split reduction
    return max(1, min(n_chunks, -(-2 * _sm_count(device.index or 0) // bh)))


def _reduce_states(a: Tensor, b: Tensor, o: Tensor | None, do: Tensor | None, den: Tensor | None,
                   meta: dict, opts: dict, grad: bool, normalize: bool) -> tuple[Tensor, Tensor]:
    """(S, z) of the non-causal kernels, summed over sequence slices: (BH, BK, BV) and (BH, BK), float32."""
    bh, n = a.shape[0], a.shape[1]
    n_chunks = triton.cdiv(n, meta["BC"])
    splits = _n_splits(bh, n_chunks, a.device)
    per_split = triton.cdiv(n_chunks, splits)
    splits = triton.cdiv(n_chunks, per_split)
    s = a.new_empty(bh, splits, meta["BK"], meta["BV"], dtype=torch.float32)
    z = a.new_empty(bh, splits, meta["BK"], dtype=torch.float32)
    dummy = b if o is None else o
    _state_kernel[(splits, bh)](
        a, b, dummy, do if do is not None else dummy, den if den is not None else z, s, z, n, per_split,
        DA=meta["DK"], DB=meta["DV"], BA=meta["BK"], BB=meta["BV"], BC=meta["BC"],
        GRAD=grad, NORMALIZE=normalize, PRECISION=meta["PRECISION"], UPCAST=meta["UPCAST"], **opts,
    )
    return s.sum(dim=1), z.sum(dim=1)  # deterministic: a fixed-order sum, no atomics


class LinearAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the kernels; inputs (BH, N, D) contiguous."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, normalize: bool, eps: float,
                chunk: int | None) -> Tensor:
        meta = _meta(q, v, chunk)
        opts = _launch_options(meta)
        bh, n = q.shape[0], q.shape[1]
        o = torch.empty_like(v)
        den = q.new_empty(bh, n, dtype=torch.float32)
        common = dict(NORMALIZE=normalize, **meta, **opts)
        if causal:
            _causal_fwd_kernel[(bh,)](q, k, v, o, den, n, eps, **common)
            ctx.save_for_backward(q, k, v, o, den)
        else:
            s, z = _reduce_states(k, v, None, None, None, meta, opts, grad=False, normalize=normalize)
            _noncausal_fwd_kernel[(triton.cdiv(n, meta["BC"]), bh)](q, s, z, o, den, n, eps, **common)
            ctx.save_for_backward(q, k, v, o, den, s, z)
        ctx.causal, ctx.normalize, ctx.meta, ctx.opts = causal, normalize, meta, opts
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, o, den, *states = ctx.saved_tensors
        do = do.contiguous()
        bh, n = q.shape[0], q.shape[1]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(NORMALIZE=ctx.normalize, **ctx.meta, **ctx.opts)
        if ctx.causal:
            _causal_bwd_dq_kernel[(bh,)](k, v, o, do, den, dq, n, **common)
            _causal_bwd_dkv_kernel[(bh,)](q, k, v, o, do, den, dk, dv, n, **common)
        else:
            s, z = states
            ds, dz = _reduce_states(q, do, o, do, den, ctx.meta, ctx.opts, grad=True, normalize=ctx.normalize)
            _noncausal_bwd_kernel[(triton.cdiv(n, ctx.meta["BC"]), bh)](
                k, v, o, do, den, s, z, ds, dz, dq, dk, dv, n, **common)
        return dq, dk, dv, None, None, None, None


def linear_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, normalize: bool = True, eps: float = 1e-6,
    chunk: int | None = None,
) -> Tensor:
    """The Triton path of `shared.kernels.linear_attention.linear_attention` (same arguments and result).

    `chunk` overrides the tokens per chunk (a power of two >= 16; tuning only).
    """
    if triton is None:
        raise RuntimeError("linear_attention_triton needs the 'triton' package")
    check_inputs(q, k, v)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"linear_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    q3 = q.reshape(b * h, n, dk).contiguous()  # (BH, N, Dk)
    k3 = k.reshape(b * h, n, dk).contiguous()  # (BH, N, Dk)
    v3 = v.reshape(b * h, n, dv).contiguous()  # (BH, N, Dv)
    out = LinearAttentionFunction.apply(q3, k3, v3, causal, normalize, float(eps), chunk)
    return out.view(b, h, n, dv)  # (B, H, N, Dv)
