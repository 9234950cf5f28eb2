"""Titans: the chunked memory update equals its definition (values and outer-loop gradients), the variants are
causal, the ablation switches do what Table 5 says, configs compose, and a short run learns."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from projects.titans.memory import (
    MEMORY_IMPLS,
    CausalDepthwiseConv1d,
    Gates,
    MemoryState,
    NeuralMemory,
    associative_grad,
    associative_loss,
    memory_chunked_dual,
    memory_chunked_materialized,
    memory_recurrent_reference,
)
from projects.titans.model import MODELS, VARIANTS, build_titans

REPO = Path(__file__).resolve().parents[1]


def _problem(depth: int, momentum: bool, forgetting: bool, bh: int = 3, t: int = 11, d: int = 4, hidden: int = 6,
             seed: int = 0):
    """A random memory problem in float64 with every input a leaf that requires grad."""
    g = torch.Generator().manual_seed(seed)
    dims = [d] + [hidden] * (depth - 1) + [d]
    weights = [(torch.randn(bh, dims[i], dims[i + 1], generator=g, dtype=torch.float64) / 2).requires_grad_()
               for i in range(depth)]
    momenta = [(0.1 * torch.randn(w.shape, generator=g, dtype=torch.float64)).requires_grad_() for w in weights]
    k = F.normalize(torch.randn(bh, t, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    v = torch.randn(bh, t, d, generator=g, dtype=torch.float64).requires_grad_()
    q = torch.randn(bh, t, d, generator=g, dtype=torch.float64).requires_grad_()
    theta = (0.3 * torch.rand(bh, t, generator=g, dtype=torch.float64)).requires_grad_()
    log_eta = F.logsigmoid(torch.randn(bh, t, generator=g, dtype=torch.float64)).requires_grad_() if momentum else None
    log_keep = (F.logsigmoid(torch.randn(bh, t, generator=g, dtype=torch.float64) + 2).requires_grad_()
                if forgetting else None)
    leaves = [*weights, *momenta, k, v, q, theta] + [x for x in (log_eta, log_keep) if x is not None]
    return MemoryState(tuple(weights), tuple(momenta)), k, v, q, Gates(theta, log_eta, log_keep), leaves


def _outputs_and_grads(fn, state, k, v, q, gates, leaves, chunk, retrieve):
    reads, final = fn(state, k, v, q, gates, chunk, "silu", retrieve)
    # An outer loss that touches the reads and both parts of the final state.
    loss = reads.pow(2).sum() + sum(w.pow(2).sum() for w in final.weights) + sum(s.sin().sum() for s in final.momentum)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # S_0 is unused without momentum
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return [reads, *final.weights, *final.momentum], grads


def test_reference_gradient_is_the_gradient_of_eq12():
    """The reference's hand-written chain rule equals autograd's gradient of ||M(k) - v||^2."""
    state, k, v, _, _, _ = _problem(depth=3, momentum=True, forgetting=True)
    ws = [w.detach().requires_grad_() for w in state.weights]
    manual = associative_grad(ws, k[:, 0].detach(), v[:, 0].detach(), "silu")
    auto = torch.autograd.grad(associative_loss([w for w in ws], k[:, 0, None].detach(), v[:, 0, None].detach(),
                                                "silu"), ws)
    for a, b in zip(manual, auto):
        torch.testing.assert_close(a, b)


def test_chunk_one_is_the_recurrence():
    """b = 1: u_t = grad l(M_{t-1}; x_t) exactly; hand-check the first two steps of eqs. 13-15."""
    state, k, v, q, gates, _ = _problem(depth=2, momentum=True, forgetting=True, t=2)
    reads, _ = memory_recurrent_reference(state, k, v, q, gates, chunk_size=1)
    w, s = list(state.weights), list(state.momentum)
    for t in range(2):
        u = associative_grad(w, k[:, t], v[:, t], "silu")
        eta, keep = gates.log_eta[:, t, None, None].exp(), gates.log_keep[:, t, None, None].exp()
        s = [eta * si - gates.theta[:, t, None, None] * ui for si, ui in zip(s, u)]
        w = [keep * wi + si for wi, si in zip(w, s)]
        expected = F.silu(q[:, t, None] @ w[0]) @ w[1]
        torch.testing.assert_close(reads[:, t], expected[:, 0])


@pytest.mark.parametrize("impl", [memory_chunked_dual, memory_chunked_materialized])
@pytest.mark.parametrize("depth,momentum,forgetting", [(1, True, True), (2, True, True), (2, False, True),
                                                        (2, True, False), (3, True, True)])
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("retrieve", ["after", "before"])
def test_parallel_chunked_update_equals_definition(impl, depth, momentum, forgetting, chunk, retrieve):
    """Values and outer-loop gradients of the parallel paths equal the token loop (chunk 1: the recurrence; chunk 4
    with 11 tokens: eqs. 16/18 with gradients at the chunk-start weights, and a ragged last chunk)."""
    problem = _problem(depth, momentum, forgetting, seed=depth)
    ref_out, ref_grads = _outputs_and_grads(memory_recurrent_reference, *problem, chunk, retrieve)
    out, grads = _outputs_and_grads(impl, *problem, chunk, retrieve)
    for a, b in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("impl", [memory_chunked_dual, memory_chunked_materialized])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk", [1, 4])
def test_clipped_surprise_equals_definition(impl, depth, chunk):
    """`max_surprise_norm` clips in the parallel paths exactly as in the token loop (values and gradients), at a
    norm that binds for some tokens and not for others."""
    state, k, v, q, gates, leaves = _problem(depth, True, True, seed=depth)
    norms = torch.stack([sum(g.pow(2).sum((1, 2)) for g in associative_grad(state.weights, k[:, t], v[:, t], "silu"))
                         for t in range(k.shape[1])]).sqrt()  # (T, BH) at M_0
    max_norm = float(norms.median())
    clip = lambda fn: lambda *a: fn(*a, max_surprise_norm=max_norm)  # noqa: E731
    problem = (state, k, v, q, gates, leaves)
    ref_out, ref_grads = _outputs_and_grads(clip(memory_recurrent_reference), *problem, chunk, "after")
    out, grads = _outputs_and_grads(clip(impl), *problem, chunk, "after")
    for a, b in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    unclipped, _ = _outputs_and_grads(memory_recurrent_reference, *problem, chunk, "after")
    assert (unclipped[0] - ref_out[0]).abs().max() > 1e-3


def test_clipped_surprise_bounds_the_first_step():
    """b = 1, no momentum carried in: the first write moves the memory by theta_1 * min(||u_1||, max_norm)."""
    state, k, v, q, gates, _ = _problem(depth=2, momentum=True, forgetting=False, t=1)
    state = MemoryState(state.weights, tuple(torch.zeros_like(s) for s in state.momentum))
    u = associative_grad(state.weights, k[:, 0], v[:, 0], "silu")
    norm = sum(g.pow(2).sum((1, 2)) for g in u).sqrt()  # (BH,)
    max_norm = float(norm.min() + norm.max()) / 2
    _, final = memory_recurrent_reference(state, k, v, q, gates, 1, max_surprise_norm=max_norm)
    moved = sum((a - b).pow(2).sum((1, 2)) for a, b in zip(final.weights, state.weights)).sqrt()
    torch.testing.assert_close(moved, gates.theta[:, 0] * norm.clamp(max=max_norm))


def test_chunking_changes_the_result():
    """b > 1 is a different (stale-gradient) update, not the recurrence: the equivalence tests are not vacuous."""
    state, k, v, q, gates, _ = _problem(depth=2, momentum=True, forgetting=True)
    r1, _ = memory_chunked_dual(state, k, v, q, gates, 1)
    r4, _ = memory_chunked_dual(state, k, v, q, gates, 4)
    assert (r1 - r4).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [4, 16])
def test_dual_equals_autograd_gradients_with_gelu(chunk):
    """The dual form's written-out MLP backward (GELU, L_M = 3) equals `torch.func`'s per-token gradients in the
    materialised form; chunk 16 > 11 tokens is a single ragged chunk."""
    problem = _problem(3, True, True, seed=7)
    outs = []
    for impl in (memory_chunked_dual, memory_chunked_materialized):
        state, k, v, q, gates, leaves = problem
        reads, final = impl(state, k, v, q, gates, chunk, "gelu", "after")
        loss = reads.pow(2).sum() + sum(w.pow(2).sum() for w in final.weights)
        outs.append([reads, *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.slow
def test_compiled_chunk_step_equals_eager():
    """`compile_step=True` (torch.compile of the chunk step and the reads) computes the same values and gradients."""
    problem = _problem(2, True, True, t=13, seed=3)
    outs = []
    for compile_step in (False, True):
        state, k, v, q, gates, leaves = problem
        reads, final = memory_chunked_dual(state, k, v, q, gates, 4, compile_step=compile_step)
        loss = reads.pow(2).sum() + sum(w.pow(2).sum() for w in final.weights)
        outs.append([reads, *torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_compile_step_model_equals_eager(variant):
    """A whole model with `compile_step` (projections, gates, coefficients, reads and output through torch.compile;
    MAC: two segments, the second with the conv caches, and a ragged one) gives the eager logits and gradients."""
    torch.manual_seed(0)
    models = [build_titans(variant, "tiny", max_len=256, memory={"compile_step": c}).double() for c in (False, True)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randint(0, 256, (2, 150))
    outs = []
    for model in models:
        logits = model(x)
        outs.append([logits, *torch.autograd.grad(logits.square().mean(), list(model.parameters()))])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_neural_memory_layer_impls_agree_and_learn_in_context():
    torch.manual_seed(0)
    layer = NeuralMemory(16, num_heads=2, depth=2, chunk_size=4).double()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    outs = []
    for impl in MEMORY_IMPLS:
        layer.impl = impl
        outs.append(layer(x))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])
    # The memory is written: the associative loss of the sequence's own pairs falls from M_0 to the final state.
    q, _ = layer.queries(x)
    k, v, _ = layer.keys_values(x)
    state = layer.initial_state(2)
    _, final = layer.memorize(state, k, v, q, Gates(torch.full((4, 13), 0.2, dtype=torch.float64), None, None))
    assert associative_loss(final.weights, k, v, "silu") < associative_loss(state.weights, k, v, "silu")


def test_ablation_switches():
    """Table 5's ablations are structural: the mechanism is absent, not merely initialised away."""
    base = NeuralMemory(32, num_heads=2)
    assert base.to_eta is not None and base.to_alpha is not None and base.conv_q is not None
    assert NeuralMemory(32, num_heads=2, momentum=False).to_eta is None
    assert NeuralMemory(32, num_heads=2, forgetting=False).to_alpha is None
    assert NeuralMemory(32, num_heads=2, conv=False).conv_k is None
    assert len(NeuralMemory(32, num_heads=2, depth=1).memory_init) == 1
    model = build_titans("lmm", "tiny", num_persistent=0)
    assert all(b.persistent is None for b in model.blocks)
    gates = NeuralMemory(32, num_heads=2, momentum=False, forgetting=False).gates(torch.randn(1, 5, 32))
    assert gates.log_eta is None and gates.log_keep is None


def test_causal_conv_in_pieces_equals_whole():
    torch.manual_seed(0)
    conv = CausalDepthwiseConv1d(6, 4)
    x = torch.randn(2, 10, 6)
    whole, _ = conv(x)
    a, cache = conv(x[:, :3])
    b, cache = conv(x[:, 3:7], cache)
    c, _ = conv(x[:, 7:], cache)
    torch.testing.assert_close(torch.cat([a, b, c], 1), whole)
    y = x.clone()
    y[:, 5] += 1.0
    changed = (conv(y)[0] - whole).abs().sum(-1)[0]
    assert changed[:5].max() == 0 and changed[5:9].min() > 0 and changed[9] == 0  # kernel 4: steps 5..8


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_are_causal(variant):
    """Changing token t leaves the logits before t unchanged (MAC: also across a segment boundary, where the
    memory written with the previous segment is read)."""
    torch.manual_seed(0)
    model = build_titans(variant, "tiny", dim=32, num_heads=2, window=8, segment_len=16, num_persistent=2,
                         memory=dict(chunk_size=4)).double().eval()
    x = torch.randint(0, 256, (1, 40))
    y = x.clone()
    y[0, 20] = (y[0, 20] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :20], b[:, :20])
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 0
    # Far past the attention window, the token still matters through the long-term memory (or full attention).
    assert (a[:, 39] - b[:, 39]).abs().max() > 0


def _expected_params(variant: str, vocab_size: int, dim: int, depth: int, num_heads: int, num_persistent: int,
                     memory: dict, conv_kernel: int = 4, **_) -> int:
    """The parameter count written out from the architecture description (independent of the model code)."""
    mlp_hidden = 64 * math.ceil(int(8 * dim / 3) / 64)  # LLaMA's 8/3 rule, rounded up to 64
    per_block = 2 * dim + 3 * dim * mlp_hidden  # two RMSNorms, SwiGLU
    attention = 4 * dim * dim
    if variant == "transformer":
        return 2 * vocab_size * dim + depth * (per_block + attention) + dim
    hd, mem_depth = dim // num_heads, memory["depth"]
    widths = [hd] + [int(memory["expansion"] * hd)] * (mem_depth - 1) + [hd]
    lmm = (3 * dim * dim + 3 * dim * conv_kernel  # W_Q, W_K, W_V and their depthwise convolutions
           + 3 * (dim * num_heads + num_heads)  # theta, eta, alpha gates (a linear layer each)
           + num_heads * sum(widths[i] * widths[i + 1] for i in range(mem_depth))  # M_0 of every head
           + hd + 2 * dim * dim)  # output RMSNorm, gate and output projections
    per_block += lmm + num_persistent * dim
    if variant != "lmm":
        per_block += attention
    if variant in ("mac", "mag"):
        per_block += 2 * dim  # the two RMSNorms of the gate
    return 2 * vocab_size * dim + depth * per_block + dim


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_counts(name):
    """Fingerprints of our configurations (the paper publishes no widths): built on the meta device."""
    from projects.titans.model import _SIZES

    variant = {"titans": name.split("_")[1], "transformer": "transformer"}[name.split("_")[0]]
    with torch.device("meta"):
        model = MODELS[name]()
    cfg = dict(_SIZES[name.split("_")[-1]])
    cfg["depth"] = cfg["depth"][variant]
    assert sum(p.numel() for p in model.parameters()) == _expected_params(variant, **cfg)


def test_experiment_configs_compose_and_build():
    """Every conf/experiment/titans/*.yaml composes with the project and its model builds (on meta)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from projects.titans.module import build_model

    names = sorted(p.stem for p in (REPO / "conf/experiment/titans").glob("*.yaml"))
    assert {"mac", "mag", "mal", "lmm", "transformer_pp", "linear_memory", "no_momentum", "no_weight_decay",
            "no_convolution", "no_persistent_memory"} <= set(names)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for name in names:
            cfg = compose("train", overrides=["project=titans", f"experiment=titans/{name}"], return_hydra_config=True)
            net = dict(cfg.model.net)
            net = {k: (v if not hasattr(v, "items") else dict(v)) for k, v in net.items()}
            net["vocab_size"], net["max_len"] = int(cfg.data.vocab_size), int(cfg.data.seq_len)
            with torch.device("meta"):
                model = build_model(net)
            assert model.variant in VARIANTS, name
    GlobalHydra.instance().clear()


@pytest.mark.slow
def test_short_training_beats_unigram():
    """A tiny MAC model, trained briefly on the embedded Wikipedia bytes, gets far below the unigram entropy."""
    import lightning.pytorch as pl

    from projects.titans.data import TitansDataModule
    from projects.titans.module import TitansLitModule

    torch.manual_seed(0)
    data = TitansDataModule(seq_len=64, batch_size=16, val_samples=64)
    module = TitansLitModule(
        net=dict(name="titans_mac_tiny", dim=64, depth=1, num_heads=2, segment_len=32, window=32,
                 memory=dict(chunk_size=16)),
        seq_len=64, optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 0.0}, scheduler={"name": "constant"})
    trainer = pl.Trainer(max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=4,
                         num_sanity_val_steps=0, val_check_interval=150)
    trainer.fit(module, datamodule=data)
    val = trainer.callback_metrics["val/loss"].item()
    assert data.unigram_loss is not None and math.isfinite(val)
    assert val < 0.8 * data.unigram_loss, (val, data.unigram_loss)


@pytest.mark.slow
def test_bench_scan_part_measures_both_paths_against_the_exact_scan(tmp_path, monkeypatch, load_script):
    """`--parts scan` on the CPU (the kernels under the Triton interpreter): the exact float32 reference is its own
    yardstick (difference 0), each fast path (the kernels for the 2-layer memories, the prefix scan for the linear
    one) agrees with it to rounding in IEEE float32, and both bf16 paths deviate by bf16 rounding only; every mode
    that runs is timed."""
    import json

    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1")
    bench = load_script("bench_titans")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["bench", "--quick", "--parts", "scan", "--json", "scan.json"])
    bench.main()
    rows = json.loads((tmp_path / "scan.json").read_text())["scan"]["64"]
    assert {size: r["fast_path"] for size, r in rows.items()} == {"tiny": "triton", "small": "triton",
                                                                  "small_linear": "affine"}
    for size, r in rows.items():
        fast = r["fast_path"]
        assert r["fp32_ieee_reference_err"] == 0 and r["fp32_ieee_reference_grad_err"] == 0, size
        assert r[f"fp32_ieee_{fast}_err"] < 1e-5 and r[f"fp32_ieee_{fast}_grad_err"] < 1e-4, (size, r)
        for impl in ("reference", fast):
            assert 0 < r[f"bf16_{impl}_err"] < 5e-2 and 0 < r[f"bf16_{impl}_grad_err"] < 0.1, (size, impl, r)
            assert r[f"bf16_train_{impl}_ms"] > 0 and r[f"fp32_tf32_eval_{impl}_ms"] > 0


@pytest.mark.slow
def test_bench_precision_part_compares_the_compiled_step_with_float32(tmp_path, monkeypatch, load_script):
    """`--parts precision` on the CPU (no autocast there, the reference scan): the eager step is the float32 step
    itself, and the compiled one differs from it by float32 rounding only, in the loss and in every gradient."""
    import json

    bench = load_script("bench_titans")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["bench", "--quick", "--parts", "precision", "--variants", "transformer,lmm",
                                     "--json", "precision.json"])
    bench.main()
    rows = json.loads((tmp_path / "precision.json").read_text())["precision"]
    assert set(rows) == {"lmm"}  # Transformer++ has no memory to compile
    r = rows["lmm"]
    assert r["loss_eager"] == r["loss_fp32"] and r["grads_eager"]["max"] == 0, r
    assert r["loss_compiled"] == pytest.approx(r["loss_fp32"], rel=1e-5), r
    assert r["grads_compiled"]["median"] <= r["grads_compiled"]["max"] < 1e-4, r
    assert r["grads_compiled_vs_eager"] == r["grads_compiled"], r


def test_profile_kinds_name_the_kernels_a_titans_step_launches(load_script):
    """Kernel names as an H200 profile shows them (the fused scan, cuDNN / flash / FlexAttention, cuBLAS, fused
    AdamW, ATen and Inductor elementwise kernels) and CPU operators fall in the kind a reader expects."""
    bench = load_script("bench_titans")
    other = "elementwise, reductions, copies"
    kinds = {"_memory_scan_fwd": "memory scan", "_memory_scan_bwd": "memory scan",
             "flash_fwd_kernel": "attention", "cudnn_generated_fort_native_sdpa_sm90_knob_7": "attention",
             "triton_tem_fused_0": "attention", "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
             "nvjet_tst_128x64_64x8_2x1_v_bz_coopA_NNT": "matmul", "aten::bmm": "matmul", "aten::addmm": "matmul",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul", "aten::mm": "matmul",
             "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
             "void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>": other,
             "triton_poi_fused_mul_sigmoid_0": other, "aten::mul": other, "aten::linalg_vector_norm": other,
             "Memcpy DtoD (Device -> Device)": other}
    assert {name: bench.work_kind(name) for name in kinds} == kinds


def test_profile_summary_leaves_the_step_annotation_out_of_the_device_time(load_script):
    """On a GPU the profiler also records its "ProfilerStep#n" annotation on the device's timeline, spanning the
    whole step: it is not a kernel, so the busy time is the kernels' alone and stays within the wall time."""
    from types import SimpleNamespace

    bench = load_script("bench_titans")
    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(key, device_type, device_us, count=1):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=device_us,
                               self_cpu_time_total=0.0, count=count)

    events = [event("ProfilerStep*", gpu, 200_000.0, 2), event("ProfilerStep*", cpu, 0.0, 2),
              event("_memory_scan_bwd", gpu, 60_000.0, 4), event("sm90_xmma_gemm_bf16bf16", gpu, 20_000.0, 8),
              event("aten::mm", cpu, 20_000.0, 8), event("MemoryScanFunctionBackward", cpu, 60_000.0, 4)]
    summary = bench.profile_summary(events, steps=2, wall_s=0.05, cuda=True)
    assert summary["busy_s"] == pytest.approx(0.04) and summary["busy_fraction"] == pytest.approx(0.8)
    assert summary["kernels_per_step"] == 6
    assert [k["name"] for k in summary["top_kernels"]] == ["_memory_scan_bwd", "sm90_xmma_gemm_bf16bf16"]
    assert summary["kinds"]["memory scan"]["share"] == pytest.approx(0.75)
    assert summary["kinds"]["elementwise, reductions, copies"]["s_per_step"] == 0
    assert [op["name"] for op in summary["top_ops"]] == ["MemoryScanFunctionBackward", "aten::mm"]


def test_bench_profile_part_accounts_for_the_whole_step(tmp_path, monkeypatch, load_script):
    """`--parts profile` on the CPU: each variant's kinds share all of the profiled time, its costliest operators
    are ranked and within it, and kernels and operators fall in the right kinds."""
    import json

    bench = load_script("bench_titans")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["bench", "--quick", "--parts", "profile", "--profile-variants", "transformer,mag",
                                     "--profile-len", "64", "--json", "profile.json"])
    bench.main()
    rows = json.loads((tmp_path / "profile.json").read_text())["profile"]
    assert set(rows) == {"transformer", "mag"}
    for variant, r in rows.items():
        assert r["step_s"] > 0 and r["busy_fraction"] is None, variant  # no device: CPU times, no busy fraction
        assert sum(k["share"] for k in r["kinds"].values()) == pytest.approx(1.0), variant
        assert r["kinds"]["matmul"]["launches_per_step"] > 0 and r["kinds"]["memory scan"]["share"] == 0, variant
        shares = [op["share"] for op in r["top_ops"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9, variant
    # Kernel and operator names as the H200 and CPU profiles report them, each in its kind (which operator costs the
    # most CPU time at these tiny sizes depends on the machine's load, so that is not asserted).
    copy = "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda"
    kinds = {"_memory_scan_bwd": "memory scan", "triton_tem_fused_flex_attention_backward_1": "attention",
             "nvjet_sm90_tst_32x64_64x16_4x2_h_bz_NTN": "matmul", "aten::addmm": "matmul", "aten::bmm": "matmul",
             "multi_tensor_apply_kernel": "optimizer", copy: "elementwise, reductions, copies"}
    assert {name: bench.work_kind(name) for name in kinds} == kinds


@pytest.mark.parametrize("flag,value,message", [
    ("--rows", "lmm+graph+scan,gpt+scan", "row 'gpt+scan'"),
    ("--rows", "mag+scan+scan", "row 'mag+scan+scan'"),
    ("--rows", "mag+fused", "row 'mag+fused'"),
    ("--profile-variants", "mag+graph", "flags here are ['compile']"),
])
def test_bench_rejects_a_bad_row_name_naming_it(flag, value, message, monkeypatch, capsys, load_script):
    bench = load_script("bench_titans")
    monkeypatch.setattr("sys.argv", ["bench", "--quick", "--parts", "throughput", flag, value])
    with pytest.raises(SystemExit):
        bench.main()
    assert message in capsys.readouterr().err


def test_bench_marks_skips_and_errors_and_writes_json_per_item(tmp_path, monkeypatch, capsys, load_script):
    """The GPU benchmark's bookkeeping on the CPU: items past the budget are "skipped", a failing variant is an
    "error" with its reason (after the SDPA fallback), the others run (MAG / MAL at 4 x 32 tokens), and the JSON
    on disk holds every item recorded so far."""
    import json

    bench = load_script("bench_titans")
    out = tmp_path / "out"  # not created: the bench makes it
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setattr("sys.argv", ["bench", "--quick", "--parts", "throughput,chunk", "--max-seconds", "0"])
    bench.main()
    saved = json.loads((out / "titans.json").read_text())
    assert saved["throughput"]["mag"]["64"] == {"skipped": "time budget"}
    assert all(r == {"skipped": "time budget"} for r in saved["chunk"]["64"].values())
    assert "skipped" in capsys.readouterr().out

    build = bench.Bench.model
    written = []

    def model(self, variant, **kw):
        if variant == "lmm":
            raise RuntimeError("no such kernel")
        written.append(json.loads((out / "titans.json").read_text()))  # saved after the previous item
        return build(self, variant, **kw)

    monkeypatch.setattr(bench.Bench, "model", model)
    monkeypatch.setattr("sys.argv", ["bench", "--quick", "--parts", "throughput", "--seq-lens", "32",
                                     "--tokens-per-batch", "128", "--rows", "mag+scan+graph", "--row-lens", "32"])
    bench.main()
    table = json.loads((out / "titans.json").read_text())["throughput"]
    assert table["mag+scan+graph"]["32"] == {"skipped": "needs a GPU"}
    assert table["lmm"]["32"]["error"] == "RuntimeError: no such kernel"
    assert all(table[v]["32"]["tokens_per_s"] > 0 for v in ("transformer", "mac", "mag", "mal"))
    assert "lmm" in written[-1]["throughput"] and "mag" in written[-1]["throughput"]  # before MAL ran
    out = capsys.readouterr().out
    assert "error: RuntimeError" in out and "no such kernel" in out


def test_bench_lm_part_records_a_validation_curve(tmp_path, monkeypatch, load_script):
    """`--val-every` evaluates during training as well: every row of the lm and ablation parts gets a curve at those
    steps and at the end, and the lm row's last point is its reported validation; each validation is also split
    over `--val-positions` spans of the sequence, whose mean is the whole validation; `--ablations` picks Table 5's
    rows by their experiment names."""
    import json

    bench = load_script("bench_titans")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["bench", "--quick", "--parts", "lm,ablation", "--variants", "transformer,lmm",
                                     "--ablations", "lmm,no_momentum", "--steps", "5", "--val-every", "2",
                                     "--json", "lm.json"])
    bench.main()
    saved = json.loads((tmp_path / "lm.json").read_text())
    assert saved["unigram_bpb"] > saved["bigram_val_bpb"] > 0  # the baselines: English bytes depend on the previous one
    for variant, row in saved["lm"].items():
        assert [step for step, _ in row["val_curve"]] == [2, 4, 5], variant
        assert row["val_curve"][-1][1] == pytest.approx(row["val_bpb"]), variant
        assert row["val_curve"][0][1] != row["val_curve"][-1][1], variant  # the model trained in between
        assert [step for step, _ in row["val_position_curve"]] == [2, 4, 5], variant
        assert row["val_position_curve"][-1][1] == row["val_bpb_by_position"], variant
        spans = row["val_bpb_by_position"]  # 8 spans of the 64 positions of --quick, each 8 long
        assert len(spans) == 8 and sum(spans) / 8 == pytest.approx(row["val_bpb"]), variant
        assert spans[0] > min(spans[1:]), variant  # the first positions have the least context
    rows = saved["ablation"]["rows"]
    assert set(rows) == {"LMM", "w/o Momentum"}  # the rows asked for; the LMM's is the lm part's own run
    assert rows["LMM"]["val_bpb"] == saved["lm"]["lmm"]["val_bpb"]
    assert rows["LMM"]["val_curve"] == saved["lm"]["lmm"]["val_curve"]  # the reused run keeps its curve
    assert [step for step, _ in rows["w/o Momentum"]["val_curve"]] == [2, 4, 5]


def test_bench_refuses_cuda_graph_on_the_cpu_and_with_the_niah_part(monkeypatch, capsys, load_script):
    """`--cuda-graph` captures the quality parts' training step on a GPU at one shape: on the CPU, or with the niah
    part (which fine-tunes the lm part's models at another length), the bench stops before training, saying why."""
    bench = load_script("bench_titans")
    monkeypatch.setattr("sys.argv", ["bench", "--quick", "--parts", "lm", "--cuda-graph"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--cuda-graph captures the training step on a GPU" in capsys.readouterr().err
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("sys.argv", ["bench", "--parts", "lm,niah", "--cuda-graph"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "the niah part fine-tunes the lm part's models" in capsys.readouterr().err


def test_bench_refuses_more_position_spans_than_positions(monkeypatch, capsys, load_script):
    bench = load_script("bench_titans")
    monkeypatch.setattr("sys.argv", ["bench", "--quick", "--parts", "lm", "--seq-len", "64", "--val-positions", "65"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--val-positions 65: give 1 to --seq-len (64) spans" in capsys.readouterr().err


def test_bench_leaves_a_diverged_model_out_of_the_orderings(load_script):
    """A model whose loss went NaN is reported as diverged, with its step, and takes no place in the ranking of the
    finite ones (a NaN would otherwise sort first: the 1,000-step Table 5 run's model without weight decay)."""
    bench = load_script("bench_titans")
    rows = {"LMM": {"val_bpb": 1.94}, "w/o Weight Decay": {"val_bpb": math.nan, "first_non_finite_step": 124},
            "Linear Memory": {"skipped": "time budget"}, "w/o Momentum": {"val_bpb": 1.99}}
    assert list(bench.measured(rows)) == ["LMM", "w/o Momentum"]
    assert bench.status(rows["w/o Weight Decay"]) == "diverged (NaN from step 124)"
    assert bench.status({"val_bpb": math.nan, "first_non_finite_step": None}) == "diverged"
    assert bench.status(rows["Linear Memory"]) == "skipped"
    assert bench.kendall_tau(["LMM"], ["LMM"]) is None  # one finite row: no pair to rank, not "no agreement"
    assert bench.kendall_tau(["LMM", "w/o Momentum"], ["w/o Momentum", "LMM"]) == -1


def _train_small_lmm(memory: dict, steps: int = 14, batch: int = 2) -> list[float]:
    """The benchmark's LMM `small` on Wikipedia bytes, its optimiser and lr (warm-up to 1.5e-3 over 10 steps)."""
    from shared.data.text import wikipedia_text

    torch.manual_seed(0)
    data = torch.frombuffer(bytearray(wikipedia_text()[:200_000].encode()), dtype=torch.uint8).long()
    model = build_titans("lmm", "small", attn_backend="sdpa", max_len=512, memory=memory)
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 513, (batch,), generator=gen)
        window = data[starts[:, None] + torch.arange(513)]  # (B, 513)
        loss = F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
    return losses


@pytest.mark.slow
def test_small_deep_memory_stays_finite_at_the_benchmark_lr():
    """With theta_max = 1 a chunk's 64 stale gradients made the deep memory of `small` diverge to NaN within a
    dozen outer steps (the H200 run of 2026-11-29); the size's bound on theta keeps the same run finite."""
    losses = _train_small_lmm({})
    assert len(losses) == 14 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.slow
def test_surprise_clip_lets_the_paper_theta_gate_train():
    """theta_t = sigmoid(.) unbounded (theta_max = 1, the paper's gate) drives the same `small` run to NaN at step 10;
    clipping each token's surprise to norm 1 keeps it finite and learning as fast as the bounded theta above."""
    paper_gate = {"theta_max": 1.0, "theta_init": 0.02}
    assert not math.isfinite(_train_small_lmm(paper_gate, steps=10)[-1])
    losses = _train_small_lmm({**paper_gate, "max_surprise_norm": 1.0})
    assert len(losses) == 14 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 2.0, losses


def _periodic_reads_finite(eta_max: float, chunk_size: int, max_surprise_norm: float | None = None) -> bool:
    """A `small` memory layer on an input that repeats every 89 tokens (as the S-NIAH passkey haystack), with the
    gates where outer training can push them (theta at its bound, momentum gate saturated, no forgetting) and
    M_0, W_V five times their initial scale."""
    torch.manual_seed(0)
    memory = NeuralMemory(384, num_heads=6, depth=2, expansion=2.0, chunk_size=chunk_size, theta_max=0.0016,
                          theta_init=0.0004, eta_max=eta_max, max_surprise_norm=max_surprise_norm)
    with torch.no_grad():
        for gate, bias in ((memory.to_theta, 12.0), (memory.to_eta, 12.0), (memory.to_alpha, -9.2)):
            gate.weight.zero_()
            gate.bias.fill_(bias)
        for w in (*memory.memory_init, memory.to_v.weight):
            w.mul_(5.0)
        x = torch.randn(1, 89, 384).repeat(1, 12, 1)[:, :1024]  # (1, 1024, 384)
        return bool(torch.isfinite(memory(x)).all())


def test_momentum_bound_keeps_the_memory_finite_on_a_periodic_input():
    # eta -> 1 with alpha -> 0 is an undamped heavy-ball descent: the paper's gate (eta_max = 1) lets the memory's
    # reads overflow within one sequence, at b = 64 and in the token recurrence alike (README, "S-NIAH").
    assert not _periodic_reads_finite(eta_max=1.0, chunk_size=64)
    assert _periodic_reads_finite(eta_max=0.8, chunk_size=64)


def test_surprise_clip_keeps_the_memory_finite_with_the_paper_momentum_gate():
    # Clipped gradients can move the weights only a bounded amount per token, so the undamped heavy ball above
    # stays finite at eta_max = 1 (the paper's gate) too.
    assert _periodic_reads_finite(eta_max=1.0, chunk_size=64, max_surprise_norm=1.0)


@pytest.mark.slow
def test_token_recurrence_diverges_too_without_a_momentum_bound():
    assert not _periodic_reads_finite(eta_max=1.0, chunk_size=1)
    assert _periodic_reads_finite(eta_max=0.8, chunk_size=1)


def test_max_surprise_norm_must_be_positive():
    with pytest.raises(ValueError, match="max_surprise_norm"):
        NeuralMemory(32, num_heads=2, max_surprise_norm=0.0)


def test_eta_init_must_lie_below_eta_max():
    with pytest.raises(ValueError, match="eta_init"):
        NeuralMemory(32, num_heads=2, eta_init=0.9, eta_max=0.8)


def test_cuda_graph_on_a_cpu_run_is_one_clear_error(cli):
    result = cli("project=titans", "model.cuda_graph=true", "trainer=cpu", "trainer.max_steps=2", "logger=csv",
                 check=False)
    assert result.returncode == 1
    assert "model.cuda_graph=true needs a GPU; this run trains on cpu" in result.stdout + result.stderr
