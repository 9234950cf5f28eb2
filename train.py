#!/usr/bin/env python
"""Train, validate and test one project: `python train.py project=<name> [key=value ...]`.

See README.md for sweeps (`-m`), SLURM (`hydra/launcher=slurm`), DDP (`trainer=ddp trainer.devices=N`)
and resuming (`ckpt_path=last`).
"""

import sys

import hydra
from omegaconf import DictConfig

import shared.lit.resolvers  # noqa: F401  (registers ${run_id:...})
from shared.lit.registry import project_error


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from shared.lit.runner import run  # torch and Lightning load only when a job really runs

    return run(cfg)


if __name__ == "__main__":
    if error := project_error(sys.argv[1:]):
        print(error, file=sys.stderr)
        sys.exit(2)
    main()
