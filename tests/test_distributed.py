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
    a = torch.load(one / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(two / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 48
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # the logged training loss is the mean over ranks: the global batch's loss, step for step
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
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


@pytest.mark.slow
def test_slurm_preset_starts_one_rank_per_task_and_trains_like_one_process(cli):
    """`hydra/launcher=slurm_local trainer=ddp_cpu`: submitit starts the 2 tasks (tasks_per_node = devices), each is
    one rank of one DDP job (no rank launches ranks of its own), and they train like 1 process with batch 16."""
    cli(*TOY, *EXACT, "run_id=one", "data.batch_size=16")
    cli("-m", "hydra/launcher=slurm_local", *TOY, *EXACT, "run_id=slurm", "data.batch_size=8", "trainer=ddp_cpu")
    tasks = sorted(p.name for p in (cli.outputs / ".submitit").glob("*/*_log.out"))
    assert len(tasks) == 2, tasks  # one job, two tasks
    a = torch.load(cli.outputs / "toy" / "one" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(cli.outputs / "toy" / "slurm" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 48
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert losses(cli.outputs / "toy" / "slurm") == pytest.approx(losses(cli.outputs / "toy" / "one"), rel=1e-4)


def test_submitit_local_environment_refuses_a_task_count_that_is_not_the_device_count(monkeypatch):
    from shared.lit.cluster import SubmititLocalEnvironment
    from shared.lit.errors import ConfigError

    for name, value in {"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
                        "SUBMITIT_LOCAL_JOB_ID": "4242"}.items():
        monkeypatch.setenv(name, value)
    env = SubmititLocalEnvironment()
    assert SubmititLocalEnvironment.detect()
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (2, 1, 1, 0)
    env.validate_settings(num_devices=2, num_nodes=1)
    with pytest.raises(ConfigError, match="trainer.devices"):
        env.validate_settings(num_devices=4, num_nodes=1)


@pytest.mark.slow
def test_a_run_moves_from_two_ranks_to_one_and_back_inside_an_epoch(cli):
    """Stops by max_steps at steps 10 and 20 of 16-step epochs: each resume continues mid-epoch on another world
    size with the same global batch, and the whole curve is the uninterrupted one."""
    steps = ["trainer.max_epochs=-1", "test=false", "trainer.log_every_n_steps=1"]
    cli(*TOY, *EXACT, *steps, "run_id=ref", "data.batch_size=16", "trainer.max_steps=30")
    cli(*TOY, *EXACT, *steps, "run_id=moved", "data.batch_size=8", "trainer=ddp_cpu", "trainer.max_steps=10")
    cli(*TOY, *EXACT, *steps, "run_id=moved", "data.batch_size=16", "trainer.max_steps=20", "ckpt_path=last")
    cli(*TOY, *EXACT, *steps, "run_id=moved", "data.batch_size=8", "trainer=ddp_cpu", "trainer.max_steps=30",
        "ckpt_path=last")
    ref, moved = losses(cli.outputs / "toy" / "ref"), losses(cli.outputs / "toy" / "moved")
    assert len(moved) == len(ref) == 30
    assert moved == pytest.approx(ref, rel=1e-4)
