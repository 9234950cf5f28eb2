#!/usr/bin/env python
"""Long Range Arena on one GPU, plain PyTorch (no Hydra, no Lightning).

Speed (the paper's Table 2 layout): training steps per second and peak memory of the Text-task Transformer
(4 layers, 256 wide, batch 32) with each attention variant at sequence lengths 1K-4K, bf16 autocast, one run:

    python scripts/bench_lra.py                       # all variants, 1024..4096
    python scripts/bench_lra.py --quick               # a tiny CPU smoke run

Training (reproduction of the paper's Transformer row on generated data, bf16, a wall-clock budget):

    python scripts/bench_lra.py --train listops --minutes 4         # target: within 2 points of 36.37
    python scripts/bench_lra.py --train pathfinder32 --minutes 4    # target: >= 71.40
    python scripts/bench_lra.py --train listops --minutes 8 --fp32  # float32, as the official runs

ListOps follows the official recipe (96k/2k/2k generated examples, batch 32, 5,000 steps, Adam(0.9, 0.98, 1e-9),
weight decay 0.1, linear warm-up 1,000 then rsqrt decay, peak lr 0.05 / sqrt(1000)) and stops early only if the
budget runs out. Pathfinder-32 follows its recipe (batch 512, lr 1e-3, one epoch of warm-up, cosine decay, no
weight decay) with as many steps as the budget allows after a timed warm-up; the official run is 200 epochs of
160k images, far more than a few minutes. For a run longer than one command, fix its schedule with `--steps`
(62,500 is the recipe's 200 epochs): a run saves its whole state to $OUT/<task>_state.pt when `--minutes` stops
it or it finishes, `--resume <that file>` continues a stopped run exactly (same batches, same dropout draws, same
schedule) and `--init-from <that file>` starts another run from its weights (the easy-to-hard curriculum). Data
generation runs on every CPU core and its rate is printed; generated data is cached (`FORMERLAB_CACHE`, default
~/.cache/formerlab). `--augment dihedral` shows each Pathfinder training image under a random one of the square's eight
symmetries (not in the paper; the label does not change). Training evaluates the validation split
every `--eval-every` steps and reports the test accuracy of the best-validation weights (the official protocol) next
to that of the final weights.

`--recipe nystromformer` trains Pathfinder-32 as the Nystromformer LRA code trains its softmax baseline (a 2-layer,
64-wide model, AdamW(0.9, 0.999, 1e-6) at lr 1e-4, batch 256, warm-up 312 steps then linear decay, 62,500 steps),
the PyTorch recipe under which later papers report ~74 % for this Transformer (see the project README).

Is the generated Pathfinder data learnable at all? The same images, split and budget flags, but a small dilated
ResNet (593K parameters, AdamW 2e-3, batch 256) instead of the Transformer; it should leave chance within a few
epochs (on an H200: 87 % test after one minute, 89 % after three; see the project README):

    python scripts/bench_lra.py --train pathfinder32 --train-size 160000 --val-size 2000 --test-size 20000 \
        --probe-cnn --minutes 3

The masked-attention NaN check (seconds; see `shared/blocks/attention/softmax.py`, `MASKED_BACKENDS`):

    python scripts/bench_lra.py --check-sdpa

Results go to stdout and, when `OUT` is set, to $OUT/bench_lra.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from projects.lra import tasks  # noqa: E402
from projects.lra.model import create_model  # noqa: E402
from shared.data.synthetic import listops  # noqa: E402
from shared.lit.optim import build_optimizer, build_scheduler  # noqa: E402

VARIANTS = {
    "softmax": {"name": "softmax"},
    "local": {"name": "local", "block_size": 50},
    "linformer": {"name": "linformer", "k": 16},
    "linear": {"name": "linear"},
    "performer": {"name": "performer", "nb_features": 256},
}
PAPER_TABLE2 = {  # Transformer, steps/s and GB at 1K/2K/3K/4K (the paper's Table 2, TPU v3; from memory, see README)
    "softmax": {"steps_per_s": [8.1, 4.9, 2.3, 1.4], "memory_gb": [0.85, 2.65, 5.51, 9.48]},
}


def cuda_time(fn, iters: int) -> float:
    """Median seconds of `fn()` over `iters` calls, timed with CUDA events (wall clock on CPU)."""
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def autocast(device: torch.device, bf16: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------------
# Speed and memory


def time_variant(variant: str, n: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Median training-step time and peak memory of the Text-task model with `variant` at length `n`."""
    torch.manual_seed(0)
    kwargs = dict(max_len=n, attention=VARIANTS[variant])
    if args.quick:
        kwargs.update(emb_dim=32, qkv_dim=32, mlp_dim=64, num_layers=1)
    model = create_model("text_transformer", **kwargs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(1, 257, (args.batch, n), device=device)
    targets = torch.randint(0, 2, (args.batch,), device=device)

    def step() -> None:
        with autocast(device):
            loss = F.cross_entropy(model(tokens).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = cuda_time(step, args.iters)
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        return {"steps_per_s": 1.0 / seconds, "memory_gb": memory}
    except torch.OutOfMemoryError:
        return {"steps_per_s": float("nan"), "memory_gb": float("inf")}


def bench_speed(args: argparse.Namespace, device: torch.device) -> dict:
    lengths = [int(n) for n in args.lengths.split(",")]
    variants = args.variants.split(",")
    results: dict[str, dict[int, dict]] = {}
    for variant in variants:
        results[variant] = {}
        for n in lengths:
            results[variant][n] = time_variant(variant, n, args, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"  {variant:<10} N={n:<5} {results[variant][n]['steps_per_s']:8.2f} steps/s "
                  f"{results[variant][n]['memory_gb']:7.2f} GB", flush=True)

    base = results.get("softmax")
    print(f"\nLRA Table 2 layout: Text task model, batch {args.batch}, bf16, {device} "
          f"(speed-up and memory relative to softmax/SDPA in this run)")
    header = "".join(f"{n:>16}" for n in lengths)
    print(f"{'steps/s':<12}{header}")
    for variant in variants:
        cells = []
        for n in lengths:
            r = results[variant][n]
            ratio = f" ({r['steps_per_s'] / base[n]['steps_per_s']:.2f}x)" if base and variant != "softmax" else ""
            cells.append(f"{r['steps_per_s']:.2f}{ratio}".rjust(16))
        print(f"{variant:<12}{''.join(cells)}")
    print(f"{'memory GB':<12}{header}")
    for variant in variants:
        cells = []
        for n in lengths:
            r = results[variant][n]
            ratio = f" ({r['memory_gb'] / base[n]['memory_gb']:.2f}x)" if base and variant != "softmax" else ""
            cells.append(f"{r['memory_gb']:.2f}{ratio}".rjust(16))
        print(f"{variant:<12}{''.join(cells)}")
    print(f"paper (TPU v3 4x4) Transformer steps/s {PAPER_TABLE2['softmax']['steps_per_s']}, "
          f"GB {PAPER_TABLE2['softmax']['memory_gb']}")
    return {"device": str(device), "batch": args.batch, "lengths": lengths,
            "results": {v: {str(n): r for n, r in rs.items()} for v, rs in results.items()}}


# ----------------------------------------------------------------------------------------------------------------
# The masked-SDPA NaN of pytorch/pytorch#196678 on this GPU


def check_sdpa(device: torch.device, quick: bool) -> dict:
    """Non-finite entries of dQ from masked SDPA, PyTorch's default dispatch vs `shared.blocks.attention`'s `sdpa`.

    The conditions of the cuDNN bug: an explicit key mask (the LRA padding mask, (B, 1, 1, N)), a key length of
    64 modulo 128, and query rows whose logsumexp is below -88.7 (every logit about -120 here, as attention logits
    grown at a high learning rate can be). Lengths 768 and 1,024 are controls; attention dropout 0.1 is what the
    LRA models train with.
    """
    from shared.blocks.attention.softmax import sdpa

    b, h = (1, 1) if quick else (4, 8)
    results = {}
    for n in (704, 768, 1024, 1984):
        gen = torch.Generator(device).manual_seed(0)
        q, k = (0.1 * torch.randn(b, h, n, 64, device=device, generator=gen) for _ in range(2))
        v = torch.randn(b, h, n, 64, device=device, generator=gen)
        q[..., 0], k[..., 0] = 1.0, -120.0 * 8  # every logit ~ -120
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool, device=device)
        mask[-1, ..., n - 100:] = False  # padded keys in the last sequence
        grad_out = torch.randn(b, h, n, 64, device=device, generator=gen).to(torch.bfloat16)
        for p in (0.0, 0.1):
            row = {}
            if device.type == "cuda":
                grads = [t.detach().requires_grad_() for t in (q, k, v)]  # the choice depends on training
                choice = int(torch._fused_sdp_choice(*grads, attn_mask=mask, dropout_p=p))
                row["default_backend"] = SDPBACKEND_NAMES.get(choice, str(choice))
            for name in ("default", "shared_sdpa"):
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                if name == "default":
                    out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, dropout_p=p)
                else:
                    out = sdpa(*leaves, mask, dropout_p=p)
                out.backward(grad_out)
                row[f"{name}_nonfinite_dq"] = int((~torch.isfinite(leaves[0].grad)).sum())
            results[f"N={n} dropout={p}"] = row
            print(f"  N={n:<5} dropout {p}: " + "  ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    default_bad = sum(row["default_nonfinite_dq"] > 0 for row in results.values())
    shared_bad = sum(row["shared_sdpa_nonfinite_dq"] > 0 for row in results.values())
    print(f"\nmasked SDPA: non-finite dQ in {default_bad} of {len(results)} cases with PyTorch's default dispatch, "
          f"in {shared_bad} with shared.blocks.attention's sdpa (expected 0)")
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "results": results}


SDPBACKEND_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


# ----------------------------------------------------------------------------------------------------------------
# Data generation on every core


def _listops_chunk(job: tuple[int, int, dict[str, int]]) -> list[tuple[str, int]]:
    count, seed, bounds = job
    return listops.generate(count, seed, **bounds)


def listops_data(sizes: dict[str, int], seed: int, workers: int, **bounds: int) -> dict[str, tasks.SequenceDataset]:
    """The official generator on `workers` processes (one stream each), deduplicated across streams; `bounds`:
    min_length / max_length other than the official 500 / 2000."""
    total = sum(sizes.values())
    per = -(-total * 11 // 10 // workers)  # 10% spare for duplicates between streams
    t = time.time()
    with ProcessPoolExecutor(workers) as pool:
        chunks = list(pool.map(_listops_chunk, [(per, seed * 1000 + w, bounds) for w in range(workers)]))
    rows = list(dict.fromkeys(row for chunk in chunks for row in chunk))[:total]
    rate = len(rows) / (time.time() - t)
    print(f"ListOps generation: {len(rows)} examples in {time.time() - t:.1f} s "
          f"({rate:.0f}/s on {workers} processes)")
    random.Random(seed).shuffle(rows)
    out, start = {}, 0
    for split in ("train", "val", "test"):
        part = rows[start:start + sizes[split]]
        start += sizes[split]
        out[split] = tasks.SequenceDataset([np.asarray(listops.encode(s), dtype=np.int8) for s, _ in part],
                                           [label for _, label in part])
    return out


def pathfinder_data(sizes: dict[str, int], seed: int, workers: int, difficulty: str
                    ) -> dict[str, tasks.SequenceDataset]:
    from shared.data.text import cache_dir

    t = time.time()
    data = tasks.generated_pathfinder("pathfinder32", sizes, seed, cache_dir(), difficulty, workers)
    n = sum(len(d) for d in data.values())
    print(f"Pathfinder-32 data: {n} images ready in {time.time() - t:.1f} s "
          f"({n / max(time.time() - t, 1e-9):.0f}/s on {workers} processes; instant when cached)")
    return data


def pathfinder_splits(args: argparse.Namespace, workers: int) -> dict[str, tasks.SequenceDataset]:
    sizes = ({"train": args.train_size, "val": args.val_size, "test": args.test_size} if not args.quick
             else {"train": 64, "val": 8, "test": 32})
    return pathfinder_data(sizes, args.seed if args.data_seed is None else args.data_seed, workers, args.difficulty)


# ----------------------------------------------------------------------------------------------------------------
# A convolutional probe of the Pathfinder data


class ResidualBlock(torch.nn.Module):
    """x + BN(conv3x3(ReLU(BN(dilated conv3x3(x))))), then ReLU."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x))))))


def probe_cnn_model(channels: int = 64) -> torch.nn.Module:
    """Images (B, 1, H, W) in [0, 1] -> logits (B, 2). Dilations 1-8 twice: the receptive field (63 pixels)
    spans a whole 32x32 image, which a path between the two markers needs."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, channels, 3, padding=1, bias=False), torch.nn.BatchNorm2d(channels), torch.nn.ReLU(),
        *(ResidualBlock(channels, d) for d in (1, 2, 4, 8, 1, 2, 4, 8)),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(channels, 2))


def probe_cnn(data: dict[str, tasks.SequenceDataset], budget_s: float, device: torch.device, seed: int,
              batch_size: int = 256, max_epochs: int | None = None) -> dict:
    """Train the probe for `budget_s` seconds or `max_epochs` epochs, whichever ends first (whole epochs, the last
    one cut at the time budget), and report the validation and test accuracy (%) after every epoch and the test
    accuracy at the best validation epoch."""
    torch.manual_seed(seed)

    def images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = np.asarray(data[split].sequences, dtype=np.float32) / 255.0  # (N, H * W)
        side = math.isqrt(pixels.shape[1])
        x = torch.from_numpy(pixels).view(-1, 1, side, side).to(device)  # (N, 1, H, W)
        return x, torch.from_numpy(data[split].labels).to(device)

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = images("train"), images("val"), images("test")
    model = probe_cnn_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)

    @torch.no_grad()
    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        model.eval()
        correct = 0
        for start in range(0, len(x), 1024):
            with autocast(device):
                correct += int((model(x[start:start + 1024]).argmax(-1) == y[start:start + 1024]).sum())
        model.train()
        return 100.0 * correct / len(x)

    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(x_train))
    epochs, t0 = [], time.time()
    while time.time() - t0 < budget_s and len(epochs) != max_epochs:
        order = torch.randperm(len(x_train), generator=generator).to(device)
        losses = []
        for start in range(0, len(x_train) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            with autocast(device):
                loss = F.cross_entropy(model(x_train[index]).float(), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            if time.time() - t0 > budget_s:
                break
        epochs.append({"epoch": len(epochs) + 1, "seconds": round(time.time() - t0, 1),
                       "train_loss": float(torch.stack(losses).mean()),
                       "val": accuracy(x_val, y_val), "test": accuracy(x_test, y_test)})
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in epochs[-1].items()),
              flush=True)
    best = max(epochs, key=lambda e: e["val"])
    majority = 100.0 * max(float(y_test.float().mean()), 1 - float(y_test.float().mean()))
    print(f"\nCNN probe: test accuracy {best['test']:.2f} at the best validation epoch {best['epoch']} "
          f"(val {best['val']:.2f}); majority class {majority:.2f}")
    return {"epochs": epochs, "best_epoch": best["epoch"], "test_accuracy": best["test"], "majority": majority,
            "params": sum(p.numel() for p in model.parameters())}


def probe_pathfinder(args: argparse.Namespace, device: torch.device) -> dict:
    data = pathfinder_splits(args, args.workers or os.cpu_count() or 1)
    return probe_cnn(data, (args.minutes or (0.1 if args.quick else 3.0)) * 60, device, args.seed)


# ----------------------------------------------------------------------------------------------------------------
# Training


class DeviceData:
    """A whole split on the device: tokens padded to the longest sequence (int16) and labels; the lengths stay on
    the host, so that cutting a batch to its longest sequence needs no device-to-host copy."""

    def __init__(self, dataset: tasks.SequenceDataset, device: torch.device, pad_multiple: int = 128) -> None:
        self.lengths = np.asarray([len(seq) for seq in dataset.sequences])
        tokens = np.zeros((len(self.lengths), self.lengths.max()), dtype=np.int16)
        for i, seq in enumerate(dataset.sequences):
            tokens[i, :len(seq)] = seq
        self.tokens = torch.from_numpy(tokens).to(device)
        self.labels = torch.from_numpy(dataset.labels).to(device)
        self.pad_multiple = pad_multiple

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, generator: torch.Generator | None, skip: int = 0):
        """Batches of (tokens (B, width) int64, labels); shuffled, dropping the remainder, with a generator, in
        order and complete without; the first `skip` batches are left out (a resumed epoch). The width is the
        batch's longest sequence rounded up to `pad_multiple` (at most the split's longest): padded keys are masked
        and ListOps pools the CLS token (Pathfinder images all have 1,024 tokens), so the outputs are those of the
        unrounded batch, and at most 16 widths instead of hundreds keep kernel plans, the allocator and
        torch.compile warm."""
        n = len(self)
        if generator is None:
            order, stop = torch.arange(n), n
        else:
            order, stop = torch.randperm(n, generator=generator), n - batch_size + 1
        lengths, order_on_device = self.lengths[order.numpy()], order.to(self.labels.device)  # one copy per epoch
        for start in range(skip * batch_size, stop, batch_size):
            longest = int(lengths[start:start + batch_size].max())
            width = min(-(-longest // self.pad_multiple) * self.pad_multiple, self.tokens.shape[1])
            index = order_on_device[start:start + batch_size]
            yield self.tokens[index, :width].long(), self.labels[index]


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DeviceData, batch_size: int, device: torch.device, bf16: bool) -> float:
    model.eval()
    correct = 0
    for tokens, labels in data.batches(batch_size, None):
        with autocast(device, bf16):
            correct += int((model(tokens).argmax(-1) == labels).sum())
    model.train()
    return correct / len(data)


def train(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    workers = args.workers or os.cpu_count() or 1
    args.minutes = args.minutes or (0.5 if args.quick else 4.0)
    budget = args.minutes * 60
    schedule_budget = (args.schedule_minutes or args.minutes) * 60  # > budget: a run continued with --resume
    if args.train == "listops":
        sizes = ({"train": 96_000, "val": 2_000, "test": 2_000} if not args.quick
                 else {"train": 256, "val": 32, "test": 64})
        data = listops_data(sizes, args.seed, workers, **({"min_length": 20, "max_length": 200} if args.quick else {}))
        model_name, batch_size, total_steps = "listops_transformer", 32, 5000 if not args.quick else 4
        optim = dict(name="adamw", lr=0.05 / math.sqrt(1000), weight_decay=0.1, betas=(0.9, 0.98), eps=1e-9)
        sched = dict(name="rsqrt", warmup_steps=1000)
    else:
        data = pathfinder_splits(args, workers)
        if args.recipe == "nystromformer":  # lra_config.py / run_tasks.py of the Nystromformer LRA code
            model_name, batch_size, total_steps = "pathfinder32_transformer_nystromformer", 256, 62_500
            optim = dict(name="adamw", lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-6)
            # OneCycleLR(anneal_strategy="linear"): from lr / 25 up to lr in 312 steps, then linearly to ~0
            sched = dict(name="linear", warmup_steps=312, warmup_start_factor=1 / 25, min_lr=0.0)
        else:
            model_name, batch_size, total_steps = "pathfinder32_transformer", 512, None
            optim = dict(name="adamw", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.98), eps=1e-9)
            sched = dict(name="cosine", warmup_steps=max(1, len(data["train"]) // batch_size), min_lr=0.0)
        batch_size = 16 if args.quick else batch_size
        total_steps = 4 if args.quick and total_steps else total_steps
    tiny = dict(num_layers=1, emb_dim=32, qkv_dim=32, mlp_dim=64, max_len=2000)
    kwargs = {**(tiny if args.quick and args.train == "listops" else {}), **json.loads(args.model_kwargs)}
    model = create_model(model_name, **kwargs).to(device)
    if args.init_from:  # a warm start (e.g. from the easy level), with a fresh optimiser and schedule
        start_state = torch.load(args.init_from, map_location=device, weights_only=True)
        if not isinstance(start_state, dict) or start_state.get("model") != model_name:
            saved = start_state.get("model") if isinstance(start_state, dict) else None
            raise SystemExit(f"--init-from {args.init_from}: weights of {saved or 'no model of this bench'}, this "
                             f"run trains {model_name}")
        model.load_state_dict(start_state["weights"])
    if args.compile:
        model.compile()  # in place: the state-dict keys stay those of the eager model, so --resume works across both
    optimizer = build_optimizer(model, **optim)
    train_data = DeviceData(data["train"], device, args.pad_multiple)
    val_data = DeviceData(data["val"], device, args.pad_multiple)
    test_data = DeviceData(data["test"], device, args.pad_multiple)
    eval_batch = 256 if args.train == "listops" else 1024
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = len(train_data) // batch_size
    total_steps = args.steps or total_steps
    state = torch.load(args.resume, map_location=device, weights_only=True) if args.resume else None
    if state is not None:
        total_steps = args.steps or state["total_steps"]
        saved_augment = state.get("augment", "none")  # states saved before --augment existed had none
        if (state["total_steps"] != total_steps or state["seed"] != args.seed or state["model"] != model_name
                or saved_augment != args.augment):
            raise SystemExit(f"--resume {args.resume}: saved for {state['model']}, seed {state['seed']}, "
                             f"{state['total_steps']} steps, augment {saved_augment}; this run is {model_name}, "
                             f"seed {args.seed}, {total_steps} steps, augment {args.augment}")
        for _ in range(state["step"] // steps_per_epoch):  # replay the epochs' shuffles, so the data order resumes
            torch.randperm(len(train_data), generator=generator)

    def stream(skip: int):
        while True:
            yield from train_data.batches(batch_size, generator, skip)
            skip = 0

    it = stream(state["step"] % steps_per_epoch if state else 0)

    orders = None  # main() allows --augment dihedral for Pathfinder only
    if args.augment == "dihedral":
        orders = torch.from_numpy(tasks.dihedral_orders(tasks.PATHFINDER_RESOLUTIONS[args.train])).to(device)

    def step(scheduler=None, number: int = 0) -> torch.Tensor:
        tokens, labels = next(it)
        if orders is not None:  # symmetry k of example i drawn from (seed, step), so --resume redraws the same
            draw = torch.Generator().manual_seed(args.seed * 1_000_003 + number)
            which = torch.randint(len(orders), (len(tokens),), generator=draw).to(device)
            tokens = tokens.gather(1, orders[which])  # (B, 1024): each image re-read in its symmetry's order
        with autocast(device, not args.fp32):
            loss = F.cross_entropy(model(tokens).float(), labels)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        return loss.detach()

    start = time.time()
    if total_steps is None:  # time a few steps (at lr 0), then fit the schedule to the budget
        lr = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        probe = 5 if args.quick else 30
        for _ in range(probe):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.time() - t) / probe
        for g, value in zip(optimizer.param_groups, lr):
            g["lr"] = value
        total_steps = max(1, int((schedule_budget - (time.time() - start)) * 0.97 / per_step))
        epochs = total_steps / max(steps_per_epoch, 1)
        print(f"{per_step * 1e3:.1f} ms/step -> {total_steps} steps ({epochs:.1f} epochs "
              f"of {len(data['train'])} images) in the budget")
    scheduler = build_scheduler(optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, **sched)
    first = 1
    # The official trainer evaluates on validation every `eval_frequency` steps and the paper reports the model
    # selected there; its final ListOps weights can fall back to the majority class (long-range-arena issue #15).
    val_history: list[list[float]] = []
    best_val, best_step, best_state = -1.0, None, None
    if state is not None:
        model.load_state_dict(state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["cpu_rng"].cpu())  # map_location moved every tensor, the RNG states too
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu())
        val_history = state["val_history"]
        best_val, best_step, best_state = state["best_val"], state["best_step"], state["best_weights"]
        first = state["step"] + 1
        print(f"resumed at step {state['step']} of {total_steps} (best validation {100 * best_val:.2f} at step "
              f"{best_step})")

    def validate(at_step: int) -> float:
        """Validation accuracy at `at_step`, keeping a device copy of the weights when it is the best so far;
        returns the seconds spent, for the training-rate prints to leave out."""
        nonlocal best_val, best_step, best_state
        if device.type == "cuda":
            torch.cuda.synchronize()  # queued training steps are not evaluation time
        t = time.time()
        accuracy = evaluate(model, val_data, eval_batch, device, not args.fp32)
        val_history.append([at_step, accuracy])
        if accuracy > best_val:
            best_val, best_step = accuracy, at_step
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        print(f"step {at_step} val accuracy {100 * accuracy:.2f} (best {100 * best_val:.2f} at step {best_step})",
              flush=True)
        return time.time() - t

    t0 = t_log = time.time()
    losses, done, diverged = [], first - 1, None
    for done in range(first, total_steps + 1):
        losses.append(step(scheduler, done))
        if done % args.log_every == 0:
            window = torch.stack(losses[-args.log_every:])
            now = time.time()
            print(f"step {done}/{total_steps} loss {window.mean():.4f} {args.log_every / (now - t_log):.1f} "
                  f"steps/s ({(done - first + 1) / (now - t0):.1f} since the start)", flush=True)
            t_log = now
            bad = (~torch.isfinite(window)).nonzero()
            if len(bad):
                diverged = done - len(window) + 1 + int(bad[0])
                print(f"the training loss is not finite at step {diverged}: stopping (the final-weights test "
                      f"accuracy below is that of the broken weights)")
                break
        out_of_time = time.time() - start > budget
        if args.eval_every and (done % args.eval_every == 0 or done == total_steps or out_of_time):
            # Shift the window's start past the evaluation: resetting it to now would credit the steps before the
            # evaluation to the time after it.
            t_log += validate(done)
        if out_of_time:
            print(f"budget of {args.minutes} min reached at step {done}")
            break
    train_seconds = time.time() - t0
    if os.environ.get("OUT") and diverged is None:  # finished runs too: their weights can start the next level
        path = Path(os.environ["OUT"]) / f"{args.train}_state.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model_name, "seed": args.seed, "total_steps": total_steps, "step": done,
                    "augment": args.augment,
                    "weights": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "cpu_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                    "val_history": val_history, "best_val": best_val, "best_step": best_step,
                    "best_weights": best_state}, path)
        print(f"stopped at step {done} of {total_steps}: state saved to {path} (continue with --resume)"
              if done < total_steps else f"finished: state saved to {path} (warm-start with --init-from)")
    final_accuracy = evaluate(model, test_data, eval_batch, device, not args.fp32)
    if best_state is not None:
        model.load_state_dict(best_state)
        accuracy = evaluate(model, test_data, eval_batch, device, not args.fp32)
        headline = (f"test accuracy {100 * accuracy:.2f} with the best-validation weights (step {best_step}, "
                    f"val {100 * best_val:.2f}), {100 * final_accuracy:.2f} with the final weights")
    else:
        accuracy = final_accuracy
        headline = f"test accuracy {100 * accuracy:.2f} with the final weights (no validation)"
    counts = np.bincount(data["test"].labels, minlength=2)
    target = {"listops": "within 2 points of 36.37", "pathfinder32": ">= 71.40"}[args.train]
    print(f"\n{args.train}: {headline} (paper Transformer, selected by validation: "
          f"{ {'listops': 36.37, 'pathfinder32': 71.40}[args.train]}; target {target}); majority class "
          f"{100 * counts.max() / counts.sum():.2f}; {done} steps in {train_seconds:.0f} s on {device}, "
          f"{'bf16' if device.type == 'cuda' and not args.fp32 else 'float32'}")
    return {"task": args.train, "test_accuracy": accuracy, "final_test_accuracy": final_accuracy,
            "best_val_accuracy": best_val if best_state is not None else None, "best_val_step": best_step,
            "val_history": val_history, "eval_every": args.eval_every,
            "steps": done, "train_seconds": train_seconds, "first_non_finite_step": diverged,
            "device": str(device), "batch_size": batch_size, "train_examples": len(data["train"]),
            "augment": args.augment,
            "majority": float(counts.max() / counts.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", choices=["listops", "pathfinder32"], help="train instead of the speed table")
    parser.add_argument("--check-sdpa", action="store_true",
                        help="only check masked SDPA for the NaN gradients of pytorch/pytorch#196678 (seconds)")
    parser.add_argument("--minutes", type=float, default=None, help="training budget (wall clock; 4, --quick 0.5)")
    parser.add_argument("--fp32", action="store_true", help="train in float32 (the official precision), no autocast")
    parser.add_argument("--train-size", type=int, default=40_000, help="generated Pathfinder training images")
    parser.add_argument("--val-size", type=int, default=200, help="generated Pathfinder validation images")
    parser.add_argument("--test-size", type=int, default=2_000, help="generated Pathfinder test images")
    parser.add_argument("--difficulty", default="curv_contour_length_14", help="Pathfinder level")
    parser.add_argument("--model-kwargs", default="{}",
                        help='JSON overrides of the model factory, e.g. \'{"learn_pos_emb": true}\'')
    parser.add_argument("--steps", type=int, default=0,
                        help="training steps of the schedule (0: ListOps' 5,000, Pathfinder fits the budget, "
                             "a resumed run keeps its own)")
    parser.add_argument("--schedule-minutes", type=float, default=0.0,
                        help="fit Pathfinder's schedule to this many minutes (default --minutes); more than --minutes "
                             "plans a run that later commands continue with --resume")
    parser.add_argument("--resume", default="",
                        help="a $OUT/<task>_state.pt that a run stopped by its budget saved: continue it exactly")
    parser.add_argument("--recipe", choices=["paper", "nystromformer"], default="paper",
                        help="Pathfinder-32: the paper's released config, or the softmax baseline of the Nystromformer "
                             "LRA code (2 x 64 wide, lr 1e-4, batch 256, 62,500 steps; see the project README)")
    parser.add_argument("--init-from", default="",
                        help="start from the weights of a saved $OUT/<task>_state.pt (fresh optimiser and schedule)")
    parser.add_argument("--probe-cnn", action="store_true",
                        help="with --train pathfinder32: train a small CNN on the same data (is it learnable?)")
    parser.add_argument("--augment", choices=["none", "dihedral"], default="none",
                        help="Pathfinder: show each training image under a random one of the square's 8 symmetries")
    parser.add_argument("--grad-clip", type=float, default=0.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--pad-multiple", type=int, default=128,
                        help="round each training batch's length up to a multiple of this (1: the batch maximum)")
    parser.add_argument("--workers", type=int, default=0, help="data generation processes (0: all cores)")
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=100,
                        help="training steps between validation evaluations (and at the last step; 0: none)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--lengths", default="1024,2048,3072,4096")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=None,
                        help="seed of the generated Pathfinder images (default --seed): another training seed, "
                             "same data")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that works on CPU")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.batch, args.warmup, args.iters, args.log_every = "128,256", 2, 1, 2, 2
        args.eval_every = 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.check_sdpa:
        result, key = check_sdpa(device, args.quick), "sdpa_check"
    elif args.probe_cnn:
        if args.train != "pathfinder32":
            parser.error("--probe-cnn needs --train pathfinder32")
        result, key = probe_pathfinder(args, device), "pathfinder32_cnn_probe"
    elif args.train:
        if args.augment != "none" and args.train != "pathfinder32":
            parser.error("--augment dihedral is for --train pathfinder32")
        result, key = train(args, device), args.train
    else:
        result, key = bench_speed(args, device), "speed"
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_lra.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(path.read_text()) if path.is_file() else {}
        previous[key] = result
        path.write_text(json.dumps(previous, indent=1))


if __name__ == "__main__":
    main()
