#!/usr/bin/env python
"""Collect finished LRA runs into the paper's Table 1 (accuracy, %), our number beside the paper's.

    python scripts/lra_table.py                 # every run under outputs/lra
    python scripts/lra_table.py outputs/lra multirun --markdown-out table.md

A run is a directory with the `results.json` that `projects.lra.module.LRAModule` writes after testing (task,
attention, test/accuracy), or, for runs without it, a `config.yaml` and a CSV log (`csv/metrics.csv`) whose last
`test/accuracy` is taken. Rows are attention variants (the paper's name where the paper has the model; any new
variant of `shared/blocks/attention` appears as a new row), columns the tasks; a cell reads `ours (paper)`. A run
of a model other than the task's paper configuration (`<task>_transformer`, e.g. the laptop `listops_tiny` or
`pathfinder32_transformer_nystromformer`) gets its own row, `<variant> [<arch>]`, without paper numbers.
When a (variant, task) has several runs, the newest counts. Avg is over the five tasks without Path-X, as in
the paper, and only when all five are present.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml

COLUMNS = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
           "pathfinder32": "Path", "pathfinder128": "Path-X"}
AVERAGED = ("listops", "text", "retrieval", "image", "pathfinder32")
ROW_NAMES = {"softmax": "Transformer", "local": "Local Attention", "linformer": "Linformer",
             "linear": "Linear Trans.", "performer": "Performer"}
# Table 1 of the paper (and the repository README, 8 Nov 2020); None marks FAIL (chance on Path-X).
PAPER = {
    "Transformer": (36.37, 64.27, 57.46, 42.44, 71.40, None),
    "Local Attention": (15.82, 52.98, 53.39, 41.46, 66.63, None),
    "Sparse Trans.": (17.07, 63.58, 59.59, 44.24, 71.71, None),
    "Longformer": (35.63, 62.85, 56.89, 42.22, 69.71, None),
    "Linformer": (35.70, 53.94, 52.27, 38.56, 76.34, None),
    "Reformer": (37.27, 56.10, 53.40, 38.07, 68.50, None),
    "Sinkhorn Trans.": (33.67, 61.20, 53.83, 41.23, 67.45, None),
    "Synthesizer": (36.99, 61.68, 54.67, 41.61, 69.45, None),
    "BigBird": (36.05, 64.02, 59.29, 40.83, 74.87, None),
    "Linear Trans.": (16.13, 65.90, 53.09, 42.34, 75.30, None),
    "Performer": (18.01, 65.40, 53.82, 42.77, 77.05, None),
}


def row_key(attention: str, task: str, arch: str | None) -> str:
    """The table row of a run: its attention variant, with the model named when it is not the paper's."""
    return attention if arch in (None, f"{task}_transformer") else f"{attention} [{arch}]"


def read_run(folder: Path) -> dict | None:
    """{task, variant, accuracy, time} of one run directory, or None when it has no test result."""
    results = folder / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        if "test/accuracy" in data:
            return {"task": data["task"],
                    "variant": row_key(data.get("attention", "softmax"), data["task"], data.get("arch")),
                    "accuracy": 100 * float(data["test/accuracy"]), "time": results.stat().st_mtime}
    config, metrics = folder / "config.yaml", folder / "csv" / "metrics.csv"
    if config.is_file() and metrics.is_file():
        cfg = yaml.safe_load(config.read_text()) or {}
        values = [row["test/accuracy"] for row in csv.DictReader(metrics.open()) if row.get("test/accuracy")]
        model = cfg.get("model") or {}
        task = model.get("task")
        if values and task:
            attention = (cfg.get("attention") or {}).get("name", "softmax")
            return {"task": task, "variant": row_key(attention, task, model.get("arch")),
                    "accuracy": 100 * float(values[-1]), "time": metrics.stat().st_mtime}
    return None


def collect(roots: list[Path]) -> dict[str, dict[str, float]]:
    """variant -> task -> accuracy (%) of the newest run."""
    newest: dict[tuple[str, str], dict] = {}
    for root in roots:
        candidates = {p.parent for p in root.rglob("results.json")} | {p.parent for p in root.rglob("config.yaml")}
        for folder in sorted(candidates):
            run = read_run(folder)
            if run is None or run["task"] not in COLUMNS:
                continue
            key = (run["variant"], run["task"])
            if key not in newest or run["time"] > newest[key]["time"]:
                newest[key] = run
    table: dict[str, dict[str, float]] = {}
    for (variant, task), run in newest.items():
        table.setdefault(variant, {})[task] = run["accuracy"]
    return table


def cell(ours: float | None, paper: float | None, has_paper_row: bool) -> str:
    theirs = ("FAIL" if paper is None else f"{paper:.2f}") if has_paper_row else None
    if ours is None:
        return f"- ({theirs})" if theirs else "-"
    return f"{ours:.2f} ({theirs})" if theirs else f"{ours:.2f}"


def render(table: dict[str, dict[str, float]]) -> str:
    lines = ["| Model | " + " | ".join(COLUMNS.values()) + " | Avg |", "|---" * (len(COLUMNS) + 2) + "|"]
    order = [v for v in ROW_NAMES if v in table] + sorted(v for v in table if v not in ROW_NAMES)
    for variant in order:
        name = ROW_NAMES.get(variant, variant)
        paper = PAPER.get(name)
        ours = table[variant]
        cells = [cell(ours.get(task), paper[i] if paper else None, paper is not None)
                 for i, task in enumerate(COLUMNS)]
        mine = [ours[t] for t in AVERAGED if t in ours]
        avg_ours = sum(mine) / len(mine) if len(mine) == len(AVERAGED) else None
        avg_paper = sum(paper[:5]) / 5 if paper else None
        cells.append(cell(avg_ours, avg_paper, paper is not None))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="*", default=["outputs/lra"], help="folders searched for runs")
    parser.add_argument("--markdown-out", help="also write the table to this file")
    args = parser.parse_args()
    table = collect([Path(r) for r in args.roots])
    if not table:
        print(f"no finished LRA runs under {', '.join(args.roots)}")
        return
    text = "Accuracy (%), ours (paper Table 1)\n\n" + render(table)
    print(text)
    if args.markdown_out:
        Path(args.markdown_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
