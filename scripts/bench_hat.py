#!/usr/bin/env python
"""Benchmark HAT: training step time and peak memory, inference time, fused (SDPA) vs plain-math attention.

    python scripts/bench_hat.py            # on a GPU: HAT x4, batch 32 and 4, LR patch 64; 256x256 LR inference
    python scripts/bench_hat.py --quick    # smoke run on CPU with a tiny HAT

Training: one optimiser step (L1 loss, Adam, as the paper) of HAT-SRx4 on LR patches of 64x64, in fp32 (TF32
matmuls, as the runner sets `float32_matmul_precision="high"`) and bf16-mixed (autocast, fp32 weights, as
Lightning's `bf16-mixed`), each with the fused attention (SDPA, relative position bias as an additive mask) and the
plain-math path. The math path is the official implementation's algorithm (tests show it bit-identical to
`hat_arch.py`), so it is also the baseline of the official code. Inference: one 256x256 LR image to 1024x1024.
Times are medians over CUDA-event-timed iterations after warm-up. Results: a table with each row's time relative to
the fastest row of its group, and JSON in $OUT/bench_hat.json when OUT is set. Configurations that run out of
memory are reported as OOM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from projects.hat.model import HAT, hat_tiny_x4, hat_x4  # noqa: E402
from shared.blocks.attention.window import set_fused_attn  # noqa: E402


def timed(fn: Callable[[], None], warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of `fn` after `warmup` calls (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_train(build: Callable[[], HAT], batch: int, patch: int, precision: str, fused: bool,
                device: torch.device, warmup: int, iters: int) -> dict:
    reset(device)
    torch.manual_seed(0)
    model = build().to(device).train()
    set_fused_attn(model, fused)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.99))
    scale = model.upscale
    lq = torch.rand(batch, 3, patch, patch, device=device)
    gt = torch.rand(batch, 3, patch * scale, patch * scale, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step() -> None:
        with autocast:
            loss = F.l1_loss(model(lq), gt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    row = {"task": "train", "batch": batch, "patch": patch, "precision": precision,
           "attention": "fused" if fused else "math"}
    try:
        ms = timed(step, warmup, iters, device)
        row.update(ms=ms, samples_per_s=batch / ms * 1e3, peak_gb=peak_gb(device))
    except torch.OutOfMemoryError:
        row.update(ms=None, samples_per_s=None, peak_gb=None, note="OOM")
    return row


@torch.no_grad()
def bench_infer(build: Callable[[], HAT], size: int, precision: str, fused: bool, device: torch.device,
                warmup: int, iters: int, reference: dict) -> dict:
    reset(device)
    torch.manual_seed(0)
    model = build().to(device).eval()
    set_fused_attn(model, fused)
    lq = torch.rand(1, 3, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    row = {"task": "infer", "batch": 1, "patch": size, "precision": precision,
           "attention": "fused" if fused else "math"}
    try:
        with autocast:
            ms = timed(lambda: model(lq), warmup, iters, device)
            out = model(lq).float()
        row.update(ms=ms, samples_per_s=1e3 / ms, peak_gb=peak_gb(device))
        key = precision
        if key in reference:  # same weights, same input: how far the fused path is from the math path
            row["max_abs_diff_vs_first"] = (out - reference[key]).abs().max().item()
        else:
            reference[key] = out
    except torch.OutOfMemoryError:
        row.update(ms=None, samples_per_s=None, peak_gb=None, note="OOM")
    return row


def sdpa_backends(device: torch.device) -> dict[str, bool]:
    """Which SDPA kernels accept HAT's case: fp32/bf16, float bias that needs a gradient (head_dim 30)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(8, 6, 256, 30, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        bias = torch.randn(1, 6, 256, 256, device=device, dtype=dtype, requires_grad=True)
        for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum().backward()
                ok = True
            except RuntimeError:
                ok = False
            out[f"{backend.name}/{str(dtype).removeprefix('torch.')}"] = ok
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'task':6} {'batch':>5} {'patch':>5} {'precision':10} {'attn':6} {'ms':>9} {'samples/s':>10} "
             f"{'peak GB':>8} {'vs best':>8}"]
    groups: dict[tuple, float] = {}
    for r in rows:
        if r["ms"] is not None:
            g = (r["task"], r["batch"])
            groups[g] = min(groups.get(g, float("inf")), r["ms"])
    for r in rows:
        best = groups.get((r["task"], r["batch"]))
        ms = f"{r['ms']:9.2f}" if r["ms"] is not None else f"{r.get('note', '-'):>9}"
        sps = f"{r['samples_per_s']:10.1f}" if r["samples_per_s"] else f"{'-':>10}"
        mem = f"{r['peak_gb']:8.2f}" if r.get("peak_gb") is not None else f"{'-':>8}"
        ratio = f"{r['ms'] / best:7.2f}x" if r["ms"] is not None and best else f"{'-':>8}"
        lines.append(f"{r['task']:6} {r['batch']:5d} {r['patch']:5d} {r['precision']:10} {r['attention']:6} "
                     f"{ms} {sps} {mem} {ratio}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU, a few iterations (smoke test)")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 4], help="training batch sizes")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    torch.set_float32_matmul_precision("high")
    if args.quick:
        build, batches, patch, infer_size, warmup, iters = hat_tiny_x4, [2], 16, 32, 1, 2
    else:
        def build() -> HAT:
            return hat_x4()

        batches, patch, infer_size, warmup, iters = args.batch, 64, 256, 3, args.iters

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "model": "hat_tiny_x4" if args.quick else "hat_x4 (20.77 M params)"}
    if device.type == "cuda":
        info["sdpa_backends_with_bias_grad"] = sdpa_backends(device)
    rows = []
    for batch in batches:
        for precision in ("bf16-mixed", "fp32"):
            for fused in (True, False):
                rows.append(bench_train(build, batch, patch, precision, fused, device, warmup, iters))
                print(rows[-1], flush=True)
    reference: dict = {}
    for precision in ("fp32", "bf16-mixed"):
        for fused in (False, True):
            rows.append(bench_infer(build, infer_size, precision, fused, device, warmup, iters, reference))
            print(rows[-1], flush=True)

    print(f"\nHAT benchmark on {info['device']} ({info['model']}, torch {info['torch']}); "
          "train: one Adam step, LR patch; infer: one LR image x4")
    if "sdpa_backends_with_bias_grad" in info:
        print("SDPA kernels that take a float bias with a gradient:", info["sdpa_backends_with_bias_grad"])
    print(table(rows))
    for task, batch in sorted({(r["task"], r["batch"]) for r in rows}):
        by = {(r["precision"], r["attention"]): r["ms"] for r in rows if (r["task"], r["batch"]) == (task, batch)}
        for precision in ("fp32", "bf16-mixed"):
            f, m = by.get((precision, "fused")), by.get((precision, "math"))
            if f and m:
                print(f"{task} batch {batch} {precision}: speed-up of fused over math attention {m / f:.2f}x")
        f32, b16 = by.get(("fp32", "fused")), by.get(("bf16-mixed", "fused"))
        if f32 and b16:
            print(f"{task} batch {batch} fused: speed-up of bf16-mixed over fp32 {f32 / b16:.2f}x")
    for r in rows:
        if "max_abs_diff_vs_first" in r:
            print(f"infer {r['precision']}: max |fused - math| on the output = {r['max_abs_diff_vs_first']:.3g}")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_hat.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"info": info, "rows": rows}, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
