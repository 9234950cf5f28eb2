"""The chunk-by-chunk state scan of Titans' neural memory: `memory_scan(weights, momentum, k, v, end, decay, ...)`.

    scan = memory_scan(weights, momentum, k_chunks, v_chunks, end, decay, act="silu", max_surprise_norm=1.0)
    scan.weights, scan.momentum        # the state after the last chunk
    scan.w0, scan.s0                   # every chunk's start state, (BH, nc, d_l, d_{l+1})
    scan.inputs, scan.deltas           # every chunk's factors a_l and delta_l (see reference.py)

Dispatch, by `FORMERLAB_MEMORY_SCAN`: `auto` (the default) takes a fast path for CUDA tensors and the PyTorch
reference (`reference.py`, the spec; autograd gives its backward) otherwise. The fast paths:

- the fused Triton kernels (`triton_scan.py`: one program per memory, the weights and momentum kept on chip across the
  chunks, forward and backward, with the backward's gradients that no later chunk needs in a second kernel, parallel
  over the chunks) for a 2-layer SiLU MLP memory with power-of-two sizes of at least 16 whose kernels fit the GPU's
  shared memory;
- a parallel prefix scan over the chunks in PyTorch (`affine.py`) for the linear memory without the surprise clip,
  whose chunk step is affine in the state.

Anything else (a deeper memory, another activation, chunk lengths or widths the kernels do not take, a linear memory
with the clip) takes the reference. `reference` always runs the reference; `triton` takes the fast paths on any
device (the Triton kernels then need `TRITON_INTERPRET=1` on the CPU, which is how the tests run them). On an H200
the kernels match the exact float32 reference to 1e-6 (IEEE products) and, in bf16, come closer to it than the
reference's own bf16 matmuls; so does the prefix scan on an H100 (`scripts/bench_titans.py --parts scan`;
projects/titans/README.md gives the numbers).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from shared.kernels.dispatch import forced_backend
from shared.kernels.memory_scan.reference import ScanResult, dual_advance, memory_scan_reference

__all__ = ["memory_scan", "memory_scan_reference", "ScanResult", "backend"]

ENV_VAR = "FORMERLAB_MEMORY_SCAN"


def backend(weights: tuple[Tensor, ...], k: Tensor, act: str, max_surprise_norm: float | None = None) -> str:
    """'triton', 'affine' or 'reference': the path `memory_scan` takes for these inputs."""
    forced = forced_backend(ENV_VAR, "auto")
    if forced == "reference" or (forced == "auto" and k.device.type != "cuda"):
        return "reference"
    from shared.kernels.memory_scan import affine
    from shared.kernels.memory_scan.triton_scan import supports
    from shared.kernels.triton_common import triton_available

    if triton_available() and supports(weights, k, act):
        return "triton"
    return "affine" if affine.supports(weights, max_surprise_norm) else "reference"


def memory_scan(weights: tuple[Tensor, ...], momentum: tuple[Tensor, ...], k: Tensor, v: Tensor, end: Tensor,
                decay: Tensor, act: str = "silu", max_surprise_norm: float | None = None,
                advance: Callable = dual_advance) -> ScanResult:
    """Every chunk's update in order (reference.py's docstring); `advance` is the reference's chunk step (a
    compiled copy of `dual_advance` with the memory's `compile_step`)."""
    path = backend(weights, k, act, max_surprise_norm)
    if path == "triton":
        from shared.kernels.memory_scan.triton_scan import memory_scan_triton

        return memory_scan_triton(weights, momentum, k, v, end, decay, max_surprise_norm)
    if path == "affine":
        from shared.kernels.memory_scan.affine import memory_scan_affine

        return memory_scan_affine(weights, momentum, k, v, end, decay)
    return memory_scan_reference(weights, momentum, k, v, end, decay, act, max_surprise_norm, advance)
