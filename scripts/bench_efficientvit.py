#!/usr/bin/env python
"""EfficientViT inference throughput, ours against timm's `efficientvit_m0..m5`, in the paper's protocol.

The paper (Table 1; the official `speed_test.py`): GPU batch 2048 under AMP (fp16 autocast), CPU one thread at
batch 16, 224 x 224 inputs, BatchNorm fused into the convolutions (`replace_batchnorm`), warm-up, then the mean
time of repeated forwards. Here both models get the same treatment:

  timm            timm's model with every `fuse()`-able module fused (the official `replace_batchnorm` rule;
                  timm's ConvNorm / NormLinear have `fuse()` but timm has no model-level call)
  ours            `fuse_bn` (the same fusion) + `fold_residual_dw` (residual depth-wise convs folded into the conv)
and each is timed in NCHW and channels-last memory format (`-cl`); on CUDA ours also with the explicit attention
(`-explicit`, the official op sequence) instead of the default fused SDPA kernel. With `--compile` every model is
also run through `torch.compile` (`+compile`: each side's fastest eager configuration), with `--jit` through
`torch.jit.trace` as the paper did (`+jit`).
Ratios compare ours with the strongest timm configuration of the same kind (eager / compiled / traced).

Before timing, ours is loaded with the timm model's weights (converted) and the largest difference of their logits
is printed: both are the same function.

    python scripts/bench_efficientvit.py                          # H200: M0..M5, eager, about 2 minutes
    python scripts/bench_efficientvit.py --compile --variants m0 m1 m2   # + torch.compile (compiling takes time:
    python scripts/bench_efficientvit.py --compile --variants m3 m4 m5   #  split the sizes over two runs)
    python scripts/bench_efficientvit.py --device cpu             # 1 thread, batch 16 (the paper's CPU protocol)
    python scripts/bench_efficientvit.py --quick                  # smoke run: CPU, M0, batch 2, a few iterations

Writes $OUT/efficientvit.json when OUT is set. Needs torch and timm only (no hydra / lightning).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from projects.efficientvit import model as M  # noqa: E402

VARIANTS = ["m0", "m1", "m2", "m3", "m4", "m5"]


def fuse_like_official(net: nn.Module) -> nn.Module:
    """The official `replace_batchnorm`: every child with `fuse()` is replaced by its fused module, in place."""
    for name, child in net.named_children():
        if hasattr(child, "fuse"):
            setattr(net, name, child.fuse())
        elif isinstance(child, nn.BatchNorm2d):
            setattr(net, name, nn.Identity())
        else:
            fuse_like_official(child)
    return net


@torch.no_grad()
def randomize_(model: nn.Module) -> nn.Module:
    """Random weights and BN statistics everywhere: at initialisation the zero-initialised BN weights make most
    branches vanish, and a comparison of outputs would check little."""
    g = torch.Generator().manual_seed(0)
    for name, t in model.state_dict().items():
        if t.dtype.is_floating_point:
            t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var")
                    else torch.randn(t.shape, generator=g) * 0.2)
    return model


def build_pair(variant: str, img: int) -> tuple[nn.Module, nn.Module]:
    """timm's model and ours with the same (converted) weights, both BN-fused, eval mode, on the CPU."""
    import timm

    theirs = randomize_(timm.create_model(f"efficientvit_{variant}", pretrained=False, img_size=img)).eval()
    ours = M.build(variant, img_size=img).eval()
    M.load_official_state_dict(ours, M.convert_timm_state_dict(theirs.state_dict()))
    return fuse_like_official(theirs), M.fold_residual_dw(M.fuse_bn(ours))


class Timer:
    """Seconds per forward: CUDA events on GPU (median of the timed iterations); on CPU the median wall-clock and
    the median thread CPU time (the latter is robust to other processes sharing the cores)."""

    def __init__(self, device: torch.device, warmup_s: float, time_s: float, min_iters: int) -> None:
        self.device, self.warmup_s, self.time_s, self.min_iters = device, warmup_s, time_s, min_iters

    def __call__(self, fn: Callable[[], object]) -> dict[str, float]:
        start = time.perf_counter()
        for _ in range(3):
            fn()
        while time.perf_counter() - start < self.warmup_s:
            fn()
        walls, cpus = [], []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            while len(walls) < self.min_iters or sum(walls) < self.time_s:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                walls.append(begin.elapsed_time(end) / 1e3)
            return {"wall_s": statistics.median(walls)}
        while len(walls) < self.min_iters or sum(walls) < self.time_s:
            w, c = time.perf_counter(), time.thread_time()
            fn()
            walls.append(time.perf_counter() - w)
            cpus.append(time.thread_time() - c)
        return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def configurations(variant: str, args: argparse.Namespace, device: torch.device) -> dict[str, nn.Module]:
    """name -> ready model (fused, on the device, in its memory format)."""
    theirs, ours = build_pair(variant, args.img)
    cl = torch.channels_last
    models: dict[str, nn.Module] = {}
    for name, model in (("timm", theirs), ("ours", ours)):
        models[name] = model.to(device)
        models[f"{name}-cl"] = _copy(model).to(device, memory_format=cl)
    if device.type == "cuda":
        explicit = _copy(ours).to(device, memory_format=cl)
        for m in explicit.modules():
            if isinstance(m, M.CascadedGroupAttention):
                m.fused_attn = False
        models["ours-cl-explicit"] = explicit
    return models


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True  # both models get cuDNN's autotuned kernels
    batch = args.batch or (2048 if device.type == "cuda" else 16)
    amp = device.type == "cuda" and not args.fp32
    timer = Timer(device, args.warmup_s, args.time_s, args.min_iters)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, args.img, args.img, device=device)
    inputs = {False: x, True: x.contiguous(memory_format=torch.channels_last)}  # by "channels-last?"
    results: dict = {"device": _device_name(device), "batch": batch, "img": args.img, "amp_fp16": amp,
                     "threads": torch.get_num_threads() if device.type == "cpu" else None, "torch": torch.__version__,
                     "variants": {}}
    for variant in args.variants:
        models = configurations(variant, args, device)
        layout = {name: inputs["-cl" in name] for name in models}
        rows: dict[str, dict] = {}
        measure = functools.partial(timed, timer, batch=batch)
        with torch.no_grad(), torch.autocast(device.type, torch.float16, enabled=amp):
            check = x[:64]
            reference = models["timm"](check).float()
            diff = (models["ours"](check).float() - reference).abs().max().item()
            scale = reference.abs().max().item()
            for name, model in models.items():
                rows[name] = measure(model, layout[name])
            if args.jit:  # the paper's deployment: TorchScript traces
                for name, model in models.items():
                    if "explicit" not in name:
                        rows[f"{name}+jit"] = measure(torch.jit.trace(model, layout[name]), layout[name])
            if args.compile:  # compiling is slow: only each side's fastest eager configuration
                for who in ("timm", "ours"):
                    candidates = [n for n in models if n.startswith(who) and rows[n].get("img_per_s")]
                    if candidates:
                        best = max(candidates, key=lambda n: rows[n]["img_per_s"])
                        rows[f"{best}+compile"] = measure(torch.compile(models[best]), layout[best])
        results["variants"][variant] = {"max_abs_logit_diff": diff, "logit_scale": scale, "rows": rows,
                                        "ratios": _ratios(rows)}
        del models
        print(f"{variant}: ours vs timm max |logit diff| {diff:.3g} (logits up to {scale:.3g})", flush=True)
    return results


def timed(timer: Timer, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> dict:
    """One configuration's row: seconds and images per second, or the error that stopped it."""
    try:
        row: dict = timer(lambda: fn(x))
    except Exception as err:  # noqa: BLE001 - a failing configuration is reported, not fatal
        return {"error": f"{err.__class__.__name__}: {str(err)[:200]}"}
    finally:
        if x.is_cuda:
            torch.cuda.empty_cache()
    row["img_per_s"] = batch / row["wall_s"]
    if "cpu_s" in row:
        row["img_per_cpu_s"] = batch / row["cpu_s"]
    return row


def _ratios(rows: dict[str, dict]) -> dict[str, float]:
    """Best ours / best timm, per kind (eager, +compile, +jit), by wall-clock (and by CPU time on CPU)."""
    ratios = {}
    for kind in ("", "+compile", "+jit"):
        for metric in ("img_per_s", "img_per_cpu_s"):
            best = {}
            for who in ("ours", "timm"):
                values = [r[metric] for n, r in rows.items()
                          if n.startswith(who) and n.endswith(kind) and (kind or "+" not in n) and r.get(metric)]
                if values:
                    best[who] = max(values)
            if len(best) == 2:
                ratios[f"{kind.strip('+') or 'eager'}/{metric}"] = best["ours"] / best["timm"]
    return ratios


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "cpu"
    return name


def print_table(results: dict) -> None:
    cpu = results["threads"] is not None
    precision = "AMP fp16" if results["amp_fp16"] else "fp32"
    threads = f", {results['threads']} thread(s)" if cpu else ""
    print(f"\nEfficientViT throughput, {results['device']}, batch {results['batch']}, "
          f"{results['img']}x{results['img']}, {precision}{threads}")
    header = f"{'variant':8s}{'config':24s}{'img/s':>12s}" + (f"{'img/cpu-s':>12s}" if cpu else "")
    print(header)
    print("-" * len(header))
    for variant, res in results["variants"].items():
        for name, row in res["rows"].items():
            if "error" in row:
                print(f"{variant:8s}{name:24s}  failed: {row['error']}")
                continue
            line = f"{variant:8s}{name:24s}{row['img_per_s']:12.1f}"
            if cpu:
                line += f"{row['img_per_cpu_s']:12.1f}"
            print(line)
        ratios = ", ".join(f"{k.split('/')[0]}{' (cpu time)' if 'cpu' in k else ''} {v:.3f}"
                           for k, v in res["ratios"].items())
        print(f"{variant:8s}{'ours / timm (best each)':24s}  {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=None, help="default: 2048 on CUDA, 16 on CPU (the paper's)")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the paper: 1)")
    parser.add_argument("--fp32", action="store_true", help="no AMP on CUDA")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--jit", action="store_true", help="also time torch.jit.trace'd models (the paper's)")
    parser.add_argument("--warmup-s", type=float, default=None, help="default: 1 (CUDA), 2 (CPU)")
    parser.add_argument("--time-s", type=float, default=None, help="timed seconds per configuration; default 2 / 4")
    parser.add_argument("--min-iters", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: M0, batch 2, a few iterations")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (1.0 if cuda else 2.0)
    args.time_s = args.time_s if args.time_s is not None else (2.0 if cuda else 4.0)
    if args.quick:
        args.device, args.variants, args.batch = "cpu", ["m0"], 2
        args.warmup_s, args.time_s, args.min_iters = 0.0, 0.0, 3
    results = run(args)
    print_table(results)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "efficientvit.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
