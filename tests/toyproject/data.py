from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from shared.data.loading import make_loader, sample_rng


class NoisyLinear(Dataset):
    """y = x.w + noise; training draws fresh input noise per (seed, epoch, sample) to exercise augmentation."""

    def __init__(self, n: int, seed: int, augment: bool) -> None:
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, 8)).astype(np.float32)
        self.y = (self.x @ np.linspace(-1, 1, 8, dtype=np.float32)).astype(np.float32)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):
        index, rng = sample_rng(key)
        x = self.x[index]
        if self.augment:
            x = x + 0.05 * rng.normal(size=x.shape).astype(np.float32)
        return torch.from_numpy(x), torch.tensor(self.y[index])


class ToyDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 16, n_train: int = 256, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.n_train, self.num_workers, self.seed = batch_size, n_train, num_workers, seed

    def setup(self, stage: str | None = None) -> None:
        self.train_set = NoisyLinear(self.n_train, 0, augment=True)
        self.val_set = NoisyLinear(67, 1, augment=False)
        self.test_set = NoisyLinear(67, 2, augment=False)

    def train_dataloader(self):
        return make_loader(self.train_set, self.batch_size, train=True, seed=self.seed,
                           num_workers=self.num_workers, trainer=self.trainer)

    def val_dataloader(self):
        return make_loader(self.val_set, 32, train=False, trainer=self.trainer)

    def test_dataloader(self):
        return make_loader(self.test_set, 32, train=False, trainer=self.trainer)
