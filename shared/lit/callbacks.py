"""Callbacks every run gets (conf/callbacks/default.yaml): throughput and MFU, the non-finite-loss guard,
a checkpoint on preemption, the best-validation checkpoint, and the random-number state that makes
`ckpt_path=last` resume exactly."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from shared.lit.errors import NonFiniteLossError
from shared.lit.flops import peak_tflops
from shared.lit.logging import get_logger

log = get_logger(__name__)


class Throughput(Callback):
    """Logs `perf/samples_per_s` and `perf/tokens_per_s` (all ranks together) over a sliding window of steps, and
    `perf/tflops` and `perf/mfu` for modules that declare `flops_per_sample()` (training FLOPs of one sample).

    The module may define `samples_in(batch)` and `tokens_in(batch)`; by default a batch's first tensor gives the
    sample count and there are no tokens. Timing is wall-clock between step ends, data loading included.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._times: list[float] = []
        self._samples: list[int] = []
        self._tokens: list[int] = []
        self._flops_per_sample: float | None = None
        self._peak: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fn = getattr(pl_module, "flops_per_sample", None)
        self._flops_per_sample = fn() if callable(fn) else None
        self._peak = peak_tflops(pl_module.device, str(trainer.precision))
        if self._flops_per_sample:
            log.info(f"training FLOPs per sample: {self._flops_per_sample:.4g}")

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if not self._times:
            self._times.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        self._times.append(time.perf_counter())
        self._samples.append(_call_or(pl_module, "samples_in", batch, default=_first_dim(batch)))
        self._tokens.append(_call_or(pl_module, "tokens_in", batch, default=0) or 0)
        if len(self._samples) > self.window:
            self._times.pop(0), self._samples.pop(0), self._tokens.pop(0)
        if len(self._samples) < min(self.window, 3):
            return
        elapsed = self._times[-1] - self._times[0]
        world = trainer.world_size
        samples_per_s = sum(self._samples) * world / elapsed
        metrics = {"perf/samples_per_s": samples_per_s}
        if sum(self._tokens):
            metrics["perf/tokens_per_s"] = sum(self._tokens) * world / elapsed
        if self._flops_per_sample:
            tflops = samples_per_s * self._flops_per_sample / 1e12
            metrics["perf/tflops"] = tflops
            if self._peak:
                metrics["perf/mfu"] = tflops / (self._peak * world)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        pl_module.log("samples/s", samples_per_s, prog_bar=True, on_step=True, on_epoch=False, logger=False)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # validation between epochs is not training time
        self._times.clear(), self._samples.clear(), self._tokens.clear()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._times.clear(), self._samples.clear(), self._tokens.clear()


def _first_dim(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            n = _first_dim(item)
            if n:
                return n
    return 0


def _call_or(module: Any, name: str, batch: Any, default: int) -> int:
    fn = getattr(module, name, None)
    value = fn(batch) if callable(fn) else None
    return default if value is None else int(value)


class NonFiniteLossGuard(Callback):
    """Stops the run, before the update, at the first NaN or Inf training loss or gradient, naming the step.

    The weights are never touched by the bad step, and no checkpoint is written after it, so the last one on
    disk is the last good state. Gradients are checked too because a finite loss can still give NaN gradients
    (e.g. a fused attention kernel's backward); under fp16 (`16-mixed`) the gradient scaler already skips steps
    with Inf gradients by design, so only the loss is checked there.
    """

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self._stop(trainer, f"training loss is {loss.detach().float().mean().item()}")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if str(trainer.precision) == "16-mixed":
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # after DDP's all-reduce every rank holds the same gradients: no collective needed
        if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)).all()):
            self._stop(trainer, "gradients are not finite (the loss was)")

    @staticmethod
    def _stop(trainer: pl.Trainer, what: str) -> None:
        ckpt = trainer.checkpoint_callback
        last = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
        raise NonFiniteLossError(
            f"{what} at step {trainer.global_step} (epoch {trainer.current_epoch}); stopped before the update, {kept}"
        )


class BestCheckpoint(ModelCheckpoint):
    """Keeps the one checkpoint with the best `monitor` (a logged validation metric), `best-step*.ckpt`, for
    `test_ckpt=best`; with `monitor=None` it saves nothing.

    It is a second callback beside the run's `ModelCheckpoint` because a monitored `ModelCheckpoint` rewrites
    `last.ckpt` only when the score improves, which would make `ckpt_path=last` resume from an old step.
    """

    def __init__(self, dirpath: str, monitor: str | None = None, mode: str = "min") -> None:
        super().__init__(dirpath=dirpath, filename="best-step{step:07d}", auto_insert_metric_name=False,
                         monitor=monitor, mode=mode, save_top_k=1 if monitor else 0, save_last=False)

    @property
    def state_key(self) -> str:
        # its own key, so that its state never collides with the run's ModelCheckpoint (both unmonitored by default)
        return self._generate_state_key(kind="best", monitor=self.monitor, mode=self.mode)


class PreemptionCheckpoint(Callback):
    """Saves `last.ckpt` when the run is interrupted, so that `ckpt_path=last` continues it exactly.

    SIGTERM (a kill, or SLURM preemption): Lightning stops at the next step boundary and raises
    `SIGTERMException`; the checkpoint is written then and the run exits with status 143.
    The preemption signal (SIGUSR2, which submitit asks SLURM to send before the time limit) is held until the
    next step boundary, the checkpoint is written, and the signal is handed to submitit, which requeues the
    job; the requeued job resumes from `last.ckpt` (`shared.lit.runner.resolve_ckpt_path`).
    """

    def __init__(self, dirpath: str, preempt_signal: str = "SIGUSR2") -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.preempt_signal = getattr(signal, preempt_signal)
        self._received: int | None = None
        self._previous: Any = None

    def on_fit_start(self, trainer, pl_module) -> None:
        try:
            self._previous = signal.signal(self.preempt_signal, self._hold)
        except ValueError:  # not the main thread: leave signals to whoever owns them
            self._previous = None

    def _hold(self, signum: int, frame: Any) -> None:
        self._received = signum

    def _save(self, trainer: pl.Trainer, why: str) -> None:
        trainer.save_checkpoint(self.path)
        log.info(f"{why} at step {trainer.global_step}: saved {self.path}; resume with ckpt_path=last")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        preempted = self._received is not None
        if trainer.world_size > 1:
            preempted = trainer.strategy.reduce_boolean_decision(preempted, all=False)
        if not preempted:
            return
        self._save(trainer, "preemption signal")
        if self._received is not None and callable(self._previous):
            self._previous(self._received, None)  # submitit: requeue this job, then exit
        trainer.should_stop = True

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save(trainer, "SIGTERM")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None:
            try:
                signal.signal(self.preempt_signal, self._previous)
            except ValueError:
                pass
            self._previous = None


class EMA(EMAWeightAveraging):
    """Lightning's EMA of the weights (validated, tested and saved as the checkpoint's `state_dict`), except that a
    checkpoint written after training ended keeps the trained weights as the weights to resume from.

    Lightning copies the average into the model when training ends and then writes `last.ckpt` (a run stopped by
    `max_steps` between epochs), so the copy became the "current" weights: a run extended from it with
    `ckpt_path=last` continued training from the average instead of the weights it had trained.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._trained_weights: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained_weights = None
        super().on_train_start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained_weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._trained_weights is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._trained_weights


class ExactResume(Callback):
    """Stores every rank's Python, NumPy and torch random state in checkpoints and restores it on resume.

    Together with the loaders of `shared.data.loading` (whose order and augmentation depend on the seed, the
    epoch and the sample only), a resumed run draws the same random numbers as the run it continues.

    Also records a run that `trainer.max_steps` stopped in the middle of an epoch as the mid-epoch state it is:
    Lightning counts that epoch as processed (or completed), and a run extended from the checkpoint (a larger
    `max_steps`, `ckpt_path=last`) would continue with the next epoch's data from the current batch.
    """

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop")
        if not fit_loop:
            return
        epoch, batches = fit_loop["epoch_progress"], fit_loop["epoch_loop.batch_progress"]
        if batches["current"]["completed"] > 0 and not batches["is_last_batch"]:  # stopped inside an epoch
            for counts in (epoch["current"], epoch["total"]):
                counts["processed"] = counts["completed"] = counts["started"] - 1
            checkpoint["epoch"] = epoch["current"]["completed"]

    def state_dict(self) -> dict[str, Any]:
        state = _rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
            return {"ranks": states}
        return {"ranks": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict["ranks"]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        _set_rng_state(ranks[rank % len(ranks)])


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
