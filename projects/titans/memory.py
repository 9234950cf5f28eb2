"""The neural long-term memory of Titans (Behrouz, Zhong, Mirrokni 2025, §3), following the equations literally.

The memory M is an MLP with L_M >= 1 weight matrices (no biases), a different one per head, whose weights are the
fast state. For every token x_t (eqs. 11-15):

    k_t = x_t W_K,  v_t = x_t W_V,  q_t = x_t W_Q                      (eq. 11; each followed by a depthwise causal
                                                                        conv and SiLU, q and k l2-normalised, §4.4)
    l(M_{t-1}; x_t) = || M_{t-1}(k_t) - v_t ||_2^2                      (eq. 12, the associative loss)
    S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; x_t)                   (eq. 14, momentum: "surprise")
    M_t = (1 - alpha_t) M_{t-1} + S_t                                   (eq. 13, forgetting gate = weight decay)
    y_t = M_t^*(q_t)                                                    (eq. 15, retrieval: a forward pass, no update)

theta_t (inner learning rate), eta_t (momentum decay) and alpha_t (forgetting) are functions of the token.

Parallel training (§3.2): the sequence is cut into chunks of b tokens and every gradient inside a chunk is taken at
the weights of the chunk start, u_t = grad l(M_{t'}; x_t) (eqs. 16, 18); b = 1 is the exact recurrence. The
momentum and forgetting recurrences are then linear in u, and are computed in parallel over the chunk with the
cumulative products of eta and (1 - alpha) (the "segsum" matrices below). Three implementations of that one
definition live here and are tested against each other:

- `memory_recurrent_reference`: the definition itself, a Python loop over tokens with the gradient of eq. 12
  written out by hand (the spec; also the "token loop" of the speed benchmark).
- `memory_chunked_materialized`: per-token gradients u_t by `torch.func` (`vmap` over tokens of `grad`), the
  scans as cumulative-product matrices, the per-token weights M_t materialised and read with `vmap`. It works for
  any memory network, but stores b weight-sized tensors per chunk.
- `memory_chunked_dual` (default): the same numbers without materialising per-token weights. A gradient of eq. 12
  w.r.t. an MLP layer is an outer product (layer input) x (gradient at the layer's pre-activation), obtained for
  all tokens of a chunk at once by the MLP's backward pass written out; substituting it into the scans turns every
  read into matmuls against b x b coefficient matrices (Yu Sun et al. 2024's dual form, extended with momentum and
  decay). Only the chunk-end states are computed chunk by chunk (`shared/kernels/memory_scan`, where the chunk
  step `dual_advance` and the MLP's written-out backward `layer_factors` live); coefficients and reads are batched
  over chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from shared.blocks.norms import RMSNorm
from shared.kernels.memory_scan import memory_scan
from shared.kernels.memory_scan.reference import ACTIVATIONS, act_derivative, dual_advance, surprise_scale

IMPLS = ("dual", "materialized", "reference")
RETRIEVE = ("after", "before")


class MemoryState(NamedTuple):
    """The fast state of B*H memories: `weights` M and `momentum` S, each a tuple of (BH, d_l, d_{l+1})."""

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]


class Gates(NamedTuple):
    """Per-token gates of B*H memories, each (BH, T): theta_t, log eta_t and log(1 - alpha_t).

    A disabled mechanism is None: no momentum means eta_t = 0 (S_t = -theta_t u_t), no forgetting alpha_t = 0.
    They are kept in log space so the cumulative products never see log(0).
    """

    theta: Tensor
    log_eta: Tensor | None
    log_keep: Tensor | None


def mlp_forward(weights: Sequence[Tensor], x: Tensor, act: str) -> Tensor:
    """M(x) for weights[l]: (d_l, d_{l+1}) and x: (..., d_0): x W_1, act, ..., W_{L_M} (no activation at the end)."""
    for i, w in enumerate(weights):
        x = x @ w
        if i < len(weights) - 1:
            x = ACTIVATIONS[act](x)
    return x


def associative_loss(weights: Sequence[Tensor], k: Tensor, v: Tensor, act: str) -> Tensor:
    """Eq. 12, l = ||M(k) - v||_2^2, summed over the tokens of `k` (..., d)."""
    return (mlp_forward(weights, k, act) - v).pow(2).sum()


# ---------------------------------------------------------------------------------------------------------------
# The definition: a loop over tokens.


def associative_grad(weights: Sequence[Tensor], k: Tensor, v: Tensor, act: str) -> list[Tensor]:
    """grad_W ||M(k) - v||^2 by the chain rule, for a batch of memories: weights[l] (BH, d_l, d_{l+1}), k, v (BH, d)."""
    inputs, pre = [k], []
    for i, w in enumerate(weights):
        z = torch.einsum("nd,nde->ne", inputs[-1], w)
        pre.append(z)
        if i < len(weights) - 1:
            inputs.append(ACTIVATIONS[act](z))
    delta = 2 * (pre[-1] - v)  # dl/dz_L
    grads = []
    for i in range(len(weights) - 1, -1, -1):
        grads.append(torch.einsum("nd,ne->nde", inputs[i], delta))  # outer(a_{l-1}, delta_l)
        if i:
            delta = torch.einsum("ne,nde->nd", delta, weights[i]) * act_derivative(pre[i - 1], act)
    return grads[::-1]


def memory_recurrent_reference(state: MemoryState, k: Tensor, v: Tensor, q: Tensor, gates: Gates, chunk_size: int,
                               act: str = "silu", retrieve: str = "after",
                               max_surprise_norm: float | None = None) -> tuple[Tensor, MemoryState]:
    """Eqs. 13-15 token by token, gradients at the chunk-start weights M_{t'} (eqs. 16, 18); chunk_size 1 is the
    plain recurrence. k, v, q: (BH, T, d). `max_surprise_norm` clips each token's gradient (all layers together)
    to that norm before it enters the momentum (None: no clipping). Returns the reads (BH, T, d_out) and the
    final state."""
    weights, momentum = list(state.weights), list(state.momentum)
    start = weights
    reads = []
    for t in range(k.shape[1]):
        if t % chunk_size == 0:
            start = weights  # M_{t'}: the weights after the previous chunk
        if retrieve == "before":
            reads.append(mlp_forward(weights, q[:, t, None], act)[:, 0])
        u = associative_grad(start, k[:, t], v[:, t], act)
        if max_surprise_norm is not None:
            scale = surprise_scale(sum(g.pow(2).sum((1, 2)) for g in u), max_surprise_norm)  # (BH,)
            u = [g * scale[:, None, None] for g in u]
        theta = gates.theta[:, t, None, None]
        if gates.log_eta is None:
            momentum = [-theta * g for g in u]
        else:
            eta = gates.log_eta[:, t, None, None].exp()
            momentum = [eta * s - theta * g for s, g in zip(momentum, u)]
        keep = 1.0 if gates.log_keep is None else gates.log_keep[:, t, None, None].exp()
        weights = [keep * w + s for w, s in zip(weights, momentum)]
        if retrieve == "after":
            reads.append(mlp_forward(weights, q[:, t, None], act)[:, 0])
    return torch.stack(reads, dim=1), MemoryState(tuple(weights), tuple(momentum))


# ---------------------------------------------------------------------------------------------------------------
# Parallel over each chunk.


def segsum(log_a: Tensor) -> Tensor:
    """(..., n) -> (..., n, n): [i, j] = sum_{m=j+1..i} log_a[m] for j <= i, -inf above the diagonal, so that
    exp(segsum) holds the products prod_{j<m<=i} a_m of a linear recurrence h_i = a_i h_{i-1} + x_i. Summing a masked
    matrix (rather than differencing one cumulative sum) avoids cancellation when the products get small."""
    n = log_a.shape[-1]
    x = log_a[..., None, :].expand(*log_a.shape, n).transpose(-1, -2)  # (..., n, n): x[i, j] = log_a[i]
    upper = torch.ones(n, n, dtype=torch.bool, device=log_a.device).triu()  # j >= i
    x = x.masked_fill(upper, 0.0).cumsum(dim=-2)  # [i, j] = sum_{j < m <= i} log_a[m]
    return x.masked_fill(upper.triu(1), float("-inf"))


class ChunkCoefficients(NamedTuple):
    """A chunk's recurrences in closed form, for its tokens 1..n and start state (M_0, S_0):

        S_i = E_i S_0 - sum_{j<=i} L_E[i, j] theta_j u_j,      L_E[i, j] = prod_{j<m<=i} eta_m,  E_i = prod_{m<=i} eta_m
        M_i = A_i M_0 + sum_{j<=i} L_A[i, j] S_j,              L_A[i, j] = prod_{j<m<=i} (1 - alpha_m), A_i likewise

    so that M_i = A_i M_0 + D_i S_0 - sum_{j<=i} K[i, j] theta_j u_j with K = L_A L_E and D = L_A E.
    Shapes (BH, n, n) and (BH, n); float32 at least, autocast or not.
    """

    theta: Tensor
    l_eta: Tensor
    e: Tensor
    l_keep: Tensor
    a: Tensor
    k: Tensor
    d: Tensor


def scan_coefficients(gates: Gates) -> ChunkCoefficients:
    """The coefficients of `ChunkCoefficients` for gates of shape (..., n) (any leading dims: every chunk at once)."""
    theta = gates.theta
    n, lead = theta.shape[-1], theta.shape[:-1]
    kw = {"device": theta.device, "dtype": torch.promote_types(theta.dtype, torch.float32)}
    if gates.log_eta is None:  # eta = 0: S_i = -theta_i u_i
        l_eta, e = torch.eye(n, **kw).expand(*lead, n, n), torch.zeros(*lead, n, **kw)
    else:
        log_eta = gates.log_eta.to(kw["dtype"])
        l_eta, e = segsum(log_eta).exp(), log_eta.cumsum(-1).exp()
    if gates.log_keep is None:  # alpha = 0: M_i = M_0 + sum S_j
        l_keep, a = torch.ones(n, n, **kw).tril().expand(*lead, n, n), torch.ones(*lead, n, **kw)
    else:
        log_keep = gates.log_keep.to(kw["dtype"])
        l_keep, a = segsum(log_keep).exp(), log_keep.cumsum(-1).exp()
    device = theta.device.type  # products of up to b gates: not in bf16 (flop counts' meta device has no autocast)
    with torch.autocast(device, enabled=False) if device != "meta" else nullcontext():
        d = (l_keep @ e[..., None])[..., 0]
        k = l_keep @ l_eta
    return ChunkCoefficients(theta.to(kw["dtype"]), l_eta, e, l_keep, a, k, d)


def chunk_pieces(t: int, chunk_size: int) -> list[tuple[slice, int]]:
    """The tokens 0..t-1 as (slice, chunk length) pieces: all whole chunks together, then a ragged last chunk."""
    full = t - t % chunk_size
    return [(sl, n) for sl, n in ((slice(0, full), chunk_size), (slice(full, t), t - full)) if sl.stop > sl.start]


def chunked(x: Tensor, sl: slice, n: int) -> Tensor:
    """The tokens `sl` of x (BH, T, ...) in chunks of n: (BH, n_chunks, n, ...)."""
    return x[:, sl].unflatten(1, (-1, n))


def chunk_coefficients(gates: Gates, chunk_size: int) -> list[tuple[slice, ChunkCoefficients]]:
    """Each chunk's token slice and coefficients. They depend on the gates only, not on the memory, so they are
    computed for all chunks in one batch before the sequential pass (and `unbind` keeps the backward one op)."""
    out = []
    for sl, n in chunk_pieces(gates.theta.shape[1], chunk_size):
        coeffs = scan_coefficients(Gates(*(None if g is None else chunked(g, sl, n) for g in gates)))  # (BH, nc, n)
        per_chunk = zip(*(x.unbind(1) for x in coeffs))
        out += [(slice(s, s + n), ChunkCoefficients(*c)) for s, c in zip(range(sl.start, sl.stop, n), per_chunk)]
    return out


def memory_chunked_materialized(state: MemoryState, k: Tensor, v: Tensor, q: Tensor, gates: Gates, chunk_size: int,
                                act: str = "silu", retrieve: str = "after",
                                max_surprise_norm: float | None = None) -> tuple[Tensor, MemoryState]:
    """Per-token gradients with `vmap(grad)`, scans as cumulative-product matrices, reads through the per-token
    weights. Same arguments and results as `memory_recurrent_reference`."""
    loss = lambda w, kt, vt: associative_loss(w, kt, vt, act)  # noqa: E731
    # Inner vmap: tokens of one memory, all at the chunk-start weights; outer vmap: the B*H memories.
    per_token_grad = vmap(vmap(grad(loss), in_dims=(None, 0, 0)), in_dims=(0, 0, 0))
    per_token_read = vmap(vmap(lambda w, x: mlp_forward(w, x, act)))
    weights, momentum = state
    reads = []
    for sl, c in chunk_coefficients(gates, chunk_size):
        u = per_token_grad(weights, k[:, sl], v[:, sl])  # L_M x (BH, n, d_l, d_{l+1})
        theta = c.theta[:, :, None, None]
        if max_surprise_norm is not None:
            theta = theta * surprise_scale(sum(ui.pow(2).sum((-2, -1)) for ui in u), max_surprise_norm)[..., None, None]
        # eq. 18: S_i = eta_i S_{i-1} - theta_i u_i, for all i of the chunk at once.
        s_all = [torch.einsum("bij,bjde->bide", c.l_eta.to(ui.dtype), -theta * ui) + c.e[:, :, None, None] * s0[:, None]
                 for ui, s0 in zip(u, momentum)]
        # eq. 13: M_i = (1 - alpha_i) M_{i-1} + S_i.
        w_all = [torch.einsum("bij,bjde->bide", c.l_keep.to(si.dtype), si) + c.a[:, :, None, None] * w0[:, None]
                 for si, w0 in zip(s_all, weights)]
        if retrieve == "after":
            read_w = w_all
        else:  # M_{i-1}: the chunk-start weights, then the chunk's own
            read_w = [torch.cat([w0[:, None], wi[:, :-1]], dim=1) for w0, wi in zip(weights, w_all)]
        reads.append(per_token_read(read_w, q[:, sl]))
        weights = tuple(wi[:, -1] for wi in w_all)
        momentum = tuple(si[:, -1] for si in s_all)
    return torch.cat(reads, dim=1), MemoryState(tuple(weights), tuple(momentum))


class DualCoefficients(NamedTuple):
    """What the dual form needs from the gates, for chunks of n tokens (BH, nc, ...): `end` (BH, nc, n, 2) and
    `decay` (BH, nc, 3) for the scan (`shared.kernels.memory_scan`), and the read coefficients `read_k`
    (BH, nc, n, n) = -2 K[i, j] theta_j, `read_a`, `read_d` (BH, nc, n, 1) of `dual_reads`."""

    end: Tensor
    decay: Tensor
    read_k: Tensor
    read_a: Tensor
    read_d: Tensor


def chunk_end_rows(x: Tensor, last_row: int) -> Tensor:
    """Row n - 1 of every chunk of x (BH, nc, n, ...), except row `last_row` of the last chunk (the last real
    token of a sequence padded to whole chunks): (BH, nc, ...)."""
    ends = x[:, :, -1]
    if last_row == x.shape[2] - 1:
        return ends
    return torch.cat([ends[:, :-1], x[:, -1:, last_row]], dim=1)


def dual_coefficients(gates: Gates, chunk_size: int, last_row: int, retrieve: str, dtype: torch.dtype,
                      ) -> DualCoefficients:
    """The gates (BH, nc * n) of whole chunks -> `DualCoefficients` in `dtype` (the decays in float32 at least);
    the last chunk ends at its row `last_row` (`chunk_end_rows`)."""
    c = scan_coefficients(Gates(*(None if g is None else g.unflatten(1, (-1, chunk_size)) for g in gates)))
    step = -2 * c.theta  # (BH, nc, n): the descent's minus and the squared loss's 2 (deltas are those of l / 2)
    end = (torch.stack([chunk_end_rows(c.k, last_row), chunk_end_rows(c.l_eta, last_row)], dim=-1)
           * step[..., None]).to(dtype)  # (BH, nc, n, 2)
    decay = torch.stack([chunk_end_rows(x, last_row) for x in (c.a, c.d, c.e)], dim=-1)  # (BH, nc, 3): A_n, D_n, E_n
    if retrieve == "after":
        read_k, read_a, read_d = c.k, c.a, c.d
    else:  # M_{i-1}: shift every coefficient down one token; M_{-1} of the chunk is M_0
        read_k = F.pad(c.k, (0, 0, 1, 0))[..., :-1, :]
        read_a = F.pad(c.a, (1, 0), value=1.0)[..., :-1]
        read_d = F.pad(c.d, (1, 0))[..., :-1]
    return DualCoefficients(end, decay, (read_k * step[..., None, :]).to(dtype), read_a[..., None].to(dtype),
                            read_d[..., None].to(dtype))


def dual_reads(h: Tensor, w0: Sequence[Tensor], s0: Sequence[Tensor], inputs: Sequence[Tensor],
               deltas: Sequence[Tensor], read_k: Tensor, read_a: Tensor, read_d: Tensor, act: str) -> Tensor:
    """The reads of every chunk at once, given each chunk's start state and factors (`memory_chunked_dual`).

    h: (BH, nc, n, d_0) queries; w0[l], s0[l]: (BH, nc, d_l, d_{l+1}) chunk-start weights and momenta;
    inputs[l]: (BH, nc, n, d_l), deltas[l]: (BH, nc, n, d_{l+1}); read_k: (BH, nc, n, n) = -2 K[i, j] theta_j;
    read_a, read_d: (BH, nc, n, 1). Returns (BH, nc, n, d_out).
    """
    for i, (w, s, a_j, delta) in enumerate(zip(w0, s0, inputs, deltas)):
        z = torch.addcmul(torch.addcmul((read_k * (h @ a_j.transpose(-1, -2))) @ delta, read_d, h @ s), read_a, h @ w)
        h = ACTIVATIONS[act](z) if i < len(w0) - 1 else z
    return h


@cache
def _compiled(fn: Callable) -> Callable:
    """torch.compile'd `fn` (fuses the small element-wise ops of a chunk step; compiled once per shape)."""
    return torch.compile(fn, dynamic=False)


def memory_chunked_dual(state: MemoryState, k: Tensor, v: Tensor, q: Tensor, gates: Gates, chunk_size: int,
                        act: str = "silu", retrieve: str = "after", max_surprise_norm: float | None = None,
                        compile_step: bool = False) -> tuple[Tensor, MemoryState]:
    """The chunked update without per-token weights (module docstring). Same arguments and results as
    `memory_recurrent_reference`; `compile_step=True` runs everything but the scan (the coefficients before it,
    the reads after it, and the reference scan's chunk step) through `torch.compile`.

    With u_j = 2 a_j^T delta_j per layer and M_i = A_i M_0 + D_i S_0 - sum_{j<=i} K[i, j] theta_j u_j
    (`ChunkCoefficients`), a read h_i M_i of the layer's input h_i is
        A_i (h_i M_0) + D_i (h_i S_0) - sum_j 2 K[i, j] theta_j (h_i . a_j) delta_j   (b x b matmuls, layer by layer).
    Only the chunk-end states are sequential (`shared.kernels.memory_scan`: a few matmuls per chunk, or fused Triton
    kernels on a GPU); the coefficients before the scan and the reads after it (`dual_reads`) are batched over all
    chunks. A sequence that is not a whole number of chunks is padded with zero tokens at its end: row i of a chunk
    depends on tokens j <= i only, so the real tokens' reads are unchanged, and the last chunk's end state is taken
    at its last real token; one pass over whole chunks replaces a second one for a ragged remainder.
    """
    coefficients, advance, read = ((_compiled(dual_coefficients), _compiled(dual_advance), _compiled(dual_reads))
                                   if compile_step else (dual_coefficients, dual_advance, dual_reads))
    t = k.shape[1]
    pad = -t % chunk_size
    if pad:
        k, v, q = (F.pad(x, (0, 0, 0, pad)) for x in (k, v, q))  # (BH, T + pad, d)
        gates = Gates(*(None if g is None else F.pad(g, (0, pad)) for g in gates))  # theta 0, gates 1: no write
    c = coefficients(gates, chunk_size, (t - 1) % chunk_size, retrieve, k.dtype)
    k_c, v_c = k.unflatten(1, (-1, chunk_size)), v.unflatten(1, (-1, chunk_size))  # (BH, nc, n, d)
    scan = memory_scan(state.weights, state.momentum, k_c, v_c, c.end, c.decay, act, max_surprise_norm, advance)
    h = q.unflatten(1, (-1, chunk_size))  # (BH, nc, n, d)
    inputs = [k_c] + scan.inputs  # layer 1's inputs are the keys themselves
    h = read(h, scan.w0, scan.s0, inputs, scan.deltas, c.read_k, c.read_a, c.read_d, act)  # (BH, nc, n, d_out)
    return h.flatten(1, 2)[:, :t], MemoryState(scan.weights, scan.momentum)


MEMORY_IMPLS = {"dual": memory_chunked_dual, "materialized": memory_chunked_materialized,
                "reference": memory_recurrent_reference}


def memory_recall(state: MemoryState, q: Tensor, act: str = "silu") -> Tensor:
    """M^*(q) at fixed weights (no update), q: (BH, T, d_0) -> (BH, T, d_out); MAC's h_t = M^*_{t-1}(q_t) (eq. 21)."""
    return mlp_forward(state.weights, q, act)


# ---------------------------------------------------------------------------------------------------------------
# The layer: projections, gates, memory, output gate.


class CausalDepthwiseConv1d(nn.Module):
    """Depthwise 1-D convolution over time that sees only the current and past `kernel_size - 1` steps (§4.4).

    `forward(x, cache)` takes the last `kernel_size - 1` inputs of the previous call (or zeros) so a sequence fed
    in pieces gives the same result as fed whole; it returns the output and the new cache.
    """

    def __init__(self, channels: int, kernel_size: int = 4) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(self, x: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, T, C), cache: (B, kernel_size - 1, C) or None -> (B, T, C), (B, kernel_size - 1, C)."""
        if cache is None:
            cache = x.new_zeros(x.shape[0], self.kernel_size - 1, x.shape[2])
        padded = torch.cat([cache.to(x.dtype), x], dim=1)  # (B, T + K - 1, C)
        y = self.conv(padded.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        return y, padded[:, padded.shape[1] - (self.kernel_size - 1):]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class NeuralMemory(nn.Module):
    """Titans' long-term memory module (LMM) as a sequence layer: x (B, T, dim) -> (B, T, dim).

    Args:
        dim: model width.
        num_heads: independent memories (the paper does not say; we split the width as attention does).
        head_dim: width of each memory's keys/values (default dim // num_heads).
        depth: L_M, weight matrices of the memory MLP (1 = the "linear memory" ablation).
        expansion: hidden width of a deep memory, in multiples of head_dim.
        act: the memory MLP's non-linearity ("silu" | "gelu").
        chunk_size: b of §3.2; 1 = the exact token recurrence.
        momentum: eq. 14's eta_t S_{t-1} term (False = the "w/o momentum" ablation, eta = 0).
        forgetting: eq. 13's alpha_t (False = the "w/o weight decay" ablation, alpha = 0).
        conv: depthwise causal convolutions after the q, k, v projections (False = "w/o convolution").
        conv_kernel: their width.
        qk_l2norm: l2-normalise queries and keys (§4.4).
        theta_max: theta_t = theta_max * sigmoid(.).
        eta_max: eta_t = eta_max * sigmoid(.) (1 = the paper's sigmoid gate). Below 1 it keeps the momentum damped:
            with eta near 1 and alpha near 0 the update can diverge on periodic inputs (README, "S-NIAH").
        theta_init, eta_init, alpha_init: the gates' values at initialisation (their biases).
        max_surprise_norm: clip each token's momentary surprise grad l(M_{t'}; x_t) (eq. 12's gradient, all
            layers together) to this Frobenius norm before eq. 14; None (default) is the paper's update. It bounds
            the step a chunk's b stale gradients can take where the memory's curvature has grown (README, "S-NIAH").
        retrieve: "after" (y_t = M_t^*(q_t), x_t already written) or "before" (M_{t-1}^*); the paper does not say.
        impl: "dual" | "materialized" | "reference" (see the module docstring; all compute the same numbers).
        compile_step: `torch.compile` the work around the dual form's scan: the projections, convolutions, norms
            and gates (`write_inputs`), the coefficients, the reads, the output gate (`output`), and the reference
            scan's chunk step (fuses their small kernels; the first call compiles, 20-60 s).
    """

    def __init__(self, dim: int, num_heads: int = 4, head_dim: int | None = None, depth: int = 2,
                 expansion: float = 4.0, act: str = "silu", chunk_size: int = 64, momentum: bool = True,
                 forgetting: bool = True, conv: bool = True, conv_kernel: int = 4, qk_l2norm: bool = True,
                 theta_max: float = 1.0, theta_init: float = 0.02, eta_init: float = 0.5, alpha_init: float = 0.01,
                 eta_max: float = 1.0, max_surprise_norm: float | None = None,
                 retrieve: str = "after", impl: str = "dual", compile_step: bool = False) -> None:
        super().__init__()
        if act not in ACTIVATIONS or retrieve not in RETRIEVE or impl not in IMPLS or depth < 1:
            raise ValueError(f"NeuralMemory: act in {list(ACTIVATIONS)}, retrieve in {RETRIEVE}, impl in {IMPLS}, "
                             f"depth >= 1; got act={act!r}, retrieve={retrieve!r}, impl={impl!r}, depth={depth}")
        if not 0 < eta_init < eta_max <= 1:
            raise ValueError(f"NeuralMemory: need 0 < eta_init < eta_max <= 1, got eta_init={eta_init}, "
                             f"eta_max={eta_max}")
        if max_surprise_norm is not None and not max_surprise_norm > 0:
            raise ValueError(f"NeuralMemory: max_surprise_norm must be positive or None, got {max_surprise_norm}")
        if compile_step and impl != "dual":
            raise ValueError(f"NeuralMemory: compile_step applies to impl='dual' only, got impl={impl!r}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = head_dim or dim // num_heads
        self.depth, self.act, self.chunk_size = depth, act, chunk_size
        self.momentum, self.forgetting, self.qk_l2norm = momentum, forgetting, qk_l2norm
        self.theta_max, self.retrieve, self.impl, self.compile_step = theta_max, retrieve, impl, compile_step
        self.eta_max, self.max_surprise_norm = eta_max, max_surprise_norm
        inner = num_heads * self.head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.conv_q = CausalDepthwiseConv1d(inner, conv_kernel) if conv else None
        self.conv_k = CausalDepthwiseConv1d(inner, conv_kernel) if conv else None
        self.conv_v = CausalDepthwiseConv1d(inner, conv_kernel) if conv else None
        # theta, eta, alpha: one scalar per head and token, from the token (the paper's data-dependent gates).
        self.to_theta = nn.Linear(dim, num_heads)
        self.to_eta = nn.Linear(dim, num_heads) if momentum else None
        self.to_alpha = nn.Linear(dim, num_heads) if forgetting else None
        # M_0: the memory's initial weights, learned in the outer loop (shared by all sequences).
        hidden = int(expansion * self.head_dim)
        widths = [self.head_dim] + [hidden] * (depth - 1) + [self.head_dim]
        self.memory_init = nn.ParameterList(
            [nn.Parameter(torch.empty(num_heads, widths[i], widths[i + 1])) for i in range(depth)])
        # "normalization and gating with a linear layer before the final output projection" (§4.4).
        self.out_norm = RMSNorm(self.head_dim)
        self.to_gate = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.gate_inits = (theta_init, eta_init, alpha_init)
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        for w in self.memory_init:
            nn.init.normal_(w, std=w.shape[1] ** -0.5)
        theta_init, eta_init, alpha_init = self.gate_inits
        nn.init.constant_(self.to_theta.bias, _logit(theta_init / self.theta_max))
        if self.to_eta is not None:
            nn.init.constant_(self.to_eta.bias, _logit(eta_init / self.eta_max))
        if self.to_alpha is not None:
            nn.init.constant_(self.to_alpha.bias, _logit(alpha_init))

    # -- pieces (MAC calls them one segment at a time) --

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        t = t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        return t.reshape(b * self.num_heads, n, self.head_dim)  # (BH, T, d)

    def _project(self, x: Tensor, proj: nn.Linear, conv: CausalDepthwiseConv1d | None, cache: Tensor | None,
                 l2norm: bool) -> tuple[Tensor, Tensor | None]:
        t = proj(x)
        if conv is not None:
            t, cache = conv(t, cache)
        t = self._heads(F.silu(t))  # (BH, T, d)
        return (F.normalize(t, dim=-1) if l2norm else t), cache

    def queries(self, x: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """q_t = l2norm(SiLU(conv(x_t W_Q))): (BH, T, d), and the conv cache."""
        return self._project(x, self.to_q, self.conv_q, cache, self.qk_l2norm)

    def keys_values(self, x: Tensor, cache: tuple | None = None) -> tuple[Tensor, Tensor, tuple]:
        """k_t (l2-normalised) and v_t of eq. 11, each (BH, T, d), and the conv caches."""
        k, ck = self._project(x, self.to_k, self.conv_k, None if cache is None else cache[0], self.qk_l2norm)
        v, cv = self._project(x, self.to_v, self.conv_v, None if cache is None else cache[1], False)
        return k, v, (ck, cv)

    def gates(self, x: Tensor) -> Gates:
        """theta_t, log eta_t, log(1 - alpha_t) of the tokens x (B, T, dim), each (BH, T), in float32 at least."""

        def per_head(t: Tensor) -> Tensor:
            t = t.to(torch.promote_types(t.dtype, torch.float32))
            return t.transpose(1, 2).reshape(-1, t.shape[1])  # (B, T, H) -> (BH, T)

        theta = self.theta_max * torch.sigmoid(per_head(self.to_theta(x)))
        log_eta = (math.log(self.eta_max) + F.logsigmoid(per_head(self.to_eta(x)))
                   if self.to_eta is not None else None)
        log_keep = F.logsigmoid(-per_head(self.to_alpha(x))) if self.to_alpha is not None else None
        return Gates(theta, log_eta, log_keep)

    def write_inputs(self, x: Tensor, cache: tuple | None = None) -> tuple[Tensor, Tensor, Tensor, Gates, tuple]:
        """Everything eqs. 11-15 need from the tokens x (B, T, dim): q_t, k_t, v_t (each (BH, T, d)), the gates,
        and the conv caches (q, k, v) for the next piece of the sequence. Through torch.compile with
        `compile_step` (the projections, convolutions, norms and gates fuse)."""
        return self._compiled_if_asked(_write_inputs)(self, x, cache)

    def initial_state(self, batch: int) -> MemoryState:
        """M_0 (the learned initial weights) and S_0 = 0 for a batch of sequences: (B*H, d_l, d_{l+1}) each."""
        weights = tuple(w.unsqueeze(0).expand(batch, *w.shape).reshape(batch * self.num_heads, *w.shape[1:])
                        for w in self.memory_init)
        return MemoryState(weights, tuple(torch.zeros_like(w) for w in weights))

    def memorize(self, state: MemoryState, k: Tensor, v: Tensor, q: Tensor, gates: Gates) -> tuple[Tensor, MemoryState]:
        """Write the tokens' (k, v) with eqs. 13-14 and read q with eq. 15 on the way: reads (BH, T, d), new state."""
        extra = {"compile_step": True} if self.compile_step else {}  # only the dual form takes it
        return MEMORY_IMPLS[self.impl](state, k, v, q, gates, self.chunk_size, self.act, self.retrieve,
                                       self.max_surprise_norm, **extra)

    def recall(self, state: MemoryState, q: Tensor) -> Tensor:
        return memory_recall(state, q, self.act)

    def output(self, reads: Tensor, x: Tensor) -> Tensor:
        """W_O (RMSNorm(reads) * SiLU(x W_G)): reads (BH, T, d), x (B, T, dim) -> (B, T, dim); through
        torch.compile with `compile_step`."""
        return self._compiled_if_asked(_output)(self, reads, x)

    def forward(self, x: Tensor) -> Tensor:
        """The LMM over a whole sequence from M_0: (B, T, dim) -> (B, T, dim)."""
        q, k, v, gates, _ = self.write_inputs(x)
        reads, _ = self.memorize(self.initial_state(x.shape[0]), k, v, q, gates)
        return self.output(reads, x)

    def _compiled_if_asked(self, fn: Callable) -> Callable:
        return _compiled(fn) if self.compile_step else fn

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}x{self.head_dim}, depth={self.depth}, chunk={self.chunk_size}, "
                f"momentum={self.momentum}, forgetting={self.forgetting}, retrieve={self.retrieve}, impl={self.impl}")


def _write_inputs(memory: NeuralMemory, x: Tensor, cache: tuple | None) -> tuple[Tensor, Tensor, Tensor, Gates, tuple]:
    """`NeuralMemory.write_inputs` (a function, so that one compiled graph serves every layer)."""
    cq, ck, cv = cache if cache is not None else (None, None, None)
    q, cq = memory.queries(x, cq)
    k, v, (ck, cv) = memory.keys_values(x, (ck, cv))
    return q, k, v, memory.gates(x), (cq, ck, cv)


def _output(memory: NeuralMemory, reads: Tensor, x: Tensor) -> Tensor:
    """`NeuralMemory.output`."""
    b, n, _ = x.shape
    y = memory.out_norm(reads).view(b, memory.num_heads, n, memory.head_dim)  # (B, H, T, d)
    y = y.transpose(1, 2).reshape(b, n, -1)  # (B, T, H*d)
    return memory.to_out(y * F.silu(memory.to_gate(x)))
