"""The runner's promises, proven on the test-only toy project (tests/toyproject) through the real CLI."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from shared.lit.registry import available_projects
from tests.conftest import REPO, TOY


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_losses(rows: list[dict[str, str]]) -> list[tuple[int, str]]:
    return [(int(r["step"]), r["train/loss"]) for r in rows if r.get("train/loss")]


def last_value(rows: list[dict[str, str]], key: str) -> float:
    return [float(r[key]) for r in rows if r.get(key)][-1]


# ---------------------------------------------------------------- the command line


def test_no_project_lists_projects_in_one_line():
    result = subprocess.run([sys.executable, "train.py"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: no project given")
    for name, info in available_projects().items():
        assert f"{name} ({info.description})" in lines[0]


def test_unknown_project_is_one_line():
    result = subprocess.run([sys.executable, "train.py", "project=hta"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown project 'hta'" in result.stderr and "available projects:" in result.stderr


def test_every_project_has_a_one_line_description():
    projects = available_projects()
    for name, info in projects.items():
        assert info.description and "\n" not in info.description, name


def test_help_does_not_import_torch_or_projects():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['train.py', '--help']\n"
        "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'lightning') if m in sys.modules]\n"
        "heavy += [m for m in sys.modules if m.startswith('projects.')]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert "HEAVY []" in result.stdout, result.stdout[-500:] + result.stderr[-2000:]


def test_config_typo_names_the_key(cli):
    result = cli(*TOY, "+model.hiden=3", check=False)
    assert result.returncode == 1
    assert "model.hiden: tests.toyproject.module.ToyModule has no parameter 'hiden'" in result.stdout + result.stderr


# ---------------------------------------------------------------- a run and what it leaves behind


@pytest.mark.slow
def test_train_writes_run_dir_checkpoints_config_and_throughput(cli):
    cli(*TOY, "trainer.max_epochs=2")
    run_dir = cli.outputs / "toy" / "trainer.max_epochs-2"  # deterministic: named by the overrides
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["project"]["name"] == "toy" and config["trainer"]["max_epochs"] == 2
    hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    assert len(hparams["git"]["commit"]) in (40, 7) or hparams["git"]["commit"] == "unknown"
    rows = read_metrics(run_dir)
    assert last_value(rows, "perf/samples_per_s") > 0
    assert 0 < last_value(rows, "perf/mfu") < 1
    assert "test/loss" in rows[-1] and last_value(rows, "test/loss") < last_value(rows, "train/loss") * 10
    # the checkpoint holds plain values only: it loads with weights_only=True
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["hidden"] == 32


@pytest.mark.slow
def test_resume_after_sigterm_reproduces_the_uninterrupted_run(cli):
    """Dropout, per-sample augmentation and a cosine schedule: a mid-epoch SIGTERM, then ckpt_path=last,
    must end bit-for-bit where the uninterrupted run ends."""
    cli(*TOY, "run_id=full")
    kill = ["run_id=cut", "+callbacks.kill._target_=tests.toyproject.callbacks.KillAtStep", "+callbacks.kill.step=21"]
    killed = cli(*TOY, *kill, check=False)
    assert killed.returncode == 143, killed.stderr[-2000:]
    cut = cli.outputs / "toy" / "cut"
    assert torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 21
    cli(*TOY, "run_id=cut", "ckpt_path=last")
    full = torch.load(cli.outputs / "toy" / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)
    assert full["global_step"] == resumed["global_step"] == 48
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    full_rows, resumed_rows = read_metrics(cli.outputs / "toy" / "full"), read_metrics(cut)
    assert last_value(full_rows, "test/loss") == last_value(resumed_rows, "test/loss")
    # the resumed run continues the CSV log: the whole curve, each step once, as the uninterrupted run logged it
    assert train_losses(resumed_rows) == train_losses(full_rows)


@pytest.mark.slow
def test_a_run_stopped_by_max_steps_mid_epoch_extends_like_the_uninterrupted_run(cli):
    """max_steps=10 stops inside the first epoch (16 steps); extending the run to 30 with ckpt_path=last must
    continue that epoch's data, not start the next epoch's (Lightning marks the stopped epoch as finished), and
    from the trained weights, not their EMA (which Lightning copies into the model when training ends)."""
    steady = ["model.scheduler.name=constant", "model.scheduler.warmup_steps=0", "trainer.max_epochs=-1", "test=false",
              # an EMA of the weights: the checkpoint written after training must resume the trained weights
              "+callbacks.ema._target_=shared.lit.callbacks.EMA", "+callbacks.ema.decay=0.9",
              # validation only at the end: last.ckpt is then written when training ends, after the EMA copy
              "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=30"]
    cli(*TOY, *steady, "run_id=full", "trainer.max_steps=30")
    cli(*TOY, *steady, "run_id=extended", "trainer.max_steps=10")
    cli(*TOY, *steady, "run_id=extended", "trainer.max_steps=30", "ckpt_path=last")
    full = read_metrics(cli.outputs / "toy" / "full")
    extended = read_metrics(cli.outputs / "toy" / "extended")

    def epochs(rows: list[dict]) -> list[int]:
        return [int(r["epoch"]) for r in rows if r.get("train/loss")]

    assert epochs(extended) == epochs(full)
    assert train_losses(extended) == train_losses(full)
    a = torch.load(cli.outputs / "toy" / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(cli.outputs / "toy" / "extended" / "checkpoints" / "last.ckpt", weights_only=True)
    for name in ("state_dict", "current_model_state"):  # the average, and the trained weights
        for key, value in a[name].items():
            assert torch.equal(value, b[name][key]), (name, key)


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(cli):
    result = cli(*TOY, "model.nan_at_step=20", check=False)
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "training loss is nan at step 20" in out
    last = cli.outputs / "toy" / "model.nan_at_step-20" / "checkpoints" / "last.ckpt"
    assert f"the last good checkpoint is {last}" in out
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 16  # saved after epoch 0, untouched by the bad step
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_non_finite_gradient_with_a_finite_loss_also_stops_before_the_update(cli):
    result = cli(*TOY, "model.nan_grad_at_step=20", check=False)
    assert result.returncode == 1
    assert "gradients are not finite (the loss was) at step 20" in result.stdout + result.stderr
    state = torch.load(cli.outputs / "toy" / "model.nan_grad_at_step-20" / "checkpoints" / "last.ckpt",
                       weights_only=True)
    assert state["global_step"] == 16
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_checkpoint_of_another_model_is_one_clear_error(cli):
    cli(*TOY, "run_id=small", "model.hidden=16", "trainer.max_epochs=1")
    other = cli.outputs / "toy" / "small" / "checkpoints" / "last.ckpt"
    result = cli(*TOY, "run_id=big", f"ckpt_path={other}", check=False)
    assert result.returncode == 1
    assert f"{other} does not fit this toy model" in result.stdout + result.stderr


@pytest.mark.slow
def test_init_from_starts_from_another_runs_weights_with_a_fresh_optimiser(cli):
    """init_from=<checkpoint>: the run starts from those weights (at lr 0 it ends with them unchanged) at step 0;
    a checkpoint of another model, or no file, is one clear error; a resumed run ignores it."""
    cli(*TOY, "run_id=first", "trainer.max_epochs=1")
    first = cli.outputs / "toy" / "first" / "checkpoints" / "last.ckpt"
    frozen = ["model.optimizer.lr=0", "model.optimizer.weight_decay=0", "trainer.max_epochs=1", "test=false"]
    cli(*TOY, "run_id=warm", f"init_from={first}", *frozen)
    a = torch.load(first, weights_only=True)
    b = torch.load(cli.outputs / "toy" / "warm" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 16  # the warm run counted its own steps from 0
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    cli(*TOY, "run_id=cold", *frozen)  # the same run without init_from keeps its own initialisation
    c = torch.load(cli.outputs / "toy" / "cold" / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(not torch.equal(v, c["state_dict"][k]) for k, v in a["state_dict"].items())

    result = cli(*TOY, "run_id=wide", "model.hidden=16", f"init_from={first}", check=False)
    assert result.returncode == 1 and f"init_from={first} does not fit this toy model" in result.stdout + result.stderr
    result = cli(*TOY, "run_id=none", "init_from=missing.ckpt", check=False)
    assert result.returncode == 1 and "init_from=missing.ckpt: no such file" in result.stdout + result.stderr
    result = cli(*TOY, "run_id=warm", f"init_from={first}", "ckpt_path=last", *frozen[:2], "trainer.max_epochs=2",
                 "test=false")
    assert "is not used" in result.stdout + result.stderr


def test_init_from_refuses_a_file_that_is_not_a_train_checkpoint(tmp_path):
    from shared.lit.errors import CheckpointError
    from shared.lit.runner import warm_start
    from tests.toyproject.module import ToyModule

    module = ToyModule(hidden=8, dropout=0.0, optimizer={"name": "adamw", "lr": 1e-3})
    text, bare = tmp_path / "notes.txt", tmp_path / "bare.pt"
    text.write_text("not a checkpoint")
    torch.save(module.state_dict(), bare)  # a bare state_dict: no Lightning `state_dict` entry
    with pytest.raises(CheckpointError, match=f"init_from={text}: cannot be read as a weights-only checkpoint"):
        warm_start(module, str(text), "toy")
    with pytest.raises(CheckpointError, match=f"init_from={bare}: not a checkpoint of train.py"):
        warm_start(module, str(bare), "toy")


# ---------------------------------------------------------------- distributed, sweeps, clusters, logging


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(cli):
    result = cli(*TOY, "trainer=ddp_cpu")
    run_dir = cli.outputs / "toy" / "trainer-ddp_cpu"
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran, in the same run directory
    assert "distributed_backend=gloo" in result.stdout + result.stderr
    # 256 samples, batch 16 per rank, 2 ranks: 8 steps an epoch
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 24


@pytest.mark.slow
def test_multirun_sweep_gives_each_job_its_own_run_dir(cli):
    cli("-m", *TOY, "model.hidden=16,32", "seed=0,1", "trainer.max_epochs=1")
    dirs = sorted(p.name for p in (cli.outputs / "toy").iterdir())
    assert dirs == [f"model.hidden-{h}_seed-{s}_trainer.max_epochs-1" for h in (16, 32) for s in (0, 1)]
    for d in dirs:
        assert (cli.outputs / "toy" / d / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_slurm_preset_runs_through_submitit_local_executor(cli):
    cli("-m", "hydra/launcher=slurm_local", *TOY, "model.hidden=16,32", "trainer.max_epochs=1")
    for hidden in (16, 32):
        run_dir = cli.outputs / "toy" / f"model.hidden-{hidden}_trainer.max_epochs-1"
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((cli.outputs / ".submitit").iterdir())  # the jobs went through submitit


def test_slurm_preset_starts_one_task_per_gpu():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                          "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4  # SLURM starts the ranks, one per GPU
    assert launcher.nodes == 2
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # requeue on preemption


@pytest.mark.slow
def test_wandb_offline_without_account_or_network_one_run_per_job(cli):
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "WANDB_BASE_URL": "http://127.0.0.1:9"}
    cli("-m", "project=toy", f"hydra.searchpath=[file://{REPO / 'tests' / 'conf'}]", "logger=wandb",
        "model.hidden=16,32", "trainer.max_epochs=1", env=env)
    runs = sorted(cli.outputs.glob("toy/*/wandb/offline-run-*"))
    assert len(runs) == 2 and runs[0].parent.parent != runs[1].parent.parent
    for run in runs:
        assert list(run.glob("run-*.wandb"))


@pytest.mark.slow
def test_tensorboard_logger(cli):
    cli("project=toy", f"hydra.searchpath=[file://{REPO / 'tests' / 'conf'}]", "logger=tensorboard",
        "trainer.max_epochs=1")
    events = list((cli.outputs / "toy" / "trainer.max_epochs-1" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.slow
def test_test_ckpt_best_tests_the_validation_selected_checkpoint(cli):
    # mode=max selects the epoch with the *highest* validation loss, the first one here: so the selected checkpoint
    # and the final weights differ, and the test can tell which of them the test split saw.
    cli(*TOY, "trainer.max_epochs=3", "test_ckpt=best", "callbacks.best_checkpoint.monitor=val/loss",
        "callbacks.best_checkpoint.mode=max", "run_id=best")
    run_dir = cli.outputs / "toy" / "best"
    rows = read_metrics(run_dir)
    (best,) = (run_dir / "checkpoints").glob("best-step*.ckpt")
    state = torch.load(best, map_location="cpu", weights_only=True)
    monitor = next(v for k, v in state["callbacks"].items() if "'kind': 'best'" in k)
    assert float(monitor["best_model_score"]) == pytest.approx(max(float(r["val/loss"]) for r in rows
                                                                   if r.get("val/loss")))
    # last.ckpt keeps following the latest step (ckpt_path=last), whatever the monitored score does
    last = run_dir / "checkpoints" / "last.ckpt"
    assert state["global_step"] < torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 48
    tested = last_value(rows, "test/loss")
    result = cli(*TOY, f"weights={best}", script="eval.py")
    assert f"test/loss  {tested:.4f}" in result.stdout
    final = cli(*TOY, f"weights={last}", script="eval.py")
    assert f"test/loss  {tested:.4f}" not in final.stdout


def test_test_ckpt_best_without_validation_tests_the_final_weights(cli):
    result = cli(*TOY, "trainer.max_epochs=1", "test_ckpt=best", "callbacks.best_checkpoint.monitor=val/loss",
                 "+trainer.limit_val_batches=0", "run_id=noval")
    assert "validation never ran" in result.stdout + result.stderr
    assert last_value(read_metrics(cli.outputs / "toy" / "noval"), "test/loss") > 0


@pytest.mark.parametrize("overrides, message", [
    (["test_ckpt=bst"], "test_ckpt='bst': use null"),
    (["test_ckpt=best"], "test_ckpt=best needs a monitored checkpoint"),
])
def test_bad_test_ckpt_is_one_line_before_training(cli, overrides, message):
    result = cli(*TOY, *overrides, check=False)
    assert result.returncode == 1 and message in result.stdout + result.stderr
    assert not list(cli.outputs.glob("toy/*/checkpoints/*.ckpt"))


def test_eval_reproduces_the_test_metric_of_a_checkpoint(cli):
    cli(*TOY, "trainer.max_epochs=1")
    run_dir = cli.outputs / "toy" / "trainer.max_epochs-1"
    trained = last_value(read_metrics(run_dir), "test/loss")
    result = cli(*TOY, f"weights={run_dir / 'checkpoints' / 'last.ckpt'}", script="eval.py")
    assert f"test/loss  {trained:.4f}" in result.stdout
    results = yaml.safe_load((cli.outputs / "toy" / "eval" / "default" / "results.json").read_text())
    assert results["test/loss"] == pytest.approx(trained, rel=1e-6)
