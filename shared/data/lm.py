"""Language-modelling data: fixed-length windows over a token stream, from embedded text or token files.

Two sources give the same kind of stream (a 1-D integer array per split):

- `text_splits(text, level)`: a text (e.g. `shared.data.text.wikipedia_text()`) encoded as UTF-8 bytes
  (`level="byte"`, vocabulary 256) or as characters (`level="char"`, vocabulary = the sorted characters of the
  whole text), split by position into contiguous train / val / test parts (no window crosses a split).
- `token_file_splits(root, dtype)`: nanoGPT's binary layout, the one its `prepare.py` scripts write for
  OpenWebText / FineWeb-Edu: `<root>/train.bin` and `<root>/val.bin` (and optionally `<root>/test.bin`), each a
  flat array of token ids with no header, `uint16` (vocabulary < 65,536, e.g. GPT-2) or `uint32` (larger, e.g.
  Llama-3). They are opened with `np.memmap`, so corpora larger than memory work.

`LMWindows` turns a stream into (input, target) pairs of `seq_len` tokens, the target shifted by one. Training
windows start at a random offset drawn from the per-sample generator of `shared.data.loading` (exact resume);
evaluation windows tile the split without overlap, in order. `LMDataModule` puts the two together for any
language-modelling project.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shared.data.loading import SampleKey, make_loader, sample_rng
from shared.lit.errors import ConfigError, DatasetError

SPLITS = ("train", "val", "test")
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class CharVocab:
    """The sorted distinct characters of a text; id i is the i-th character."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        return np.fromiter((self.index[c] for c in text), dtype=np.int32 if len(self) > 65535 else np.uint16,
                           count=len(text))

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def split_bounds(length: int, fractions: tuple[float, float, float]) -> dict[str, tuple[int, int]]:
    """[start, end) of each split of a stream of `length` tokens: train first, then val, then test."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ConfigError(f"data.split must be three non-negative fractions summing to 1 (train, val, test), "
                          f"got {fractions}")
    n_train = int(length * fractions[0])
    n_val = int(length * fractions[1])
    return {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, length)}


def text_splits(text: str, level: str = "byte", fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
                ) -> tuple[dict[str, np.ndarray], int, float]:
    """Encode `text` and split it by position.

    Returns (splits, vocab_size, bytes_per_token): `bytes_per_token` converts a loss in nats per token to
    bits per byte (bpb = loss / ln 2 / bytes_per_token); it is 1 for byte level.
    """
    if level == "byte":
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        vocab, bytes_per_token = 256, 1.0
    elif level == "char":
        char_vocab = CharVocab(text)
        ids, vocab = char_vocab.encode(text), len(char_vocab)
        bytes_per_token = len(text.encode("utf-8")) / max(len(text), 1)
    else:
        raise ConfigError(f"data.level must be 'byte' or 'char', got '{level}'")
    bounds = split_bounds(len(ids), tuple(fractions))
    return {name: ids[a:b] for name, (a, b) in bounds.items()}, vocab, bytes_per_token


def token_file_splits(root: str | Path, dtype: str = "uint16") -> dict[str, np.ndarray]:
    """Memory-map nanoGPT token files `<root>/{train,val[,test]}.bin` (headerless `dtype` arrays).

    Without test.bin the val split doubles as the test split (nanoGPT has no test file).
    """
    if dtype not in TOKEN_DTYPES:
        raise ConfigError(f"data.dtype must be one of {sorted(TOKEN_DTYPES)}, got '{dtype}'")
    root = Path(root).expanduser()
    layout = (f"expected nanoGPT token files {root}/train.bin and {root}/val.bin (optional test.bin): "
              f"flat {dtype} arrays")
    if not root.is_dir():
        raise DatasetError(f"token directory {root} does not exist; {layout}")
    np_dtype = np.dtype(TOKEN_DTYPES[dtype])
    splits: dict[str, np.ndarray] = {}
    for name in SPLITS:
        path = root / f"{name}.bin"
        if not path.is_file():
            if name == "test" and "val" in splits:
                splits["test"] = splits["val"]
                continue
            raise DatasetError(f"missing {path}; {layout}")
        size = path.stat().st_size
        if size == 0 or size % np_dtype.itemsize:
            raise DatasetError(f"{path} has {size} bytes, not a whole number of {dtype} tokens; {layout}")
        splits[name] = np.memmap(path, dtype=np_dtype, mode="r")
    return splits


class LMWindows(Dataset):
    """(x, y) windows of `seq_len` tokens over a 1-D token stream, y = x shifted left by one.

    Args:
        tokens: the split's token ids (ndarray or memmap).
        seq_len: tokens per window.
        train: random window starts drawn from the sample's generator; otherwise tiling windows in order.
        num_samples: windows per epoch when training (default: as many as tile the split once).
        name: used in error messages (e.g. the split's file).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, train: bool, num_samples: int | None = None,
                 name: str = "tokens") -> None:
        if len(tokens) < seq_len + 1:
            raise DatasetError(f"{name} has {len(tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.tokens, self.seq_len, self.train = tokens, seq_len, train
        self.num_windows = (len(tokens) - 1) // seq_len
        self.num_samples = num_samples if train and num_samples else self.num_windows

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        index, rng = sample_rng(key)
        if self.train:
            start = int(rng.integers(0, len(self.tokens) - self.seq_len))
        else:
            start = index * self.seq_len
        chunk = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats per token) of the unigram distribution of `tokens`: the loss of the best context-free model,
    the baseline a language model must beat."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def bigram_cross_entropy(train: np.ndarray, held_out: np.ndarray, vocab_size: int, add: float = 0.01) -> float:
    """Loss (nats per token) on `held_out` of the bigram model counted on `train`, add-`add` smoothed: what a model
    that sees only the current token can reach, the plateau of a language model whose sequence mixing does not
    work. Counts are kept sparse, so any vocabulary size will do."""
    train, held_out = (np.asarray(t, dtype=np.int64) for t in (train, held_out))
    if len(train) < 2 or len(held_out) < 2:
        raise ValueError(f"bigram_cross_entropy needs two tokens or more in each split; got {len(train)} for training "
                         f"and {len(held_out)} held out")
    pairs, pair_counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    context_counts = np.bincount(train[:-1], minlength=vocab_size)
    query = held_out[:-1] * vocab_size + held_out[1:]
    at = np.searchsorted(pairs, query).clip(max=len(pairs) - 1)
    seen = np.where(pairs[at] == query, pair_counts[at], 0)
    p = (seen + add) / (context_counts[held_out[:-1]] + add * vocab_size)
    return float(-np.log(p).mean())


def corpus_text(corpus: str) -> str:
    """An embedded English text by name: "wikipedia" (gensim's excerpt) or "pydoc" (Python's documentation)."""
    from shared.data import text

    if corpus == "wikipedia":
        return text.wikipedia_text()
    if corpus == "pydoc":
        return text.pydoc_text()
    raise ConfigError(f"data.corpus must be 'wikipedia' or 'pydoc', got '{corpus}'")


class LMDataModule(pl.LightningDataModule):
    """Next-token prediction over windows of `seq_len` tokens.

    Args:
        source: "embedded" (an embedded text, `corpus` at `level`) or "real" (nanoGPT token files under `root`).
        root, dtype: the token directory and its integer type ("uint16" | "uint32") for source="real".
        corpus, level: the embedded text ("wikipedia" | "pydoc") and its tokens ("byte" | "char"); split 90/5/5.
        vocab_size: the model's vocabulary, checked against the data.
        seq_len: tokens per window. batch_size: per device.
        train_samples: windows per training epoch (default: as many as tile the train split once).
        num_workers, seed: loader workers; the seed of window offsets and order.

    After `setup`: `unigram_loss` (nats per token of the best context-free model; embedded text only) and
    `bytes_per_token` (to report bits per byte).
    """

    def __init__(self, source: str = "embedded", root: str | None = None, dtype: str = "uint16",
                 corpus: str = "wikipedia", level: str = "byte", vocab_size: int = 256, seq_len: int = 256,
                 batch_size: int = 16, train_samples: int | None = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if source not in ("embedded", "real"):
            raise ConfigError(f"data.source must be 'embedded' or 'real', got '{source}'")
        if source == "real" and not root:
            raise ConfigError("data.source=real reads nanoGPT token files: set data.root=<dir with train.bin, val.bin>")
        self.source, self.root, self.dtype, self.corpus, self.level = source, root, dtype, corpus, level
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.train_samples, self.num_workers, self.seed = train_samples, num_workers, seed
        self.unigram_loss: float | None = None
        self.bytes_per_token = 1.0

    def setup(self, stage: str | None = None) -> None:
        if self.source == "real":
            splits = token_file_splits(self.root, self.dtype)
            names = {s: f"{self.root}/{s}.bin" for s in splits}
            biggest = max(int(t.max()) for t in splits.values())
            if biggest >= self.vocab_size:
                raise DatasetError(f"{self.root}: token id {biggest} >= data.vocab_size={self.vocab_size}")
        else:
            splits, vocab, self.bytes_per_token = text_splits(corpus_text(self.corpus), self.level)
            if vocab > self.vocab_size:
                raise ConfigError(f"data.level={self.level} of {self.corpus} has {vocab} tokens but data.vocab_size="
                                  f"{self.vocab_size} (the model's vocabulary): set data.vocab_size={vocab}")
            names = {s: f"{self.corpus} {s} split" for s in splits}
            self.unigram_loss = unigram_entropy(splits["train"], self.vocab_size)
        self.train_set = LMWindows(splits["train"], self.seq_len, True, self.train_samples, names["train"])
        self.val_set = LMWindows(splits["val"], self.seq_len, False, name=names["val"])
        self.test_set = LMWindows(splits["test"], self.seq_len, False, name=names["test"])

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train_set, self.batch_size, train=True, seed=self.seed,
                           num_workers=self.num_workers, trainer=self.trainer)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, self.batch_size, train=False, trainer=self.trainer)

    def test_dataloader(self) -> DataLoader:
        return make_loader(self.test_set, self.batch_size, train=False, trainer=self.trainer)
