"""`evaluate(cfg)`: weights in, the paper's table out (used by eval.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

from shared.lit.errors import CheckpointError, FormerlabError
from shared.lit.logging import get_logger, route_lightning_logs_through_hydra
from shared.lit.runner import build

log = get_logger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    route_lightning_logs_through_hydra()
    try:
        return _evaluate(cfg)
    except FormerlabError as err:
        log.error(f"error: {err}")
        raise SystemExit(1) from None


def _evaluate(cfg: DictConfig) -> dict[str, float]:
    weights = Path(cfg.weights)
    if not weights.is_file():
        raise CheckpointError(f"weights={weights}: no such file")
    datamodule = build("data", cfg.data)
    module = load_module(cfg, weights)
    loggers = [build(f"logger.{name}", node) for name, node in cfg.get("logger", {}).items() if node]
    trainer = build("trainer", cfg.trainer, logger=loggers or False, callbacks=[], enable_checkpointing=False)
    results: dict[str, float] = {}
    for per_loader in trainer.test(module, datamodule=datamodule, verbose=False):
        results.update({k: float(v) for k, v in per_loader.items()})
    table = module.results_table(results) if hasattr(module, "results_table") else _plain_table(results)
    print(table, file=sys.stdout)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"weights": str(weights), **results}, indent=2))
    return results


def load_module(cfg: DictConfig, weights: Path) -> Any:
    """The project's module holding `weights`: a Lightning checkpoint rebuilds the module from its own saved
    hyper-parameters; anything else (official weights) is handed to the module as its `pretrained` argument."""
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    module_cls = get_class(cfg.model._target_)
    if isinstance(checkpoint, dict) and "pytorch-lightning_version" in checkpoint:
        module = module_cls(**checkpoint.get("hyper_parameters", {}))
        try:
            module.load_state_dict(checkpoint["state_dict"], strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{weights} is not a checkpoint of {cfg.model._target_}: {str(err)[:300]}") from None
        return module
    if "pretrained" not in cfg.model:
        raise CheckpointError(
            f"{weights} is not a Lightning checkpoint, and {cfg.model._target_} loads no other weights"
        )
    with open_dict(cfg):
        cfg.model.pretrained = str(weights)
    return build("model", cfg.model)


def _plain_table(results: dict[str, float]) -> str:
    width = max((len(k) for k in results), default=10)
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in sorted(results.items()))
