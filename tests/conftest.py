"""Shared fixtures: the embedded tiny model, one warm process for the session, and a CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tunefleet.common.raycluster import token_available

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model_name", "tunefleet/tiny-qwen2", "--dataset", "tunefleet/tiny-ultrafeedback"]
SPLIT = {"sft": "train_sft", "dpo": "train_prefs", "orpo": "train_prefs", "kto": "train_prefs", "grpo": "train_gen"}
# A few fast steps: batch 4, no accumulation.
FAST = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--logging_steps", "1"]

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
        os.environ[warm.SOCKET_ENV] = path
    yield path
    os.environ.pop(warm.SOCKET_ENV, None)
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


def tunefleet(*args, check: bool = True, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `tunefleet` CLI in a process of its own (forked warm; cold when the environment asks)."""
    from tunefleet.launcher import warm

    cmd = [sys.executable, "-m", "tunefleet.launcher.cli", *map(str, args)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = warm.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})}, cwd=str(ROOT))
        try:
            code = started.wait(timeout)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait()
            raise
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(
            cmd, code, out.read().decode(errors="replace"), err.read().decode(errors="replace")
        )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"tunefleet {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    return proc


class Started:
    """A `tunefleet` command started in the background, forked warm: pid, send_signal, kill, wait, and its output
    (stdout and stderr together) once it ended."""

    def __init__(self, *args, env: dict | None = None):
        from tunefleet.launcher import warm

        self.log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "tunefleet.launcher.cli", *map(str, args)]
        env = {**os.environ, **(env or {})}
        self.proc = warm.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        self.pid = self.proc.pid

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.proc.kill()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def output(self, timeout: float | None = None) -> str:
        self.wait(timeout)
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def sft_train(output_dir) -> list:
    """The start of a `tunefleet train` command line: a tiny SFT run into `output_dir` (append its flags)."""
    return ["train", "--method", "sft", *TINY, "--split", "train_sft", "--output_dir", output_dir]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the real CLI entry in this process (fast: imports once); returns (code, stdout, stderr)."""
    from tunefleet.launcher.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def checkpoint_steps(run_dir) -> list[int]:
    """Steps of the complete checkpoints in a run folder, ascending."""
    return sorted(
        int(p.name.split("-")[1]) for p in Path(run_dir).glob("checkpoint-*") if (p / "trainer_state.json").exists()
    )


def wait_for_checkpoint(run_dir, timeout: float = 240) -> None:
    """Poll until a run folder holds its first complete checkpoint (or the timeout passes)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and not checkpoint_steps(run_dir):
        time.sleep(0.2)


def pids_in_tree(root: int) -> set[int]:
    """A process and all its descendants, from /proc (torch elastic starts ranks in sessions of their own)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, grew = {root}, True
    while grew:
        kids = {p for p, pp in parents.items() if pp in tree and p not in tree}
        grew = bool(kids)
        tree |= kids
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant."""
    import signal

    for p in pids_in_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
