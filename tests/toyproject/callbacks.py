import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """Sends this process SIGTERM once `step` optimiser steps are done, as a cluster preempting the job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
