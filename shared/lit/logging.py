"""Rank-zero logging: one line per event, not one per process, and no line printed twice under Hydra; a CSV
log that a resumed run continues."""

from __future__ import annotations

import csv
import logging

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


def get_logger(name: str) -> logging.LoggerAdapter:
    """A logger whose records are emitted by global rank 0 only."""
    return _RankZeroAdapter(logging.getLogger(name), {})


class _RankZeroAdapter(logging.LoggerAdapter):
    def log(self, level: int, msg: object, *args, **kwargs) -> None:
        if rank_zero_only.rank == 0:
            super().log(level, msg, *args, **kwargs)


def route_lightning_logs_through_hydra() -> None:
    """Lightning installs its own console handlers; under Hydra each message would print twice."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSV logger, except that a run resumed with `ckpt_path=last` continues its `metrics.csv`.

    Lightning's logger deletes an existing `metrics.csv`, so a resumed run would keep only the steps after the
    resume. Here the rows before the first step the new process logs are kept; the rows from that step on (all of
    them when a run starts afresh in the same directory, or the steps an interrupted run logged after its last
    checkpoint) are replaced.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


class _ContinuingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        self._previous: tuple[list[str], list[dict[str, str]]] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                reader = csv.DictReader(f)
                self._previous = (list(reader.fieldnames or []), list(reader))

    def save(self) -> None:
        if self._previous is not None and self.metrics:
            keys, rows = self._previous
            first = min(int(m["step"]) for m in self.metrics)
            kept = [row for row in rows if row.get("step") and int(row["step"]) < first]
            if kept:
                with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=keys)
                    writer.writeheader()
                    writer.writerows(kept)
                self.metrics_keys = sorted(keys)
            else:
                self._fs.rm_file(self.metrics_file_path)
            self._previous = None
        super().save()
