"""Shared test helpers: run the real CLI in a subprocess, compose configs in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU under its interpreter; this must be set before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One intra-op thread per process: on a 2-core machine two OpenMP threads per process (and the 2-process DDP
# tests) oversubscribe the cores and spin against each other, 10-40x slower when anything else runs.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TEST_CONF = REPO / "tests" / "conf"
TOY = ["project=toy", f"hydra.searchpath=[file://{TEST_CONF}]", "logger=csv"]


def run_cli(args: list[str], log_dir: Path, env: dict[str, str] | None = None, timeout: int = 300,
            script: str = "train.py") -> subprocess.CompletedProcess:
    """`python train.py <args>` from the repository root, writing under `log_dir`."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", **(env or {})}
    # Overrides must precede trailing flags such as `--cfg hydra`.
    flag = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    args = [*args[:flag], f"paths.log_dir={log_dir}", *args[flag:]]
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def triton_kernel_module(name: str):
    """The Triton kernel module `name` (e.g. "shared.kernels.memory_scan.triton_scan"): as imported on a GPU, else
    reloaded for the CPU interpreter (the variable is read when a kernel is decorated); skips the test without it."""
    import importlib

    pytest.importorskip("triton")
    module = importlib.import_module(name)
    if torch.cuda.is_available():
        return module
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    return importlib.reload(module)


@pytest.fixture
def load_script(monkeypatch):
    """`load_script("bench_lra")` imports scripts/bench_lra.py as module `bench_lra`, registered in `sys.modules`
    for the test (process pools unpickle the script's functions by module name)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def cli(tmp_path):
    def _run(*args: str, env: dict[str, str] | None = None, check: bool = True, script: str = "train.py"):
        result = run_cli(list(args), tmp_path / "outputs", env=env, script=script)
        if check and result.returncode != 0:
            raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    _run.outputs = tmp_path / "outputs"
    return _run
