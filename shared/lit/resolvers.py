"""OmegaConf resolvers used by `conf/`; importing this module registers them (cheap: no torch)."""

from __future__ import annotations

import hashlib
import re

from omegaconf import OmegaConf


def run_id_from_overrides(override_dirname: str) -> str:
    """A deterministic, readable run id from the command-line overrides: `model.lr=0.1,seed=1` gives
    `model.lr-0.1_seed-1`.

    The same command always gets the same run directory, which is what lets `ckpt_path=last` (and a SLURM
    requeue) find the checkpoint of the run it continues. The id avoids `=` and `,` so that a path into the run
    directory can be passed back on the command line unquoted; long override lists are shortened with a hash.
    """
    if not override_dirname:
        return "default"
    readable = re.sub(r"[^A-Za-z0-9_.+-]", "-", override_dirname.replace("=", "-").replace(",", "_"))
    if len(readable) <= 96:
        return readable
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
    return f"{readable[:80]}-{digest}"


if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", run_id_from_overrides)
