"""DDP correctness on 2 CPU processes (gloo): the same global batch gives the same training as one process,
validation metrics are reduced over ranks, and a checkpoint moves between 2 ranks and 1 rank."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TOY
from tests.test_foundation import read_metrics

# No dropout and a constant learning rate: 1 process with batch 16 and 2 processes with batch 8 each then
# compute the same function, up to the order of floating-point sums.
EXACT = ["model.dropout=0.0", "model.scheduler.name=constant", "model.scheduler.warmup_steps=0"]


def losses(run_dir) -> list[float]:
    return [float(r["train/loss"]) for r in read_metrics(run_dir) if r.get("train/loss")]


def val_losses(run_dir) -> list[float]:
    return [float(r["val/loss"]) for r in read_metrics(run_dir) if r.get("val/loss")]


@pytest.mark.slow
def test_two_ranks_train_like_one_process_with_the_same_global_batch(cli):
    cli(*TOY, *EXACT, "run_id=one", "data.batch_size=16")
    cli(*TOY, *EXACT, "run_id=two", "data.batch_size=8", "trainer=ddp_cpu")
    one, two = cli.outputs / "toy" / "one", cli.outputs / "toy" / "two"
    # rank 0 logs its own shard's loss; the averaged gradient is what must agree, so compare the weights
    a = torch.load(one / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(two / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 48
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # validation is sharded without duplicates and reduced over ranks: the same mean as one process
    assert val_losses(two) == pytest.approx(val_losses(one), rel=1e-4)


@pytest.mark.slow
def test_checkpoint_from_two_ranks_resumes_on_one_and_back(cli):
    cli(*TOY, *EXACT, "run_id=ref", "data.batch_size=16", "trainer.max_epochs=3")
    cli(*TOY, *EXACT, "run_id=moved", "data.batch_size=8", "trainer=ddp_cpu", "trainer.max_epochs=1")
    cli(*TOY, *EXACT, "run_id=moved", "data.batch_size=16", "trainer.max_epochs=2", "ckpt_path=last")
    cli(*TOY, *EXACT, "run_id=moved", "data.batch_size=8", "trainer=ddp_cpu", "trainer.max_epochs=3",
        "ckpt_path=last")
    ref = torch.load(cli.outputs / "toy" / "ref" / "checkpoints" / "last.ckpt", weights_only=True)
    moved = torch.load(cli.outputs / "toy" / "moved" / "checkpoints" / "last.ckpt", weights_only=True)
    assert moved["global_step"] == ref["global_step"] == 48
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(moved["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
