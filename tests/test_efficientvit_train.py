"""EfficientViT training: the shared classification data (shared/data/classification.py: ImageNet folder layout,
embedded MNIST-5k, seeded augmentation, repeated augmentation) and module (shared/lit/classification.py: mixup,
AGC, distillation, metrics), the project config, and a short run whose accuracy must rise far above chance."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from projects.efficientvit.module import EfficientViTModule
from shared.data.classification import (
    ClassificationDataModule,
    ImageFolderDataset,
    eval_transform,
    mnist_5k_splits,
    train_transform,
)
from shared.data.loading import ShardedSampler
from shared.lit.classification import ClassificationModule, adaptive_clip_grad_, unitwise_norm
from shared.lit.errors import ConfigError, DatasetError


def write_imagenet_layout(root, classes=("n01440764", "n01443537"), per_class=3, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{c}_{i}.JPEG", format="JPEG")
    return root


def test_imagenet_folder_layout_is_read(tmp_path):
    root = write_imagenet_layout(tmp_path / "imagenet")
    dm = ClassificationDataModule(source="real", root=str(root), img_size=32, batch_size=2)
    dm.setup()
    assert dm.num_classes == 2 and len(dm.datasets["train"]) == 6 and len(dm.datasets["test"]) == 6
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 0]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32)


def test_bad_folder_layouts_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match=r"missing/train is not a directory; expected <root>/<split>/<class>"):
        ClassificationDataModule(source="real", root=str(tmp_path / "missing"), img_size=32).setup()
    root = write_imagenet_layout(tmp_path / "a")
    (root / "train" / "n09999999").mkdir()
    with pytest.raises(DatasetError, match="n09999999 holds no images"):
        ImageFolderDataset(root, "train", eval_transform(32))
    root = write_imagenet_layout(tmp_path / "b")
    (root / "val" / "n01443537" / "n01443537_0.JPEG").write_bytes(b"not a jpeg")
    dataset = ImageFolderDataset(root, "val", eval_transform(32))
    with pytest.raises(DatasetError, match="n01443537_0.JPEG: cannot read"):
        dataset[3]
    root = write_imagenet_layout(tmp_path / "c")
    (root / "val" / "n01440764").rename(root / "val" / "n02000000")
    with pytest.raises(DatasetError, match="same classes"):
        ClassificationDataModule(source="real", root=str(root), img_size=32).setup()
    with pytest.raises(ConfigError, match="data.root"):
        ClassificationDataModule(source="real")


def test_mnist_split_is_fixed_disjoint_and_stratified():
    splits = mnist_5k_splits(32)
    images, labels = splits["train"]
    assert images.shape == (4000, 32, 32) and np.bincount(labels).tolist() == [400] * 10
    assert [len(splits[s][1]) for s in ("val", "test")] == [500, 500]
    again = mnist_5k_splits(32)
    assert all(np.array_equal(splits[s][0], again[s][0]) for s in splits)
    flat = {s: {im.tobytes() for im in splits[s][0]} for s in splits}
    assert not flat["val"] & flat["test"] and not flat["train"] & flat["test"]


def test_augmentation_is_a_pure_function_of_the_key():
    dm = ClassificationDataModule(img_size=64, batch_size=4)  # full DeiT augmentation incl. RandAugment, erasing
    dm.setup()
    train = dm.datasets["train"]
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state())
    a, b, c = train[(5, 1234)][0], train[(5, 1234)][0], train[(5, 99)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.random.get_rng_state(), states[2])
    image, label = dm.datasets["val"][0]
    assert image.shape == (3, 64, 64) and isinstance(label, int)
    # DeiT's rule for small images: RandomCrop(padding=4) instead of the resized crop
    assert type(train_transform(32).transform.transforms[0]).__name__ == "RandomCrop"


def test_repeated_augmentation_puts_copies_on_different_ranks():
    samplers = [ShardedSampler(600, shuffle=True, repeats=3, seed=1, rank=r, world_size=3) for r in range(3)]
    for s in samplers:
        s.set_epoch(2)
    keys = [list(s) for s in samplers]
    assert all(len(k) == 600 // 256 * 256 // 3 for k in keys)
    for position in range(len(keys[0])):  # one image per position, three different augmentation seeds
        indices = {keys[r][position][0] for r in range(3)}
        seeds = {keys[r][position][1] for r in range(3)}
        assert len(indices) == 1 and len(seeds) == 3
    dm = ClassificationDataModule(img_size=32, batch_size=6, repeated_aug=3)
    dm.setup()
    assert dm.train_dataloader().sampler.repeats == 3


def test_agc_clips_each_unit_to_its_weight_norm():
    layer = nn.Linear(8, 4)
    layer.weight.grad = torch.randn(4, 8) * torch.tensor([[1e-4], [10.0], [1e-4], [10.0]])
    layer.bias.grad = torch.full((4,), 100.0)
    before = layer.weight.grad.clone()
    adaptive_clip_grad_(layer.parameters(), 0.02)
    limit = 0.02 * unitwise_norm(layer.weight.detach()).clamp(min=1e-3).flatten()
    norms = layer.weight.grad.norm(dim=1)
    assert torch.equal(layer.weight.grad[[0, 2]], before[[0, 2]])  # small gradients are untouched
    torch.testing.assert_close(norms[[1, 3]], limit[[1, 3]])  # large ones are scaled to the limit
    torch.testing.assert_close(layer.bias.grad.norm(), 0.02 * layer.bias.detach().norm().clamp(min=1e-3))


def classification_module(**kw) -> EfficientViTModule:
    return EfficientViTModule(**{"num_classes": 10, "img_size": 32, "seed": 3, **kw})


def test_mixup_is_seeded_per_step_and_needs_even_batches():
    module = classification_module(mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5})
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    state = np.random.get_state()[1].copy()
    a, ta = module.mix(images.clone(), labels)
    b, tb = module.mix(images.clone(), labels)
    assert torch.equal(a, b) and torch.equal(ta, tb) and not torch.equal(a, images)
    assert np.array_equal(np.random.get_state()[1], state)
    torch.testing.assert_close(ta.sum(1), torch.ones(4))  # soft targets with smoothing 0.1
    assert ta.min() >= 0.1 / 10 - 1e-6
    with pytest.raises(ConfigError, match="even batch"):
        module.mix(images[:3], labels[:3])


def test_losses():
    module = classification_module()
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    torch.testing.assert_close(module.classification_loss(logits, labels),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))
    hard = classification_module(distillation={"type": "hard", "teacher": "resnet18", "alpha": 0.5})
    assert hard.model.distillation  # the official model gets its distillation head
    teacher_logits = torch.randn(6, 10)
    hard._teacher.append(lambda images: teacher_logits)
    student = (logits, torch.randn(6, 10))
    expected = 0.5 * F.cross_entropy(logits, labels, label_smoothing=0.1) + 0.5 * F.cross_entropy(
        student[1], teacher_logits.argmax(1))
    torch.testing.assert_close(hard.distillation_loss(torch.zeros(6, 3, 32, 32), student, labels), expected)
    with pytest.raises(ConfigError, match="teacher"):
        classification_module(distillation={"type": "soft"})
    with pytest.raises(ConfigError, match="grad_clip"):
        classification_module(grad_clip={"mode": "agc"})


def test_flops_per_sample_counts_forward_and_backward():
    module = classification_module()
    assert 3 * 4e6 < module.flops_per_sample() < 3 * 6e6  # ~5.2 M FLOPs forward for M0 at 32 px
    assert isinstance(module, ClassificationModule)


def test_short_training_run_learns_the_digits(tmp_path):
    """EfficientViT-M0 at 32 px on MNIST-5k: validation top-1 goes from chance (10%) far above 50%."""
    pl.seed_everything(0)
    dm = ClassificationDataModule(img_size=32, batch_size=32, eval_batch_size=250,
                                  train_transform={"auto_augment": None, "re_prob": 0.0, "hflip": 0.0,
                                                   "color_jitter": 0.0, "scale": [0.5, 1.0]})
    module = classification_module(grad_clip={"mode": "agc", "value": 0.02},
                                   optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 0.025},
                                   scheduler={"name": "cosine", "warmup_steps": 10, "min_lr": 1e-4})
    trainer = pl.Trainer(max_steps=80, limit_val_batches=1, val_check_interval=80, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, default_root_dir=tmp_path, accelerator="cpu")
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/top1"]
    trainer.fit(module, datamodule=dm)
    after = trainer.callback_metrics["val/top1"].item()
    print(f"val top-1 {before:.3f} -> {after:.3f}")
    assert before < 0.3 and after > 0.5, (before, after)


@pytest.mark.slow
def test_cli_default_project_runs(cli):
    result = cli("project=efficientvit", "trainer.max_steps=8", "data.batch_size=16", "data.img_size=32",
                 "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "logger=csv",
                 env={"OMP_NUM_THREADS": "1"})
    assert "test/top1" in result.stdout + result.stderr
    composed = cli("experiment=efficientvit/m4", "data.root=/data/imagenet", "--cfg", "job").stdout
    for line in ("variant: m4", "lr_reference_batch: 512", "auto_augment: rand-m9-mstd0.5-inc1", "repeated_aug: 3",
                 "max_epochs: 300", "mode: agc"):
        assert line in composed
