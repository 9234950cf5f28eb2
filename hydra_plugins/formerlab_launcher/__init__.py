"""Hydra launchers of formerlab (Hydra finds launchers only inside the `hydra_plugins` namespace package)."""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

# What submitit's local executor understands besides the base parameters; the rest of the SLURM preset
# (partition, account, gres, signal, ...) only means something to a SLURM cluster.
_LOCAL_KEYS = {"submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb",
               "nodes", "name", "stderr_to_stdout", "max_num_timeout"}


class SlurmPresetLocalLauncher(BaseSubmititLauncher):
    """The SLURM preset (`hydra/launcher=slurm`) run through submitit's local executor.

    Same job layout, same per-job parameters, same requeue machinery; keys that only a SLURM cluster understands
    are dropped. This is how the tests exercise the SLURM path without a cluster.
    """

    _EXECUTOR = "local"

    def __init__(self, **params: Any) -> None:
        super().__init__(**{k: v for k, v in params.items() if k in _LOCAL_KEYS})
