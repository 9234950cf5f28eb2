"""The linear memory's scan (L_M = 1, no surprise clip) as a parallel prefix scan over the chunks.

With one weight matrix the chunk step of `reference.py` is affine in the state. With delta = K W - V and e_W, e_S the
two columns of `end`:

    W' = (A I + K^T diag(e_W) K) W + D S - K^T diag(e_W) V,     S' = K^T diag(e_S) K W + E S - K^T diag(e_S) V,

that is X' = T X + b for the stacked state X = [W; S] (2 d_0, d_1), with T (2 d_0, 2 d_0) and b (2 d_0, d_1) known
from the chunk's keys, values and gates before the scan starts. Affine maps compose associatively,
(T_2, b_2) o (T_1, b_1) = (T_2 T_1, T_2 b_1 + b_2), so every chunk's start state comes out of ceil(log2 nc) rounds of
batched matmuls (an inclusive scan by recursive doubling, Hillis & Steele 1986) instead of nc dependent steps, and
autograd differentiates the rounds as they are. It takes more arithmetic than the chunk-by-chunk loop, about
(2 d_0)^2 (2 d_0 + d_1) multiply-adds per chunk and round against 3 n d_0 d_1 per chunk, which a GPU has to spare and
a CPU does not: the dispatcher (`__init__.py`) takes it on CUDA only.

A deep memory's step is not affine (its gradient reaches the weights through the activation), nor is a clipped one
(the clip's factor depends on the state): those take the sequential loop (`reference.py`, `triton_scan.py`).

The scan runs in the state's dtype (float32) with autocast off, whatever the keys' dtype (the reference multiplies in
bf16 under bf16 autocast): products of up to nc transitions are where rounding would compound. Where PyTorch allows
TF32 its matmuls take it, and the error then exceeds the reference's in TF32 (projects/titans/README.md), while
staying below the reference's in bf16.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shared.kernels.memory_scan.reference import ScanResult, product_dtype


def supports(weights: tuple[Tensor, ...], max_surprise_norm: float | None) -> bool:
    """A linear memory (one weight matrix) without the surprise clip: the step is then affine in the state."""
    return len(weights) == 1 and max_surprise_norm is None


def chunk_maps(k: Tensor, v: Tensor, end: Tensor, decay: Tensor) -> tuple[Tensor, Tensor]:
    """Each chunk's step as the affine map X -> T X + b of the stacked state X = [W; S]: k (BH, nc, n, d_0),
    v (BH, nc, n, d_1), end (BH, nc, n, 2), decay (BH, nc, 3) -> T (BH, nc, 2 d_0, 2 d_0), b (BH, nc, 2 d_0, d_1)."""
    k_w, k_s = (k * e[..., None] for e in end.unbind(-1))  # (BH, nc, n, d_0): rows scaled by e_W, e_S
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    keep_w, keep_s, keep_m = (x[..., None, None] for x in decay.unbind(-1))  # A, D, E: (BH, nc, 1, 1)
    transition = torch.cat([torch.cat([keep_w * eye + k_w.mT @ k, keep_s * eye], dim=-1),
                            torch.cat([k_s.mT @ k, keep_m * eye], dim=-1)], dim=-2)
    offset = -torch.cat([k_w.mT @ v, k_s.mT @ v], dim=-2)
    return transition, offset


def memory_scan_affine(weights: tuple[Tensor, ...], momentum: tuple[Tensor, ...], k: Tensor, v: Tensor, end: Tensor,
                       decay: Tensor) -> ScanResult:
    """`memory_scan_reference` for a linear memory without the clip (`supports`), the same arguments and results."""
    (w,), (s,) = weights, momentum
    factor_dtype = torch.promote_types(product_dtype(k), v.dtype)  # the reference's M(k) - v
    d0, nc = w.shape[1], k.shape[1]
    acc = torch.promote_types(w.dtype, torch.float32)  # the state's dtype, float32 at least
    with torch.autocast(k.device.type, enabled=False):
        k, v, end, decay = (t.to(acc) for t in (k, v, end, decay))
        transition, offset = chunk_maps(k, v, end, decay)
        start = torch.cat([w, s], dim=1).to(acc)  # X_0: (BH, 2 d_0, d_1)
        # Chunk 0's map applied to X_0: from here on, once its span reaches chunk 0, offset[c] is chunk c's end state.
        offset = torch.cat([(transition[:, 0] @ start + offset[:, 0])[:, None], offset[:, 1:]], dim=1)
        step = 1
        while step < nc:  # before this round, entry c spans chunks c - step + 1 .. c; after it, c - 2 step + 1 .. c
            offset = torch.cat([offset[:, :step], transition[:, step:] @ offset[:, :-step] + offset[:, step:]], dim=1)
            # entries below 2 step now reach chunk 0 and their transitions are never read again
            transition = torch.cat([transition[:, :2 * step], transition[:, 2 * step:] @ transition[:, step:-step]],
                                   dim=1)
            step *= 2
        starts = torch.cat([start[:, None], offset[:, :-1]], dim=1)  # (BH, nc, 2 d_0, d_1)
        w_start, s_start = starts[:, :, :d0], starts[:, :, d0:]
        deltas = k @ w_start - v  # (BH, nc, n, d_1): delta_1 = M(k) - v at each chunk's start weights
    final = offset[:, -1]
    return ScanResult((final[:, :d0],), (final[:, d0:],), [w_start], [s_start], [], [deltas.to(factor_dtype)])
