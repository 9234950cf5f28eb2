"""Loaders whose order and augmentation depend only on (seed, epoch, sample): exact resume and DDP sharding.

`make_loader` shards by rank itself (the trainer runs with `use_distributed_sampler=False`), draws a fresh
permutation each epoch from (seed, epoch), and hands each training sample its own seed, so a dataset's random
augmentation is the same whichever worker, rank or resumed process draws it. A run resumed from a mid-epoch
checkpoint continues with exactly the batches the interrupted run had not yet seen.

A training dataset's `__getitem__` receives `(index, sample_seed)`; `sample_rng(key)` turns that into an index
and a `numpy.random.Generator` (evaluation datasets get plain indices).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

SampleKey = int | tuple[int, int]


def sample_rng(key: SampleKey) -> tuple[int, np.random.Generator]:
    """The dataset index of `key` and the random generator for this draw of it."""
    if isinstance(key, tuple):
        index, seed = key
        return int(index), np.random.default_rng(seed)
    return int(key), np.random.default_rng(int(key))


class ShardedSampler(Sampler[SampleKey]):
    """This rank's share of a dataset, in an order fixed by (seed, epoch).

    Training (shuffle=True): a permutation per epoch, padded by wrap-around so every rank gets the same number
    of samples (as `DistributedSampler` does); each sample comes with its own seed. Evaluation: indices in order,
    rank r takes r, r + world, ... (no duplicates, so metrics reduced over ranks count every sample once).

    Repeated augmentation (`repeats` > 1; Hoffer et al. 2020, DeiT's `RASampler`): every index of the epoch's
    permutation appears `repeats` times in a row and the list is dealt round-robin over ranks, so the copies of one
    image land in the same global batch on different ranks, each with its own augmentation seed. Each rank keeps
    `length // world` samples rounded down to a multiple of 256, as DeiT does, so an epoch keeps about `length`
    samples and sees about 1/`repeats` of the images.

    `progress`, when given, is asked at the start of every pass for (epoch, batches of this epoch already
    trained); a pass then starts after those batches. Reading it when the pass starts, not when the loader is
    built, is what makes a mid-epoch resume continue exactly where the interrupted run stopped.
    """

    def __init__(self, length: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, repeats: int = 1, progress: Callable[[], tuple[int, int]] | None = None) -> None:
        if repeats > 1 and not shuffle:
            raise ValueError("repeated augmentation is for training (shuffle=True) only")
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.repeats = repeats
        self.progress = progress
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.rank, self.length, self.world_size)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.length)
        order = np.repeat(order, self.repeats)  # (length * repeats,) each index `repeats` times in a row
        per_rank = -(-len(order) // self.world_size)
        order = np.resize(order, per_rank * self.world_size)  # wrap-around padding
        return order[self.rank :: self.world_size][: len(self)]

    def __len__(self) -> int:
        if not self.shuffle:
            return len(range(self.rank, self.length, self.world_size))
        if self.repeats > 1 and self.length // 256 * 256 // self.world_size > 0:
            return self.length // 256 * 256 // self.world_size
        return -(-self.length // self.world_size)

    def __iter__(self) -> Iterator[SampleKey]:
        start = 0
        if self.progress is not None:
            self.epoch, batches_done = self.progress()
            start = batches_done * self.batch_size
        indices = self._indices()
        if start >= len(indices):  # a checkpoint taken at the very end of an epoch
            start = 0
        if not self.shuffle:
            yield from (int(i) for i in indices[start:])
            return
        base = (self.seed * 1_000_003 + self.epoch) * 2_147_483_647
        for position in range(start, len(indices)):
            yield int(indices[position]), base + position * self.world_size + self.rank


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    trainer: Any = None,
    collate_fn: Callable | None = None,
    drop_last: bool | None = None,
    repeats: int = 1,
) -> DataLoader:
    """A DataLoader over this rank's shard of `dataset` (see the module docstring); `repeats` > 1 turns on
    repeated augmentation for training (see `ShardedSampler`).

    Pass the Lightning trainer (`self.trainer` in a DataModule): the loader then knows the rank, the epoch and,
    after a mid-epoch resume, which batches of the current epoch were already trained on.
    """
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    progress = _training_progress(trainer) if train and trainer is not None else None
    sampler = ShardedSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world,
                             batch_size=batch_size, repeats=repeats, progress=progress)
    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=train if drop_last is None else drop_last,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # A private generator: creating the iterator must not consume the global random state.
        generator=torch.Generator().manual_seed(seed),
    )


class ResumableDataLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch correctly.

    Its position is not stored in the checkpoint: the sampler reads the restored epoch and batch counters of
    the trainer when a pass starts, so there is no loader state to save.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _training_progress(trainer: Any) -> Callable[[], tuple[int, int]]:
    def progress() -> tuple[int, int]:
        fit_loop = trainer.fit_loop
        return fit_loop.epoch_progress.current.processed, fit_loop.epoch_loop.batch_progress.current.completed

    return progress
