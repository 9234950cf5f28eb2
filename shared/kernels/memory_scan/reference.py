"""The sequential part of Titans' chunked memory update (Behrouz et al. 2025, §3.2): from each chunk's start state
of an MLP memory (weights M, momentum S) to the next, for all chunks of a sequence in order.

For the n tokens of a chunk at the chunk-start weights M_0 (depth L_M, weights W_l (d_l, d_{l+1}), no biases):

    a_0 = k, z_l = a_{l-1} W_l, a_l = act(z_l);  delta_L = z_L - v, delta_l = (delta_{l+1} W_{l+1}^T) act'(z_l)
    u_j = 2 a_{l-1,j}^T delta_{l,j}  (the gradient of ||M(k_j) - v_j||^2 w.r.t. W_l, per token j)
    M_n = A_n M_0 + D_n S_0 - sum_j K[n, j] theta_j u_j,    S_n = E_n S_0 - sum_j L_E[n, j] theta_j u_j

with the decay products A_n, D_n, E_n and the chunk-end rows of K and L_E computed beforehand from the gates
(`projects/titans/memory.py`, `ChunkCoefficients`); here they arrive as `end` (BH, nc, n, 2), [j] = -2 theta_j
(K[n, j], L_E[n, j]), and `decay` (BH, nc, 3) = (A_n, D_n, E_n). Optionally each token's u_j is clipped to norm
`max_surprise_norm` first. Besides the final state, the scan returns what the reads of every chunk need: each
chunk's start state and its factors a_l (l >= 1) and delta_l.

This file is the spec (`memory_scan_reference`, a loop over chunks of `dual_advance`); `triton_scan.py` fuses it
into two kernels, forward and backward (one program per memory, the state held on chip across chunks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"silu": F.silu, "gelu": F.gelu}


class ScanResult(NamedTuple):
    """The final state and, per chunk c, the start state and the factors, each stacked on dim 1 (BH, nc, ...):
    `w0[l]`, `s0[l]` (BH, nc, d_l, d_{l+1}); `inputs[l]` = a_{l+1} (BH, nc, n, d_{l+1}) for l < L_M - 1 (layer 1's
    inputs are the keys themselves); `deltas[l]` (BH, nc, n, d_{l+1})."""

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    w0: list[Tensor]
    s0: list[Tensor]
    inputs: list[Tensor]
    deltas: list[Tensor]


def surprise_scale(sq_norm: Tensor, max_norm: float) -> Tensor:
    """The factor min(1, max_norm / ||u_t||) that clips each token's momentary surprise u_t = grad l(M_{t'}; x_t),
    given ||u_t||^2 summed over the memory's layers (any shape). Clamping the squared norm first keeps the
    backward finite at u_t = 0."""
    return max_norm * sq_norm.clamp_min(max_norm ** 2).rsqrt()


def act_derivative(z: Tensor, act: str) -> Tensor:
    """d act / dz, written out (the reference does not use autograd for the inner gradient)."""
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if act == "gelu":
        return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    raise ValueError(f"unknown memory activation {act!r}")


def layer_factors(weights: Sequence[Tensor], k: Tensor, v: Tensor, act: str) -> tuple[list[Tensor], list[Tensor]]:
    """For B*H memories and the n tokens of a chunk at weights M_{t'}: the inputs a_{l-1} of every layer
    (BH, n, d_l) and the gradients delta_l of (1/2) l (eq. 12) at every pre-activation (BH, n, d_{l+1}), so that
    grad_{W_l} l(x_t) = 2 a_{l-1,t}^T delta_{l,t} (the 2 is left to the caller, which folds it into theta).

    The backward pass of the memory MLP is written out (delta_L = M(k) - v, delta_l = (delta_{l+1} W_{l+1}^T)
    act'(z_l)) with differentiable ops, so the outer loop trains through it; `memory_chunked_materialized` gets
    the same gradients from `torch.func.grad` and the tests compare the two. Writing it out instead of calling
    `torch.func.grad` keeps the sequential loop over chunks to a few large kernels (no functorch layers)."""
    inputs, pre = [], []
    x = k
    for i, w in enumerate(weights):
        inputs.append(x)
        x = x @ w
        if i < len(weights) - 1:
            pre.append(x)
            x = ACTIVATIONS[act](x)
    deltas = [x - v]
    for w, z in zip(weights[:0:-1], pre[::-1]):  # layers L..2: delta_{l-1} from delta_l
        deltas.append((deltas[-1] @ w.transpose(-1, -2)) * act_derivative(z, act))
    return inputs, deltas[::-1]


def dual_advance(weights: tuple[Tensor, ...], momentum: tuple[Tensor, ...], k: Tensor, v: Tensor, end: Tensor,
                 decay: Tensor, act: str, max_surprise_norm: float | None = None,
                 ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], list[Tensor], list[Tensor]]:
    """One chunk's end state from its start state (M_0, S_0): the only sequential work of the chunked update.

        M_n = A_n M_0 + D_n S_0 - sum_j K[n, j] theta_j u_j,    S_n = E_n S_0 - sum_j L_E[n, j] theta_j u_j,
    with u_j = 2 a_j^T delta_j per layer. k, v: (BH, n, d); end: (BH, n, 2), [j] = -2 theta_j (K[n, j], L_E[n, j]);
    decay: (BH, 3) = (A_n, D_n, E_n). Returns the new weights and momenta and the chunk's factors (inputs, deltas);
    with `max_surprise_norm` the deltas come back clipped, ||u_j|| = 2 (sum_l |a_lj|^2 |delta_lj|^2)^(1/2) per token.
    """
    inputs, deltas = layer_factors(weights, k, v, act)
    if max_surprise_norm is not None:
        acc = torch.promote_types(deltas[0].dtype, torch.float32)  # under bf16 autocast the norm is summed in float32
        sq_norm = 4 * sum(a.to(acc).pow(2).sum(-1) * delta.to(acc).pow(2).sum(-1)
                          for a, delta in zip(inputs, deltas))  # (BH, n)
        scale = surprise_scale(sq_norm, max_surprise_norm)[..., None].to(deltas[0].dtype)
        deltas = [delta * scale for delta in deltas]
    a, d, e = (x[:, None, None] for x in decay.unbind(-1))  # (BH, 1, 1) each
    new_w, new_s = [], []
    for w0, s0, a_j, delta in zip(weights, momentum, inputs, deltas):
        # Both sums in one matmul: a^T [delta * end_M | delta * end_S].
        scaled = (delta[..., None, :] * end[..., None]).flatten(-2)  # (BH, n, 2 d_{l+1})
        u_w, u_s = (a_j.transpose(-1, -2) @ scaled).unflatten(-1, (2, -1)).unbind(-2)  # (BH, d_l, d_{l+1}) each
        # addcmul promotes to the state's float32 under bf16 autocast (the matmul's output is bf16).
        new_w.append(torch.addcmul(torch.addcmul(u_w, d, s0), a, w0))
        new_s.append(torch.addcmul(u_s, e, s0))
    return tuple(new_w), tuple(new_s), inputs, deltas


def product_dtype(k: Tensor) -> torch.dtype:
    """The dtype the scan multiplies in: autocast's when it is on (CUDA autocast leaves the l2-normalised keys in
    float32, and the reference's matmuls run in the autocast dtype), else the keys'. The Triton kernels multiply in
    it; the prefix scan returns its factors (`ScanResult.deltas`, M(k) - v) in it promoted with the values' dtype,
    as the reference does."""
    if torch.is_autocast_enabled(k.device.type):
        return torch.get_autocast_dtype(k.device.type)
    return k.dtype


def _stack_chunks(per_chunk: Iterable[Sequence[Tensor]]) -> list[Tensor]:
    """Per-chunk lists of per-layer tensors (BH, ...) -> one tensor per layer (BH, n_chunks, ...)."""
    return [torch.stack(layer, dim=1) for layer in zip(*per_chunk)]


def memory_scan_reference(weights: tuple[Tensor, ...], momentum: tuple[Tensor, ...], k: Tensor, v: Tensor,
                          end: Tensor, decay: Tensor, act: str = "silu", max_surprise_norm: float | None = None,
                          advance: Callable = dual_advance) -> ScanResult:
    """Every chunk in order: k (BH, nc, n, d_0), v (BH, nc, n, d_L), end (BH, nc, n, 2), decay (BH, nc, 3).
    `advance` is `dual_advance` or a compiled copy of it."""
    starts, factors = [], []
    for kc, vc, ec, dc in zip(k.unbind(1), v.unbind(1), end.unbind(1), decay.unbind(1)):
        starts.append((weights, momentum))
        weights, momentum, inputs, deltas = advance(weights, momentum, kc, vc, ec, dc, act, max_surprise_norm)
        factors.append((inputs[1:], deltas))
    return ScanResult(weights, momentum, _stack_chunks(w for w, _ in starts), _stack_chunks(s for _, s in starts),
                      _stack_chunks(i for i, _ in factors), _stack_chunks(d for _, d in factors))
