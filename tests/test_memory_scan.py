"""shared/kernels/memory_scan: the fused Triton scan of Titans' memory against the PyTorch reference."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from shared.kernels import memory_scan as ms
from shared.kernels.memory_scan.reference import memory_scan_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def triton_scan():
    """The Triton module, on the GPU or built for the CPU interpreter (see tests/test_linear_attention.py)."""
    pytest.importorskip("triton")
    from shared.kernels.memory_scan import triton_scan as module

    if torch.cuda.is_available():
        return module
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    return importlib.reload(module)


def scan_inputs(bh: int = 3, nc: int = 3, n: int = 16, d0: int = 16, dh: int = 32, dtype=torch.float32, seed: int = 0):
    """A random 2-layer memory state and three chunks of keys, values and coefficients, at the scales the model
    has: unit-norm keys, decays in (0, 1], `end` = -2 theta (K, L_E) with theta ~ 0.05."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    weights = (rand(bh, d0, dh) / d0 ** 0.5, rand(bh, dh, d0) / dh ** 0.5)
    momentum = tuple(0.1 * rand(*w.shape) for w in weights)
    k = torch.nn.functional.normalize(rand(bh, nc, n, d0), dim=-1)
    v = rand(bh, nc, n, d0)
    end = -0.1 * torch.rand(bh, nc, n, 2, generator=g)
    decay = torch.rand(bh, nc, 3, generator=g) * 0.5 + 0.5
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return (tuple(map(to, weights)), tuple(map(to, momentum)), to(k).to(dtype), to(v).to(dtype),
            to(end).to(dtype), to(decay))


def assert_scans_close(got, expected, tol: float) -> None:
    for name in ("weights", "momentum", "w0", "s0", "inputs", "deltas"):
        a, b = getattr(got, name), getattr(expected, name)
        assert len(a) == len(b), name
        for i, (x, y) in enumerate(zip(a, b)):
            assert x.shape == y.shape and x.dtype == y.dtype, (name, i, x.shape, y.shape, x.dtype, y.dtype)
            err = (x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12)
            assert err < tol, f"{name}[{i}]: relative error {err:.2e}"


@pytest.mark.parametrize("clip", [None, 0.5])
def test_triton_scan_matches_the_reference_in_float32(triton_scan, clip):
    args = scan_inputs()
    expected = memory_scan_reference(*args, act="silu", max_surprise_norm=clip)
    got = triton_scan.memory_scan_triton(*args, max_surprise_norm=clip)
    assert_scans_close(got, expected, 2e-5)
    assert got.w0[0][:, 0].equal(args[0][0]) and got.s0[1][:, 0].equal(args[1][1])  # chunk 0 starts from the input


def test_triton_scan_matches_the_reference_under_bf16_autocast(triton_scan):
    """As the model runs it on a GPU: bf16 keys and values, float32 state (the reference's matmuls in bf16)."""
    args = scan_inputs(dtype=torch.bfloat16, seed=1)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        expected = memory_scan_reference(*args, act="silu", max_surprise_norm=1.0)
    got = triton_scan.memory_scan_triton(*args, max_surprise_norm=1.0)
    assert_scans_close(got, expected, 4e-2)


def test_supports_only_what_the_kernel_computes(triton_scan):
    weights, _, k, *_ = scan_inputs()
    assert triton_scan.supports(weights, k, "silu")
    assert not triton_scan.supports(weights, k, "gelu")
    assert not triton_scan.supports(weights[:1], k, "silu")  # the linear memory
    assert not triton_scan.supports(weights, k[:, :, :12], "silu")  # a ragged last chunk of 12 tokens
    assert not triton_scan.supports(tuple(w.double() for w in weights), k, "silu")


def test_dispatcher_keeps_the_reference_when_a_gradient_is_needed(triton_scan, monkeypatch):
    weights, momentum, k, v, end, decay = scan_inputs()
    assert ms.backend(weights, k, "silu") == "reference"  # the default until the kernel is checked on a GPU
    monkeypatch.setenv(ms.ENV_VAR, "auto")
    assert ms.backend(weights, k, "silu") == ("triton" if DEVICE == "cuda" else "reference")
    weights = tuple(w.requires_grad_() for w in weights)
    assert ms.backend(weights, k, "silu") == "reference"
    with torch.no_grad():
        assert ms.backend(weights, k, "silu") == ("triton" if DEVICE == "cuda" else "reference")
    monkeypatch.setenv(ms.ENV_VAR, "sideways")
    with pytest.raises(ValueError, match="FORMERLAB_MEMORY_SCAN='sideways'"):
        ms.backend(weights, k, "silu")


def test_memory_reads_through_the_kernel_equal_the_reference(triton_scan, monkeypatch):
    """The whole neural memory (gates, scan, reads) under no_grad: the Triton scan gives the reference's reads."""
    from projects.titans.memory import NeuralMemory

    torch.manual_seed(0)
    memory = NeuralMemory(dim=32, num_heads=2, depth=2, chunk_size=16, max_surprise_norm=1.0).to(DEVICE).eval()
    x = torch.randn(2, 48, 32, device=DEVICE)
    with torch.no_grad():
        monkeypatch.setenv(ms.ENV_VAR, "reference")
        expected = memory(x)
        monkeypatch.setenv(ms.ENV_VAR, "triton")
        got = memory(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
