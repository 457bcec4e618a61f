"""Fixtures and hooks only: the embedded tiny model, one warm process for the session, the files' order, and the
environment a test leaves. Shared helpers (running the CLI, reading JSON, process trees): tests/testkit.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tunefleet.common.contract import WARM_SOCKET_ENV
from tunefleet.common.raycluster import token_available

# `make test` runs three pytest workers (pytest-xdist, `--dist loadfile`) on the 2 cores: a file's tests run on one
# worker, so a module fixture (trained runs, the local SLURM, a 2-node Ray) is made once and one SLURM runs at a time;
# a third worker fills the time the others wait (Ray and SLURM starting, runs waiting on each other). Files go out
# longest first (seconds each took in a two-worker run; in a three-worker one the workers ended within 41 s).
LONGEST_FILES_FIRST = (
    "test_cluster_recipes",  # ~300 s alone (three cluster setups in fresh venvs, each running the cluster check)
    "test_recipes",  # ~250 s alone (TRL recipes, full fine-tuning, ZeRO-3, pipelines)
    "test_slurm",  # 176 s
    "test_search",  # 173
    "test_pipeline",  # 139
    "test_storage",  # 129
    "test_multinode",  # 128
    "test_warm",  # 110
    "test_memory",  # 90
    "test_sweep",  # 84
    "test_package",  # 75
    "test_generation",  # 62
    "test_eval",  # 53
    "test_distributed",  # 39
    "test_export",  # 37
    "test_train",  # 31
    "test_checkpoints",  # 32
    "test_locks",  # 30
    "test_data",  # 30
)


def pytest_collection_modifyitems(config, items):
    def order(item) -> int:
        name = item.path.stem
        return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)

    items.sort(key=order)


RAY_TMPDIR_MADE = pytest.StashKey[str]()


def pytest_configure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        # Three workers share 2 cores: one thread per training process, not two each
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        # Each worker's local Rays keep their session folders apart from the other's (the path stays short:
        # Ray's unix sockets live under it)
        if "RAY_TMPDIR" not in os.environ:
            os.environ["RAY_TMPDIR"] = config.stash[RAY_TMPDIR_MADE] = tempfile.mkdtemp(
                prefix=f"tfr{worker}", dir="/tmp"
            )
    elif not token_available():
        # Ray's token, which the first head of a machine writes, is made before the workers start: two heads
        # starting at once would each write their own
        ray = Path(sys.executable).parent / "ray"
        subprocess.run([str(ray), "get-auth-token", "--generate"], check=True, capture_output=True, timeout=120)


def pytest_unconfigure(config):
    made = config.stash.get(RAY_TMPDIR_MADE, None)
    if made:
        shutil.rmtree(made, ignore_errors=True)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from tunefleet.trainers.tiny import ensure_model

    return ensure_model()


@pytest.fixture(scope="session", autouse=True)
def warm_process():
    """One warm process for the whole session, advertised to every process the tests start: the CLI commands
    below and the runs of their sweeps fork from it instead of importing the training stack each time."""
    from tunefleet.launcher import warm

    path = warm.prestart()
    if path:
        os.environ[WARM_SOCKET_ENV] = path
    yield path
    os.environ.pop(WARM_SOCKET_ENV, None)
    warm.stop_all()


@pytest.fixture(autouse=True)
def warm_processes_of_a_test_end_with_it(warm_process):
    """A test that runs commands in an environment of its own (a PYTHONPATH, a bucket's credentials) gets a warm
    process for that environment (about 630 MB): it ends with the test, so that the session keeps only its own."""
    from tunefleet.launcher import warm

    before = warm.own_sockets()
    yield
    warm.stop(warm.own_sockets() - before)


@pytest.fixture(autouse=True)
def environment_of_a_test_ends_with_it():
    """Variables set in this process during a test (a library's import: lm-eval sets HF_XET_HIGH_PERFORMANCE; the
    in-process tracking tests set WANDB_RUN_ID) are undone after it: later tests' commands would carry them, and the
    session's warm process declines an environment that differs in what its imports read."""
    saved = dict(os.environ)
    yield
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    os.environ.update(saved)
