"""shared/kernels/memory_scan: the fused Triton scan of Titans' memory against the PyTorch reference."""

from __future__ import annotations

import os

import pytest
import torch

from shared.kernels import memory_scan as ms
from shared.kernels.memory_scan.reference import memory_scan_reference
from tests.conftest import REPO, triton_kernel_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def triton_scan():
    return triton_kernel_module("shared.kernels.memory_scan.triton_scan")


def scan_inputs(bh: int = 3, nc: int = 3, n: int = 64, d0: int = 16, dh: int = 32, dtype=torch.float32, seed: int = 0):
    """A random 2-layer memory state and three chunks of keys, values and coefficients, at the scales the model
    has: unit-norm keys, decays in (0, 1], `end` = -2 theta (K, L_E) with theta ~ 0.05. Chunks of 64 tokens are
    two of the forward kernel's blocks of rows, four of the backward's sequential half's and one of its parallel
    half's (`block_rows`)."""
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


def test_triton_scan_multiplies_in_the_autocast_dtype(triton_scan):
    """CUDA autocast leaves the l2-normalised keys in float32; the kernels then multiply in bf16, as the reference's
    autocast matmuls do: float32 keys and values under autocast give exactly the scan of their bf16 copies."""
    args = scan_inputs(seed=4)
    bf16 = (*args[:2], *(t.bfloat16() for t in args[2:5]), args[5])
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert triton_scan.product_dtype(args[2]) == torch.bfloat16
        got = triton_scan.memory_scan_triton(*args, max_surprise_norm=1.0)
    expected = triton_scan.memory_scan_triton(*bf16, max_surprise_norm=1.0)
    assert triton_scan.product_dtype(args[2]) == torch.float32
    assert_scans_close(got, expected, 1e-6)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_triton_scan_gradients_match_the_reference(triton_scan, clip):
    """The backward kernel against autograd through the reference: an outer loss touching every output (final
    state, chunk-start states, factors) gives the same gradients for the state, keys, values and coefficients."""
    leaves = [t.clone().requires_grad_() for t in (*scan_inputs(seed=2)[0], *scan_inputs(seed=2)[1])]
    _, _, *rest = scan_inputs(seed=2)
    rest = [t.clone().requires_grad_() for t in rest]

    def outer_loss(scan) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        outputs = [*scan.weights, *scan.momentum, *scan.w0, *scan.s0, *scan.inputs, *scan.deltas]
        return sum((x.float() * torch.randn(x.shape, generator=g).to(DEVICE)).sum() for x in outputs)

    def grads(fn):
        scan = fn((leaves[0], leaves[1]), (leaves[2], leaves[3]), *rest, max_surprise_norm=clip)
        return torch.autograd.grad(outer_loss(scan), [*leaves, *rest])

    expected = grads(lambda *a, **kw: memory_scan_reference(*a, act="silu", **kw))
    got = grads(triton_scan.memory_scan_triton)
    names = ["W1", "W2", "S1", "S2", "k", "v", "end", "decay"]
    for name, x, y in zip(names, got, expected):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        err = (x - y).abs().max() / y.abs().max()
        assert err < 1e-4, f"d{name}: relative error {err:.2e}"


def test_supports_only_what_the_kernel_computes(triton_scan):
    weights, _, k, *_ = scan_inputs()
    assert triton_scan.supports(weights, k, "silu")
    assert not triton_scan.supports(weights, k, "gelu")
    assert not triton_scan.supports(weights[:1], k, "silu")  # the linear memory
    assert not triton_scan.supports(weights, k[:, :, :12], "silu")  # a ragged last chunk of 12 tokens
    assert not triton_scan.supports(tuple(w.double() for w in weights), k, "silu")


def test_dispatcher_takes_the_kernels_on_cuda_by_default(triton_scan, monkeypatch):
    weights, momentum, k, v, end, decay = scan_inputs()
    monkeypatch.delenv(ms.ENV_VAR, raising=False)
    assert ms.backend(weights, k, "silu") == ("triton" if DEVICE == "cuda" else "reference")
    monkeypatch.setenv(ms.ENV_VAR, "reference")
    assert ms.backend(weights, k, "silu") == "reference"
    monkeypatch.setenv(ms.ENV_VAR, "auto")
    assert ms.backend(weights, k, "gelu") == "reference"
    monkeypatch.setenv(ms.ENV_VAR, "triton")  # any device; what the kernels do not take still goes to the reference
    assert ms.backend(weights, k, "silu") == "triton"
    assert ms.backend(weights[:1], k, "silu") == ms.backend(weights, k[:, :, :12], "silu") == "reference"
    monkeypatch.setenv(ms.ENV_VAR, "sideways")
    with pytest.raises(ValueError, match="FORMERLAB_MEMORY_SCAN='sideways'"):
        ms.backend(weights, k, "silu")


def test_memory_through_the_kernels_equals_the_reference(triton_scan, monkeypatch):
    """The whole neural memory (gates, scan, reads) with the Triton scan gives the reference's reads, and the same
    gradients for every parameter of the memory (the outer loop trains through the kernels' backward). 50 tokens:
    padded to four whole chunks of 16, all through the kernels in one call (no ragged chunk left to the reference)."""
    from projects.titans.memory import NeuralMemory

    torch.manual_seed(0)
    memory = NeuralMemory(dim=32, num_heads=2, depth=2, chunk_size=16, max_surprise_norm=1.0).to(DEVICE)
    x = torch.randn(2, 50, 32, device=DEVICE)
    chosen, real_backend = [], ms.backend

    def recording_backend(*args) -> str:
        chosen.append(real_backend(*args))
        return chosen[-1]

    monkeypatch.setattr(ms, "backend", recording_backend)

    def run(backend: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setenv(ms.ENV_VAR, backend)
        reads = memory(x)
        return reads, torch.autograd.grad(reads.square().mean(), list(memory.parameters()))

    expected, expected_grads = run("reference")
    got, got_grads = run("triton")
    assert chosen == ["reference", "triton"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for (name, _), g, e in zip(memory.named_parameters(), got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5, msg=name)


HOPPER_SHARED_MEMORY = 232_448  # bytes per block on an H100 / H200 (Triton's `max_shared_mem`)

_COMPILE_FOR_HOPPER = """
import inspect
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from shared.kernels.memory_scan import triton_scan

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def stack_bytes(cubin: bytes) -> int:
    # ptxas' per-thread stack frame: where the registers spill to
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"STACK:(\\d+)", usage).group(1))


n, d0, dh, do = 64, 64, 128, 64  # the memory of the `small` and `340m` models: head_dim 64, expansion 2, b = 64
shared = {}
for kernel in (triton_scan._memory_scan_fwd, triton_scan._memory_scan_bwd, triton_scan._memory_scan_bwd_outputs):
    rows = triton_scan.block_rows(n, kernel)
    constants = dict(N=n, R=rows, D0=d0, DH=dh, DO=do, CLIP=True, PRECISION="tf32", UPCAST=False)
    names = list(inspect.signature(kernel.fn).parameters)
    f32_args = {"decay_ptr", "ddecay_ptr"} | {p for p in names if p[:2] in ("w1", "w2", "s1", "s2", "gw", "gs")}
    f32_args |= {"dw1_ptr", "dw2_ptr", "ds1_ptr", "ds2_ptr", "clip_ptr"}
    signature = {p: "constexpr" if p in constants else "i32" if p == "NC" else "fp32" if p == "max_norm"
                 else "*fp32" if p in f32_args else "*bf16" for p in names}
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    compiled = compile(source, target=GPUTarget("cuda", 90, 32), options=triton_scan.launch_options(dh))
    shared[kernel.fn.__name__] = {"shared": compiled.metadata.shared, "stack": stack_bytes(compiled.asm["cubin"])}
print(json.dumps(shared))
"""


@pytest.mark.slow
def test_kernels_at_the_models_memory_size_fit_hopper_shared_memory_and_registers():
    """The three kernels compiled for sm_90 (no GPU needed) with the launch options the model uses, at the `small` /
    `340m` memory in bf16, their rows in blocks of `block_rows` (32 forward, 16 the backward's sequential half, 64 its
    parallel half): the sequential half keeps twelve state-sized operands of its products in shared memory (an
    earlier version asked for 444 KB in float32, which an H200 refused at launch), and the registers spill little (a
    whole chunk of rows at once spilled 1.6 KB / 6.3 KB a thread, and the backward ran 2.2 times slower on an H100).
    How little depends on Triton's version. Forward / sequential half / parallel half, bytes of stack a thread: with
    3.8 (torch 2.14.1, the CI's) 0 / 232 / 0, with 3.6 (torch 2.11's, on an H100 on 2026-12-07) 8 / 224 / 240; the
    one-kernel backward spilled 2.7 KB with 3.6."""
    import json
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    usage = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(usage) == {"_memory_scan_fwd", "_memory_scan_bwd", "_memory_scan_bwd_outputs"}
    for name, u in usage.items():
        assert 0 < u["shared"] <= HOPPER_SHARED_MEMORY, f"{name}: {u['shared']} bytes of shared memory"
    # the bound each version was measured under: 3.8 spills nothing here, 3.6 up to 240 bytes
    small_spill = 64 if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 8) else 512
    assert usage["_memory_scan_fwd"]["stack"] < small_spill, usage
    assert usage["_memory_scan_bwd_outputs"]["stack"] < small_spill, usage
    assert usage["_memory_scan_bwd"]["stack"] < 3072, usage
