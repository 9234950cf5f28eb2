"""Masked-language-model data of variable-length sentences, batched padded (the model packs them).

Sources:
- `source="embedded"` (default, offline): the Wikipedia excerpt bundled with gensim (`shared.data.text`), split
  into sentences; articles are assigned to train / val / test by index (article i goes to val when
  i % 20 == 7, to test when i % 20 == 13, else to train), so no article is in two splits.
- `source="real"`, `root=<dir>`: plain UTF-8 text, one example (a sentence or a passage) per line, blank lines
  skipped:

      <root>/train.txt        required
      <root>/validation.txt   required
      <root>/test.txt         optional

Tokenizer: BERT's WordPiece (`tokenizers`). With `vocab=` (a vocab.txt, or a directory holding one, such as a
Hugging Face BERT directory; `model.pretrained` is passed here by the project config) that vocabulary is used,
lower-cased unless the directory's tokenizer_config.json says `do_lower_case: false`. Without it a WordPiece
vocabulary of `vocab_size` entries is learned on the training split (`learn_wordpiece_vocab`, deterministic)
once and cached under the formerlab cache directory (`$FORMERLAB_CACHE`, default ~/.cache/formerlab), keyed by
a hash of the text and the settings.

A sample is [CLS] sentence [SEP], truncated to `max_length`. Masking follows BERT (Devlin et al. 2019 §3.1 and
the original create_pretraining_data.py): max(1, round(0.15 n)) of the sentence's n tokens are chosen; of those
80% become [MASK], 10% a random token, 10% stay;
labels are the original ids there and -100 elsewhere. Training draws the masks from the per-sample generator of
`shared.data.loading` (a new mask every epoch, exact resume); evaluation masks are fixed by the sample index.
Batches are padded to their longest sample: input_ids, attention_mask, labels (B, L).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from shared.data.loading import SampleKey, make_loader, sample_rng
from shared.data.text import cache_dir, wikipedia_text
from shared.lit.errors import ConfigError, DatasetError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENIZER_VERSION = 1  # bump when training settings change, so cached vocabularies are rebuilt
REAL_LAYOUT = "<root>/train.txt and <root>/validation.txt (optional <root>/test.txt), one example per line"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str, min_words: int = 3) -> list[str]:
    """Sentences of a text with one paragraph per line: split after . ! ? before a capital, digit or quote."""
    sentences = []
    for line in text.splitlines():
        sentences += [s for s in _SENTENCE_END.split(line.strip()) if len(s.split()) >= min_words]
    return sentences


def embedded_splits() -> dict[str, list[str]]:
    """The bundled Wikipedia articles' sentences, split by article (see the module docstring)."""
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, article in enumerate(a for a in wikipedia_text().split("\n\n") if a.strip()):
        split = "val" if i % 20 == 7 else "test" if i % 20 == 13 else "train"
        splits[split] += split_sentences(article)
    return splits


def real_splits(root: str | Path) -> dict[str, list[str]]:
    """The lines of <root>/{train,validation,test}.txt."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data.root={root}: no such directory; expected {REAL_LAYOUT}")
    splits = {}
    for split, name in (("train", "train.txt"), ("val", "validation.txt"), ("test", "test.txt")):
        path = root / name
        if not path.is_file():
            if split == "test":
                continue
            raise DatasetError(f"{path}: missing; expected {REAL_LAYOUT}")
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as err:
            raise DatasetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                               f"expected {REAL_LAYOUT}") from None
        splits[split] = [line for line in lines if line]
        if not splits[split]:
            raise DatasetError(f"{path}: no non-blank line; expected {REAL_LAYOUT}")
    return splits


def _vocab_file(vocab: str | Path) -> Path:
    path = Path(vocab)
    path = path / "vocab.txt" if path.is_dir() else path
    if not path.is_file():
        raise DatasetError(f"data.vocab={vocab}: no vocab.txt there (a BERT vocabulary, one WordPiece a line)")
    return path


def _lowercase_of(vocab_file: Path) -> bool:
    """A Hugging Face directory's `do_lower_case` (tokenizer_config.json), else True (bert-*-uncased)."""
    config = vocab_file.parent / "tokenizer_config.json"
    if config.is_file():
        return bool(json.loads(config.read_text()).get("do_lower_case", True))
    return True


def learn_wordpiece_vocab(sentences: list[str], vocab_size: int, lowercase: bool = True, min_frequency: int = 2,
                          limit_alphabet: int = 1000) -> list[str]:
    """A WordPiece vocabulary learned as `tokenizers`' WordPieceTrainer does (BPE merges over BERT's normalised,
    pre-tokenised words, `##` marking word-internal pieces), but deterministic: ties between equally frequent
    merges go to the alphabetically first pair (the library breaks them by hash-map order, which changes from run
    to run). Returns the special tokens, the alphabet, then the merged pieces in the order they were learned."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for sentence in sentences:
        counts.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(sentence)))
    char_counts: Counter[str] = Counter()
    for word, count in counts.items():
        for ch in word:
            char_counts[ch] += count
    alphabet = {ch for ch, _ in sorted(char_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit_alphabet]}
    words = [[w[0], *("##" + ch for ch in w[1:])] for w in sorted(counts) if set(w) <= alphabet]
    freq = [counts["".join(p.removeprefix("##") for p in w)] for w in words]
    vocab = list(SPECIAL_TOKENS) + sorted({piece for w in words for piece in w})
    known = set(vocab)

    pair_count: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freq[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if -negative != pair_count.get(pair, 0):
            continue  # a stale entry: this pair's count changed since it was pushed
        if -negative < min_frequency:
            break
        merged = pair[0] + pair[1].removeprefix("##")
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        changed: set[tuple[str, str]] = set()
        for i in where.pop(pair, ()):
            w, f = words[i], freq[i]
            for old in zip(w, w[1:]):
                pair_count[old] -= f
                changed.add(old)
            j, out = 0, []
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for new in zip(out, out[1:]):
                pair_count[new] += f
                where.setdefault(new, set()).add(i)
                changed.add(new)
        pair_count.pop(pair, None)
        for other in changed - {pair}:
            if pair_count[other] > 0:
                heapq.heappush(heap, (-pair_count[other], other))
    return vocab


def wordpiece_tokenizer(train_sentences: list[str], vocab: str | Path | None, vocab_size: int,
                        lowercase: bool | None = None) -> Any:
    """BERT's WordPiece tokenizer: from `vocab`, or learned on `train_sentences` and cached (module docstring)."""
    import tokenizers  # a core dependency, imported here because it is only needed for this project

    if vocab is not None:
        path = _vocab_file(vocab)
        lowercase = _lowercase_of(path) if lowercase is None else lowercase
        return tokenizers.BertWordPieceTokenizer(str(path), lowercase=lowercase)
    lowercase = True if lowercase is None else lowercase
    digest = hashlib.sha1()
    for sentence in train_sentences:
        digest.update(sentence.encode("utf-8") + b"\n")
    digest.update(f"{vocab_size}-{lowercase}-{TOKENIZER_VERSION}".encode())
    path = cache_dir() / "bytetransformer" / f"wordpiece-{digest.hexdigest()[:16]}" / "vocab.txt"
    if not path.is_file():
        pieces = learn_wordpiece_vocab(train_sentences, vocab_size, lowercase)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(f"{piece}\n" for piece in pieces), encoding="utf-8")
        tmp.replace(path)  # atomic: concurrent ranks never read a half-written vocabulary
    return tokenizers.BertWordPieceTokenizer(str(path), lowercase=lowercase)


class MaskedSentences(Dataset):
    """[CLS] sentence [SEP] with BERT's masking; items are (input_ids, labels) int64 tensors of one length."""

    def __init__(self, sentences: list[list[int]], specials: dict[str, int], vocab_size: int, max_length: int,
                 mask_prob: float = 0.15) -> None:
        if max_length < 3:
            raise ConfigError(f"data.max_length={max_length}: a sample needs [CLS], a token and [SEP]")
        keep = max_length - 2
        self.lengths = np.array([min(len(s), keep) for s in sentences if s], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.tokens = np.concatenate([np.asarray(s[:keep], dtype=np.int64) for s in sentences if s] or [np.zeros(0)])
        self.specials, self.vocab_size = specials, vocab_size
        self.mask_prob = mask_prob

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, key: SampleKey) -> tuple[Tensor, Tensor]:
        index, rng = sample_rng(key)
        body = self.tokens[self.offsets[index]: self.offsets[index + 1]]
        chosen = np.zeros(len(body), dtype=bool)
        chosen[rng.choice(len(body), size=max(1, round(len(body) * self.mask_prob)), replace=False)] = True
        action = rng.random(len(body))
        inputs = body.copy()
        inputs[chosen & (action < 0.8)] = self.specials["[MASK]"]
        randomised = chosen & (action >= 0.8) & (action < 0.9)
        inputs[randomised] = rng.integers(self.vocab_size, size=int(randomised.sum()))
        labels = np.where(chosen, body, -100)
        cls, sep = self.specials["[CLS]"], self.specials["[SEP]"]
        input_ids = np.concatenate([[cls], inputs, [sep]])
        labels = np.concatenate([[-100], labels, [-100]])
        return torch.from_numpy(input_ids), torch.from_numpy(labels)


def pad_collate(pad_id: int):
    """Pads a list of (input_ids, labels) to the longest: input_ids, attention_mask, labels (B, L)."""

    def collate(items: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        longest = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(items), longest), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, (ids, lab) in enumerate(items):
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = lab
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


class SentenceMLMData(pl.LightningDataModule):
    """Args:
    source: "embedded" (bundled Wikipedia sentences) or "real" (text files under `root`, module docstring).
    vocab: a vocab.txt or a directory with one (e.g. the pretrained BERT's); None trains a WordPiece vocabulary.
    vocab_size: size of the trained vocabulary (ignored with `vocab`).
    lowercase: None = the vocabulary directory's setting, or True.
    max_length: tokens per sample, [CLS] and [SEP] included.
    """

    def __init__(self, source: str = "embedded", root: str | None = None, vocab: str | None = None,
                 vocab_size: int = 4096, lowercase: bool | None = None, max_length: int = 128,
                 mask_prob: float = 0.15, batch_size: int = 32, eval_batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0) -> None:
        super().__init__()
        if source not in ("embedded", "real"):
            raise ConfigError(f"data.source={source!r}: expected 'embedded' or 'real'")
        if source == "real" and not root:
            raise ConfigError(f"data.source=real needs data.root: a directory with {REAL_LAYOUT}")
        self.source, self.root, self.vocab, self.vocab_size = source, root, vocab, vocab_size
        self.lowercase, self.max_length, self.mask_prob = lowercase, max_length, mask_prob
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.datasets: dict[str, MaskedSentences] = {}
        self.tokenizer: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        text = embedded_splits() if self.source == "embedded" else real_splits(self.root)
        self.tokenizer = wordpiece_tokenizer(text["train"], self.vocab, self.vocab_size, self.lowercase)
        specials = {}
        for token in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"):
            specials[token] = self.tokenizer.token_to_id(token)
            if specials[token] is None:
                raise DatasetError(f"the vocabulary has no {token} token (data.vocab={self.vocab})")
        self.specials = specials
        for split, sentences in text.items():
            ids = [e.ids for e in self.tokenizer.encode_batch(sentences, add_special_tokens=False)]
            self.datasets[split] = MaskedSentences(ids, specials, self.tokenizer.get_vocab_size(), self.max_length,
                                                   self.mask_prob)

    @property
    def tokenizer_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def length_stats(self) -> tuple[float, float]:
        """Mean tokens per training sample and mean squared length ([CLS] and [SEP] included)."""
        lengths = self.datasets["train"].lengths + 2
        return float(lengths.mean()), float((lengths.astype(np.float64) ** 2).mean())

    def _loader(self, split: str, train: bool):
        batch = self.batch_size if train else self.eval_batch_size
        return make_loader(self.datasets[split], batch, train=train, seed=self.seed, num_workers=self.num_workers,
                           trainer=self.trainer, collate_fn=pad_collate(self.specials["[PAD]"]))

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val", train=False)

    def test_dataloader(self):
        if "test" not in self.datasets:
            return []
        return self._loader("test", train=False)
