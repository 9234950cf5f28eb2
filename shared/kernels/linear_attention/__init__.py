"""Linear (kernelised) attention: `linear_attention(q, k, v, *, causal, normalize, eps)`.

    from shared.kernels.linear_attention import linear_attention
    out = linear_attention(F.relu(q), F.relu(k), v)               # (B, H, N, Dv), non-causal, normalised
    out = linear_attention(phi_q, phi_k, v, causal=True)          # autoregressive (Katharopoulos et al. eq. 8-10)

q, k are (B, H, N, Dk) features that the caller has already mapped to non-negative values, v is (B, H, N, Dv);
the result is (q k^T [causal mask]) v divided by q . sum_j k_j (+ eps) when `normalize`, in v's dtype, with
float32 accumulation in every path.

Dispatch: CUDA tensors go to the chunked Triton kernel (`triton_chunk.py`, forward and backward; head sizes up
to 128, q, k, v of one dtype), everything else to the PyTorch reference (`reference.py`, the spec).
`FORMERLAB_LINEAR_ATTENTION=reference` forces the reference everywhere (debugging, or a GPU without Triton);
`=triton` forces the Triton kernel (on CPU it then needs `TRITON_INTERPRET=1`, which is how the tests run it).
"""

from __future__ import annotations

from torch import Tensor

from shared.kernels.dispatch import forced_backend
from shared.kernels.linear_attention.reference import linear_attention_reference

__all__ = ["linear_attention", "linear_attention_reference", "backend"]

ENV_VAR = "FORMERLAB_LINEAR_ATTENTION"


def backend(device_type: str) -> str:
    """'triton' or 'reference': the path `linear_attention` takes for tensors on `device_type` (shapes the
    kernel does not take still go to the reference unless the variable forces Triton)."""
    forced = forced_backend(ENV_VAR, "auto")
    if forced != "auto":
        return forced
    if device_type != "cuda":
        return "reference"
    from shared.kernels.triton_common import triton_available

    return "triton" if triton_available() else "reference"


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, normalize: bool = True, eps: float = 1e-6
) -> Tensor:
    """(phi(q) phi(k)^T [causal-masked]) v / (phi(q) . sum_j phi(k_j) + eps); see the module docstring."""
    if backend(q.device.type) == "triton":
        from shared.kernels.linear_attention.triton_chunk import linear_attention_triton, supports

        if supports(q, v) or forced_backend(ENV_VAR, "auto") == "triton":
            return linear_attention_triton(q, k, v, causal=causal, normalize=normalize, eps=eps)
    return linear_attention_reference(q, k, v, causal=causal, normalize=normalize, eps=eps)
