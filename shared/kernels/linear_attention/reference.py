"""Linear attention in plain PyTorch: the specification the fast paths are tested against.

Katharopoulos et al. 2020 ("Transformers are RNNs", eq. 4-5 and eq. 8-10 for the causal form) replace
softmax(QK^T) by a feature map phi: with q = phi(Q), k = phi(K) already applied by the caller,

    out_i = sum_j (q_i . k_j) v_j / (q_i . sum_j k_j + eps)          (non-causal, j over all tokens)
    out_i = sum_{j<=i} (q_i . k_j) v_j / (q_i . sum_{j<=i} k_j + eps)  (causal)

and without the normaliser (`normalize=False`) the numerator alone. Everything is computed in float32 (float64
for float64 inputs) whatever the input dtype, since the products of non-negative features are large and the
normaliser is a long sum; the result is returned in the dtype of `v`.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Causal attention is evaluated for this many queries at a time, so memory is O(N * block), not O(N^2).
_CAUSAL_QUERY_BLOCK = 256


def check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """One clear error for shapes the kernels cannot take."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"linear_attention expects (B, H, N, D) tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"linear_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"linear_attention: v {tuple(v.shape)} must share (B, H, N) with k {tuple(k.shape)}")


def linear_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, normalize: bool = True, eps: float = 1e-6
) -> Tensor:
    """(q k^T [lower-triangular when causal]) v, divided row-wise by q . sum_j k_j + eps when `normalize`.

    q, k: (B, H, N, Dk), non-negative features; v: (B, H, N, Dv). Returns (B, H, N, Dv) in v's dtype.
    Differentiable by autograd.
    """
    check_inputs(q, k, v)
    out_dtype = v.dtype
    compute = torch.promote_types(v.dtype, torch.float32)  # float64 stays float64 (gradcheck)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if not causal:
        kv = k.transpose(-2, -1) @ v  # (B, H, Dk, Dv): the whole sequence summarised once (eq. 5)
        out = q @ kv  # (B, H, N, Dv)
        if normalize:
            out = out / (q @ k.sum(dim=-2).unsqueeze(-1) + eps)  # (B, H, N, 1)
        return out.to(out_dtype)
    n = q.shape[-2]
    blocks = []
    for start in range(0, n, _CAUSAL_QUERY_BLOCK):
        stop = min(start + _CAUSAL_QUERY_BLOCK, n)
        scores = q[..., start:stop, :] @ k[..., :stop, :].transpose(-2, -1)  # (B, H, stop-start, stop)
        rows = torch.arange(start, stop, device=q.device).unsqueeze(-1)
        cols = torch.arange(stop, device=q.device)
        scores = scores.masked_fill(cols > rows, 0.0)  # token i sees keys j <= i only
        out = scores @ v[..., :stop, :]  # (B, H, stop-start, Dv)
        if normalize:
            out = out / (scores.sum(dim=-1, keepdim=True) + eps)
        blocks.append(out)
    return torch.cat(blocks, dim=-2).to(out_dtype)
