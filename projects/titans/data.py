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

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from shared.data.lm import LMWindows, text_splits, token_file_splits, unigram_entropy
from shared.data.loading import SampleKey, make_loader, sample_rng
from shared.data.synthetic.mqar import mqar_example
from shared.data.synthetic.niah import niah_example, word_list
from shared.lit.errors import ConfigError

TASKS = ("lm", "niah", "mqar")


def corpus_text(corpus: str) -> str:
    from shared.data import text

    if corpus == "wikipedia":
        return text.wikipedia_text()
    if corpus == "pydoc":
        return text.pydoc_text()
    raise ConfigError(f"data.corpus must be 'wikipedia' or 'pydoc', got '{corpus}'")


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


class TitansDataModule(pl.LightningDataModule):
    """Args:
    task: "lm" | "niah" | "mqar".
    source: "embedded" | "real" (LM only).
    root, dtype: the nanoGPT token directory and its dtype ("uint16" | "uint32") for source="real".
    corpus, level: embedded text ("wikipedia" | "pydoc") and its tokens ("byte" | "char").
    seq_len: tokens per sample (NIAH / MQAR: the full length, the model sees seq_len - 1).
    batch_size: per device.
    train_samples: samples per training epoch (LM default: as many windows as tile the train split).
    val_samples: evaluation samples of the synthetic tasks (LM: the whole val / test split).
    niah_task: "passkey" | "number" | "word".
    vocab_size: the model's vocabulary (byte level: 256; checked against the data).
    num_kv_pairs, power_a: MQAR's parameters.
    """

    def __init__(self, task: str = "lm", source: str = "embedded", root: str | None = None, dtype: str = "uint16",
                 corpus: str = "wikipedia", level: str = "byte", seq_len: int = 256, batch_size: int = 16,
                 train_samples: int | None = None, val_samples: int = 256, niah_task: str = "passkey",
                 num_kv_pairs: int = 32, vocab_size: int = 256, power_a: float = 0.01, num_workers: int = 0,
                 seed: int = 0) -> None:
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"data.task must be one of {TASKS}, got '{task}'")
        if source not in ("embedded", "real"):
            raise ConfigError(f"data.source must be 'embedded' or 'real', got '{source}'")
        if source == "real" and (task != "lm" or not root):
            raise ConfigError("data.source=real reads nanoGPT token files for task=lm: "
                              "set data.root=<dir with train.bin, val.bin>")
        self.task, self.source, self.root, self.dtype = task, source, root, dtype
        self.corpus, self.level, self.seq_len = corpus, level, seq_len
        self.batch_size, self.train_samples, self.val_samples = batch_size, train_samples, val_samples
        self.niah_task, self.num_kv_pairs, self.vocab_size, self.power_a = niah_task, num_kv_pairs, vocab_size, power_a
        self.num_workers, self.seed = num_workers, seed
        self.unigram_loss: float | None = None  # nats per token of the best context-free model (LM)

    def setup(self, stage: str | None = None) -> None:
        if self.task == "lm":
            if self.source == "real":
                splits = token_file_splits(self.root, self.dtype)
                names = {s: f"{self.root}/{s}.bin" for s in splits}
            else:
                splits, vocab, _ = text_splits(corpus_text(self.corpus), self.level)
                if vocab > self.vocab_size:
                    raise ConfigError(f"data.level={self.level} of {self.corpus} has {vocab} tokens but "
                                      f"data.vocab_size={self.vocab_size} (the model's vocabulary): "
                                      f"set data.vocab_size={vocab}")
                names = {s: f"{self.corpus} {s} split" for s in splits}
                self.unigram_loss = unigram_entropy(splits["train"], self.vocab_size)
            self.train_set = LMWindows(splits["train"], self.seq_len, True, self.train_samples, names["train"])
            self.val_set = LMWindows(splits["val"], self.seq_len, False, name=names["val"])
            self.test_set = LMWindows(splits["test"], self.seq_len, False, name=names["test"])
            return
        if self.task == "niah":
            text = corpus_text(self.corpus)
            words = word_list(text)

            def make(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
                return niah_example(self.niah_task, self.seq_len, rng, text, words)
        else:

            def make(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
                return mqar_example(self.seq_len, self.num_kv_pairs, self.vocab_size, rng, self.power_a)

        self.train_set = SyntheticTask(make, self.train_samples or 10_000, self.seed, train=True)
        self.val_set = SyntheticTask(make, self.val_samples, self.seed + 1, train=False)
        self.test_set = SyntheticTask(make, self.val_samples, self.seed + 2, train=False)

    def train_dataloader(self):
        return make_loader(self.train_set, self.batch_size, train=True, seed=self.seed,
                           num_workers=self.num_workers, trainer=self.trainer)

    def val_dataloader(self):
        return make_loader(self.val_set, self.batch_size, train=False, trainer=self.trainer)

    def test_dataloader(self):
        return make_loader(self.test_set, self.batch_size, train=False, trainer=self.trainer)
