"""HAT data: the embedded photos, the DF2K / benchmark folder layouts on tiny fixtures, and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from projects.hat.data import EMBEDDED_SET, SRDataModule, augment, mod_crop, paired_random_crop
from shared.data.imresize import imresize_uint8
from shared.lit.errors import ConfigError, DatasetError


def _save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_layout(root: Path, scale: int = 2) -> None:
    """DF2K training pairs and two benchmark sets. Training HR = LR with each pixel repeated s x s, so that
    alignment survives flips and transposes and is checkable exactly."""
    for i, (h, w) in enumerate([(24, 32), (20, 20)]):
        lr = _pattern(h, w, i)
        _save(root / "DF2K_HR" / f"{i + 1:04d}.png", lr.repeat(scale, 0).repeat(scale, 1))
        _save(root / "DF2K_LR_bicubic" / f"X{scale}" / f"{i + 1:04d}x{scale}.png", lr)
    for folder, names in (("Set5", ["baby", "bird"]), ("Set14", ["zebra"])):
        for j, name in enumerate(names):
            gt = _pattern(32, 48, 10 + j)
            _save(root / folder / f"GTmod{scale}" / f"{name}.png", gt)
            _save(root / folder / f"LRbicx{scale}" / f"{name}.png", imresize_uint8(gt, 1 / scale))


def test_real_layout_pairs_are_aligned(tmp_path):
    _write_layout(tmp_path)
    dm = SRDataModule(source="real", root=str(tmp_path), scale=2, patch_size=8, batch_size=4, samples_per_epoch=8,
                      val_sets=["Set5"], test_sets=["Set5", "Set14"])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["lq"].shape == (4, 3, 8, 8) and batch["gt"].shape == (4, 3, 16, 16)
    # every LR patch is its HR patch subsampled: crop positions and flips/transposes agree
    assert (batch["gt"][..., ::2, ::2] == batch["lq"]).all() and (batch["gt"][..., 1::2, 1::2] == batch["lq"]).all()
    (val,) = list(dm.val_dataloader())[:1]
    assert val["name"] == "baby" and val["lq"].shape == (1, 3, 16, 24) and val["gt"].shape == (1, 3, 32, 48)
    assert val["bicubic"].shape == val["gt"].shape
    tests = dm.test_dataloader()
    assert [len(t) for t in tests] == [2, 1] and dm.test_set_names() == ["Set5", "Set14"]


def test_training_draws_depend_only_on_the_sample_key(tmp_path):
    _write_layout(tmp_path)
    dm = SRDataModule(source="real", root=str(tmp_path), scale=2, patch_size=8, samples_per_epoch=8)
    dm.setup("fit")
    a, b, c = dm.train_set[(1, 123)], dm.train_set[(1, 123)], dm.train_set[(1, 124)]
    assert (a["lq"] == b["lq"]).all() and not (a["lq"] == c["lq"]).all()


def test_augment_and_crop_by_hand():
    rng = np.random.default_rng(0)
    lr = np.arange(4 * 6 * 1).reshape(4, 6, 1)
    hr = np.repeat(np.repeat(lr, 2, 0), 2, 1)
    lr_p, hr_p = paired_random_crop(lr, hr, 3, 2, rng, "x")
    assert (hr_p[::2, ::2] == lr_p).all() and hr_p.shape == (6, 6, 1)
    seen = set()
    for seed in range(64):
        out_lr, out_hr = augment([lr, hr], np.random.default_rng(seed))
        assert (out_hr[::2, ::2] == out_lr).all()
        seen.add(out_lr.tobytes())
    assert len(seen) == 8  # the 8 flips/transposes of a generic image all occur
    with pytest.raises(DatasetError, match="smaller than the training patch"):
        paired_random_crop(lr, hr, 5, 2, rng, "tiny.png")


def test_mod_crop():
    assert mod_crop(np.zeros((13, 10, 3)), 4).shape == (12, 8, 3)


def test_missing_lr_partner_names_the_file(tmp_path):
    _write_layout(tmp_path)
    (tmp_path / "DF2K_LR_bicubic" / "X2" / "0002x2.png").unlink()
    dm = SRDataModule(source="real", root=str(tmp_path), scale=2, patch_size=8)
    with pytest.raises(DatasetError, match="0002x2.png"):
        dm.setup("fit")


def test_wrong_scale_names_the_file(tmp_path):
    _write_layout(tmp_path)
    hr = np.asarray(Image.open(tmp_path / "DF2K_HR" / "0001.png"))
    _save(tmp_path / "DF2K_LR_bicubic" / "X2" / "0001x2.png", hr[::3, ::3])  # an x3 image in the X2 folder
    dm = SRDataModule(source="real", root=str(tmp_path), scale=2, patch_size=8, samples_per_epoch=2)
    dm.setup("fit")
    with pytest.raises(DatasetError, match="0001x2.png.*x2 partner"):
        dm.train_set[(0, 1)]


def test_benchmark_errors(tmp_path):
    _write_layout(tmp_path)
    dm = SRDataModule(source="real", root=str(tmp_path), scale=2, test_sets=["Urban100"])
    with pytest.raises(DatasetError, match="urban100"):
        dm.setup("test")
    (tmp_path / "Set5" / "LRbicx2" / "bird.png").unlink()
    dm = SRDataModule(source="real", root=str(tmp_path), scale=2, test_sets=["Set5"])
    with pytest.raises(DatasetError, match="LRbicx2/bird.png"):
        dm.setup("test")
    dm = SRDataModule(source="real", root=str(tmp_path), scale=4, test_sets=["Set14"])
    with pytest.raises(DatasetError, match="GTmod4"):
        dm.setup("test")
    with pytest.raises(DatasetError, match="DF2K_HR"):
        SRDataModule(source="real", root=str(tmp_path / "nowhere"), scale=2).setup("fit")
    with pytest.raises(ConfigError, match="data.root"):
        SRDataModule(source="real")


def test_hr_only_layout_makes_lr_with_matlab_bicubic(tmp_path):
    hr = _pattern(36, 44, 3)
    _save(tmp_path / "ImageNet" / "n01" / "a.png", hr)
    dm = SRDataModule(source="real", root=str(tmp_path), scale=2, patch_size=6, train_hr="ImageNet/n01",
                      train_lr=None, samples_per_epoch=2, val_sets=[])
    dm.setup("fit")
    lr, full_hr = dm.train_set.loaders[0]()
    assert (full_hr == hr).all() and (lr == imresize_uint8(hr, 0.5)).all()
    assert dm.val_dataloader() == []
    # class sub-folders are searched; an image narrower than the HR patch is stretched to it first
    _save(tmp_path / "ImageNet" / "n02" / "b.png", _pattern(40, 8, 4))
    dm = SRDataModule(source="real", root=str(tmp_path), scale=2, patch_size=6, train_hr="ImageNet",
                      train_lr=None, samples_per_epoch=2, val_sets=[])
    dm.setup("fit")
    assert len(dm.train_set.loaders) == 2
    lr, hr = dm.train_set.loaders[1]()
    assert hr.shape == (40, 12, 3) and lr.shape == (20, 6, 3)


def test_embedded_split_and_lr():
    dm = SRDataModule(scale=3, patch_size=8, embedded_train=["flower"], embedded_test=["chelsea"])
    dm.setup("fit")
    item = dm.eval_sets[EMBEDDED_SET][0]
    assert item["name"] == "chelsea"
    assert item["gt"].shape == (3, 300, 450) and item["lq"].shape == (3, 100, 150)  # 451 -> GTmod3 450
    gt = (item["gt"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    lq = (item["lq"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert (imresize_uint8(gt, 1 / 3) == lq).all()
    assert dm.val_set_names() == dm.test_set_names() == [EMBEDDED_SET]
