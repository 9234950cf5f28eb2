"""Kernels shared by several projects, one operation a folder: `<op>/reference.py` (plain PyTorch, the spec),
a fast path (Triton) and a dispatcher in `<op>/__init__.py` that picks the fast path on CUDA and the reference
elsewhere. Fast paths are tested against their reference on CPU under `TRITON_INTERPRET=1`.

- `linear_attention`: non-causal and causal kernelised (linear) attention with an optional normaliser
  (SLAB, LRA's Linear Transformer, ScatterFormer, kernelised-attention papers).
"""
