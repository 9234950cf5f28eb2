"""Unit tests of the runner's parts: loaders, schedules, run ids, peak FLOPs, bundled data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from shared.data.loading import ShardedSampler, make_loader, sample_rng
from shared.lit.errors import ConfigError
from shared.lit.flops import GPU_PEAK_TFLOPS, cpu_peak_tflops, peak_tflops
from shared.lit.optim import build_optimizer, build_scheduler, param_groups
from shared.lit.resolvers import run_id_from_overrides


def test_training_shards_are_disjoint_cover_the_data_and_change_every_epoch():
    n, world = 103, 4
    samplers = [ShardedSampler(n, shuffle=True, seed=7, rank=r, world_size=world) for r in range(world)]
    epochs = []
    for epoch in range(2):
        keys = []
        for s in samplers:
            s.set_epoch(epoch)
            keys.append(list(s))
        lengths = {len(k) for k in keys}
        assert lengths == {math.ceil(n / world)}  # equal shares: DDP steps stay in lockstep
        indices = [i for k in keys for i, _ in k]
        assert set(indices) == set(range(n))  # nothing missing; wrap-around pads 1 duplicate
        assert len(indices) - n == math.ceil(n / world) * world - n
        seeds = [seed for k in keys for _, seed in k]
        assert len(set(seeds)) == len(seeds)  # every draw of a sample gets its own augmentation seed
        epochs.append(indices)
    assert epochs[0] != epochs[1]


def test_evaluation_shards_count_every_sample_once():
    n, world = 10, 3
    shards = [list(ShardedSampler(n, shuffle=False, rank=r, world_size=world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))


def test_a_resumed_pass_starts_after_the_consumed_batches_with_the_same_keys():
    full = list(ShardedSampler(50, shuffle=True, seed=3, batch_size=4, progress=lambda: (2, 0)))
    resumed = list(ShardedSampler(50, shuffle=True, seed=3, batch_size=4, progress=lambda: (2, 5)))
    assert resumed == full[20:]


def test_sample_rng_is_a_function_of_the_key():
    assert sample_rng((5, 123))[1].random() == sample_rng((5, 123))[1].random()
    assert sample_rng((5, 123))[1].random() != sample_rng((5, 124))[1].random()
    assert sample_rng(5)[0] == 5


def test_loader_iteration_does_not_touch_the_global_random_state():
    data = torch.utils.data.TensorDataset(torch.arange(20.0))
    loader = make_loader(data, 4, train=False)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    list(loader)
    assert torch.equal(before, torch.get_rng_state())


def test_run_id_is_readable_deterministic_and_safe_on_the_command_line():
    assert run_id_from_overrides("") == "default"
    assert run_id_from_overrides("experiment=hat/hat_x4,model.lr=0.1") == "experiment-hat-hat_x4_model.lr-0.1"
    long = ",".join(f"model.k{i}={i}" for i in range(40))
    assert run_id_from_overrides(long) == run_id_from_overrides(long) and len(run_id_from_overrides(long)) < 100
    assert run_id_from_overrides(long) != run_id_from_overrides(long + ",seed=1")


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def test_cosine_with_warmup_reaches_peak_then_min_lr():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(build_scheduler(opt, total_steps=110, name="cosine", warmup_steps=10, min_lr=0.1), 111)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5) and lrs[110] == pytest.approx(0.1)


def test_linear_decay_after_warmup():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(build_scheduler(opt, total_steps=12, name="linear", warmup_steps=2), 13)
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0]) and lrs[7] == pytest.approx(0.5) and lrs[12] == 0.0


def test_multistep_halves_at_each_milestone():
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=2e-4)
    lrs = _lrs(build_scheduler(opt, total_steps=10, name="multistep", milestones=[3, 6], gamma=0.5), 8)
    assert lrs == pytest.approx([2e-4] * 3 + [1e-4] * 3 + [5e-5] * 2)


def test_rsqrt_matches_lra_definition():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)  # lr = peak = base / sqrt(warmup)
    lrs = _lrs(build_scheduler(opt, total_steps=100, name="rsqrt", warmup_steps=4), 16)
    for step, lr in enumerate(lrs, start=1):
        assert lr == pytest.approx(min(1, step / 4) * math.sqrt(4 / max(step, 4)))


def test_warmup_in_epochs_needs_an_epoch_based_run():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError):
        build_scheduler(opt, total_steps=10, name="cosine", warmup_epochs=1)
    with pytest.raises(ConfigError):
        build_scheduler(opt, total_steps=10, name="cosin")


def test_no_weight_decay_on_norms_biases_and_listed_tables():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.table = nn.Parameter(torch.zeros(3, 4))

        def no_weight_decay(self):
            return {"table"}

    decay, no_decay = param_groups(Net(), 0.05)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_linear_lr_scaling_by_global_batch():
    opt = build_optimizer(nn.Linear(2, 2), name="adamw", lr=1e-3, lr_reference_batch=512, global_batch=2048)
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-3)


def test_peak_flops_table():
    assert peak_tflops(torch.device("cpu"), "32-true") == cpu_peak_tflops() > 0
    for gpu in ("H200", "H100", "A100"):
        assert GPU_PEAK_TFLOPS[gpu]["bf16"] > GPU_PEAK_TFLOPS[gpu]["fp32"] > 0


def test_bundled_datasets():
    from shared.data.bundled import PHOTOS, mnist_5k, photo, sklearn_digits
    from shared.data.text import clean_wikitext, pydoc_text, wikipedia_text

    images, labels = mnist_5k()
    assert images.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    digits, digit_labels = sklearn_digits()
    assert digits.shape == (1797, 8, 8) and digits.max() == 16 and set(digit_labels) == set(range(10))
    assert photo("astronaut").shape == (512, 512, 3) and len(PHOTOS) >= 10
    text = wikipedia_text()
    assert len(text) > 2_500_000 and "Anarchism" in text and "{{" not in text and "[[" not in text
    assert len(pydoc_text()) > 100_000
    assert clean_wikitext("'''Bold''' [[Target|shown]] {{cite|x={{y}}}} text<ref>r</ref>.") == "Bold shown text."
