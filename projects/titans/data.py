"""Data for Titans: byte-level language modelling and the synthetic long-context tasks.

`task="lm"`: next-token prediction over fixed windows of `seq_len` tokens.
    `source="embedded"` (default, offline): the Wikipedia excerpt bundled with gensim (`corpus="wikipedia"`) or
    Python's documentation (`corpus="pydoc"`), as UTF-8 bytes (`level="byte"`, 256 tokens) or characters, split
    90/5/5 by position.
    `source="real"`: nanoGPT token files `<root>/train.bin`, `<root>/val.bin` (optional `test.bin`), flat uint16 or
    uint32 arrays (`dtype`), e.g. FineWeb-Edu tokenised with the Llama-2 tokenizer as in the paper (§5.1).
`task="niah"`: S-NIAH passkey / number / word samples of `seq_len` bytes (`shared.data.synthetic.niah`), the
    haystack drawn from the embedded text; answers only are targets.
`task="mqar"`: multi-query associative recall (`shared.data.synthetic.mqar`).
Training samples are drawn from each sample's own seed (exact resume); validation and test sets are fixed.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shared.data.lm import LMDataModule, corpus_text
from shared.data.loading import SampleKey, make_loader, sample_rng
from shared.data.synthetic.mqar import mqar_example
from shared.data.synthetic.niah import niah_example, word_list
from shared.lit.errors import ConfigError

TASKS = ("lm", "niah", "mqar")


class SyntheticTask(Dataset):
    """`num_samples` NIAH or MQAR examples; training draws each from its sample seed, evaluation from (seed, index)."""

    def __init__(self, make: Any, num_samples: int, seed: int, train: bool) -> None:
        self.make, self.num_samples, self.seed, self.train = make, num_samples, seed, train

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        index, rng = sample_rng(key)
        if not self.train:
            rng = np.random.default_rng([self.seed, index])
        x, y = self.make(rng)
        return torch.from_numpy(x), torch.from_numpy(y)


class TitansDataModule(LMDataModule):
    """The shared `LMDataModule` (task="lm", all its arguments) plus the synthetic long-context tasks.

    Args (besides LMDataModule's):
    task: "lm" | "niah" | "mqar" (NIAH / MQAR: `seq_len` is the full length, the model sees seq_len - 1).
    val_samples: evaluation samples of the synthetic tasks (LM: the whole val / test split).
    train_samples: samples per training epoch (synthetic tasks: default 10,000).
    niah_task: "passkey" | "number" | "word".
    num_kv_pairs, power_a: MQAR's parameters.
    test_lengths: NIAH / MQAR only: test at each of these lengths instead of `seq_len` (one test loader per length),
        e.g. train at 256 bytes and find the needle at 256 .. 4,096.
    """

    def __init__(self, task: str = "lm", source: str = "embedded", root: str | None = None, dtype: str = "uint16",
                 corpus: str = "wikipedia", level: str = "byte", seq_len: int = 256, batch_size: int = 16,
                 train_samples: int | None = None, val_samples: int = 256, niah_task: str = "passkey",
                 num_kv_pairs: int = 32, vocab_size: int = 256, power_a: float = 0.01, num_workers: int = 0,
                 seed: int = 0, test_lengths: list[int] | None = None) -> None:
        if task not in TASKS:
            raise ConfigError(f"data.task must be one of {TASKS}, got '{task}'")
        if test_lengths and task == "lm":
            raise ConfigError("data.test_lengths serves the synthetic tasks (niah, mqar); task=lm tests at seq_len")
        if source == "real" and task != "lm":
            raise ConfigError("data.source=real reads nanoGPT token files, which serve task=lm only")
        super().__init__(source=source, root=root, dtype=dtype, corpus=corpus, level=level, vocab_size=vocab_size,
                         seq_len=seq_len, batch_size=batch_size, train_samples=train_samples,
                         num_workers=num_workers, seed=seed)
        self.task, self.val_samples, self.niah_task = task, val_samples, niah_task
        self.num_kv_pairs, self.power_a = num_kv_pairs, power_a
        self.test_lengths = list(test_lengths) if test_lengths else None

    def setup(self, stage: str | None = None) -> None:
        if self.task == "lm":
            super().setup(stage)
            return
        if self.task == "niah":
            text = corpus_text(self.corpus)
            words = word_list(text)

            def make(rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
                return niah_example(self.niah_task, seq_len, rng, text, words)
        else:

            def make(rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
                return mqar_example(seq_len, self.num_kv_pairs, self.vocab_size, rng, self.power_a)

        self.train_set = SyntheticTask(partial(make, seq_len=self.seq_len), self.train_samples or 10_000, self.seed,
                                       train=True)
        self.val_set = SyntheticTask(partial(make, seq_len=self.seq_len), self.val_samples, self.seed + 1, train=False)
        self.test_sets = [SyntheticTask(partial(make, seq_len=length), self.val_samples, self.seed + 2, train=False)
                          for length in self.test_lengths or [self.seq_len]]
        self.test_set = self.test_sets[0]

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        if not self.test_lengths:
            return super().test_dataloader()
        return [make_loader(dataset, self.batch_size, train=False, trainer=self.trainer) for dataset in self.test_sets]
