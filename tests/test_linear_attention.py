"""shared.kernels.linear_attention: the reference against the textbook formula, the dispatcher, and the chunked
Triton kernel against the reference (values and gradients) on CPU under TRITON_INTERPRET=1 at small sizes."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported (its own library functions are decorated then), so it is set
    # before anything imports triton; without CUDA, Triton can only run interpreted anyway.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from shared.kernels import linear_attention as la  # noqa: E402
from shared.kernels.linear_attention.reference import linear_attention_reference  # noqa: E402
from tests.conftest import triton_kernel_module  # noqa: E402


def naive(q, k, v, causal, normalize, eps):
    """Katharopoulos et al. eq. 4 / 9 written out with the full (N, N) score matrix, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-2, -1)  # (B, H, N, N)
    if causal:
        scores = scores.tril()
    out = scores @ v
    if normalize:
        out = out / (scores.sum(-1, keepdim=True) + eps)
    return out


def inputs(b=2, h=3, n=37, dk=8, dv=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, h, n, dk, generator=g).to(dtype)  # non-negative features, as phi(q) would be
    k = torch.rand(b, h, n, dk, generator=g).to(dtype)
    v = torch.randn(b, h, n, dv, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_the_formula(causal, normalize):
    q, k, v = inputs(n=300)  # longer than the reference's causal query block (256)
    out = linear_attention_reference(q, k, v, causal=causal, normalize=normalize, eps=1e-3)
    expected = naive(q, k, v, causal, normalize, 1e-3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


def test_causal_output_ignores_the_future():
    q, k, v = inputs(n=20)
    out = linear_attention_reference(q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[..., 10:, :] += 1.0
    v2[..., 10:, :] *= -3.0
    out2 = linear_attention_reference(q, k2, v2, causal=True)
    torch.testing.assert_close(out[..., :10, :], out2[..., :10, :])
    assert not torch.allclose(out[..., 10:, :], out2[..., 10:, :])


@pytest.mark.parametrize("causal", [False, True])
def test_reference_gradients(causal):
    q, k, v = (t.double().requires_grad_() for t in inputs(b=1, h=2, n=9, dk=3, dv=4))
    assert torch.autograd.gradcheck(lambda a, b, c: linear_attention_reference(a, b, c, causal=causal), (q, k, v))


def test_reference_keeps_the_value_dtype_and_accumulates_in_float32():
    q, k, v = inputs(n=64, dtype=torch.bfloat16)
    out = linear_attention_reference(q, k, v)
    assert out.dtype == torch.bfloat16
    expected = naive(q, k, v, False, True, 1e-6).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # only the final rounding differs from float64


def test_dispatcher_uses_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(la.ENV_VAR, raising=False)
    assert la.backend("cpu") == "reference"
    q, k, v = inputs()
    torch.testing.assert_close(la.linear_attention(q, k, v, causal=True),
                               linear_attention_reference(q, k, v, causal=True), rtol=0, atol=0)
    monkeypatch.setenv(la.ENV_VAR, "reference")
    assert la.backend("cuda") == "reference"
    monkeypatch.setenv(la.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=la.ENV_VAR):
        la.backend("cpu")


def test_bad_shapes_name_the_tensors():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="must share"):
        linear_attention_reference(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        linear_attention_reference(q[0], k[0], v[0])


# ------------------------------------------------------------------------------------- Triton (interpreted)

@pytest.fixture(scope="module")
def triton_chunk():
    return triton_kernel_module("shared.kernels.linear_attention.triton_chunk")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative to the largest entry


def assert_close_scaled(actual, expected, dtype, what):
    err = (actual.float() - expected.float()).abs().max() / expected.float().abs().max()
    assert err < TOLERANCE[dtype], f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_matches_reference(triton_chunk, dtype, causal, normalize):
    # 40 tokens = 2.5 chunks of 16: a partial chunk, and (non-causal) a state reduced over two slices;
    # head sizes that are not powers of two exercise the padding masks.
    q, k, v = (t.to(DEVICE).requires_grad_() for t in inputs(b=1, h=2, n=40, dk=12, dv=20, dtype=dtype, seed=1))
    out = triton_chunk.linear_attention_triton(q, k, v, causal=causal, normalize=normalize, chunk=16)
    assert out.shape == v.shape and out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = linear_attention_reference(q, k, v, causal=causal, normalize=normalize)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    assert_close_scaled(out, expected, dtype, "out")
    for name, g, e in zip("qkv", grads, expected_grads):
        assert g.dtype == dtype
        assert_close_scaled(g, e, dtype, f"d{name}")


def test_triton_through_the_dispatcher_with_strided_inputs(triton_chunk, monkeypatch):
    monkeypatch.setenv(la.ENV_VAR, "triton")
    # q, k, v as the heads of one (B, N, 3, H, D) projection: non-contiguous views, as attention layers make them
    qkv = torch.rand(2, 33, 3, 2, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
    out = la.linear_attention(q, k, v, causal=True)
    out.square().sum().backward()
    grad = qkv.grad.clone()
    qkv.grad = None
    expected = linear_attention_reference(q, k, v, causal=True)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, qkv.grad, rtol=1e-3, atol=1e-3)
