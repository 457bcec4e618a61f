"""`tunefleet train` on a terminal (a real pseudo-terminal): one progress bar with step/total, loss and time left,
and none of the noise: no warning caused by tunefleet's own arguments, no library bars, no raw log dicts. Off a
terminal: one line per logged step. `--verbose`: everything the libraries print."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest
from testkit import ROOT, TINY, tunefleet

NOISE = (
    "`gradient_checkpointing` is deprecated",  # was caused by tunefleet's own TrainingArguments
    "Setting accelerator to CPU",  # DeepSpeed on a host without a GPU
    "gemm_4bit_forward",  # bitsandbytes' optional CPU kernel hint
    "Loading weights",  # transformers' bar
    "Writing model shards",
    "{'loss':",  # the trainer's raw log dict
)


def train_args(out, *extra) -> list[str]:
    return [
        "train", "--method", "sft", *TINY, "--split", "train_sft", "--output_dir", str(out), "--max_steps", "6",
        "--logging_steps", "2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--use_qlora", "true", *extra,
    ]  # fmt: skip


def run_on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal; everything it wrote there, decoded."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunefleet.launcher.cli", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm-256color"},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: every process holding it has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_a_terminal_gets_one_bar_with_loss_and_time_left_and_no_noise(tmp_path):
    code, screen = run_on_a_terminal(train_args(tmp_path / "run"))
    assert code == 0, screen[-3000:]
    assert "6/6" in screen and "left" in screen and "loss " in screen, screen[-2000:]
    assert "\x1b[?25l" in screen  # the bar's live display (cursor hidden while it draws)
    assert "step 2 | max_steps 6" not in screen  # no per-log lines under the bar
    for noise in NOISE:
        assert noise not in screen, f"{noise!r} on the terminal:\n{screen[:3000]}"
    assert "done: " in screen


@pytest.mark.slow
def test_off_a_terminal_one_line_per_log_and_verbose_shows_everything(tmp_path):
    proc = tunefleet(*train_args(tmp_path / "plain"))
    output = proc.stdout + proc.stderr
    assert "step 2 | max_steps 6" in output and "step 6 | max_steps 6" in output
    assert "\x1b[" not in proc.stdout  # no bar, no colour codes in a log file
    for noise in NOISE:
        assert noise not in output, f"{noise!r} in the output:\n{output[:3000]}"

    quiet_switches = ("HF_HUB_DISABLE_PROGRESS_BARS", "DS_ACCELERATOR")  # as a user's shell has them: unset
    env = {k: v for k, v in os.environ.items() if k not in quiet_switches}
    proc = subprocess.run(
        [sys.executable, "-m", "tunefleet.launcher.cli", *train_args(tmp_path / "verbose", "--verbose", "true")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Loading weights" in output and "{'loss':" in output


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`tunefleet ... | head -1`: the reader goes away; the command ends without a traceback, with the exit code of
    a tool that SIGPIPE ended (141) when it still had output to write, else 0."""
    import json

    sweep = tmp_path / "runs"
    sweep.mkdir()
    runs = {f"run{i:04d}": {"output_dir": str(sweep / f"run{i:04d}"), "method": "sft"} for i in range(1500)}
    (sweep / "sweep.json").write_text(json.dumps({"name": "many", "backend": "local", "runs": runs}))
    for args in (["--help"], ["status", str(sweep)], ["sweep", "sweeps/demo.yaml", "--dry-run"]):
        shell = subprocess.run(
            [
                "bash",
                "-c",
                f"{sys.executable} -m tunefleet.launcher.cli {' '.join(args)} | head -1; exit ${{PIPESTATUS[0]}}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert "Traceback" not in shell.stderr and "BrokenPipeError" not in shell.stderr, shell.stderr
        assert shell.returncode in (0, 141) and shell.stdout.count("\n") == 1, (args, shell.returncode)
    closed = subprocess.Popen(
        [sys.executable, "-m", "tunefleet.launcher.cli", "status", str(sweep)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    closed.stdout.close()  # nobody reads: the first write that reaches the pipe fails
    assert closed.wait(timeout=300) == 141 and "Traceback" not in closed.stderr.read()
