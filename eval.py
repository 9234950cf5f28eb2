#!/usr/bin/env python
"""Evaluate trained or official weights on a project's test split and print the paper's table.

    python eval.py project=hat weights=outputs/hat/default/checkpoints/last.ckpt
    python eval.py experiment=hat/hat_x4 weights=HAT_SRx4.pth data.source=real data.root=/datasets/sr
"""

import sys

import hydra
from omegaconf import DictConfig

import shared.lit.resolvers  # noqa: F401  (registers ${run_id:...})
from shared.lit.registry import project_error


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from shared.lit.evaluate import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    if error := project_error(sys.argv[1:]):
        print(error, file=sys.stderr)
        sys.exit(2)
    main()
