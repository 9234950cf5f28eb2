"""LightningDataModule of the LRA tasks: `source="embedded"` generates ListOps or Pathfinder offline (cached under
`cache_dir`); `source="real"` reads the official files under `root` (see `projects.lra.tasks`). Text, Retrieval
and Image have no offline stand-in: they need their files.

Batches are dicts: `inputs` (B, N) int64 padded with 0 and `targets` (B,); retrieval has `inputs1`, `inputs2`.
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from projects.lra import tasks
from shared.data.loading import make_loader
from shared.data.text import cache_dir as default_cache_dir
from shared.lit.errors import ConfigError, DatasetError

GENERATED = ("listops", "pathfinder32", "pathfinder64", "pathfinder128")


class LRADataModule(pl.LightningDataModule):
    """Args:
    task: listops, text, retrieval, image, pathfinder32, pathfinder64 or pathfinder128 (Path-X).
    source: "embedded" (generated offline: listops and pathfinder only) or "real" (the official files at `root`).
    root: the folder of the official files (see `projects.lra.tasks.DOWNLOADS`).
    batch_size: per device. num_workers: loader processes. seed: generation and shuffling seed.
    max_length: truncation of ListOps / Text / Retrieval sequences (None: the task's official length).
    difficulty: Pathfinder folder (curv_baseline, curv_contour_length_9, curv_contour_length_14) or easy /
        intermediate / hard.
    num_train, num_val, num_test: sizes of the generated splits.
    listops_generator: overrides of the official ListOps generator flags (max_depth, max_args, min_length,
        max_length), e.g. shorter expressions for a laptop run.
    generation_workers: processes that generate Pathfinder images (the result does not depend on it).
    cache_dir: where generated data is kept (default: $FORMERLAB_CACHE or ~/.cache/formerlab).
    augment: None, or "dihedral" (Pathfinder only): each training draw shows its image under one of the eight
        symmetries of the square, which leave the label (are the markers joined?) unchanged. Not in the paper.
    """

    def __init__(self, task: str = "listops", source: str = "embedded", root: str | None = None,
                 batch_size: int = 32, num_workers: int = 0, seed: int = 0, max_length: int | None = None,
                 difficulty: str = "curv_contour_length_14", num_train: int = 96_000, num_val: int = 2_000,
                 num_test: int = 2_000, listops_generator: dict | None = None, generation_workers: int = 1,
                 cache_dir: str | None = None, augment: str | None = None) -> None:
        super().__init__()
        self.info = tasks.task_info(task)
        if source not in ("embedded", "real"):
            raise ConfigError(f"data.source={source!r} is not 'embedded' or 'real'")
        if source == "embedded" and task not in GENERATED:
            key = "pathfinder" if task.startswith("pathfinder") else task
            raise DatasetError(f"the {task} task has no offline data; set data.source=real and data.root to "
                               f"{tasks.DOWNLOADS[key]}")
        if augment not in (None, "dihedral"):
            raise ConfigError(f"data.augment={augment!r} is not null or 'dihedral'")
        if augment and task not in tasks.PATHFINDER_RESOLUTIONS:
            raise ConfigError(f"data.augment=dihedral is for the Pathfinder images, not the {task} task")
        self.task, self.source, self.root = task, source, root
        self.augment = augment
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.max_length, self.difficulty = max_length, difficulty
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.listops_generator = dict(listops_generator or {})
        self.generation_workers = generation_workers
        self.cache_dir = cache_dir
        self.datasets: dict[str, tasks.SequenceDataset] = {}

    def _generated(self) -> dict[str, tasks.SequenceDataset]:
        cache = self.cache_dir or default_cache_dir()
        if self.task == "listops":
            return tasks.generated_listops(self.sizes, self.seed, cache, self.max_length or 2000,
                                           **self.listops_generator)
        return tasks.generated_pathfinder(self.task, self.sizes, self.seed, cache, self.difficulty,
                                          self.generation_workers)

    def prepare_data(self) -> None:
        # Generate once (local rank 0) into the cache; every rank then reads it in setup().
        if self.source == "embedded":
            self._generated()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.source == "real":
            self.datasets = tasks.read_real(self.task, self.root, max_length=self.max_length,
                                            difficulty=self.difficulty)
        else:
            self.datasets = self._generated()
        if self.augment:
            train = self.datasets["train"]
            self.datasets["train"] = tasks.SequenceDataset(train.sequences, train.labels,
                                                           augment_side=tasks.PATHFINDER_RESOLUTIONS[self.task])

    def _loader(self, split: str) -> DataLoader:
        return make_loader(self.datasets[split], self.batch_size, train=split == "train", seed=self.seed,
                           num_workers=self.num_workers, trainer=self.trainer, collate_fn=tasks.collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
