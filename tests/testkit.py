"""Shared test helpers: the tiny default's flags, the real CLI in a process of its own or in this one, JSON and
checkpoints of a run folder, process trees, a port that starts answering."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model_name", "tunefleet/tiny-qwen2", "--dataset", "tunefleet/tiny-ultrafeedback"]
SPLIT = {"sft": "train_sft", "dpo": "train_prefs", "orpo": "train_prefs", "kto": "train_prefs", "grpo": "train_gen"}
# A few fast steps: batch 4, no accumulation.
FAST = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--logging_steps", "1"]


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


def wait_for_port(port: int, what: str, timeout: float = 60) -> None:
    """Until something listens on 127.0.0.1:`port` (a server this test started); fails after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not start listening on 127.0.0.1:{port} within {timeout:.0f} s")
