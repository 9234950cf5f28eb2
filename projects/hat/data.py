"""Super-resolution data for HAT: paired (LR, HR) images, BasicSR's conventions throughout.

- `source="embedded"` (default, offline): the RGB photos bundled with scikit-image / scikit-learn / matplotlib
  (`shared.data.bundled`). Three are held out as a mini test set ("Photos3": astronaut, chelsea, coffee); the rest
  train. HR images are cropped to a multiple of the scale ("GTmod"), and LR images are made with the
  MATLAB-compatible bicubic resize, rounded once to uint8, as the benchmark LRbicx folders were made.
- `source="real"`: under `root`, DF2K/DIV2K for training (an HR folder and its `LR_bicubic/X{s}/NNNNx{s}.png`
  partner, or BasicSR's `*_sub` crops with equal names via `lr_template`, or HR only with LR made on the fly as for
  the ImageNet pre-training) and the benchmark sets Set5, Set14, B100, Urban100, Manga109 in BasicSR's
  `<set>/GTmod{s}` + `<set>/LRbicx{s}` layout for validation and test (one test loader per set).

Training samples are random LR patches of `patch_size` with their HR partner, flipped / transposed as BasicSR's
`augment` (hflip, vflip, rot90 each with p = 1/2), all drawn from `sample_rng(key)` (exact resume, disjoint DDP
shards). Evaluation samples are whole images with their MATLAB-bicubic upscaling (the "Bicubic" row of SR tables).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from shared.data.bundled import photos
from shared.data.imresize import imresize_uint8
from shared.data.loading import make_loader, sample_rng
from shared.lit.errors import ConfigError, DatasetError

EMBEDDED_TEST = ("astronaut", "chelsea", "coffee")
# Natural photos only: the bundled microscopy / astronomy images are mostly flat black and slow to prepare.
EMBEDDED_TRAIN = ("rocket", "motorcycle_left", "motorcycle_right", "china", "flower", "grace_hopper")
EMBEDDED_SET = "Photos3"
# The benchmark sets by the names SR tables use, with the folder names found in the wild (BasicSR's first).
BENCHMARK_FOLDERS = {
    "Set5": ("Set5",),
    "Set14": ("Set14",),
    "B100": ("BSDS100", "B100", "BSD100"),
    "Urban100": ("urban100", "Urban100"),
    "Manga109": ("manga109", "Manga109"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".JPEG")


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop (H, W, C) at the bottom/right to multiples of `scale` (BasicSR's `mod_crop`, the "GTmod" images)."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """The LR image of a (mod-cropped) uint8 HR image: MATLAB bicubic x 1/scale, rounded once to uint8."""
    return imresize_uint8(hr, 1.0 / scale)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) to float32 (C, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3); grey images are repeated over 3 channels (as cv2.imread does)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot be read as an image ({exc})") from exc


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The images in `folder` (and its sub-folders when `recursive`, e.g. ImageNet's class folders), sorted."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix in IMAGE_SUFFIXES and p.is_file())


def paired_random_crop(
    lr: np.ndarray, hr: np.ndarray, patch: int, scale: int, rng: np.random.Generator, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """An LR patch of `patch` x `patch` at a random position and the HR patch it came from (BasicSR's
    `paired_random_crop`)."""
    h, w = lr.shape[:2]
    if h < patch or w < patch:
        raise DatasetError(f"{name}: LR image {h}x{w} is smaller than the training patch {patch}x{patch}")
    top, left = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
    lr_patch = lr[top : top + patch, left : left + patch]
    hr_patch = hr[top * scale : (top + patch) * scale, left * scale : (left + patch) * scale]
    return lr_patch, hr_patch


def augment(
    images: list[np.ndarray], rng: np.random.Generator, flip: bool = True, rot: bool = True
) -> list[np.ndarray]:
    """BasicSR's `augment`: the same horizontal flip, vertical flip and transpose (each p = 1/2) on every image."""
    hflip = flip and rng.random() < 0.5
    vflip = rot and rng.random() < 0.5
    transpose = rot and rng.random() < 0.5
    out = []
    for img in images:
        if hflip:
            img = img[:, ::-1]
        if vflip:
            img = img[::-1]
        if transpose:
            img = img.transpose(1, 0, 2)
        out.append(np.ascontiguousarray(img))
    return out


class PatchDataset(Dataset):
    """Random training patches: `length` samples drawn over `len(loaders)` images (BasicSR's enlarge ratio).

    `loaders[i]()` returns image i as (LR, HR) uint8 arrays with HR = scale x LR.
    """

    def __init__(
        self,
        loaders: list[Callable[[], tuple[np.ndarray, np.ndarray]]],
        names: list[str],
        scale: int,
        patch_size: int,
        length: int,
        flip: bool = True,
        rot: bool = True,
    ) -> None:
        self.loaders, self.names = loaders, names
        self.scale, self.patch_size, self.length = scale, patch_size, length
        self.flip, self.rot = flip, rot

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, rng = sample_rng(key)
        image = index % len(self.loaders)
        lr, hr = self.loaders[image]()
        lr, hr = paired_random_crop(lr, hr, self.patch_size, self.scale, rng, self.names[image])
        lr, hr = augment([lr, hr], rng, self.flip, self.rot)
        return {"lq": to_tensor(lr), "gt": to_tensor(hr)}


class EvalDataset(Dataset):
    """Whole test images: LR, HR (GTmod) and the MATLAB-bicubic upscaling of the LR image."""

    def __init__(
        self, loaders: list[Callable[[], tuple[np.ndarray, np.ndarray]]], names: list[str], scale: int
    ) -> None:
        self.loaders, self.names, self.scale = loaders, names, scale

    def __len__(self) -> int:
        return len(self.loaders)

    def __getitem__(self, index: int) -> dict[str, Any]:
        lr, hr = self.loaders[index]()
        bicubic = imresize_uint8(lr, float(self.scale))
        return {"lq": to_tensor(lr), "gt": to_tensor(hr), "bicubic": to_tensor(bicubic), "name": self.names[index]}


def _in_memory(lr: np.ndarray, hr: np.ndarray) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    return lambda: (lr, hr)


class _PairFiles:
    """Reads one (LR, HR) pair from disk, checking that the sizes fit the scale. Picklable for worker processes."""

    def __init__(self, lr_path: Path, hr_path: Path, scale: int, exact: bool) -> None:
        self.lr_path, self.hr_path, self.scale, self.exact = lr_path, hr_path, scale, exact

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        lr, hr = read_rgb(self.lr_path), read_rgb(self.hr_path)
        s = self.scale
        (hl, wl), (hh, wh) = lr.shape[:2], hr.shape[:2]
        fits = (hh, wh) == (hl * s, wl * s) if self.exact else (0 <= hh - hl * s < s and 0 <= wh - wl * s < s)
        if not fits:
            raise DatasetError(
                f"{self.lr_path}: LR {hl}x{wl} is not the x{s} partner of {self.hr_path} ({hh}x{wh}); "
                f"expected LR {hh // s}x{wh // s} (wrong scale folder?)"
            )
        return lr, hr[: hl * s, : wl * s]


class _HROnly:
    """Reads an HR image and makes its LR partner with the MATLAB bicubic (`ImageNetPairedDataset`): mod-crop, and
    a side shorter than the HR patch is first stretched to it (official: cv2.resize; here the same bicubic)."""

    def __init__(self, hr_path: Path, scale: int, min_size: int) -> None:
        self.hr_path, self.scale, self.min_size = hr_path, scale, min_size

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        hr = mod_crop(read_rgb(self.hr_path), self.scale)
        h, w = hr.shape[:2]
        if h < self.min_size or w < self.min_size:
            hr = imresize_uint8(hr, None, output_shape=(max(h, self.min_size), max(w, self.min_size)))
        return bicubic_lr(hr, self.scale), hr


class SRDataModule(pl.LightningDataModule):
    """Paired super-resolution data (see the module docstring).

    Args:
        source: "embedded" (bundled photos, offline) or "real" (files under `root`).
        root: the datasets folder for `source="real"` (BasicSR's `datasets/`).
        scale: the upscaling factor (2, 3, 4).
        patch_size: LR training patch (the paper: 64, i.e. HR 128 / 192 / 256).
        batch_size: per device (the paper: 4 per GPU x 8 GPUs).
        samples_per_epoch: training patches per epoch (the image list is cycled).
        num_workers, seed: loader settings.
        train_hr / train_lr / lr_template: the training layout under `root`: HR folder; LR folder (`{scale}` is
            filled in; None makes LR on the fly with the MATLAB bicubic); LR file name from the HR stem.
        val_sets / test_sets: benchmark sets for validation (the first one is used; [] for none) / test (real
            source; names of BENCHMARK_FOLDERS or folder names under `root`).
        embedded_test / embedded_train: photo names for the embedded source.
    """

    def __init__(
        self,
        source: str = "embedded",
        root: str | None = None,
        scale: int = 2,
        patch_size: int = 64,
        batch_size: int = 4,
        samples_per_epoch: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        train_hr: str = "DF2K_HR",
        train_lr: str | None = "DF2K_LR_bicubic/X{scale}",
        lr_template: str = "{stem}x{scale}.png",
        val_sets: list[str] | None = None,
        test_sets: list[str] | None = None,
        embedded_test: list[str] | None = None,
        embedded_train: list[str] | None = None,
    ) -> None:
        super().__init__()
        if source not in ("embedded", "real"):
            raise ConfigError(f"data.source must be 'embedded' or 'real', got '{source}'")
        if source == "real" and not root:
            raise ConfigError("data.source=real needs data.root=<datasets folder> (BasicSR's datasets/ layout)")
        self.source, self.root = source, Path(root) if root else None
        self.scale, self.patch_size, self.batch_size = scale, patch_size, batch_size
        self.samples_per_epoch, self.num_workers, self.seed = samples_per_epoch, num_workers, seed
        self.train_hr, self.train_lr, self.lr_template = train_hr, train_lr, lr_template
        self.val_sets = list(val_sets) if val_sets is not None else ["Set5"]  # []: no validation
        self.test_sets = list(test_sets) if test_sets is not None else list(BENCHMARK_FOLDERS)
        self.embedded_test = list(embedded_test or EMBEDDED_TEST)
        self.embedded_train = list(embedded_train or EMBEDDED_TRAIN)
        self.train_set: Dataset | None = None
        self.eval_sets: dict[str, EvalDataset] = {}

    # -- names of the evaluation sets, known before setup (the module keys its metrics by them)
    def val_set_names(self) -> list[str]:
        return [EMBEDDED_SET] if self.source == "embedded" else self.val_sets[:1]

    def test_set_names(self) -> list[str]:
        return [EMBEDDED_SET] if self.source == "embedded" else self.test_sets

    def setup(self, stage: str | None = None) -> None:
        if self.source == "embedded":
            self._setup_embedded(stage)
        else:
            self._setup_real(stage)

    def _setup_embedded(self, stage: str | None) -> None:
        s = self.scale
        if stage in (None, "fit") and self.train_set is None:
            images = photos(self.embedded_train)
            pairs = [_in_memory(bicubic_lr(mod_crop(img, s), s), mod_crop(img, s)) for img in images.values()]
            self.train_set = PatchDataset(pairs, list(images), s, self.patch_size, self.samples_per_epoch)
        if EMBEDDED_SET not in self.eval_sets:
            loaders, names = [], []
            for name, img in photos(self.embedded_test).items():
                hr = mod_crop(img, s)
                loaders.append(_in_memory(bicubic_lr(hr, s), hr))
                names.append(name)
            self.eval_sets[EMBEDDED_SET] = EvalDataset(loaders, names, s)

    def _setup_real(self, stage: str | None) -> None:
        s = self.scale
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._real_train_set()
        wanted = (self.val_sets[:1] if stage in ("fit", "validate") else []) + (
            self.test_sets if stage in (None, "test") else []
        )
        for name in wanted:
            if name not in self.eval_sets:
                self.eval_sets[name] = self._benchmark_set(name, s)

    def _real_train_set(self) -> PatchDataset:
        s = self.scale
        hr_dir = self.root / self.train_hr
        if not hr_dir.is_dir():
            raise DatasetError(
                f"{hr_dir}: no training HR folder; expected {self.root}/{self.train_hr}/*.png with LR partners in "
                f"{self.root}/{(self.train_lr or '').format(scale=s)} (set data.train_hr / data.train_lr)"
            )
        hr_files = image_files(hr_dir, recursive=self.train_lr is None)
        if not hr_files:
            raise DatasetError(f"{hr_dir}: contains no images")
        if self.train_lr is None:  # ImageNet-style: HR only
            loaders = [_HROnly(p, s, self.patch_size * s) for p in hr_files]
        else:
            lr_dir = self.root / self.train_lr.format(scale=s)
            if not lr_dir.is_dir():
                raise DatasetError(f"{lr_dir}: no LR folder for x{s} (expected the DIV2K layout LR_bicubic/X{s})")
            loaders = []
            for hr_path in hr_files:
                lr_path = lr_dir / self.lr_template.format(stem=hr_path.stem, scale=s)
                if not lr_path.is_file():
                    raise DatasetError(
                        f"{lr_path}: missing LR partner of {hr_path} (data.lr_template={self.lr_template!r})"
                    )
                loaders.append(_PairFiles(lr_path, hr_path, s, exact=False))
        return PatchDataset(loaders, [p.name for p in hr_files], s, self.patch_size, self.samples_per_epoch)

    def _benchmark_set(self, name: str, scale: int) -> EvalDataset:
        candidates = BENCHMARK_FOLDERS.get(name, (name,))
        base = next((self.root / c for c in candidates if (self.root / c).is_dir()), None)
        if base is None:
            tried = ", ".join(str(self.root / c) for c in candidates)
            raise DatasetError(
                f"benchmark set {name}: none of {tried} exists (expected <set>/GTmod{scale} and <set>/LRbicx{scale})"
            )
        gt_dir, lr_dir = base / f"GTmod{scale}", base / f"LRbicx{scale}"
        for folder in (gt_dir, lr_dir):
            if not folder.is_dir():
                raise DatasetError(
                    f"{folder}: missing; benchmark sets need {base}/GTmod{scale} and {base}/LRbicx{scale}"
                )
        gt_files = image_files(gt_dir)
        if not gt_files:
            raise DatasetError(f"{gt_dir}: contains no images")
        lr_names = {p.name for p in image_files(lr_dir)}
        loaders = []
        for gt_path in gt_files:
            if gt_path.name not in lr_names:
                raise DatasetError(f"{lr_dir / gt_path.name}: missing LR partner of {gt_path}")
            loaders.append(_PairFiles(lr_dir / gt_path.name, gt_path, scale, exact=False))
        extra = lr_names - {p.name for p in gt_files}
        if extra:
            raise DatasetError(f"{lr_dir / sorted(extra)[0]}: LR image without a GTmod{scale} partner in {gt_dir}")
        return EvalDataset(loaders, [p.stem for p in gt_files], scale)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return make_loader(self.train_set, self.batch_size, train=True, seed=self.seed,
                           num_workers=self.num_workers, trainer=self._trainer_or_none())

    def _eval_loader(self, name: str) -> DataLoader:
        # Whole images of different sizes: one per batch, as BasicSR evaluates.
        return make_loader(self.eval_sets[name], 1, train=False, seed=self.seed, num_workers=self.num_workers,
                           trainer=self._trainer_or_none(), collate_fn=_collate_one)

    def val_dataloader(self) -> DataLoader | list:
        names = self.val_set_names()
        if not names:
            return []  # Lightning skips validation
        if names[0] not in self.eval_sets:
            self.setup("validate")
        return self._eval_loader(names[0])

    def test_dataloader(self) -> list[DataLoader]:
        if not all(n in self.eval_sets for n in self.test_set_names()):
            self.setup("test")
        return [self._eval_loader(name) for name in self.test_set_names()]

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)


def _collate_one(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch of one whole image: tensors get a batch dim, the name stays a string."""
    (item,) = items
    return {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else v) for k, v in item.items()}
