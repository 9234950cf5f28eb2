"""shared.kernels.varlen_attention: packing, the reference against padded masked attention, the dispatcher, and
our Triton kernel against the reference on CPU under TRITON_INTERPRET=1 at tiny sizes."""

from __future__ import annotations

import importlib
import math
import os
import sys

import torch

# Triton decorates its kernels (and its own library) for the interpreter only if this is set before it is first
# imported; without CUDA, Triton can only run interpreted anyway.
_TRITON_ALREADY_COMPILED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from shared.kernels.varlen_attention import (  # noqa: E402
    choose_backend,
    pack,
    pack_info,
    unpack,
    varlen_attention,
    varlen_attention_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def padded_attention(q, k, v, mask):
    """BERT's padded attention in float64: (B, L, H, D) with a key-padding mask (B, L)."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask == 0, float("-inf"))[:, None, None]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias  # (B, H, L, L)
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)  # (B, L, H, D)


def right_padded_mask(lengths, seqlen):
    return (torch.arange(seqlen)[None] < torch.tensor(lengths)[:, None]).long()  # (B, L)


def test_pack_unpack_roundtrip_and_prefix_sums():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]])  # holes and left padding too
    x = torch.randn(4, 4, 3)
    info = pack_info(mask)
    assert info.cu_seqlens.tolist() == [0, 3, 3, 4, 6] and info.cu_seqlens.dtype == torch.int32
    assert info.max_seqlen == 3
    packed = pack(x, info)
    assert torch.equal(packed, x[mask.bool()])  # row-major order of the valid tokens
    assert torch.equal(unpack(packed, info), x * mask[..., None])


def test_pack_with_capacity_has_static_shapes_and_spare_rows():
    mask = right_padded_mask([3, 1, 2], 4)
    x = torch.randn(3, 4, 5)
    exact, bucketed = pack_info(mask), pack_info(mask, capacity=8)
    assert bucketed.max_seqlen == 4 and bucketed.indices.shape == (8,)
    assert torch.equal(bucketed.indices[:6], exact.indices)
    assert torch.all(bucketed.indices[6:] == 3 * 4)  # spare rows point one past the padded batch
    packed = pack(x, bucketed, pad_value=-7.0)
    assert torch.all(packed[6:] == -7.0)
    assert torch.equal(unpack(packed, bucketed), unpack(pack(x, exact), exact))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_equals_padded_masked_attention(dtype):
    torch.manual_seed(0)
    lengths, seqlen, heads, dim = [7, 1, 0, 12, 5], 12, 3, 8
    mask = right_padded_mask(lengths, seqlen)
    q, k, v = (torch.randn(len(lengths), seqlen, heads, dim, dtype=dtype) for _ in range(3))
    info = pack_info(mask)
    out = varlen_attention_reference(*(pack(t, info) for t in (q, k, v)), info.cu_seqlens, info.max_seqlen)
    expected = padded_attention(q, k, v, mask)[mask.bool()]
    assert out.dtype == dtype and out.shape == (sum(lengths), heads, dim)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_reference_gradient_matches_padded():
    torch.manual_seed(1)
    mask = right_padded_mask([4, 6], 6)
    q, k, v = (torch.randn(2, 6, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    info = pack_info(mask)
    packed = varlen_attention_reference(*(pack(t, info) for t in (q, k, v)), info.cu_seqlens)
    grads = torch.autograd.grad(packed.square().sum(), (q, k, v))
    expected = torch.autograd.grad(padded_attention(q, k, v, mask)[mask.bool()].square().sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_reference_custom_scale():
    torch.manual_seed(2)
    q, k, v = (torch.randn(5, 2, 4, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 5], dtype=torch.int32)
    out = varlen_attention_reference(q, k, v, cu, scale=0.3)
    expected = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), scale=0.3).transpose(0, 1)
    torch.testing.assert_close(out, expected)


def test_dispatcher_choices(monkeypatch):
    q = torch.randn(4, 2, 8)
    assert choose_backend(q, 4, needs_grad=False) == "reference"  # CPU
    assert choose_backend(q, 4, needs_grad=False, backend="triton") == "triton"
    monkeypatch.setenv("FORMERLAB_VARLEN_ATTENTION", "torch")
    assert choose_backend(q, 4, needs_grad=False) == "torch"
    monkeypatch.setenv("FORMERLAB_VARLEN_ATTENTION", "fast")
    with pytest.raises(ValueError, match="FORMERLAB_VARLEN_ATTENTION"):
        choose_backend(q, 4, needs_grad=False)
    with pytest.raises(ValueError, match="is not one of"):
        choose_backend(q, 4, needs_grad=False, backend="flash")


def test_bad_inputs_give_one_clear_error():
    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match=r"\(total_tokens, H, D\)"):
        varlen_attention(q, q[:3], q, torch.tensor([0, 4], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, q, q, torch.tensor([0.0, 4.0]), 4)


def test_triton_is_forward_only():
    q = torch.randn(4, 2, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="forward-only"):
        varlen_attention(q, q, q, torch.tensor([0, 4], dtype=torch.int32), 4, backend="triton")


@pytest.fixture(scope="module")
def triton_varlen():
    """The Triton module, on the GPU or built for the CPU interpreter (reloaded under TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    from shared.kernels.varlen_attention import triton_varlen as module

    if torch.cuda.is_available():
        return module
    if _TRITON_ALREADY_COMPILED or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 could be set (set it for the whole session)")
    return importlib.reload(module)


BF16_ON_CPU = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="the Triton interpreter multiplies bf16 matrices wrongly (triton 3.8); the GPU bench checks bf16",
)


FP32_TOLERANCE = 2e-3 if torch.cuda.is_available() else 1e-5  # on the GPU, tl.dot on fp32 inputs runs in TF32


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, FP32_TOLERANCE), (torch.float16, 3e-3),
                                             pytest.param(torch.bfloat16, 2e-2, marks=BF16_ON_CPU)])
def test_triton_matches_reference(triton_varlen, dtype, tolerance):
    torch.manual_seed(3)
    # lengths: empty, single token, exactly one 16-token block, several blocks with a ragged tail
    lengths, heads, dim = [0, 1, 16, 37, 5], 2, 24  # D = 24 is padded to a 32-wide block inside the kernel
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    qkv = torch.randn(total, 3, heads, dim, device=DEVICE).to(dtype)
    q, k, v = qkv.unbind(1)  # strided views of a fused projection, as the model passes them
    out = triton_varlen.varlen_attention_triton(q, k, v, cu, max(lengths))
    expected = varlen_attention_reference(q.double(), k.double(), v.double(), cu)
    assert out.dtype == dtype and out.shape == (total, heads, dim)
    error = (out.double() - expected).abs().max() / expected.abs().max()
    assert error < tolerance, f"{dtype}: relative error {error:.2e}"


def test_triton_bucket_capacity_and_scale(triton_varlen):
    torch.manual_seed(4)
    mask = right_padded_mask([9, 3, 20], 20)
    info = pack_info(mask.to(DEVICE), capacity=48)  # 32 valid tokens, 16 spare rows; max_seqlen = L
    q, k, v = (torch.randn(48, 2, 16, device=DEVICE) for _ in range(3))
    out = triton_varlen.varlen_attention_triton(q, k, v, info.cu_seqlens, info.max_seqlen, scale=0.2)
    expected = varlen_attention_reference(q, k, v, info.cu_seqlens, scale=0.2)
    error = (out[:32] - expected[:32]).abs().max() / expected[:32].abs().max()
    assert error < FP32_TOLERANCE, f"relative error {error:.2e}"
