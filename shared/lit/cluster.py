"""The ranks of a job that submitit's local executor started (`hydra/launcher=slurm_local`).

On a SLURM cluster Lightning reads the ranks from SLURM's variables by itself. submitit's local executor starts
`tasks_per_node` processes of the same job as SLURM would, but names the ranks in its own variables, which
Lightning does not know: without this environment every task would launch `trainer.devices` ranks of its own.
"""

from __future__ import annotations

import os

from lightning.fabric.plugins.environments import ClusterEnvironment

from shared.lit.errors import ConfigError


class SubmititLocalEnvironment(ClusterEnvironment):
    """One rank per task of a submitit local job; rank 0's host is this machine."""

    @staticmethod
    def detect() -> bool:
        return "SUBMITIT_LOCAL_NTASKS" in os.environ and "SUBMITIT_LOCAL_GLOBALID" in os.environ

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return "127.0.0.1"

    @property
    def main_port(self) -> int:
        # the job id is the launcher's process id: concurrent jobs of one sweep get different ports
        return 20000 + int(os.environ["SUBMITIT_LOCAL_JOB_ID"]) % 20000

    def world_size(self) -> int:
        return int(os.environ["SUBMITIT_LOCAL_NTASKS"]) * int(os.environ.get("SUBMITIT_LOCAL_JOB_NUM_NODES", "1"))

    def set_world_size(self, size: int) -> None:
        pass  # fixed by the job's tasks

    def global_rank(self) -> int:
        return int(os.environ["SUBMITIT_LOCAL_GLOBALID"])

    def set_global_rank(self, rank: int) -> None:
        pass  # fixed by the job's tasks

    def local_rank(self) -> int:
        return int(os.environ["SUBMITIT_LOCAL_LOCALID"])

    def node_rank(self) -> int:
        return int(os.environ.get("SUBMITIT_LOCAL_NODEID", "0"))

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        if num_devices * num_nodes != self.world_size():
            raise ConfigError(
                f"the job has {self.world_size()} tasks but trainer.devices x trainer.num_nodes = "
                f"{num_devices} x {num_nodes}: the SLURM preset starts one task per device (tasks_per_node = "
                "trainer.devices); set trainer.devices rather than hydra.launcher.tasks_per_node"
            )
