#!/usr/bin/env python
"""DDP scaling and correctness on several GPUs of one node, through the real CLI (issue: multi-GPU).

For each project: throughput at 1, 2 (, 4) GPUs at a fixed per-GPU batch (bf16-mixed, DDP), scaling efficiency
= throughput(N) / (N x throughput(1)); and correctness: 1 GPU with the global batch against N GPUs with
global/N each, same seed, comparing the loss curves and the final weights.

    python scripts/bench_ddp_scaling.py --project hat --devices 1 2 4 --batch 8 --steps 80 -- <overrides>

Throughput is the median of the `perf/samples_per_s` the Throughput callback logs after `--warmup` steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(project: str, devices: int, batch: int, steps: int, run_id: str, log_dir: Path, extra: list[str]) -> Path:
    strategy = ["trainer=ddp", f"trainer.devices={devices}"] if devices > 1 else ["trainer=gpu"]
    args = [sys.executable, "train.py", f"project={project}", *strategy, "trainer.precision=bf16-mixed",
            f"data.batch_size={batch}", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
            "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=null", "trainer.limit_val_batches=0",
            "trainer.log_every_n_steps=1", "test=false", "logger=csv", f"run_id={run_id}",
            f"paths.log_dir={log_dir}", *extra]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return log_dir / project / run_id


def metrics(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=8, help="per-GPU batch for the throughput runs")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--log-dir", default=os.environ.get("OUT", "outputs") + "/scaling")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    log_dir = Path(args.log_dir)

    throughput = {}
    for n in args.devices:
        run = train(args.project, n, args.batch, args.steps, f"scale-{n}gpu", log_dir, args.overrides)
        throughput[n] = statistics.median(metrics(run, "perf/samples_per_s")[args.warmup:])
    base = throughput[args.devices[0]] / args.devices[0]
    rows = [(n, throughput[n], throughput[n] / (n * base)) for n in args.devices]

    # correctness: same global batch on 1 GPU and on N GPUs
    n = max(args.devices)
    global_batch = args.batch * n
    one = train(args.project, 1, global_batch, args.steps, "same-batch-1gpu", log_dir, args.overrides)
    many = train(args.project, n, args.batch, args.steps, f"same-batch-{n}gpu", log_dir, args.overrides)
    a, b = metrics(one, "train/loss"), metrics(many, "train/loss")
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)]

    print(f"\nDDP scaling, {args.project}, per-GPU batch {args.batch}, bf16-mixed")
    print(f"{'GPUs':>4} {'samples/s':>12} {'efficiency':>10}")
    for n_, thr, eff in rows:
        print(f"{n_:>4} {thr:>12.1f} {eff:>10.3f}")
    print(f"loss curves, global batch {global_batch}: 1 GPU vs {n} GPUs: median rel. diff {statistics.median(rel):.2e},"
          f" max {max(rel):.2e} (rank 0 logs its shard's loss; the weights follow the averaged gradient)")
    out = {"project": args.project, "throughput": throughput, "efficiency": {r[0]: r[2] for r in rows},
           "loss_rel_diff_median": statistics.median(rel), "loss_rel_diff_max": max(rel)}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"ddp_scaling_{args.project}.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
