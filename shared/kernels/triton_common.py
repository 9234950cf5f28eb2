"""What the Triton kernels of `shared/kernels` share: whether Triton is there, whether it runs interpreted (on CPU,
`TRITON_INTERPRET=1`), and a matrix product that accumulates in float32 and treats float32 inputs as PyTorch's own
matmuls do (`torch.get_float32_matmul_precision()`: 'highest' exact IEEE products, 'high'/'medium' TF32)."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the dispatchers fall back to their references
    triton = None


def triton_available() -> bool:
    """Triton is installed (kernels then run on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_options(dtype: torch.dtype) -> dict:
    """The `PRECISION` and `UPCAST` arguments of `dot` for inputs of `dtype`."""
    upcast = interpreting() and dtype == torch.bfloat16
    precision = "ieee" if upcast or torch.get_float32_matmul_precision() == "highest" else "tf32"
    return {"PRECISION": precision, "UPCAST": upcast}


if triton is not None:

    @triton.jit
    def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b (+ acc) with float32 accumulation. UPCAST multiplies in float32: the interpreter's bf16 products
        are wrong, and bf16 values are exact in float32, so this is what the tensor cores compute."""
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)
