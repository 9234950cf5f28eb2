"""The six LRA tasks as token sequences: readers of the official release layouts, the offline generators, and the
datasets and collate function the DataModule (and `scripts/bench_lra.py`) use. No Lightning here.

| task | official files (`root=`) | tokens | classes |
|---|---|---|---|
| listops | `lra_release/listops-1000/basic_{train,val,test}.tsv` | 17 ids (`shared.data.synthetic.listops`) | 10 |
| text | `aclImdb/{train,test}/{pos,neg}/*.txt` (IMDb v1) | bytes + 1 (257 ids, 0 = padding) | 2 |
| retrieval | `lra_release/tsv_data/new_aan_pairs.{train,eval,test}.tsv` | bytes + 1, per document | 2 |
| image | `cifar-10-batches-py/{data_batch_1..5,test_batch}` | grey pixels 0..255 | 10 |
| pathfinder32/64/128 | `lra_release/pathfinder{32,64,128}/<difficulty>/{metadata,imgs}` | pixels 0..255 | 2 |

Splits follow the official input pipelines: Text uses the IMDb test split for validation and test; Image uses
CIFAR-10 `train[:90%]` / `train[90%:]` / `test`; Pathfinder uses `[:80%]` / `[80%:90%]` / `[90%:]` of the
metadata files in numeric order, skipping empty PNGs (the release has one).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from shared.data.loading import SampleKey, sample_rng
from shared.data.synthetic import listops, pathfinder
from shared.lit.errors import DatasetError

SPLITS = ("train", "val", "test")
PATHFINDER_RESOLUTIONS = {"pathfinder32": 32, "pathfinder64": 64, "pathfinder128": 128}


@dataclass(frozen=True)
class TaskInfo:
    vocab_size: int
    num_classes: int
    model: str  # the paper configuration's factory in projects.lra.model
    pair: bool = False  # two documents per example (retrieval)


TASKS: dict[str, TaskInfo] = {
    "listops": TaskInfo(listops.VOCAB_SIZE, listops.NUM_CLASSES, "listops_transformer"),
    "text": TaskInfo(257, 2, "text_transformer"),
    "retrieval": TaskInfo(257, 2, "retrieval_transformer", pair=True),
    "image": TaskInfo(256, 10, "image_transformer"),
    "pathfinder32": TaskInfo(256, 2, "pathfinder32_transformer"),
    "pathfinder64": TaskInfo(256, 2, "pathfinder64_transformer"),
    "pathfinder128": TaskInfo(256, 2, "pathfinder128_transformer"),
}

# What to download for each task, and where `root` must point.
DOWNLOADS = {
    "listops": "the LRA release (https://storage.googleapis.com/long-range-arena/lra_release.gz); "
               "root = lra_release/listops-1000 (basic_train.tsv, basic_val.tsv, basic_test.tsv)",
    "text": "IMDb v1 (https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz); "
            "root = the folder that holds aclImdb/ (train/pos, train/neg, test/pos, test/neg *.txt)",
    "retrieval": "the LRA release (https://storage.googleapis.com/long-range-arena/lra_release.gz); "
                 "root = lra_release/tsv_data (new_aan_pairs.train.tsv, .eval.tsv, .test.tsv)",
    "image": "CIFAR-10 python version (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz); "
             "root = the folder that holds cifar-10-batches-py/ (data_batch_1..5, test_batch)",
    "pathfinder": "the LRA release (https://storage.googleapis.com/long-range-arena/lra_release.gz); "
                  "root = lra_release/pathfinder{res} (holding <difficulty>/metadata/*.npy and <difficulty>/imgs/)",
}


def task_info(task: str) -> TaskInfo:
    if task not in TASKS:
        raise DatasetError(f"lra task {task!r} is not one of {sorted(TASKS)}")
    return TASKS[task]


def encode_bytes(text: bytes, max_length: int) -> np.ndarray:
    """tfds ByteTextEncoder: every byte + 1 (0 is padding), truncated to `max_length`."""
    return np.frombuffer(text[:max_length], dtype=np.uint8).astype(np.int16) + 1


# ----------------------------------------------------------------------------------------------------------------
# Datasets


def dihedral_orders(side: int) -> np.ndarray:
    """The eight symmetries of a `side` x `side` image (four rotations by 90 degrees, each with and without a
    transpose) as pixel orders, (8, side * side): `pixels[orders[k]]` is the raster-order image under symmetry k
    (k = 0 is the identity). Whether Pathfinder's two markers are joined does not change under any of them."""
    grid = np.arange(side * side).reshape(side, side)
    return np.stack([np.rot90(g, k).reshape(-1) for g in (grid, grid.T) for k in range(4)])


class SequenceDataset(Dataset):
    """Token sequences (one array each) with integer labels; `pairs` holds the second documents (retrieval).

    `augment_side`: the sequences are `side` x `side` images in raster order (Pathfinder), and each draw of an
    example shows it under one of the eight symmetries of the square, drawn from the sample's seed
    (`dihedral_orders`); None: every draw is the example as stored."""

    def __init__(self, sequences: Sequence[np.ndarray], labels: Sequence[int],
                 pairs: Sequence[np.ndarray] | None = None, augment_side: int | None = None) -> None:
        if len(sequences) != len(labels) or (pairs is not None and len(pairs) != len(labels)):
            raise ValueError("sequences, pairs and labels must have the same length")
        self.sequences, self.labels, self.pairs = sequences, np.asarray(labels, dtype=np.int64), pairs
        self.orders = None if augment_side is None else dihedral_orders(augment_side)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        index, rng = sample_rng(key)
        sequence = np.asarray(self.sequences[index], dtype=np.int64)
        if self.orders is not None:
            if len(sequence) != self.orders.shape[1]:
                raise ValueError(f"example {index} has {len(sequence)} tokens, not the {self.orders.shape[1]} "
                                 f"pixels of the images the dihedral augmentation was set up for")
            sequence = sequence[self.orders[rng.integers(len(self.orders))]]
        item = {"inputs": torch.as_tensor(sequence), "targets": torch.tensor(self.labels[index])}
        if self.pairs is not None:
            item["inputs1"] = item.pop("inputs")
            item["inputs2"] = torch.as_tensor(np.asarray(self.pairs[index], dtype=np.int64))
        return item


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a batch, padding every sequence field with 0 to the longest in the batch."""
    out = {"targets": torch.stack([item["targets"] for item in items])}
    for name in items[0]:
        if name != "targets":
            out[name] = torch.nn.utils.rnn.pad_sequence([item[name] for item in items], batch_first=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Readers of the official layouts


def _require(path: Path, task: str) -> Path:
    if not path.exists():
        key = "pathfinder" if task.startswith("pathfinder") else task
        raise DatasetError(f"{path} does not exist. The {task} task reads {DOWNLOADS[key]}")
    return path


def read_listops(root: str | Path, max_length: int = 2000) -> dict[str, SequenceDataset]:
    """`basic_{train,val,test}.tsv` (header `Source	Target`), tokenised as the official pipeline does."""
    root = Path(root)
    out = {}
    for split in SPLITS:
        path = _require(root / listops.SPLIT_FILES[split], "listops")
        try:
            rows = listops.read_tsv(path)
        except ValueError as err:
            raise DatasetError(str(err)) from None
        out[split] = SequenceDataset([np.asarray(listops.encode(s, max_length), dtype=np.int8) for s, _ in rows],
                                     [label for _, label in rows])
    return out


def read_imdb(root: str | Path, max_length: int = 4096) -> dict[str, SequenceDataset]:
    """`aclImdb/{train,test}/{neg,pos}/*.txt` as bytes; labels neg = 0, pos = 1 (tfds imdb_reviews). The official
    pipeline validates and tests on the same IMDb test split."""
    root = Path(root)
    base = root / "aclImdb" if (root / "aclImdb").is_dir() else root
    splits = {}
    for split in ("train", "test"):
        sequences, labels = [], []
        for label, polarity in enumerate(("neg", "pos")):
            folder = _require(base / split / polarity, "text")
            files = sorted(folder.glob("*.txt"))
            if not files:
                raise DatasetError(f"{folder} has no *.txt reviews. The text task reads {DOWNLOADS['text']}")
            for file in files:
                sequences.append(encode_bytes(file.read_bytes(), max_length))
                labels.append(label)
        splits[split] = SequenceDataset(sequences, labels)
    return {"train": splits["train"], "val": splits["test"], "test": splits["test"]}


def read_aan(root: str | Path, max_length: int = 4000) -> dict[str, SequenceDataset]:
    """`new_aan_pairs.{train,eval,test}.tsv`: no header, tab-separated `label id1 id2 text1 text2`, no quoting."""
    root = Path(root)
    out = {}
    for split, name in zip(SPLITS, ("train", "eval", "test")):
        path = _require(root / f"new_aan_pairs.{name}.tsv", "retrieval")
        firsts, seconds, labels = [], [], []
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                fields = line.rstrip(b"\r\n").split(b"\t")
                if len(fields) != 5:
                    raise DatasetError(f"{path}:{number}: expected 5 tab-separated fields "
                                       f"(label id1 id2 text1 text2), got {len(fields)}")
                try:
                    labels.append(int(float(fields[0])))
                except ValueError:
                    raise DatasetError(f"{path}:{number}: label {fields[0][:20]!r} is not a number") from None
                firsts.append(encode_bytes(fields[3], max_length))
                seconds.append(encode_bytes(fields[4], max_length))
        out[split] = SequenceDataset(firsts, labels, pairs=seconds)
    return out


class _CifarUnpickler(pickle.Unpickler):
    # The CIFAR-10 batches are pickles of dicts of bytes, lists and NumPy arrays: allow those classes, nothing else.
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


def rgb_to_grayscale(rgb: np.ndarray) -> np.ndarray:
    """tf.image.rgb_to_grayscale on uint8 images (..., 3): float32 weights (0.2989, 0.5870, 0.1140) on x / 255,
    then TensorFlow's float -> uint8 conversion (x * 255.5, truncated)."""
    weights = np.asarray([0.2989, 0.5870, 0.1140], dtype=np.float32)
    grey = (rgb.astype(np.float32) * np.float32(1 / 255)) @ weights
    return np.clip(grey * np.float32(255.5), 0, 255).astype(np.uint8)


def read_cifar10(root: str | Path) -> dict[str, SequenceDataset]:
    """`cifar-10-batches-py/{data_batch_1..5,test_batch}` -> grey 1024-pixel sequences; train[:90%] / train[90%:]
    / test as the official pipeline splits them."""
    root = Path(root)
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root

    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = _require(base / name, "image")
        try:
            with open(path, "rb") as f:
                batch = _CifarUnpickler(f, encoding="bytes").load()
            data, labels = batch[b"data"], batch[b"labels"]
        except (pickle.UnpicklingError, KeyError, EOFError, TypeError) as err:
            raise DatasetError(f"{path} is not a CIFAR-10 python batch (a pickled dict with b'data' and "
                               f"b'labels'): {err}") from None
        data = np.asarray(data, dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"{path}: b'data' has shape {data.shape}, expected (N, 3072)")
        rgb = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3): the rows hold R, G, B planes
        return rgb_to_grayscale(rgb).reshape(-1, 1024), np.asarray(labels, dtype=np.int64)

    parts = [load(f"data_batch_{i}") for i in range(1, 6)]
    train_x, train_y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_x, test_y = load("test_batch")
    cut = len(train_x) * 9 // 10
    return {"train": SequenceDataset(train_x[:cut], train_y[:cut]),
            "val": SequenceDataset(train_x[cut:], train_y[cut:]),
            "test": SequenceDataset(test_x, test_y)}


def read_pathfinder(root: str | Path, resolution: int = 32, difficulty: str = "curv_contour_length_14"
                    ) -> dict[str, SequenceDataset]:
    """`<difficulty>/metadata/*.npy` (text lines; the label is field 3) and `<difficulty>/imgs/<b>/sample_<i>.png`,
    split [:80%] / [80%:90%] / [90%:] over the metadata files in numeric order. `root` may also be the folder that
    holds `pathfinder{resolution}/`."""
    root = Path(root)
    difficulty = pathfinder.DIFFICULTY_ALIASES.get(difficulty, difficulty)
    if (root / f"pathfinder{resolution}").is_dir():
        root = root / f"pathfinder{resolution}"
    folder = _require(root / difficulty / "metadata", f"pathfinder{resolution}").parent
    files = sorted(folder.joinpath("metadata").glob("*.npy"),
                   key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.name))
    if not files:
        raise DatasetError(f"{folder / 'metadata'} has no *.npy files. "
                           f"The pathfinder task reads {DOWNLOADS['pathfinder']}")
    images, labels = [], []
    for file in files:
        try:
            rows = pathfinder.read_metadata(file)
        except ValueError as err:
            raise DatasetError(str(err)) from None
        for relative, label in rows:
            path = _require(folder / relative, f"pathfinder{resolution}")
            if path.stat().st_size == 0:  # the official pipeline filters empty files
                continue
            image = np.asarray(Image.open(path).convert("L"))
            if image.shape != (resolution, resolution):
                raise DatasetError(f"{path} is {image.shape[1]}x{image.shape[0]}, expected {resolution}x{resolution}")
            images.append(image.reshape(-1))
            labels.append(label)
    images_array, labels_array = np.stack(images), np.asarray(labels)
    n = len(labels_array)
    a, b = n * 8 // 10, n * 9 // 10
    return {"train": SequenceDataset(images_array[:a], labels_array[:a]),
            "val": SequenceDataset(images_array[a:b], labels_array[a:b]),
            "test": SequenceDataset(images_array[b:], labels_array[b:])}


def read_real(task: str, root: str | Path | None, *, max_length: int | None = None,
              difficulty: str = "curv_contour_length_14") -> dict[str, SequenceDataset]:
    """The official files of `task` under `root` (see the table in the module docstring)."""
    task_info(task)
    if root is None:
        key = "pathfinder" if task.startswith("pathfinder") else task
        raise DatasetError(f"data.source=real needs data.root: the {task} task reads {DOWNLOADS[key]}")
    if task == "listops":
        return read_listops(root, max_length or 2000)
    if task == "text":
        return read_imdb(root, max_length or 4096)
    if task == "retrieval":
        return read_aan(root, max_length or 4000)
    if task == "image":
        return read_cifar10(root)
    return read_pathfinder(root, PATHFINDER_RESOLUTIONS[task], difficulty)


# ----------------------------------------------------------------------------------------------------------------
# Generated data (offline), cached on disk


def _cache_path(cache_dir: str | Path, kind: str, spec: dict) -> Path:
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / "lra" / f"{kind}-{digest}"


def generated_listops(sizes: dict[str, int], seed: int, cache_dir: str | Path, truncate: int = 2000,
                      **generator: int) -> dict[str, SequenceDataset]:
    """ListOps splits from the official generator (one stream, deduplicated across splits), written once in the
    release layout under `cache_dir` and read back with the release reader. `generator`: max_depth, max_args,
    min_length, max_length of the official script."""
    spec = {"sizes": sizes, "seed": seed, "generator": generator, "version": listops.VERSION}
    folder = _cache_path(cache_dir, "listops", spec)
    if not all((folder / name).is_file() for name in listops.SPLIT_FILES.values()):
        splits = listops.generate_splits(sizes["train"], sizes["val"], sizes["test"], seed, **generator)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            listops.write_tsv(tmp / listops.SPLIT_FILES[split], rows)
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
        if folder.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.replace(folder)
    return read_listops(folder, truncate)


def _pathfinder_block(args: tuple[int, int, int, pathfinder.PathfinderParams]) -> tuple[np.ndarray, np.ndarray]:
    seed, block, count, params = args
    return pathfinder.generate(count, seed * 1_000_003 + block, params)


def generate_pathfinder(num_images: int, seed: int, params: pathfinder.PathfinderParams, workers: int = 1,
                        block: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """`num_images` images in blocks of `block`, block b drawn from seed * 1000003 + b: the result does not depend
    on the number of worker processes."""
    jobs = [(seed, b, min(block, num_images - b * block), params) for b in range(-(-num_images // block))]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            results = list(pool.map(_pathfinder_block, jobs))
    else:
        results = [_pathfinder_block(job) for job in jobs]
    if not results:
        return np.zeros((0, params.window_size, params.window_size), np.uint8), np.zeros(0, np.int64)
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def generated_pathfinder(task: str, sizes: dict[str, int], seed: int, cache_dir: str | Path,
                         difficulty: str = "curv_contour_length_14", workers: int = 1) -> dict[str, SequenceDataset]:
    """Pathfinder splits from the snakes2 port (split s drawn from seed + 7919 s), cached as one .npz."""
    params = pathfinder.pathfinder_params(PATHFINDER_RESOLUTIONS[task], difficulty)
    spec = {"task": task, "difficulty": difficulty, "sizes": sizes, "seed": seed, "version": pathfinder.VERSION}
    path = _cache_path(cache_dir, "pathfinder", spec).with_suffix(".npz")
    if not path.is_file():
        arrays = {}
        for i, split in enumerate(SPLITS):
            images, labels = generate_pathfinder(sizes[split], seed + 7919 * i, params, workers)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images.reshape(len(images), -1), labels
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    with np.load(path) as data:
        return {split: SequenceDataset(data[f"{split}_images"], data[f"{split}_labels"]) for split in SPLITS}
