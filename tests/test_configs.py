"""Every project and every experiment config composes, and its model and data instantiate.

Models are built on the `meta` device: paper-size configurations (hundreds of millions of parameters) cost
nothing, and the parameter count of each experiment's model is reported in the failure message if it breaks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from shared.lit.registry import CONF_DIR, available_projects

# Files starting with `_` are pieces that experiments include, not experiments.
EXPERIMENTS = sorted(
    str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
    for p in (CONF_DIR / "experiment").rglob("*.yaml")
    if not p.name.startswith("_")
)


def compose_config(overrides: list[str], tmp_path: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=[*overrides, "logger=csv"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)  # ${hydra:...} is only set inside a real run
        cfg.run_id = "test"
    return cfg


def instantiate_all(cfg, tmp_path: Path) -> None:
    with open_dict(cfg):
        for key in ("root", "weights", "pretrained"):  # paths a user must give for real data or weights
            for section in (cfg.data, cfg.model):
                if key in section and (OmegaConf.is_missing(section, key) or (key == "root" and section[key] is None)):
                    section[key] = str(tmp_path / key)
    with torch.device("meta"):
        module = instantiate(cfg.model, _convert_="all")
    assert sum(p.numel() for p in module.parameters()) > 0
    instantiate(cfg.data, _convert_="all")
    for node in cfg.callbacks.values():
        if node:
            instantiate(node, _convert_="all")
    for node in cfg.logger.values():
        if node:
            instantiate(node, _convert_="all")


@pytest.mark.parametrize("project", sorted(available_projects()))
def test_project_config_instantiates(project, tmp_path):
    cfg = compose_config([f"project={project}"], tmp_path)
    assert cfg.project.name == project
    instantiate_all(cfg, tmp_path)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_config_instantiates(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert cfg.project.name == experiment.split("/")[0], "an experiment must select its own project"
    instantiate_all(cfg, tmp_path)


@pytest.mark.parametrize("project", sorted(available_projects()))
def test_missing_dataset_root_is_one_clear_error(project, tmp_path):
    from shared.lit.errors import DatasetError

    cfg = compose_config([f"project={project}"], tmp_path)
    if "source" not in cfg.data:
        pytest.skip(f"{project} has no real-data source")
    missing = tmp_path / "no_such_dataset"
    with open_dict(cfg):
        cfg.data.source = "real"
        cfg.data.root = str(missing)
    datamodule = instantiate(cfg.data, _convert_="all")
    with pytest.raises(DatasetError) as err:
        datamodule.setup("fit")
    message = str(err.value)
    assert str(missing) in message and "\n" not in message
