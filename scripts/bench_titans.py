#!/usr/bin/env python
"""Titans on one GPU: quality at equal budget, throughput / MFU, and the chunked memory update's speed-up.

Parts (`--parts`, comma-separated; all by default). On one H200 all of them need more than the 10 minutes one
command may take; run them as two commands of `--max-seconds 540` each (README.md, "How to run"):
`--parts throughput,chunk,attention` and `--parts lm,niah,ablation` (niah fine-tunes the lm part's models).
  lm          Transformer++ vs LMM vs MAC vs MAG vs MAL ("small" configs, bf16), the same steps and tokens on the
              embedded Wikipedia bytes: validation loss, perplexity, bits per byte (Table 1's comparison).
  ablation    Table 5 on the LMM base: linear memory, w/o convolution, w/o momentum, w/o weight decay,
              w/o persistent memory, at the same budget; the ordering is compared with the paper's.
  niah        S-NIAH passkey (Table 2's PK): the lm models are fine-tuned briefly on 1K-byte samples and tested
              at 1K, 2K, 4K, 8K bytes (exact match of the 7-digit value).
  throughput  training tokens/s and MFU (bf16) of every variant against Transformer++, and tokens/s against the
              sequence length at a fixed number of tokens per batch (Figure 9's layout). `--variants` rows run
              eager with the PyTorch reference scan at every `--seq-lens`; `--rows` adds rows at `--row-lens`
              named <variant>+<flags>, the flags any of `compile` (the memory's work around the scan under
              torch.compile, `compile_step`), `scan` (the fused Triton memory scan, `shared/kernels/memory_scan`;
              GPU only) and `graph` (the whole step replayed as a CUDA graph; GPU only), e.g. `mag+scan+graph`
              (the other parts take the kernels, the default on a GPU).
  chunk       the memory update alone (forward + backward): the token loop (the recurrence, b = 1) against the
              parallel chunked update (dual form eager and compiled, materialised form) at b = 64, and the loop at
              b = 64 (same math).
  scan        the memory's chunk scan alone: the fast paths of `shared/kernels/memory_scan` against the PyTorch
              reference loop, the fused Triton kernels at the `tiny` and `small` memory shapes, the linear memory's
              parallel prefix scan at `small`'s, without gradient and forward + backward: each path's max relative
              difference of the outputs and gradients to the reference in exact float32 (float32 IEEE and TF32,
              bf16 autocast), and ms.
  scan_time   the scan kernels' own device time (profiler), forward and backward, one `small` memory layer at
              Figure 9's shapes (6 heads x tokens / T memories of T / 64 chunks) at each of `--seq-lens`: the part
              of a step that grows with T, and the peak memory of one forward + backward. GPU only; not in the
              default `--parts`.
  profile     where a training step's time goes (torch.profiler), per variant of `--profile-variants` at
              `--profile-len` (<variant> or <variant>+compile), with the default memory scan (the kernels on a
              GPU), not graphed: the step's wall time against the device's busy
              time (the difference is launch and Python overhead, what a CUDA graph removes), the kernels by kind
              (memory scan, attention, matmul, optimizer, elementwise / reductions / copies) and the operators
              that cost the most device time. Not in the default `--parts`.
  precision   `compile_step`'s numbers: one training step of each memory variant of `--variants`, eager and
              compiled under bf16 autocast, against float32 (IEEE products, reference scan): losses and gradient
              errors. Not in the default `--parts`.
  attention   FlexAttention (compiled) against the SDPA dense-mask path on the GPU, sliding window with prefix and
              MAC's segmented mask: max difference of outputs and gradients (the CPU tests compare the eager
              FlexAttention forward and a plain-math reference).

Budget: the parts that run share `--max-seconds` (default 540) in the proportions of PART_SHARE, and time a part
leaves unused goes to the later ones. An item that would start after its part's deadline is recorded as
"skipped" (the tables say so); a training run that reaches the deadline stops and is marked "truncated" with its
step count; a real failure is recorded as "error" with its reason (out of memory frees the cache and the run goes
on). The JSON is rewritten after every item, so a run killed from outside keeps what it measured. The quality
parts use the SDPA path (`--train-backend`, no compilation unless `--memory '{"compile_step": true}'`; `--cuda-graph`
replays their training forward and backward as CUDA graphs) and report validation bits per byte over
`--val-positions` spans of the sequence as well; the throughput part uses `--attn-backend` (auto = FlexAttention on
GPU) and falls back to SDPA, saying so, if FlexAttention fails.

Text: `--text <file>` (e.g. ~/.cache/formerlab/wikipedia-*.txt written by shared.data.text.wikipedia_text());
without it the script builds the text itself (needs gensim) or falls back to Python's pydoc topics.
Prints compact tables (ratios against the strongest alternative in the run) and writes everything to
$OUT/<--json> (titans.json) when OUT is set. `--quick` runs tiny sizes on the CPU as a smoke test.
No hydra / lightning imports.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from projects.titans.memory import MEMORY_IMPLS, Gates, MemoryState  # noqa: E402
from projects.titans.model import TitansLM, build_titans  # noqa: E402
from shared.data.lm import bigram_cross_entropy, text_splits, unigram_entropy  # noqa: E402
from shared.data.synthetic.niah import IGNORE, niah_batch, word_list  # noqa: E402
from shared.lit.flops import peak_tflops  # noqa: E402

VARIANTS = ("transformer", "lmm", "mac", "mag", "mal")
ROW_FLAGS = ("compile", "scan", "graph")  # `--rows` names: <variant>+<flag>+..., see the module docstring
PART_SHARE = {"lm": 0.28, "ablation": 0.2, "niah": 0.17, "throughput": 0.22, "chunk": 0.08, "scan": 0.05,
              "scan_time": 0.03, "attention": 0.05, "profile": 0.1, "precision": 0.1}
# The profile part's kinds of work, matched in order against a kernel's name (GPU) or an operator's (CPU).
WORK_KINDS = (
    ("memory scan", r"_memory_scan_(fwd|bwd)"),
    ("attention", r"flash|fmha|attention|flex|triton_tem_|_efficient_attention|cudnn"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|wgmma|cublas|aten::(mm|bmm|addmm|baddbmm|matmul|linear)\b"),
    ("optimizer", r"multi_tensor|adam|_foreach"),
    ("elementwise, reductions, copies", r"."),
)
ABLATIONS = {  # Table 5, keyed by their experiment configs: (name, overrides of the LMM base, paper ppl, 400M / 15B)
    "lmm": ("LMM", {}, 27.01),
    "linear_memory": ("Linear Memory", {"memory": {"depth": 1}}, 28.49),
    "no_convolution": ("w/o Convolution", {"memory": {"conv": False}}, 28.73),
    "no_momentum": ("w/o Momentum", {"memory": {"momentum": False}}, 28.98),
    "no_weight_decay": ("w/o Weight Decay", {"memory": {"forgetting": False}}, 29.04),
    "no_persistent_memory": ("w/o Persistent Memory", {"num_persistent": 0}, 27.63),
}


def load_text(path: str | None) -> str:
    if path:
        return Path(path).read_text(encoding="utf-8")
    try:
        from shared.data.text import wikipedia_text

        return wikipedia_text()
    except Exception as exc:  # gensim missing on the GPU machine: use what Python ships
        print(f"[text] Wikipedia excerpt unavailable ({exc}); using pydoc topics")
        from shared.data.text import pydoc_text

        return pydoc_text()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
        self.size = "tiny" if args.quick else "small"
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else \
            torch.autocast("cpu", enabled=False)
        self.peak = peak_tflops(self.device, "bf16-mixed")
        self.results: dict[str, Any] = {"device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
                                        "torch": torch.__version__, "size": self.size, "args": vars(args)}
        self.models: dict[str, TitansLM] = {}
        self._splits: dict[str, torch.Tensor] | None = None
        self.deadline = math.inf

    # -- budget, results --

    def run(self, parts: list[str]) -> None:
        """Run `parts` in order; each gets its PART_SHARE of the time still left (unused time rolls over)."""
        start = time.perf_counter()
        end = start + self.args.max_seconds
        for i, part in enumerate(parts):
            part_start = time.perf_counter()
            share = PART_SHARE[part] / sum(PART_SHARE[p] for p in parts[i:])
            self.deadline = part_start + share * max(0.0, end - part_start)
            getattr(self, f"part_{part}")()
            self.results.setdefault("seconds", {})[part] = time.perf_counter() - part_start
            self.save()
        self.results["total_s"] = time.perf_counter() - start

    def out_of_time(self) -> bool:
        """True once the current part has used its share of the budget (the next item is then skipped)."""
        return time.perf_counter() > self.deadline

    def record(self, path: tuple, value: dict[str, Any]) -> None:
        """Store one item's result at results[path[0]][path[1]]..., print it and rewrite the JSON."""
        node = self.results
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        print(f"[{path[0]}] {' '.join(str(k) for k in path[1:])}: {value}", flush=True)
        self.save()

    def save(self) -> None:
        if os.environ.get("OUT"):
            path = Path(os.environ["OUT"]) / self.args.json
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.results, indent=1, default=str))
            os.replace(tmp, path)  # a kill mid-write leaves the previous complete file

    def failure(self, exc: BaseException) -> dict[str, str]:
        """A real error as a result row (call `free` after the `except` block to release its memory)."""
        if isinstance(exc, torch.OutOfMemoryError):
            return {"error": "out of memory", "detail": str(exc)[:200]}
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}

    def free(self) -> None:
        """Return the memory of dropped models and failed steps to the device (after an error)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- helpers --

    def milliseconds(self, fn: Callable[[], Any], iters: int) -> float:
        """Median milliseconds of `fn()` over `iters` calls, after one warm-up call."""
        times = []
        for i in range(1 + iters):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            if i:
                times.append(time.perf_counter() - t)
        return 1e3 * float(np.median(times))

    def model(self, variant: str, **overrides: Any) -> TitansLM:
        """A fresh model of the benchmark size, seeded, on the device (`memory` overrides merge key by key)."""
        torch.manual_seed(self.args.seed)
        kw = {"attn_backend": self.args.train_backend, "max_len": max(self.args.niah_lengths + [self.args.seq_len]),
              **overrides}
        if variant != "transformer":
            kw["memory"] = {"chunk_size": self.args.chunk, **self.args.memory, **kw.get("memory", {})}
        return build_titans(variant, self.size, **kw).to(self.device)

    @property
    def splits(self) -> dict[str, torch.Tensor]:
        if self._splits is None:
            splits, _, _ = text_splits(load_text(self.args.text), "byte")
            self.results["unigram_bpb"] = unigram_entropy(splits["train"], 256) / math.log(2)
            self.results["bigram_val_bpb"] = bigram_cross_entropy(splits["train"], splits["val"], 256) / math.log(2)
            self._splits = {k: torch.from_numpy(v.astype(np.int64)).to(self.device) for k, v in splits.items()}
        return self._splits

    def lm_batch(self, gen: torch.Generator, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.splits["train"]
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen).to(self.device)
        idx = starts[:, None] + torch.arange(seq_len + 1, device=self.device)  # (B, T + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def train(self, model: TitansLM, steps: int, next_batch, lr: float,
              evaluate: Callable[[], float] | None = None, every: int = 0, cuda_graph: bool = False) -> dict[str, Any]:
        """AdamW + warm-up + cosine, bf16 autocast, gradient clipping at 1; returns wall time and last losses.
        Stops early at the part's deadline (then `truncated` is True and `steps` says how many ran). With
        `evaluate` and `every`, its value every that many steps (`val_curve`, [step, value] pairs); `train_s`
        leaves the evaluations out (and includes the capture and compilation of the first step).

        `cuda_graph`: the model's training forward and backward are captured as CUDA graphs at the first step and
        replayed (the Lightning module's `cuda_graph`; the batch shape must stay fixed); the optimizer and the
        evaluations run eagerly."""
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=self.device.type == "cuda")
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1)))))
        model.train()
        losses, curve = [], []
        evaluating = 0.0

        def validate(step: int) -> None:
            nonlocal evaluating
            self.sync()
            t = time.perf_counter()
            curve.append([step, evaluate()])
            model.train()
            evaluating += time.perf_counter() - t

        # autocast's weight cast cache must be off while capturing (PyTorch's CUDA-graph notes)
        amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if cuda_graph else self.amp
        self.sync()
        start = time.perf_counter()
        for step in range(steps):
            if step and step % 10 == 0 and self.out_of_time():
                break
            if evaluate and every and step and step % every == 0:
                validate(step)
            x, y = next_batch()
            if cuda_graph and not step:
                with amp:  # in place: in eval mode the module runs its eager forward
                    torch.cuda.make_graphed_callables(model, (x,))
            with amp:
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(loss.detach())
        self.sync()
        tail = torch.stack(losses[-10:]).float().mean().item()
        bad = (~torch.stack(losses).isfinite()).nonzero()
        stats = {"train_s": time.perf_counter() - start - evaluating, "steps": len(losses),
                 "truncated": len(losses) < steps, "train_loss": tail, "finite": not len(bad),
                 "first_non_finite_step": int(bad[0]) if len(bad) else None}
        return {**stats, "val_curve": curve} if evaluate and every else stats

    def fit_lm(self, model: TitansLM) -> tuple[dict[str, Any], float]:
        """Train `model` on the lm part's batches (`--steps`, `--batch`, `--seq-len`, `--lr`, the same for every
        model) and return `train`'s stats and the validation loss after it. The stats hold that validation's bits
        per byte over `--val-positions` spans of the sequence (`val_bpb_by_position`); with `--val-every` it ends the
        curve, and `val_position_curve` holds every validation's spans."""
        a = self.args
        gen = torch.Generator().manual_seed(a.seed)
        by_position: list[list[float]] = []

        def validate() -> float:
            loss, positions = self.val_by_position(model, a.seq_len, a.val_batches, a.val_positions)
            by_position.append([x / math.log(2) for x in positions])
            return loss

        stats = self.train(model, a.steps, lambda: self.lm_batch(gen, a.batch, a.seq_len), a.lr,
                           lambda: validate() / math.log(2), a.val_every, cuda_graph=a.cuda_graph)
        loss = validate()
        if a.val_every:
            stats["val_curve"].append([stats["steps"], loss / math.log(2)])
            stats["val_position_curve"] = [[step, row] for (step, _), row in zip(stats["val_curve"], by_position)]
        stats["val_bpb_by_position"] = by_position[-1]
        return stats, loss

    @torch.no_grad()
    def val_by_position(self, model: TitansLM, seq_len: int, batches: int, spans: int) -> tuple[float, list[float]]:
        """Validation loss (nats per token) over `batches` batches of the held-out split, and its mean over each of
        `spans` equal spans of positions in the sequence (first to last): whether a model uses its long context."""
        model.eval()
        data = self.splits["val"]
        n = min(batches * self.args.batch, (len(data) - 1) // seq_len)
        total = torch.zeros(seq_len, dtype=torch.float64, device=self.device)  # summed over the sequences
        for s in range(0, n, self.args.batch):
            idx = (torch.arange(s, min(s + self.args.batch, n), device=self.device) * seq_len)[:, None] + \
                torch.arange(seq_len + 1, device=self.device)
            chunk = data[idx]
            with self.amp:
                logits = model(chunk[:, :-1])
            losses = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")  # (B, T)
            total += losses.sum(0, dtype=torch.float64)
        spans_mean = [x.mean().item() / n for x in total.tensor_split(spans)]
        return total.sum().item() / (n * seq_len), spans_mean

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def forward_flops(self, variant: str, seq_len: int, overrides: dict | None = None) -> float:
        """Forward FLOPs of one sequence, counted on the meta device."""
        from torch.utils.flop_counter import FlopCounterMode

        kw = dict(overrides or {})
        if variant != "transformer":
            kw["memory"] = {"chunk_size": self.args.chunk}
        with torch.device("meta"):
            model = build_titans(variant, self.size, max_len=seq_len, **kw)
            idx = torch.zeros(1, seq_len, dtype=torch.long)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(idx)
        return float(counter.get_total_flops())

    # -- parts --

    def part_lm(self) -> None:
        a = self.args
        for variant in self.args.variants:
            if self.out_of_time():
                self.record(("lm", variant), SKIPPED)
                continue
            try:
                model = self.model(variant)
                stats, loss = self.fit_lm(model)
                row = {"params": sum(p.numel() for p in model.parameters()), **stats, "val_loss": loss,
                       "val_ppl": math.exp(loss), "val_bpb": loss / math.log(2)}
                self.models[variant] = model
            except Exception as exc:  # keep the other variants' numbers
                row = self.failure(exc)
            if "error" in row:
                model = None  # the failed model and the traceback's activations go before `free`
                self.free()
            self.record(("lm", variant), row)
        rows = self.results["lm"]
        ok = measured(rows)
        best = min((v["val_bpb"] for v in ok.values()), default=float("nan"))
        print(f"\nLM, byte level, {a.steps} steps x {a.batch} x {a.seq_len} tokens "
              f"(unigram {self.results.get('unigram_bpb', float('nan')):.3f} bpb, "
              f"bigram on the validation bytes {self.results.get('bigram_val_bpb', float('nan')):.3f})")
        print(f"{'model':12s} {'params':>9s} {'val bpb':>8s} {'val ppl':>8s} {'vs best':>8s} {'train s':>8s} "
              f"{'steps':>6s}")
        for k, v in rows.items():
            if k not in ok:
                print(f"{k:12s} {status(v)}")
                continue
            print(f"{k:12s} {v['params'] / 1e6:8.2f}M {v['val_bpb']:8.4f} {v['val_ppl']:8.3f} "
                  f"{v['val_bpb'] / best:8.3f} {v['train_s']:8.1f} {v['steps']:6d}{' truncated' * v['truncated']}")
            if "val_curve" in v:
                print(f"{'':12s} val bpb by step: " + ", ".join(f"{step}: {bpb:.3f}" for step, bpb in v["val_curve"]))
            if len(v["val_bpb_by_position"]) > 1:
                print(f"{'':12s} val bpb by position: " + " ".join(f"{x:.3f}" for x in v["val_bpb_by_position"]))

    def part_ablation(self) -> None:
        a = self.args
        for name, overrides, paper in (ABLATIONS[key] for key in a.ablations):
            if self.out_of_time():
                self.record(("ablation", "rows", name), {**SKIPPED, "paper_ppl": paper})
                continue
            try:
                lm_row = self.results.get("lm", {}).get("lmm", {})
                if name == "LMM" and "val_loss" in lm_row:  # the lm part trained this very model: its stats and curve
                    loss = lm_row["val_loss"]
                    stats = {k: v for k, v in lm_row.items() if k not in ("params", "val_loss", "val_ppl", "val_bpb")}
                else:
                    model = self.model("lmm", **overrides)
                    stats, loss = self.fit_lm(model)
                    del model
                row = {"val_loss": loss, "val_bpb": loss / math.log(2), "paper_ppl": paper, **stats}
            except Exception as exc:
                row = {**self.failure(exc), "paper_ppl": paper}
            if "error" in row:
                model = None  # the failed model and the traceback's activations go before `free`
                self.free()
            self.record(("ablation", "rows", name), row)
        rows = self.results["ablation"]["rows"]
        ok = measured(rows)
        ours = sorted(ok, key=lambda k: ok[k]["val_bpb"])
        paper = sorted(ok, key=lambda k: ok[k]["paper_ppl"])
        self.results["ablation"].update(order_ours=ours, order_paper=paper, kendall_tau=kendall_tau(ours, paper))
        self.save()
        base = ok.get("LMM", {}).get("val_bpb")
        tau = self.results["ablation"]["kendall_tau"]
        print(f"\nTable 5 ablations (LMM base), {a.steps} steps; Kendall tau of the orderings "
              f"{'n/a' if tau is None else f'{tau:.2f}'} over {len(ok)} variants")
        print(f"{'variant':22s} {'val bpb':>8s} {'vs LMM':>7s} {'paper ppl':>9s}")
        for k in ours:
            rel = f"{ok[k]['val_bpb'] / base:7.3f}" if base else f"{'-':>7s}"  # no LMM row: no ratio
            print(f"{k:22s} {ok[k]['val_bpb']:8.4f} {rel} {ok[k]['paper_ppl']:9.2f}"
                  f"{' truncated' * ok[k].get('truncated', False)}")
            if len(ok[k]["val_bpb_by_position"]) > 1:
                print(f"{'':22s} by position: " + " ".join(f"{x:.3f}" for x in ok[k]["val_bpb_by_position"]))
        for k, v in rows.items():
            if k not in ok:
                print(f"{k:22s} {status(v)}")

    def part_niah(self) -> None:
        a = self.args
        text = load_text(a.text)
        words = word_list(text)
        for variant in self.args.variants:
            if self.out_of_time():
                self.record(("niah", variant), SKIPPED)
                continue
            try:
                model = self.models.get(variant) or self.model(variant)
                gen = np.random.default_rng(a.seed)

                def batch(gen: np.random.Generator = gen) -> tuple[torch.Tensor, torch.Tensor]:
                    seed = int(gen.integers(1 << 30))
                    x, y = niah_batch("passkey", a.niah_train_len, a.niah_batch, seed, text, words)
                    return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

                stats = self.train(model, a.niah_steps, batch, a.lr / 2)
                row = {**stats, "acc": {L: self.niah_accuracy(model, L, text, words) for L in a.niah_lengths}}
            except Exception as exc:
                row = self.failure(exc)
            if "error" in row:
                model = None  # the failed model and the traceback's activations go before `free`
                self.free()
            self.record(("niah", variant), row)
        print(f"\nS-NIAH passkey accuracy (%) after {a.niah_steps} fine-tuning steps at {a.niah_train_len} bytes")
        print(f"{'model':12s} " + " ".join(f"{L:>7d}" for L in a.niah_lengths))
        for k, v in self.results["niah"].items():
            if "acc" in v:
                print(f"{k:12s} " + " ".join(f"{100 * v['acc'][L]:7.1f}" for L in a.niah_lengths)
                      + f"{' truncated' * v['truncated']}")
            else:
                print(f"{k:12s} {status(v)}")

    @torch.no_grad()
    def niah_accuracy(self, model: TitansLM, length: int, text: str, words: list[str]) -> float:
        model.eval()
        correct = 0
        per_batch = max(1, min(self.args.niah_batch, (8 * 1024) // length * 2))
        for start in range(0, self.args.niah_eval, per_batch):
            n = min(per_batch, self.args.niah_eval - start)
            x, y = niah_batch("passkey", length, n, 10_000 + start + length, text, words)
            x, y = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
            with self.amp:
                pred = model(x).argmax(-1)
            target = y != IGNORE
            correct += int(((pred == y) | ~target).all(-1).sum())
        return correct / self.args.niah_eval

    def step_time(self, model: TitansLM, batch: int, seq_len: int, iters: int, cuda_graph: bool = False,
                  profiler: torch.profiler.profile | None = None) -> float:
        """Median seconds of one training step (forward, backward, AdamW) after two warm-up steps; `profiler.step()`
        is called after every step, the warm-up ones included.

        `cuda_graph`: the whole step captured once as a CUDA graph and replayed (PyTorch's whole-network capture),
        which removes the launch and Python overhead of the chunk loop's many small kernels but not their work.
        """
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=self.device.type == "cuda", capturable=cuda_graph)
        x = torch.randint(0, 256, (batch, seq_len), device=self.device)

        # autocast's weight cast cache must be off while capturing (PyTorch's CUDA-graph notes)
        amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if cuda_graph else self.amp

        def train_step() -> None:
            with amp:
                loss = model(x).float().logsumexp(-1).mean()
            loss.backward()
            opt.step()

        run = train_step
        if cuda_graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph, on a side stream, as capture requires
                for _ in range(3):
                    opt.zero_grad(set_to_none=True)
                    train_step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            opt.zero_grad(set_to_none=True)  # the captured backward writes the gradients into the graph's pool
            with torch.cuda.graph(graph):
                train_step()
            run = graph.replay
            probe = next(model.parameters())
            before = probe.detach().clone()
        times = []
        for i in range(iters + 2):
            self.sync()
            t = time.perf_counter()
            run()
            if not cuda_graph:
                opt.zero_grad(set_to_none=True)
            self.sync()
            if i >= 2:
                times.append(time.perf_counter() - t)
            if profiler is not None:
                profiler.step()
        if cuda_graph and torch.equal(before, probe):
            raise RuntimeError("the replayed CUDA graph did not update the weights")
        return float(np.median(times))

    def part_throughput(self) -> None:
        """Every `--variants` row at every length, shortest first (a run out of time loses the longest lengths of
        every variant, not whole variants); the `--rows` rows at their lengths."""
        a = self.args
        rows = [(v, v, set()) for v in a.variants] + [(name, *parse_row(name)) for name in a.rows]
        cuda = self.device.type == "cuda"
        for seq_len in sorted(set(a.seq_lens) | set(a.row_lens)):
            batch = max(1, a.tokens_per_batch // seq_len)
            for name, variant, flags in rows:
                if seq_len not in (a.row_lens if flags else a.seq_lens):
                    continue
                if flags & {"scan", "graph"} and not cuda:
                    self.record(("throughput", name, seq_len), {"skipped": "needs a GPU"})
                    continue
                if self.out_of_time():
                    self.record(("throughput", name, seq_len), SKIPPED)
                    continue
                extra = row_overrides(flags)
                row: dict[str, Any] = {}
                failed = ""
                for backend in dict.fromkeys([a.attn_backend, "sdpa"]):  # FlexAttention, else the SDPA path
                    try:
                        model = self.model(variant, max_len=seq_len, attn_backend=backend, **extra)
                        with scan_backend("auto" if "scan" in flags else "reference"):
                            sec = self.step_time(model, batch, seq_len, a.iters, cuda_graph="graph" in flags)
                        flops = 3 * self.forward_flops(variant, seq_len) * batch
                        row = {"tokens_per_s": batch * seq_len / sec, "step_s": sec, "batch": batch,
                               "tflops": flops / sec / 1e12, "backend": backend,
                               "mfu": flops / sec / 1e12 / self.peak if self.peak else float("nan")}
                        if failed:
                            row["fallback_from"] = failed
                        break
                    except Exception as exc:
                        row = self.failure(exc)
                        failed = f"{backend}: {row['error']}"[:200]
                    model = None
                    self.free()  # outside `except`: the traceback and the activations it held are gone
                    if row["error"] == "out of memory":  # SDPA's dense mask needs more memory, not less
                        break
                model = None
                self.record(("throughput", name, seq_len), row)
        table = self.results["throughput"]
        print(f"\nTraining throughput, bf16, {a.tokens_per_batch} tokens per batch (Figure 9 layout): "
              "ktokens/s (MFU %), ratio to Transformer++")
        lengths = sorted(set(a.seq_lens) | set(a.row_lens))
        print(f"{'model':20s} " + " ".join(f"{'T=' + str(t):>20s}" for t in lengths))
        for name, by_len in table.items():
            cells = []
            for t in lengths:
                r, base = by_len.get(t, {}), table.get("transformer", {}).get(t, {})
                if "tokens_per_s" not in r:
                    cells.append(f"{status(r)[:20]:>20s}")
                    continue
                ratio = r["tokens_per_s"] / base["tokens_per_s"] if "tokens_per_s" in base else float("nan")
                cells.append(f"{r['tokens_per_s'] / 1e3:8.1f} ({100 * r['mfu']:4.1f}) x{ratio:4.2f}")
            print(f"{name:20s} " + " ".join(cells))
        print_errors(table)

    def part_chunk(self) -> None:
        """The memory update alone: B*H memories of head_dim 64, a 2-layer MLP memory (expansion 2)."""
        a = self.args
        d = 16 if a.quick else 64
        bh = 4 if a.quick else 48
        cases = {"token loop b=1 (recurrence)": ("reference", 1, {}),
                 f"token loop b={a.chunk}": ("reference", a.chunk, {}),
                 f"materialized b={a.chunk}": ("materialized", a.chunk, {}),
                 f"dual b={a.chunk}": ("dual", a.chunk, {}),
                 f"dual b={a.chunk} compiled": ("dual", a.chunk, {"compile_step": True})}
        for t in a.chunk_lens:
            torch.manual_seed(0)
            dev = self.device
            weights = tuple(torch.randn(bh, m, n, device=dev).div(m ** 0.5).requires_grad_()
                            for m, n in ((d, 2 * d), (2 * d, d)))
            state = MemoryState(weights, tuple(torch.zeros_like(w) for w in weights))
            k = F.normalize(torch.randn(bh, t, d, device=dev), dim=-1).requires_grad_()
            v, q = torch.randn(bh, t, d, device=dev).requires_grad_(), torch.randn(bh, t, d, device=dev)
            gates = Gates(torch.full((bh, t), 0.02, device=dev), F.logsigmoid(torch.zeros(bh, t, device=dev)),
                          F.logsigmoid(torch.full((bh, t), 4.0, device=dev)))
            for name, (impl, b, kw) in cases.items():
                if self.out_of_time():
                    self.record(("chunk", t, name), SKIPPED)
                    continue
                try:
                    fn = functools.partial(MEMORY_IMPLS[impl], **kw)
                    row = {"seconds": self.time_memory(fn, state, k, v, q, gates, b)}
                except Exception as exc:
                    row = self.failure(exc)
                if "error" in row:
                    self.free()
                self.record(("chunk", t, name), row)
        print(f"\nMemory update forward+backward, {bh} memories x head_dim {d}, ms (speed-up vs the token loop)")
        for t, r in self.results["chunk"].items():
            loop = r.get("token loop b=1 (recurrence)", {}).get("seconds", float("nan"))
            print(f"T={t:6d} " + "  ".join(f"{k}: {v['seconds'] * 1e3:.1f} ms (x{loop / v['seconds']:.1f})"
                                          if "seconds" in v else f"{k}: {status(v)}" for k, v in r.items()))
        print_errors(self.results["chunk"])

    def part_scan(self) -> None:
        """The chunk scan alone: each fast path against the PyTorch reference loop, the fused Triton kernels at the
        2-layer memory shapes of `tiny` and `small`, the parallel prefix scan (`affine.py`) at the linear memory of
        `small` (the linear-memory ablation), without gradient (evaluation) and forward + backward (training). Both
        are measured against the reference in exact float32 (IEEE products): in float32-IEEE the fast paths must
        agree to rounding; with TF32 or bf16 products the recurrence over the chunks amplifies rounding, and the
        reference's own deviation in the same precision is the yardstick for the fast path's. The Triton kernels
        take the surprise clip (at 1.0), the prefix scan does not (the clip is not affine)."""
        from shared.kernels.memory_scan import affine, memory_scan_reference
        from shared.kernels.memory_scan.triton_scan import memory_scan_triton, supports

        a = self.args
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            print("[scan] needs CUDA, or TRITON_INTERPRET=1 on the CPU (tests/test_memory_scan.py compares there)")
            return
        # the memory's widths d_0 .. d_L and the chunk b
        shapes = {"tiny": ((32, 64, 32), 32), "small": ((64, 128, 64), 64), "small_linear": ((64, 64), 64)}
        fast_paths = {"triton": (memory_scan_triton, 1.0), "affine": (affine.memory_scan_affine, None)}
        modes = {"fp32_ieee": (torch.float32, "highest"), "fp32_tf32": (torch.float32, "high"),
                 "bf16": (torch.bfloat16, "high")}
        bh = 4 if a.quick else 48

        def outputs(scan) -> list[torch.Tensor]:
            return [*scan.weights, *scan.momentum, *scan.w0, *scan.s0, *scan.inputs, *scan.deltas]

        def rel_err(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
            return max(float((x.float() - y.float()).abs().max() / y.float().abs().max()) for x, y in zip(xs, ys))

        for t in a.chunk_lens:
            for size, (widths, b) in shapes.items():
                if self.out_of_time():
                    self.record(("scan", t, size), SKIPPED)
                    continue
                fast = "affine" if len(widths) == 2 else "triton"
                fast_scan, clip = fast_paths[fast]
                impls = {"reference": functools.partial(memory_scan_reference, act="silu", max_surprise_norm=clip),
                         fast: (fast_scan if clip is None else functools.partial(fast_scan, max_surprise_norm=clip))}
                layers = len(widths) - 1
                row: dict[str, Any] = {"fast_path": fast, "clip": clip}
                try:
                    g = torch.Generator(device=self.device).manual_seed(0)
                    rand = functools.partial(torch.randn, generator=g, device=self.device)
                    nc, d = t // b, widths[0]
                    state = [rand(bh, d_in, d_out) / d_in ** 0.5 for d_in, d_out in zip(widths, widths[1:])]
                    state += [0.1 * rand(*w.shape) for w in state]
                    # bf16-exact inputs, so that every mode scans the same values
                    data = [x.bfloat16().float() for x in (F.normalize(rand(bh, nc, b, d), dim=-1),
                                                           rand(bh, nc, b, d), -0.1 * rand(bh, nc, b, 2).abs())]
                    decay = 0.5 + 0.5 * torch.rand(bh, nc, 3, generator=g, device=self.device)

                    def scan(impl: str, mode: str, train: bool, state: list[torch.Tensor] = state,
                             data: list[torch.Tensor] = data, decay: torch.Tensor = decay, impls: dict = impls,
                             layers: int = layers):
                        dtype, precision = modes[mode]
                        leaves = [x.clone().requires_grad_() for x in (*state, *(x.to(dtype) for x in data), decay)]
                        with matmul_precision(precision):
                            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
                                with torch.set_grad_enabled(train):
                                    out = impls[impl](tuple(leaves[:layers]), tuple(leaves[layers:2 * layers]),
                                                      *leaves[2 * layers:])
                            if not train:
                                return outputs(out), None
                            loss = sum(x.float().square().mean() for x in outputs(out))
                            return outputs(out), list(torch.autograd.grad(loss, leaves))

                    exact, exact_grads = scan("reference", "fp32_ieee", True)
                    for mode, (dtype, precision) in modes.items():
                        with matmul_precision(precision):
                            supported = fast == "affine" or supports(tuple(state[:layers]), data[0].to(dtype), "silu")
                        if not supported:  # here: the kernels do not fit the GPU's shared memory
                            row[f"{mode}_{fast}"] = "not supported (`supports`: shared memory)"
                        for impl in impls if f"{mode}_{fast}" not in row else ("reference",):
                            values, grads = scan(impl, mode, True)
                            row[f"{mode}_{impl}_err"] = rel_err(values, exact)
                            row[f"{mode}_{impl}_grad_err"] = rel_err(grads, exact_grads)
                            if mode != "fp32_ieee":
                                for phase, train in (("eval", False), ("train", True)):
                                    row[f"{mode}_{phase}_{impl}_ms"] = self.milliseconds(
                                        functools.partial(scan, impl, mode, train), a.iters)
                except Exception as exc:
                    row = self.failure(exc)
                    self.free()
                self.record(("scan", t, size), row)
        print(f"\nMemory chunk scan, {bh} memories: max relative difference to the exact float32 reference of the "
              f"outputs / gradients, reference vs the fast path; ms reference / fast path (speed-up)")
        for t, r in self.results["scan"].items():
            for size, v in r.items():
                if "fp32_ieee_reference_err" not in v:
                    print(f"T={t:6d} {size}: {status(v)}")
                    continue
                fast = v["fast_path"]
                for mode in modes:
                    if f"{mode}_{fast}" in v:
                        print(f"T={t:6d} {size} {mode}: {fast} {v[f'{mode}_{fast}']}")
                        continue
                    line = (f"T={t:6d} {size} {mode} ({fast}): diff {v[f'{mode}_reference_err']:.1e} vs "
                            f"{v[f'{mode}_{fast}_err']:.1e}, grad diff {v[f'{mode}_reference_grad_err']:.1e} vs "
                            f"{v[f'{mode}_{fast}_grad_err']:.1e}")
                    if f"{mode}_eval_{fast}_ms" in v:
                        line += "; " + "  ".join(
                            f"{phase} {v[f'{mode}_{phase}_reference_ms']:.2f} / {v[f'{mode}_{phase}_{fast}_ms']:.2f} "
                            f"(x{v[f'{mode}_{phase}_reference_ms'] / v[f'{mode}_{phase}_{fast}_ms']:.1f})"
                            for phase in ("eval", "train"))
                    print(line)
        print_errors(self.results["scan"])

    def part_scan_time(self) -> None:
        """The fused scan kernels' own device time (profiler), forward and backward, for one memory layer at Figure
        9's shapes: the `small` memory (64 -> 128 -> 64, b = 64, bf16 under autocast, no surprise clip) and
        6 heads x `--tokens-per-batch` / T memories of T / 64 chunks at each of `--seq-lens`. As T grows at a fixed
        number of tokens the memories get fewer and their chunks more, and the kernels walk each memory's chunks in
        order: this is the part of a training step that grows with T. Also the most memory one forward + backward
        allocates beyond what was allocated before it (its copies of the inputs included). GPU only."""
        from torch.profiler import ProfilerActivity, profile

        from shared.kernels.memory_scan.triton_scan import memory_scan_triton

        a = self.args
        if self.device.type != "cuda":
            print("[scan_time] needs CUDA")
            return
        d, dh, b, iters = 64, 128, 64, 3
        for t in a.seq_lens:
            if self.out_of_time():
                self.record(("scan_time", t), SKIPPED)
                continue
            bh, nc = 6 * a.tokens_per_batch // t, t // b
            try:
                g = torch.Generator(device=self.device).manual_seed(0)
                rand = functools.partial(torch.randn, generator=g, device=self.device)
                state = [rand(bh, d, dh) / d ** 0.5, rand(bh, dh, d) / dh ** 0.5]
                state += [0.1 * rand(*w.shape) for w in state]
                # the model's scale of -2 theta K (theta_max = 0.0016), where the unclipped memory stays finite
                data = [F.normalize(rand(bh, nc, b, d), dim=-1), rand(bh, nc, b, d), -0.003 * rand(bh, nc, b, 2).abs()]
                decay = 0.9 + 0.1 * torch.rand(bh, nc, 3, generator=g, device=self.device)

                def step(inputs: tuple = (*state, *data, decay)) -> None:
                    leaves = [x.clone().requires_grad_() for x in inputs]
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = memory_scan_triton(tuple(leaves[:2]), tuple(leaves[2:4]), *leaves[4:])
                    outputs = [*out.weights, *out.momentum, *out.w0, *out.s0, *out.inputs, *out.deltas]
                    torch.autograd.backward(outputs, [torch.ones_like(x) for x in outputs])

                self.sync()
                before = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                step()
                self.sync()
                peak_mb = (torch.cuda.max_memory_allocated(self.device) - before) / 2 ** 20
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(iters):
                        step()
                    self.sync()
                ms = {kind: sum(e.device_time for e in prof.events() if e.name == f"_memory_scan_{kind}"
                                and e.device_type.name == "CUDA") / iters / 1e3
                      for kind in ("fwd", "bwd", "bwd_outputs")}
                row = {"memories": bh, "chunks": nc, "fwd_ms": ms["fwd"], "bwd_ms": ms["bwd"] + ms["bwd_outputs"],
                       "bwd_sequential_ms": ms["bwd"], "bwd_parallel_ms": ms["bwd_outputs"],
                       "us_per_chunk": (ms["fwd"] + ms["bwd"]) / nc * 1e3, "peak_mb": peak_mb}
            except Exception as exc:
                row = self.failure(exc)
                self.free()
            self.record(("scan_time", t), row)
        print(f"\nMemory scan kernels, one layer of the small memory, {a.tokens_per_batch} tokens (device ms)")
        for t, v in self.results.get("scan_time", {}).items():
            print(f"T={t:6d}: {status(v)}" if "fwd_ms" not in v else
                  f"T={t:6d} {v['memories']:4d} memories x {v['chunks']:4d} chunks: forward {v['fwd_ms']:.3f}, "
                  f"backward {v['bwd_ms']:.3f} ms (sequential {v['bwd_sequential_ms']:.3f} + parallel "
                  f"{v['bwd_parallel_ms']:.3f}; {v['us_per_chunk']:.1f} us a chunk in sequence; "
                  f"{v['peak_mb']:,.0f} MB allocated at the peak of one forward + backward)")
        print_errors({"scan_time": self.results.get("scan_time", {})})

    def part_profile(self) -> None:
        """One training step per variant, profiled: wall time (unprofiled), device busy time, work by kind and the
        costliest operators (by the device time of the kernels they launch; on the CPU, by their own time)."""
        from torch.profiler import ProfilerActivity, profile, schedule

        a = self.args
        cuda = self.device.type == "cuda"
        seq_len, batch = a.profile_len, max(1, a.tokens_per_batch // a.profile_len)
        for variant in a.profile_variants:
            if self.out_of_time():
                self.record(("profile", variant), SKIPPED)
                continue
            try:
                base, flags = parse_row(variant)
                model = self.model(base, max_len=seq_len, attn_backend=a.attn_backend, **row_overrides(flags))
                wall = self.step_time(model, batch, seq_len, a.iters)
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                steps = schedule(wait=0, warmup=2, active=a.profile_steps, repeat=1)  # step_time's warm-up, then
                with profile(activities=activities, schedule=steps) as prof:
                    self.step_time(model, batch, seq_len, a.profile_steps, profiler=prof)
                row = {"step_s": wall, "batch": batch, "tokens_per_s": batch * seq_len / wall,
                       **profile_summary(prof.key_averages(), a.profile_steps, wall, cuda)}
            except Exception as exc:
                row = self.failure(exc)
            model = None
            self.free()
            self.record(("profile", variant), row)
        print(f"\nWhere a training step goes (T={seq_len}, batch {batch}; no CUDA graph, {'device' if cuda else 'CPU'} "
              "time per step): wall ms, busy %, then each kind's share")
        for variant, r in self.results["profile"].items():
            if "kinds" not in r:
                print(f"{variant:12s} {status(r)}")
                continue
            busy = f"{100 * r['busy_fraction']:5.1f}" if r["busy_fraction"] is not None else "  -  "
            print(f"{variant:12s} {1e3 * r['step_s']:8.1f} {busy}  " +
                  "  ".join(f"{kind}: {100 * k['share']:.0f}%" for kind, k in r["kinds"].items()))
            for op in r["top_ops"][:5]:
                print(f"{'':14s}{100 * op['share']:5.1f}%  {op['calls_per_step']:6.0f} calls  {op['name'][:90]}")
        print_errors({"profile": self.results["profile"]})

    def part_precision(self) -> None:
        """`compile_step`'s numbers: one training step of each memory variant of `--variants` (batch 2 x `--seq-len`,
        random bytes), eager and with the memory's `compile_step`, both under the bench's bf16 autocast (off on the
        CPU, where the scan is the reference), against the same weights in float32 with IEEE products and the
        reference scan. The loss of each, and each parameter's gradient error as a relative norm (median and
        largest over the parameters): compiled should be as far from float32 as eager, no farther."""
        a = self.args
        gen = torch.Generator().manual_seed(a.seed)
        x = torch.randint(0, 256, (2, a.seq_len + 1), generator=gen).to(self.device)

        def loss_and_grads(model: TitansLM, amp) -> tuple[float, dict[str, torch.Tensor]]:
            model.zero_grad(set_to_none=True)
            with amp:
                logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

        def errors(grads: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> dict[str, Any]:
            err = {n: float((grads[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in exact.items()}
            worst = max(err, key=err.get)
            return {"median": float(np.median(list(err.values()))), "max": err[worst], "max_param": worst}

        for variant in (v for v in a.variants if v != "transformer"):
            if self.out_of_time():
                self.record(("precision", variant), SKIPPED)
                continue
            try:
                eager = self.model(variant, max_len=a.seq_len)
                compiled = self.model(variant, max_len=a.seq_len, **row_overrides({"compile"}))
                compiled.load_state_dict(eager.state_dict())
                with scan_backend("reference"), matmul_precision("highest"):
                    loss_fp32, exact = loss_and_grads(eager, torch.autocast(self.device.type, enabled=False))
                loss_eager, grads_eager = loss_and_grads(eager, self.amp)
                loss_compiled, grads_compiled = loss_and_grads(compiled, self.amp)
                row = {"loss_fp32": loss_fp32, "loss_eager": loss_eager, "loss_compiled": loss_compiled,
                       "grads_eager": errors(grads_eager, exact), "grads_compiled": errors(grads_compiled, exact),
                       "grads_compiled_vs_eager": errors(grads_compiled, grads_eager)}
            except Exception as exc:
                row = self.failure(exc)
            eager = compiled = None
            self.free()
            self.record(("precision", variant), row)
        print(f"\ncompile_step against eager, one training step (batch 2 x {a.seq_len}): losses (float32 / eager / "
              "compiled); gradients' relative error to float32, median / largest over the parameters")
        for variant, r in self.results.get("precision", {}).items():
            if "loss_fp32" not in r:
                print(f"{variant:5s} {status(r)}")
                continue
            grads = "  ".join(f"{key} {r[key]['median']:.2e} / {r[key]['max']:.2e}"
                              for key in ("grads_eager", "grads_compiled", "grads_compiled_vs_eager"))
            print(f"{variant:5s} {r['loss_fp32']:.6f} / {r['loss_eager']:.6f} / {r['loss_compiled']:.6f}  {grads}")
        print_errors({"precision": self.results.get("precision", {})})

    def part_attention(self) -> None:
        """Compiled FlexAttention vs the SDPA dense-mask path (values and gradients), on the GPU only."""
        from shared.blocks.attention.segmented import segmented_attention
        from shared.blocks.attention.sliding_window import sliding_window_attention

        if self.device.type != "cuda":
            print("[attention] needs CUDA (the CPU comparison is in tests/test_sliding_window.py)")
            return
        torch.manual_seed(0)
        t, seg, n_p = 2048, 256, 4
        cases = {
            "sliding window 256 + prefix 4": (lambda q, k, v, be: sliding_window_attention(q, k, v, 256, n_p, be), t),
            "segmented 256, aligned memory": (
                lambda q, k, v, be: segmented_attention(q, k, v, seg, n_p, seg, True, be), n_p + 2 * t),
        }
        for name, (fn, n_kv) in cases.items():
            for dtype in (torch.float32, torch.bfloat16):
                key = f"{name} {str(dtype).split('.')[-1]}"
                if self.out_of_time():
                    self.record(("attention", key), SKIPPED)
                    continue
                q = torch.randn(2, 6, t, 64, device=self.device, dtype=dtype, requires_grad=True)
                k = torch.randn(2, 6, n_kv, 64, device=self.device, dtype=dtype, requires_grad=True)
                v = torch.randn(2, 6, n_kv, 64, device=self.device, dtype=dtype, requires_grad=True)
                outs = {}
                for backend in ("flex", "sdpa"):
                    try:
                        o = fn(q, k, v, backend)
                        g = torch.autograd.grad(o.float().square().sum(), (q, k, v))
                        outs[backend] = (o.float(), [x.float() for x in g])
                    except Exception as exc:
                        outs[backend] = self.failure(exc)
                if all(isinstance(x, tuple) for x in outs.values()):
                    (o1, g1), (o2, g2) = outs["flex"], outs["sdpa"]
                    row = {"max_abs_out": (o1 - o2).abs().max().item(),
                           "max_rel_grad": max(((a - b).norm() / b.norm()).item() for a, b in zip(g1, g2))}
                else:
                    row = {"error": "; ".join(f"{b}: {x['error']}" for b, x in outs.items() if isinstance(x, dict))}
                self.record(("attention", key), row)

    def time_memory(self, fn, state, k, v, q, gates, b) -> float:
        """Median seconds of the memory update's forward and backward, after one warm-up call."""
        times = []
        for i in range(1 + self.args.chunk_iters):
            self.sync()
            t = time.perf_counter()
            with self.amp:
                reads, _ = fn(state, k, v, q, gates, b)
            reads.float().square().mean().backward()
            self.sync()
            if i:
                times.append(time.perf_counter() - t)
        return float(np.median(times))


SKIPPED = {"skipped": "time budget"}


@contextlib.contextmanager
def matmul_precision(value: str):
    """`torch.set_float32_matmul_precision(value)` for the duration of the block ('highest': IEEE, 'high': TF32)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextlib.contextmanager
def scan_backend(value: str):
    """`FORMERLAB_MEMORY_SCAN=value` (shared/kernels/memory_scan) for the duration of the block."""
    from shared.kernels.memory_scan import ENV_VAR

    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_VAR)
        else:
            os.environ[ENV_VAR] = before


def parse_row(name: str) -> tuple[str, set[str]]:
    """'mag+scan+graph' -> ('mag', {'scan', 'graph'}): a `--rows` name, checked."""
    variant, *flags = name.split("+")
    if variant not in VARIANTS or set(flags) - set(ROW_FLAGS) or len(set(flags)) != len(flags):
        raise ValueError(f"row {name!r}: expected <variant>[+flag...] with a variant of {list(VARIANTS)} and "
                         f"distinct flags of {list(ROW_FLAGS)}")
    return variant, set(flags)


def row_overrides(flags: set[str]) -> dict[str, Any]:
    """The model overrides of a row's flags: `compile` is the memory's `compile_step` (the others act on the run)."""
    return {"memory": {"compile_step": True}} if "compile" in flags else {}


def measured(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The rows with a finite validation loss: a diverged model's NaN would sort as the best and corrupt the order."""
    return {k: v for k, v in rows.items() if math.isfinite(v.get("val_bpb", math.nan))}


def status(row: dict[str, Any]) -> str:
    """A table cell for an item without numbers: 'skipped' (budget), 'diverged (NaN from step n)', 'error: <reason>'
    or '-' (not asked for)."""
    if not row:
        return "-"
    if "skipped" in row:
        return "skipped"
    if "val_bpb" in row:
        step = row.get("first_non_finite_step")
        return "diverged" + (f" (NaN from step {step})" if step is not None else "")
    return "error: " + ("OOM" if row["error"] == "out of memory" else row["error"].split(":")[0])


def print_errors(table: dict[Any, dict[Any, dict[str, Any]]]) -> None:
    """The full reason of every error cell of a two-level table."""
    for outer, inner in table.items():
        for key, row in inner.items():
            if "error" in row:
                print(f"  error {outer} {key}: {row['error']}")


def work_kind(name: str) -> str:
    return next(kind for kind, pattern in WORK_KINDS if re.search(pattern, name, re.IGNORECASE))


def profile_summary(events, steps: int, wall_s: float, cuda: bool, top: int = 12) -> dict[str, Any]:
    """Per-step numbers of a profile's averaged events. On a GPU the kernels (events on the device) give the busy
    time and the kinds, and the CPU operators are ranked by the device time of the kernels they launch themselves;
    on the CPU the operators' own times stand in for both."""
    # The schedule's step annotation ("ProfilerStep#n") spans the whole step on the device's timeline too; it is no
    # kernel, and counting it would put the busy time above the wall time.
    measured = [e for e in events if not e.key.startswith("ProfilerStep")]
    device_events = [e for e in measured if e.device_type != torch.autograd.DeviceType.CPU] if cuda else []
    ops = [e for e in measured if e.device_type == torch.autograd.DeviceType.CPU]

    def seconds(e) -> float:  # microseconds in the profile, summed over the profiled steps
        return (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6 / steps

    work = device_events if cuda else ops
    total = sum(seconds(e) for e in work) or float("nan")
    kinds: dict[str, dict[str, float]] = {kind: {"s_per_step": 0.0, "launches_per_step": 0.0} for kind, _ in WORK_KINDS}
    for e in work:
        kind = kinds[work_kind(e.key)]
        kind["s_per_step"] += seconds(e)
        kind["launches_per_step"] += e.count / steps
    for kind in kinds.values():
        kind["share"] = kind["s_per_step"] / total

    def costliest(candidates, per_step: str) -> list[dict[str, Any]]:
        ranked = sorted((e for e in candidates if seconds(e) > 0), key=seconds, reverse=True)[:top]
        return [{"name": e.key, "s_per_step": seconds(e), "share": seconds(e) / total, per_step: e.count / steps}
                for e in ranked]

    summary = {"busy_s": total if cuda else None, "busy_fraction": total / wall_s if cuda else None,
               "kinds": kinds, "top_ops": costliest(ops, "calls_per_step")}
    if cuda:
        summary["kernels_per_step"] = sum(e.count for e in device_events) / steps
        summary["top_kernels"] = costliest(device_events, "launches_per_step")
    return summary


def kendall_tau(a: list[str], b: list[str]) -> float | None:
    """Rank agreement of two orderings of the same items (1: identical, -1: reversed); None for fewer than two
    items, which have no pair to agree on."""
    pos = {k: i for i, k in enumerate(b)}
    n, s = len(a), 0
    if n < 2:
        return None
    for i in range(n):
        for j in range(i + 1, n):
            s += 1 if pos[a[i]] < pos[a[j]] else -1
    return s / (n * (n - 1) // 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="lm,ablation,niah,throughput,chunk,attention")
    p.add_argument("--max-seconds", type=float, default=540, help="total budget, shared among the parts that run")
    p.add_argument("--json", default="titans.json", help="file name of the results under $OUT")
    p.add_argument("--text", default=None, help="a text file (the cached Wikipedia excerpt)")
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (smoke test)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--chunk", type=int, default=64, help="memory chunk size b")
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument("--val-every", type=int, default=0,
                   help="lm / ablation parts: validation every this many steps as well (a curve; 0: at the end only)")
    p.add_argument("--val-positions", type=int, default=8,
                   help="lm / ablation parts: validation bits per byte also over this many equal spans of positions")
    p.add_argument("--cuda-graph", action="store_true",
                   help="lm / ablation parts: replay each model's training forward and backward as CUDA graphs")
    p.add_argument("--niah-steps", type=int, default=60)
    p.add_argument("--niah-batch", type=int, default=8)
    p.add_argument("--niah-train-len", type=int, default=1024)
    p.add_argument("--niah-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8192])
    p.add_argument("--niah-eval", type=int, default=32)
    p.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8192])
    p.add_argument("--tokens-per-batch", type=int, default=32768)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--chunk-lens", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048])
    p.add_argument("--chunk-iters", type=int, default=2)
    p.add_argument("--rows", type=lambda s: [x for x in s.split(",") if x], default=["lmm+compile"],
                   help="throughput rows <variant>+<flag>+... with flags compile, scan, graph ('' for none; "
                        "e.g. lmm+scan+graph,mag+scan+compile)")
    p.add_argument("--row-lens", type=lambda s: [int(x) for x in s.split(",")], default=[1024],
                   help="lengths of the --rows rows (a compile row compiles anew at each, ~a minute)")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "flex", "sdpa"], help="throughput part")
    p.add_argument("--train-backend", default="sdpa", choices=["auto", "flex", "sdpa"], help="quality parts")
    p.add_argument("--profile-variants", type=lambda s: [x for x in s.split(",") if x],
                   default=["transformer", "lmm", "mac", "mag"], help="profile part")
    p.add_argument("--profile-len", type=int, default=4096, help="profile part: sequence length")
    p.add_argument("--profile-steps", type=int, default=3, help="profile part: profiled training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", type=lambda s: [x for x in s.split(",") if x], default=list(VARIANTS),
                   help="models of the lm / niah / throughput parts (comma-separated)")
    p.add_argument("--ablations", type=lambda s: [x for x in s.split(",") if x], default=list(ABLATIONS),
                   help="rows of the ablation part (comma-separated; all by default)")
    p.add_argument("--memory", type=json.loads, default={},
                   help='NeuralMemory overrides for every memory variant, JSON (e.g. \'{"eta_max": 0.8}\')')
    if p.parse_known_args()[0].quick:  # tiny defaults; flags given explicitly still win
        p.set_defaults(steps=3, batch=2, seq_len=64, val_batches=1, chunk=16, niah_steps=2, niah_batch=2,
                       niah_train_len=256, niah_lengths=[256, 512], niah_eval=2, seq_lens=[64, 128],
                       tokens_per_batch=256, iters=1, chunk_lens=[64], chunk_iters=1, row_lens=[64],
                       profile_len=128, profile_steps=1)
    args = p.parse_args()
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PART_SHARE]
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {list(PART_SHARE)}")
    if not 1 <= args.val_positions <= args.seq_len:
        p.error(f"--val-positions {args.val_positions}: give 1 to --seq-len ({args.seq_len}) spans of positions")
    if args.cuda_graph and (args.quick or not torch.cuda.is_available()):
        p.error("--cuda-graph captures the training step on a GPU; this run is on the CPU")
    if args.cuda_graph and "niah" in parts:
        p.error("--cuda-graph: the niah part fine-tunes the lm part's models at another shape; run it without")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch._dynamo.config.cache_size_limit = 64  # compiled FlexAttention / chunk step per mask and shape
    if set(args.variants) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(set(args.variants) - set(VARIANTS))}; choose from {list(VARIANTS)}")
    if set(args.ablations) - set(ABLATIONS):
        p.error(f"--ablations: unknown {sorted(set(args.ablations) - set(ABLATIONS))}; choose from {list(ABLATIONS)}")
    for flag, allowed in (("rows", set(ROW_FLAGS)), ("profile_variants", {"compile"})):
        for name in getattr(args, flag):
            try:
                if parse_row(name)[1] - allowed:
                    raise ValueError(f"row {name!r}: flags here are {sorted(allowed)}")
            except ValueError as exc:
                p.error(f"--{flag.replace('_', '-')}: {exc}")
    bench = Bench(args)
    bench.run(parts)
    bench.save()
    print(f"\ntotal {bench.results['total_s']:.0f} s" +
          (f"; wrote {Path(os.environ['OUT']) / args.json}" if os.environ.get("OUT") else ""))


if __name__ == "__main__":
    main()
