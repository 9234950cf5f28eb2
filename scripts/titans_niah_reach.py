#!/usr/bin/env python
"""Which S-NIAH needles does a trained Titans model find beyond the reach of its attention?

A needle the attention cannot see from the answer can only reach it through the neural memory. For every test
sample of a finished `experiment=titans/niah_by_length` run (or any NIAH run with `data.test_lengths`) this finds
the needle's value in the context (RULER's " is: <value>." sentence), asks whether attention alone connects each
value byte to the position that predicts it, and splits the exact-match accuracy into needles within and beyond
that reach:

    python scripts/titans_niah_reach.py outputs/titans/<run_id>             # its test lengths, 256 samples each
    python scripts/titans_niah_reach.py <run dir> --lengths 512,1024 --samples 512 --ckpt <file>

Reach per architecture (no information moves between tokens outside attention and memory):
  transformer   every earlier token;
  mag, mal      L stacked windows of w keys (itself included): at most L (w - 1) tokens back;
  mac           the same segment only (segmented attention never crosses a segment boundary, in any layer);
  lmm           no attention: nothing but the token itself.

The samples are the run's own test samples (its data config and seeds). Prints a table and writes
$OUT/titans_niah_reach.json when OUT is set. CPU is enough (a tiny model, 256 samples of 1 KB: about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from projects.titans.data import TitansDataModule  # noqa: E402
from projects.titans.model import TitansLM  # noqa: E402
from projects.titans.module import IGNORE  # noqa: E402
from shared.lit.evaluate import load_module  # noqa: E402


def attention_sees(model: TitansLM, src: int, dst: int) -> bool:
    """Can the token at `src` influence the output at `dst` >= src through the model's attention alone?"""
    if src == dst or model.variant == "transformer":
        return True
    if model.variant == "lmm":
        return False
    if model.variant == "mac":
        segment = model.blocks[0].segment_len
        return src // segment == dst // segment
    reach = sum(block.attn.window - 1 for block in model.blocks)  # mag, mal: windows stack layer by layer
    return dst - src <= reach


def needle_value_start(tokens: np.ndarray, answer_start: int, value: bytes) -> int:
    """Position of the needle's value in the context before the answer (the " is: <value>." of RULER's template)."""
    context = tokens[:answer_start].tobytes()
    found = context.find(b" is: " + value + b".")
    if found < 0 or context.find(b" is: " + value + b".", found + 1) >= 0:
        raise ValueError(f"the needle ' is: {value.decode()}.' occurs {context.count(b' is: ' + value)} times "
                         f"in the context, not once")
    return found + len(b" is: ")


def sample_reach(model: TitansLM, x: torch.Tensor, y: torch.Tensor) -> tuple[bool, int]:
    """For one sample (inputs x, targets y, IGNORE except at the answer): whether attention alone connects every
    value byte to the input position that predicts it, and the distance between the two."""
    answer = (y != IGNORE).nonzero()[:, 0]  # input positions that predict the answer bytes
    value = bytes(y[answer].tolist())
    tokens = np.append(x.numpy(), y[-1].item()).astype(np.uint8)  # the sample: inputs and the last target
    start = needle_value_start(tokens, int(answer[0]) + 1, value)
    within = all(attention_sees(model, start + k, int(pos)) for k, pos in enumerate(answer))
    return within, int(answer[0]) - start


@torch.no_grad()
def reach_table(model: TitansLM, data: TitansDataModule, lengths: list[int], samples: int, batch: int = 16
                ) -> list[dict]:
    rows = []
    for length, dataset in zip(data.test_lengths or [data.seq_len], data.test_sets):
        if length not in lengths:
            continue
        n = min(samples, len(dataset))
        correct, within, distance = [], [], []
        for first in range(0, n, batch):
            xs, ys = zip(*(dataset[i] for i in range(first, min(first + batch, n))))
            x, y = torch.stack(xs), torch.stack(ys)
            hit = (model(x).argmax(-1) == y) | (y == IGNORE)
            correct += hit.all(dim=-1).tolist()
            for xi, yi in zip(x, y):
                w, d = sample_reach(model, xi, yi)
                within.append(w)
                distance.append(d)
        c, w = np.array(correct), np.array(within)
        rows.append({"length": length, "samples": n, "accuracy": float(c.mean()), "within_reach": int(w.sum()),
                     "accuracy_within": float(c[w].mean()) if w.any() else None,
                     "beyond_reach": int((~w).sum()),
                     "accuracy_beyond": float(c[~w].mean()) if (~w).any() else None,
                     "median_distance": float(np.median(distance))})
    return rows


def load_run(run_dir: Path, ckpt: Path | None) -> tuple[TitansLM, TitansDataModule, dict]:
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise SystemExit(f"{config_file}: not found (a train.py run directory has it)")
    cfg = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    if cfg["data"].get("task") != "niah":
        raise SystemExit(f"{config_file}: data.task={cfg['data'].get('task')!r}, this analysis needs niah")
    ckpt = ckpt or run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise SystemExit(f"{ckpt}: no checkpoint (pass --ckpt)")
    model = load_module(OmegaConf.create(cfg), ckpt).model.eval()
    data = TitansDataModule(**{k: v for k, v in cfg["data"].items() if k != "_target_"})
    data.setup("test")
    return model, data, cfg


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a train.py run directory (config.yaml, checkpoints/)")
    parser.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default <run_dir>/checkpoints/last.ckpt)")
    parser.add_argument("--lengths", default="", help="comma-separated test lengths (default: all of the run's)")
    parser.add_argument("--samples", type=int, default=256, help="test samples per length (at most the run's)")
    args = parser.parse_args(argv)
    model, data, cfg = load_run(args.run_dir, args.ckpt)
    tested = data.test_lengths or [data.seq_len]
    lengths = [int(v) for v in args.lengths.split(",")] if args.lengths else tested
    if set(lengths) - set(tested):
        raise SystemExit(f"--lengths {args.lengths}: the run tested {tested} (data.test_lengths in "
                         f"{args.run_dir / 'config.yaml'}); {sorted(set(lengths) - set(tested))} are not among them")
    rows = reach_table(model, data, lengths, args.samples)
    print(f"{cfg['model']['net']['name']} ({args.run_dir}): S-NIAH exact match by needle reach")
    print("length  samples  accuracy  within reach (acc)  beyond reach (acc)  median distance")

    def pct(v: float | None) -> str:
        return "  -  " if v is None else f"{100 * v:5.1f}"

    for r in rows:
        print(f"{r['length']:6d}  {r['samples']:7d}  {pct(r['accuracy'])}   {r['within_reach']:5d} "
              f"({pct(r['accuracy_within'])})       {r['beyond_reach']:5d} ({pct(r['accuracy_beyond'])})      "
              f"{r['median_distance']:7.0f}")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "titans_niah_reach.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"run": str(args.run_dir), "model": cfg["model"]["net"]["name"], "rows": rows},
                                  indent=1))
    return rows


if __name__ == "__main__":
    main()
