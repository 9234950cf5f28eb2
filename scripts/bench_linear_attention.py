#!/usr/bin/env python
"""Benchmark and check `shared.kernels.linear_attention` on the GPU, in one run.

1. Correctness at real sizes against the float32 PyTorch reference (values and gradients; causal and non-causal,
   with and without normaliser; bf16 and float32 inputs), ||out - ref|| / ||ref||, with flash-linear-attention's
   `chunk_linear_attn` (fla-core) checked the same way where it applies (causal).
2. Optional (`--tune`): a sweep of chunk size / warps / stages of our kernel, causal fwd+bwd.
3. Timing, bf16, B=8, H=16, D=64, sequence 512 .. 32k, forward and forward+backward (median of
   `triton.testing.do_bench`): our kernel vs fla's `chunk_linear_attn` (causal, normalize=True and False) vs
   PyTorch SDPA softmax attention (flash / cuDNN backend) vs plain PyTorch linear attention (non-causal).
   Prints a table with ratios against the strongest alternative, and the length from which linear attention
   beats SDPA (crossover). Full results go to $OUT/bench_linear_attention.json when OUT is set.

    python scripts/bench_linear_attention.py            # on the GPU machine (~2-3 minutes)
    python scripts/bench_linear_attention.py --skip-timing  # the correctness check alone
    python scripts/bench_linear_attention.py --quick    # smoke run (CPU: Triton interpreted, tiny sizes)

fla layout is [B, T, H, D]; ours and SDPA's (B, H, T, D): each is timed on inputs already in its own layout.
fla is called with scale=1 so that all linear paths compute the same function.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.nn.functional as F  # noqa: E402

from shared.kernels.linear_attention import triton_chunk  # noqa: E402
from shared.kernels.linear_attention.reference import linear_attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T0 = time.perf_counter()


def try_fla():
    try:
        from fla.ops.linear_attn import chunk_linear_attn

        return chunk_linear_attn
    except Exception as err:  # noqa: BLE001 (any import failure just drops the column)
        print(f"fla-core not available: {type(err).__name__}: {err}")
        return None


def inputs(b, h, n, d, dtype, grad=True, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    # features as a ReLU/elu+1 map would give them: non-negative, O(1)
    q = torch.rand(b, h, n, d, device=DEVICE, generator=g, dtype=torch.float32).to(dtype)
    k = torch.rand(b, h, n, d, device=DEVICE, generator=g, dtype=torch.float32).to(dtype)
    v = torch.randn(b, h, n, d, device=DEVICE, generator=g, dtype=torch.float32).to(dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ours(q, k, v, causal, normalize):
    return triton_chunk.linear_attention_triton(q, k, v, causal=causal, normalize=normalize)


def torch_linear(q, k, v, causal, normalize):
    """Non-causal linear attention in plain PyTorch, inputs' dtype (the strongest simple alternative)."""
    kv = k.transpose(-2, -1) @ v
    out = q @ kv
    if normalize:
        out = out / (q @ k.sum(-2, keepdim=True).transpose(-2, -1) + 1e-6)
    return out


def sdpa(q, k, v, causal, normalize):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


# ------------------------------------------------------------------------------------------------- correctness

def check(args, fla) -> list[dict]:
    rows = []
    print_check_row(None)
    cases = [(2, 4, 4096, 64), (1, 2, 32768, 64), (2, 3, 3136, 32)] if not args.quick else [(1, 2, 70, 16)]
    for (b, h, n, d) in cases:
        for causal in (True, False):
            for normalize in (True, False):
                for dtype in (torch.bfloat16, torch.float32):
                    if n > 8192 and (dtype == torch.float32 or not causal):
                        continue  # the long case checks the bf16 causal path the LM uses
                    q, k, v = inputs(b, h, n, d, dtype, seed=n)
                    grad_out = torch.randn(b, h, n, d, device=DEVICE, dtype=dtype)
                    ref = linear_attention_reference(*(t.float() for t in (q, k, v)), causal=causal,
                                                     normalize=normalize)
                    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.float())
                    out = ours(q, k, v, causal, normalize)
                    grads = torch.autograd.grad(out, (q, k, v), grad_out)
                    row = {"B": b, "H": h, "N": n, "D": d, "causal": causal, "normalize": normalize,
                           "dtype": str(dtype).split(".")[-1], "ours_out": rel(out, ref),
                           **{f"ours_d{x}": rel(g, r) for x, g, r in zip("qkv", grads, ref_grads)}}
                    finite = all(torch.isfinite(t).all() for t in (out, *grads))
                    row["finite"] = bool(finite)
                    if fla is not None and causal and dtype == torch.bfloat16:
                        qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
                        of = fla(qf, kf, vf, scale=1.0, normalize=normalize)[0]
                        gf = torch.autograd.grad(of, (qf, kf, vf), grad_out.transpose(1, 2).contiguous())
                        row["fla_out"] = rel(of.transpose(1, 2), ref)
                        row.update({f"fla_d{x}": rel(g.transpose(1, 2), r) for x, g, r in zip("qkv", gf, ref_grads)})
                    rows.append(row)
                    print_check_row(row)
                    del q, k, v, ref, ref_grads, out, grads
    return rows


def print_check_row(r: dict) -> None:
    if r is None:
        print("\ncorrectness: ||x - ref|| / ||ref|| against the float32 reference")
        print(f"{'B,H,N,D':>16} {'causal':>6} {'norm':>5} {'dtype':>8} | {'out':>8} {'dq':>8} {'dk':>8} {'dv':>8} | "
              f"{'fla out':>8} {'fla dq':>8}")
        return
    fla_cols = f"{r.get('fla_out', float('nan')):8.1e} {r.get('fla_dq', float('nan')):8.1e}"
    print(f"{r['B']},{r['H']},{r['N']},{r['D']:>3}".rjust(16) + f" {r['causal']!s:>6} {r['normalize']!s:>5} "
          f"{r['dtype']:>8} | {r['ours_out']:8.1e} {r['ours_dq']:8.1e} {r['ours_dk']:8.1e} {r['ours_dv']:8.1e} | "
          f"{fla_cols}" + ("" if r["finite"] else "  NON-FINITE") + f"   [{time.perf_counter() - T0:.0f}s]", flush=True)


# ------------------------------------------------------------------------------------------------------ timing

def bench_ms(fn, backward: bool, q, k, v, grad_out) -> float:
    import triton

    if backward:
        def step():
            out = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), grad_out)
    else:
        def step():
            with torch.no_grad():
                fn(q, k, v)
    if DEVICE != "cuda":
        t = time.perf_counter()
        step()
        return (time.perf_counter() - t) * 1e3
    return float(triton.testing.do_bench(step, warmup=10, rep=40, return_mode="median"))


def timing(args, fla) -> list[dict]:
    b, h, d = (8, 16, 64) if not args.quick else (1, 2, 16)
    lengths = [512, 1024, 2048, 4096, 8192, 16384, 32768] if not args.quick else [64, 128]
    rows = []
    for n in lengths:
        q, k, v = inputs(b, h, n, d, torch.bfloat16)
        grad_out = torch.randn_like(v)
        seq_first = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
        grad_seq_first = grad_out.transpose(1, 2).contiguous()
        impls = {
            ("causal", "norm"): {"ours": (ours, False), "fla": (fla, True)},
            ("causal", "plain"): {"ours": (ours, False), "fla": (fla, True)},
            ("noncausal", "norm"): {"ours": (ours, False), "torch": (torch_linear, False)},
            ("causal", "sdpa"): {"sdpa": (sdpa, False)},
            ("noncausal", "sdpa"): {"sdpa": (sdpa, False)},
        }
        for (mask, kind), candidates in impls.items():
            causal, normalize = mask == "causal", kind == "norm"
            for name, (impl, fla_layout) in candidates.items():
                if impl is None or (name == "sdpa" and DEVICE != "cuda" and n > 128):
                    continue
                if fla_layout:
                    def fn(a, b_, c, impl=impl, normalize=normalize):
                        return impl(a, b_, c, scale=1.0, normalize=normalize)[0]
                    tensors, go = seq_first, grad_seq_first
                else:
                    def fn(a, b_, c, impl=impl, causal=causal, normalize=normalize):
                        return impl(a, b_, c, causal, normalize)
                    tensors, go = (q, k, v), grad_out
                for backward in (False, True):
                    try:
                        ms = bench_ms(fn, backward, *tensors, go)
                    except Exception as err:  # noqa: BLE001 (a failing peer is reported, not fatal)
                        print(f"{name} {mask}/{kind} N={n}: {type(err).__name__}: {str(err)[:200]}")
                        ms = float("nan")
                    rows.append({"N": n, "B": b, "H": h, "D": d, "mask": mask, "kind": kind, "impl": name,
                                 "pass": "fwd+bwd" if backward else "fwd", "ms": ms})
                    print(f"  N={n:>6} {mask:>9}/{kind:<5} {name:>5} {rows[-1]['pass']:>7}: {ms:9.3f} ms"
                          f"   [{time.perf_counter() - T0:.0f}s]", flush=True)
        del q, k, v, seq_first, grad_out
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> dict:
    """Final compact table; returns the crossover lengths."""
    def get(n, mask, kind, impl, p):
        for r in rows:
            if (r["N"], r["mask"], r["kind"], r["impl"], r["pass"]) == (n, mask, kind, impl, p):
                return r["ms"]
        return float("nan")

    lengths = sorted({r["N"] for r in rows})
    crossover = {}
    for p in ("fwd", "fwd+bwd"):
        print(f"\n{p} (ms, bf16, B={rows[0]['B']} H={rows[0]['H']} D={rows[0]['D']}); ratio = strongest other / ours "
              "(>1: ours faster)")
        print(f"{'N':>6} | {'ours c':>8} {'fla c':>8} {'x':>5} | {'ours c0':>8} {'fla c0':>8} {'x':>5} | "
              f"{'ours nc':>8} {'torch nc':>8} {'x':>5} | {'sdpa c':>8} {'sdpa nc':>8}")
        for n in lengths:
            oc, fc = get(n, "causal", "norm", "ours", p), get(n, "causal", "norm", "fla", p)
            op, fp = get(n, "causal", "plain", "ours", p), get(n, "causal", "plain", "fla", p)
            on, tn = get(n, "noncausal", "norm", "ours", p), get(n, "noncausal", "norm", "torch", p)
            sc, sn = get(n, "causal", "sdpa", "sdpa", p), get(n, "noncausal", "sdpa", "sdpa", p)
            print(f"{n:>6} | {oc:8.3f} {fc:8.3f} {fc / oc:5.2f} | {op:8.3f} {fp:8.3f} {fp / op:5.2f} | "
                  f"{on:8.3f} {tn:8.3f} {tn / on:5.2f} | {sc:8.3f} {sn:8.3f}")
        for mask, ours_kind in (("causal", "norm"), ("noncausal", "norm")):
            wins = [n for n in lengths if get(n, mask, ours_kind, "ours", p) < get(n, mask, "sdpa", "sdpa", p)]
            # the shortest length from which ours stays faster than SDPA
            start = next((n for n in lengths if all(m in wins for m in lengths if m >= n)), None)
            crossover[f"{mask}/{p}"] = start
            print(f"crossover vs SDPA ({mask}, {p}): ours faster from N = {start}")
    return crossover


def tune(args) -> list[dict]:
    b, h, d = 8, 16, 64
    rows = []
    for n in (2048, 16384):
        q, k, v = inputs(b, h, n, d, torch.bfloat16)
        go = torch.randn_like(v)
        for chunk in (32, 64, 128):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    triton_chunk.TUNING.update(chunk=chunk, num_warps=warps, num_stages=stages)
                    for causal in (True, False):
                        def fn(a, b_, c, causal=causal):
                            return ours(a, b_, c, causal, True)
                        try:
                            ms = bench_ms(fn, True, q, k, v, go)
                        except Exception as err:  # noqa: BLE001
                            ms = float("nan")
                            print(f"tune chunk={chunk} warps={warps} stages={stages}: {type(err).__name__}")
                        rows.append({"N": n, "causal": causal, "chunk": chunk, "num_warps": warps,
                                     "num_stages": stages, "ms": ms})
    triton_chunk.TUNING.update(chunk=None, num_warps=None, num_stages=None)
    print("\ntuning (fwd+bwd ms, normalised, bf16, B=8 H=16 D=64): best per (N, causal)")
    for n in (2048, 16384):
        for causal in (True, False):
            cand = [r for r in rows if r["N"] == n and r["causal"] == causal and r["ms"] == r["ms"]]
            best = min(cand, key=lambda r: r["ms"])
            default = next(r for r in cand if (r["chunk"], r["num_warps"], r["num_stages"]) == (64, 4, 2))
            print(f"N={n:>6} causal={causal!s:>5}: best chunk={best['chunk']} warps={best['num_warps']} "
                  f"stages={best['num_stages']} {best['ms']:.3f} ms (default {default['ms']:.3f} ms)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--tune", action="store_true", help="also sweep chunk / warps / stages")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-timing", action="store_true", help="only the real-size correctness check")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference in full precision
    fla = try_fla() if DEVICE == "cuda" else None
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {device}; torch {torch.__version__}")
    result: dict = {"device": device, "torch": torch.__version__}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    if fla is not None:
        import fla as fla_pkg

        result["fla"] = getattr(fla_pkg, "__version__", "?")
    def save() -> None:
        if os.environ.get("OUT"):
            path = Path(os.environ["OUT"]) / "bench_linear_attention.json"
            path.write_text(json.dumps(result, indent=1))

    if args.tune and DEVICE == "cuda":
        result["tuning"] = tune(args)
        save()
    if not args.skip_timing:
        result["timing"] = timing(args, fla)
        result["crossover_vs_sdpa"] = table(result["timing"])
        save()
    if not args.skip_check:  # last: the timing table is the primary result
        result["correctness"] = check(args, fla)
        save()


if __name__ == "__main__":
    main()
