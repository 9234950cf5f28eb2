"""The one path from a composed config to a finished run: build, fit, test, log, clean up.

`train.py` calls `run(cfg)` inside Hydra's job. A project never builds its own Trainer, reads Hydra's global
state, or writes outside `cfg.paths.output_dir`.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from shared.lit.cluster import SubmititLocalEnvironment
from shared.lit.errors import CheckpointError, ConfigError, FormerlabError
from shared.lit.logging import get_logger, route_lightning_logs_through_hydra
from shared.lit.registry import REPO_ROOT

log = get_logger(__name__)


def run(cfg: DictConfig) -> float | None:
    """Train (and test) the configured project; returns `cfg.optimized_metric` for sweepers."""
    route_lightning_logs_through_hydra()
    try:
        return _run(cfg)
    except FormerlabError as err:
        log.error(f"error: {err}")
        raise SystemExit(1) from None
    except SIGTERMException:
        log.error("interrupted by SIGTERM; resume with ckpt_path=last")
        raise SystemExit(143) from None
    finally:
        _finish_wandb()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # while the interpreter is still whole: left to Lightning's atexit hook, a gloo rank of the 2-process CPU
            # tests once aborted at exit ("terminate called without an active exception") after a finished run
            torch.distributed.destroy_process_group()


def _run(cfg: DictConfig) -> float | None:
    if cfg.get("project") is None or cfg.get("model") is None:
        raise ConfigError("no project chosen: python train.py project=<name>")
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "high"))
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    datamodule = build("data", cfg.data)
    module = build("model", cfg.model)
    callbacks = [build(f"callbacks.{name}", node) for name, node in cfg.get("callbacks", {}).items() if node]
    loggers = [build(f"logger.{name}", node) for name, node in cfg.get("logger", {}).items() if node]
    ranks = {"plugins": [SubmititLocalEnvironment()]} if SubmititLocalEnvironment.detect() else {}
    trainer: pl.Trainer = build("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False, **ranks)
    if trainer.strategy.root_device.type == "cpu" and trainer.world_size > 1:
        # CPU ranks share the cores: without this each would start one thread per core and oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // trainer.num_devices))

    config = OmegaConf.to_container(cfg, resolve=True)
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, output_dir / "config.yaml")
    for lg in trainer.loggers:
        lg.log_hyperparams({**config, "git": git_state()})

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir / "checkpoints")
    if cfg.get("init_from") and ckpt_path is None:
        warm_start(module, cfg.init_from, cfg.project.name)
    elif cfg.get("init_from"):
        log.info(f"resuming from {ckpt_path}: init_from={cfg.init_from} is not used")
    _check_test_ckpt(cfg.get("test_ckpt"), trainer)
    with checkpoint_errors(ckpt_path, cfg.project.name):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if cfg.get("test", True) and _has_test(datamodule):
        test_ckpt = _test_checkpoint(cfg.get("test_ckpt"), trainer)
        trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, weights_only=True if test_ckpt else None)

    if cfg.get("optimized_metric"):
        value = trainer.callback_metrics.get(cfg.optimized_metric)
        return None if value is None else float(value)
    return None


def build(section: str, node: DictConfig, **kwargs: Any) -> Any:
    """`instantiate(node)` with plain containers, turning a misspelt key into one line that names it."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if isinstance(cause, TypeError) and target and "unexpected keyword argument" in str(cause):
            bad = str(cause).split("'")[-2]
            params = _parameters(target)
            raise ConfigError(
                f"{section}.{bad}: {target} has no parameter '{bad}'; it takes {', '.join(params)}"
            ) from None
        if isinstance(cause, FormerlabError):
            raise cause from None
        raise


def _parameters(target: str) -> list[str]:
    try:
        signature = inspect.signature(get_class(target).__init__)
    except Exception:  # the target is a function, or not importable: nothing more to say
        return []
    return [name for name in signature.parameters if name not in ("self", "args", "kwargs")]


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
    """`last` -> this run's last.ckpt (starting fresh, loudly, when there is none yet); a requeued SLURM job
    (SLURM_RESTART_COUNT > 0) resumes from it by itself; any other value must be an existing file."""
    last = checkpoint_dir / "last.ckpt"
    if ckpt_path is None and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 and last.is_file():
        log.info(f"requeued SLURM job: resuming from {last}")
        return str(last)
    if ckpt_path == "last":
        if last.is_file():
            log.info(f"resuming from {last}")
            return str(last)
        log.warning(f"ckpt_path=last but {last} does not exist yet: starting from scratch")
        return None
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such file")
    return ckpt_path


def warm_start(module: pl.LightningModule, path: str, project: str) -> None:
    """`init_from`: load the weights of a Lightning checkpoint of this project into `module` (strictly), leaving the
    optimiser, schedule and step count to start afresh."""
    if not Path(path).is_file():
        raise CheckpointError(f"init_from={path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with arbitrary objects, a truncated file, ...
        raise CheckpointError(f"init_from={path}: cannot be read as a weights-only checkpoint ({exc})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"init_from={path}: not a checkpoint of train.py (it has no state_dict)")
    with checkpoint_errors(f"init_from={path}", project):
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    log.info(f"weights from {path} (step {checkpoint.get('global_step', '?')}); optimiser and schedule start afresh")


class checkpoint_errors:
    """Turns Lightning's state-dict mismatch on resume into one line naming the checkpoint and the model."""

    def __init__(self, ckpt_path: str | None, project: str) -> None:
        self.ckpt_path, self.project = ckpt_path, project

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        if self.ckpt_path and isinstance(err, RuntimeError) and "loading state_dict" in str(err):
            first = next((line.strip() for line in str(err).splitlines() if "keys" in line), str(err)[:200])
            raise CheckpointError(
                f"{self.ckpt_path} does not fit this {self.project} model ({first[:300]})"
            ) from None
        return False


def _best_checkpoint(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback that selects on a validation metric (`callbacks.best_checkpoint`), if any."""
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)


def _check_test_ckpt(test_ckpt: str | None, trainer: pl.Trainer) -> None:
    """Refuse a bad `test_ckpt` before training, not after it."""
    if test_ckpt is None:
        return
    if test_ckpt != "best":
        raise ConfigError(f"test_ckpt={test_ckpt!r}: use null (the final weights) or best")
    if _best_checkpoint(trainer) is None:
        raise ConfigError("test_ckpt=best needs a monitored checkpoint: set callbacks.best_checkpoint.monitor "
                          "(and .mode) to a validation metric")


def _test_checkpoint(test_ckpt: str | None, trainer: pl.Trainer) -> str | None:
    """The checkpoint `test_ckpt` names after fitting: None (the final weights) or the monitored best (the final
    weights, with a warning, when validation never ran, as in `debug=fast`)."""
    if test_ckpt is None:
        return None
    checkpoint = _best_checkpoint(trainer)
    if not checkpoint.best_model_path:
        log.warning(f"test_ckpt=best: validation never ran, so nothing was selected on {checkpoint.monitor} "
                    "(see trainer.val_check_interval): testing the final weights")
        return None
    log.info(f"testing {checkpoint.best_model_path} ({checkpoint.monitor} = {float(checkpoint.best_model_score):.4f})")
    return checkpoint.best_model_path


def _has_test(datamodule: Any) -> bool:
    return type(datamodule).test_dataloader is not pl.LightningDataModule.test_dataloader


def git_state() -> dict[str, Any]:
    """The commit the run used, and whether the working tree had uncommitted changes."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
            return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    return {"commit": commit or "unknown", "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _finish_wandb() -> None:
    """Without this, every job of a multirun after the first logs into the first job's W&B run."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
