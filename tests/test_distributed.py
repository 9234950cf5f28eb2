"""DDP correctness on 2 CPU processes (gloo): the same global batch gives the same training as one process,
validation metrics are reduced over ranks, and a checkpoint moves between 2 ranks and 1 rank."""

from __future__ import annotations

import os

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


@pytest.mark.slow
def test_ddp_bench_compares_curves_and_writes_its_json_when_a_run_hangs(tmp_path):
    """scripts/bench_ddp_scaling.py on CPU ranks: 2 ranks match 1 process far closer than another seed does; a run
    past --run-timeout stops the bench with an error naming it, and the JSON is still written."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO, TEST_CONF

    def bench(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
        argv = [sys.executable, "scripts/bench_ddp_scaling.py", "--project", "toy", "--accelerator", "cpu",
                "--steps", "6", "--warmup", "1", *args, "--", f"hydra.searchpath=[file://{TEST_CONF}]"]
        done = subprocess.run(argv, cwd=REPO, env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True)
        return done, json.loads((tmp_path / "ddp_toy.json").read_text())

    done, out = bench("--parts", "correctness")
    assert done.returncode == 0, done.stderr[-2000:]
    diff = out["loss_rel_diff"]
    assert diff["1 GPU repeat"]["max"] == 0.0
    assert diff["2 GPUs vs 1 GPU"]["max"] < 1e-5 < 1e-2 < diff["1 GPU, seed 1"]["median"]
    assert len(out["curves"]["2x8"]) == 6

    done, out = bench("--parts", "correctness", "--run-timeout", "0.5", "--log-dir", str(tmp_path / "timeout"))
    assert done.returncode != 0 and "--run-timeout" in done.stderr
    assert out["curves"] == {} and out["wall_s"] == {}  # the first run timed out: nothing measured
