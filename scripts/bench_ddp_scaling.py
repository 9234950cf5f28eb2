#!/usr/bin/env python
"""DDP on several GPUs of one node, through the real CLI: scaling, correctness, checkpoint moves, SLURM preset.

    python scripts/bench_ddp_scaling.py --project hat --devices 1 2 --parts scaling,correctness,resume,slurm

- scaling: throughput at each device count at a fixed per-GPU batch (bf16-mixed, DDP); efficiency =
  throughput(N) / (N x throughput(1)). Throughput is the median of the `perf/samples_per_s` the Throughput callback
  logs after `--warmup` steps (all ranks together, data loading included).
- correctness: N GPUs with the per-GPU batch against 1 GPU with the global batch, same seed. `train/loss` is the
  mean over ranks, so the two curves are the same function of the same data; they differ only by floating-point
  order. The tolerance comes from the same run: a repeat of the 1-GPU run (the GPU's own run-to-run spread) and
  the 1-GPU run with another seed (what a different training looks like). Validation, reduced over ranks, at the end.
  In bf16 the one-batch and N-batch gradients round differently and an unstable early phase amplifies that within
  a few steps (README, "Several GPUs"); `--precision 32-true` compares the curves without bf16 rounding.
- resume: N GPUs for a third of the steps, 1 GPU (global batch) from that checkpoint to two thirds, N GPUs to the
  end (`ckpt_path=last` each time), against the uninterrupted N-GPU run.
- slurm: the SLURM preset through submitit's local executor (`hydra/launcher=slurm_local trainer=ddp`,
  tasks_per_node = gpus_per_node = devices: one task per GPU, no re-launch by Lightning), against the N-GPU run.

`--accelerator cpu` runs the same protocol on CPU processes (gloo, float32): how this script is tested.
Results: a table on stdout and `$OUT/ddp_<project>.json` with every curve.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The paper-sized model of each project at the paper's per-GPU batch, on the embedded data, with stochastic depth off
# (each rank draws its own masks, which a 1-GPU run cannot reproduce; it changes no FLOP).
PROJECTS: dict[str, dict] = {
    # the paper's lr: the laptop default (2e-3) makes this model's loss spike early, which amplifies bf16 rounding
    "hat": {"batch": 4, "overrides": ["model.arch=hat_x2", "+model.arch_kwargs.drop_path_rate=0.0",
                                      "model.optimizer.lr=2.0e-4", "data.patch_size=64", "data.num_workers=4",
                                      "model.log_images=0"]},
    "titans": {"batch": 4, "overrides": ["model.net.name=titans_mac_small", "data.seq_len=1024",
                                         "data.num_workers=2"]},
    "toy": {"batch": 8, "overrides": ["model.dropout=0.0"]},  # the tests' project (with the tests' searchpath)
}
# NVLink multicast stays off on shared machines (a program using it can take the host's GPUs out of service).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log_dir = Path(args.log_dir)
        self.walls: dict[str, float] = {}

    def train(self, run_id: str, devices: int, batch: int, *extra: str, slurm: bool = False,
              max_steps: int | None = None) -> Path:
        a = self.args
        gpu = a.accelerator == "gpu"
        if devices > 1:
            trainer = ["trainer=ddp" if gpu else "trainer=ddp_cpu", f"trainer.devices={devices}"]
        else:
            trainer = ["trainer=gpu" if gpu else "trainer=cpu"]
        precision = a.precision or ("bf16-mixed" if gpu else "32-true")
        argv = [sys.executable, "train.py", *(["-m", "hydra/launcher=slurm_local"] if slurm else []),
                f"project={a.project}", *trainer, f"trainer.precision={precision}",
                f"data.batch_size={batch}", f"trainer.max_steps={max_steps or a.steps}", "trainer.max_epochs=-1",
                f"trainer.val_check_interval={a.steps}", "trainer.check_val_every_n_epoch=null",
                "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "test=false", "logger=csv",
                f"run_id={run_id}", f"paths.log_dir={self.log_dir}", *PROJECTS[a.project]["overrides"],
                *a.overrides, *extra]
        env = {**os.environ, **NO_MULTICAST, "WANDB_MODE": "disabled"}
        start = time.perf_counter()
        try:
            result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                                    timeout=self.args.run_timeout)
        except subprocess.TimeoutExpired as e:
            raise SystemExit(f"{run_id} ran past --run-timeout {self.args.run_timeout} s: {' '.join(argv)}\n"
                             f"{tail(e.stdout)}\n{tail(e.stderr)}") from None
        self.walls[run_id] = self.walls.get(run_id, 0.0) + time.perf_counter() - start
        if result.returncode:
            raise SystemExit(f"{' '.join(argv)}\n{tail(result.stdout)}\n{tail(result.stderr)}")
        print(f"  {run_id}: {devices} device(s) x batch {batch}, {self.walls[run_id]:.0f} s", flush=True)
        return self.log_dir / a.project / run_id


def tail(output: str | bytes | None) -> str:
    """The end of a run's captured output (a timed-out run's comes back as bytes, whatever `text` says)."""
    return (output.decode(errors="replace") if isinstance(output, bytes) else output or "")[-3000:]


def column(run_dir: Path, key: str) -> list[float]:
    """The logged values of `key`, in step order (the last one of a step when a resumed run logged it twice)."""
    by_step: dict[int, float] = {}
    for path in sorted((run_dir / "csv").glob("**/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    by_step[int(row["step"])] = float(row[key])
    return [by_step[s] for s in sorted(by_step)]


def rel_diff(a: list[float], b: list[float]) -> dict[str, float]:
    if len(a) != len(b):
        raise SystemExit(f"curves of different lengths: {len(a)} and {len(b)} steps")
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)]
    return {"median": statistics.median(rel), "max": max(rel), "mean": statistics.fmean(rel)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True, choices=sorted(PROJECTS))
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, help="per-GPU batch (default: the project's entry in PROJECTS)")
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--warmup", type=int, default=30, help="steps left out of the throughput median")
    parser.add_argument("--parts", default="scaling,correctness,resume,slurm")
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--precision", help="trainer.precision (default: bf16-mixed on GPUs, 32-true on CPUs); "
                        "32-true on GPUs takes bf16 rounding out of the 1-vs-N-GPU curve comparison")
    parser.add_argument("--run-timeout", type=float, help="seconds one training run may take before the bench stops")
    parser.add_argument("--log-dir", default=os.environ.get("OUT", "outputs") + "/ddp")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    batch = args.batch or PROJECTS[args.project]["batch"]
    n = max(args.devices)
    if n < 2:
        raise SystemExit("--devices must include a count of at least 2")
    runner = Runner(args)
    out: dict = {"project": args.project, "per_gpu_batch": batch, "steps": args.steps, "devices": args.devices,
                 "accelerator": args.accelerator}
    if args.accelerator == "gpu":
        import torch

        out["device"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}, torch {torch.__version__}"
    print(f"{args.project}: per-GPU batch {batch}, {args.steps} steps, {args.accelerator} ({out.get('device', '')})")

    path = Path(os.environ.get("OUT", "outputs"), f"ddp_{args.project}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    curves: dict[str, list[float]] = {}
    try:  # what was measured is kept when a later run fails or hangs
        # the N-GPU run serves scaling, correctness, resume and slurm alike
        many = runner.train(f"ddp{n}", n, batch)
        curves[f"{n}x{batch}"] = column(many, "train/loss")
        if "scaling" in parts:
            throughput, mfu = {}, {}
            for d in args.devices:
                run = many if d == n else runner.train(f"scale{d}", d, batch)
                throughput[d] = statistics.median(column(run, "perf/samples_per_s")[args.warmup:])
                mfu[d] = statistics.median(column(run, "perf/mfu")[args.warmup:] or [float("nan")])
            base = throughput[min(args.devices)] / min(args.devices)
            out["throughput"], out["mfu"] = throughput, mfu
            out["efficiency"] = {d: throughput[d] / (d * base) for d in args.devices}
        if "correctness" in parts:
            one = runner.train("one", 1, n * batch)
            repeat = runner.train("one-repeat", 1, n * batch)
            other_seed = runner.train("one-seed1", 1, n * batch, "seed=1")
            curves.update({f"1x{n * batch}": column(one, "train/loss"),
                           f"1x{n * batch} repeat": column(repeat, "train/loss"),
                           f"1x{n * batch} seed 1": column(other_seed, "train/loss")})
            a = curves[f"1x{n * batch}"]
            out["loss_rel_diff"] = {f"{n} GPUs vs 1 GPU": rel_diff(a, curves[f"{n}x{batch}"]),
                                    "1 GPU repeat": rel_diff(a, curves[f"1x{n * batch} repeat"]),
                                    "1 GPU, seed 1": rel_diff(a, curves[f"1x{n * batch} seed 1"])}
            val_key = "val/psnr" if args.project == "hat" else "val/loss"
            out["final_" + val_key] = {name: column(run, val_key)[-1] for name, run in
                                       [(f"{n} GPUs", many), ("1 GPU", one), ("1 GPU repeat", repeat),
                                        ("1 GPU seed 1", other_seed)]}
        if "resume" in parts:
            first, second = args.steps // 3, 2 * args.steps // 3
            runner.train("moved", n, batch, max_steps=first)
            runner.train("moved", 1, n * batch, "ckpt_path=last", max_steps=second)
            moved = runner.train("moved", n, batch, "ckpt_path=last")
            curves[f"{n}->1->{n}"] = column(moved, "train/loss")
            moved_diff = rel_diff(curves[f"{n}x{batch}"], curves[f"{n}->1->{n}"])
            out["loss_rel_diff"] = {**out.get("loss_rel_diff", {}), f"{n}->1->{n} GPUs vs {n} GPUs": moved_diff}
        if "slurm" in parts:
            slurm = runner.train("slurm", n, batch, slurm=True)
            tasks = sorted(p.name for p in (runner.log_dir / ".submitit").glob("*/*_log.out"))
            curves["slurm preset"] = column(slurm, "train/loss")
            out["slurm_tasks"] = len(tasks)
            slurm_diff = rel_diff(curves[f"{n}x{batch}"], curves["slurm preset"])
            out["loss_rel_diff"] = {**out.get("loss_rel_diff", {}), f"slurm preset vs {n} GPUs": slurm_diff}
    finally:
        out["curves"], out["wall_s"] = curves, runner.walls
        path.write_text(json.dumps(out, indent=1))

    if "throughput" in out:
        print(f"\n{'GPUs':>4} {'samples/s':>12} {'efficiency':>10} {'MFU':>6}")
        for d in args.devices:
            print(f"{d:>4} {out['throughput'][d]:>12.1f} {out['efficiency'][d]:>10.3f} {out['mfu'][d]:>6.3f}")
    for name, diff in out.get("loss_rel_diff", {}).items():
        print(f"train/loss, {name}: relative difference median {diff['median']:.2e}, mean {diff['mean']:.2e}, "
              f"max {diff['max']:.2e}")
    for key in [k for k in out if k.startswith("final_")]:
        print(f"{key[6:]} at step {args.steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in out[key].items()))
    if "slurm_tasks" in out:
        print(f"SLURM preset: {out['slurm_tasks']} submitit tasks for trainer.devices={n}")


if __name__ == "__main__":
    main()
