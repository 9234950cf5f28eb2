#!/usr/bin/env python
"""Inference latency of SLAB-Swin-T/S against timm's Swin-T/S on the GPU, in one run.

Each model in eval mode, bf16 autocast, 224x224 input, batch 64 and batch 1; median of CUDA-event timings
(`triton.testing.do_bench`). SLAB models are timed as trained (PRepBN in its evaluation form, RepBN) and as
deployed (`fold_norms`: every RepBN folded into the next linear layer, SLAB eq. 4). SLA runs through the shared
linear-attention kernel in float32 (TF32 products, `torch.set_float32_matmul_precision("high")` as the runner sets).
Also checks that the folded model gives the unfolded outputs. Results to $OUT/bench_slab.json when OUT is set.

    python scripts/bench_slab.py            # on the GPU machine (~1 minute)
    python scripts/bench_slab.py --quick    # CPU smoke run (tiny input, batch 2)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from projects.slab.model import build_model, fold_norms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def latency_ms(model: torch.nn.Module, x: torch.Tensor) -> float:
    def step():
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            model(x)

    if DEVICE != "cuda":
        step()
        t = time.perf_counter()
        step()
        return (time.perf_counter() - t) * 1e3
    import triton

    return float(triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")
    import timm

    img, batches = (224, (64, 1)) if not args.quick else (64, (2,))
    models = {
        "swin_t (timm)": lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=img),
        "slab_swin_t": lambda: build_model("slab_swin_t", img_size=img),
        "swin_s (timm)": lambda: timm.create_model("swin_small_patch4_window7_224", img_size=img),
        "slab_swin_s": lambda: build_model("slab_swin_s", img_size=img),
    }
    rows = []
    for name, make in models.items():
        torch.manual_seed(0)
        model = make().to(DEVICE).eval()
        params = sum(p.numel() for p in model.parameters())
        variants = [("eval", model)]
        if name.startswith("slab"):
            x = torch.randn(4, 3, img, img, device=DEVICE)
            folded = make().to(DEVICE).eval()
            folded.load_state_dict(model.state_dict())
            fold_norms(folded)
            torch.set_float32_matmul_precision("highest")  # the check in full float32, not TF32
            with torch.no_grad():
                before = model(x)
                err = float((folded(x) - before).abs().max() / before.abs().max())
            torch.set_float32_matmul_precision("high")
            print(f"{name}: folded vs unfolded max relative difference {err:.2e}")
            variants.append(("folded", folded))
        for batch in batches:
            x = torch.randn(batch, 3, img, img, device=DEVICE)
            for variant, m in variants:
                ms = latency_ms(m, x)
                rows.append({"model": name, "variant": variant, "batch": batch, "ms": ms,
                             "img_per_s": batch / ms * 1e3, "params": params})
        del model, variants
    print(f"\nlatency ({torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}, bf16 autocast, {img}x{img}); "
          "ratio = timm Swin ms / this ms (>1: faster than Swin)")
    print(f"{'model':>14} {'variant':>7} {'batch':>5} {'ms':>9} {'img/s':>9} {'x Swin':>7}")
    for r in rows:
        base_name = ("swin_t (timm)" if "_t" in r["model"] else "swin_s (timm)")
        base = next(b["ms"] for b in rows if b["model"] == base_name and b["batch"] == r["batch"])
        r["ratio_vs_timm"] = base / r["ms"]
        print(f"{r['model']:>14} {r['variant']:>7} {r['batch']:>5} {r['ms']:9.3f} {r['img_per_s']:9.1f} "
              f"{r['ratio_vs_timm']:7.2f}")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_slab.json"
        path.write_text(json.dumps({"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                                    "rows": rows}, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
