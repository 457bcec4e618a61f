"""Whole checkpoints only: a torn checkpoint is set aside and the run resumes from the one before; a full disk, before
or during a save, stops the run in one line as interrupted, with no partial checkpoint left, and the same command
finishes once there is room."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from testkit import FAST, TINY, read_json, run_cli

from tunefleet.common.jsonfile import write_json_atomic
from tunefleet.trainers import checkpoints

SIX_STEPS = ["--max_steps", 6, "--save_steps", 2, "--finetune", "lora", "--learning_rate", "1e-3", *FAST]


def train(capsys, out: Path, *extra) -> tuple[int, str, str]:
    return run_cli(
        capsys, "train", "--method", "sft", *TINY, "--split", "train_sft", "--output_dir", out, *SIX_STEPS, *extra
    )


def losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_json(run / "trainer_state.json")["log_history"] if "loss" in e}


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (KiB), resizable, unmounted after the test; skipped where mounting is not allowed."""
    mounts = []

    def mount(kib: int, at: Path | None = None) -> Path:
        at = at or tmp_path / f"disk{len(mounts)}"
        if at in mounts:
            subprocess.run(["mount", "-o", f"remount,size={kib}k", str(at)], check=True)
            return at
        at.mkdir(exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(at)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(at)
        return at

    yield mount
    for at in mounts:
        subprocess.run(["umount", str(at)], check=False)


def test_a_torn_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path, capsys, tiny_model):
    whole, torn = tmp_path / "whole", tmp_path / "torn"
    assert train(capsys, whole)[0] == 0
    assert all((whole / f"checkpoint-{s}" / checkpoints.MARKER).is_file() for s in (2, 4, 6))
    # The same run, stopped right after its last save (a node lost): its newest checkpoint's weights cut in half.
    torn.mkdir()
    for step in (2, 4, 6):
        subprocess.run(["cp", "-r", str(whole / f"checkpoint-{step}"), str(torn)], check=True)
    record = read_json(whole / "run.json") | {"status": "interrupted"}
    (torn / "run.json").write_text(json.dumps(record))
    weights = torn / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    code, out, err = train(capsys, torn)
    assert code == 0, err
    assert "set aside checkpoint-6: adapter_model.safetensors is unreadable" in out
    assert f"resuming from {torn / 'checkpoint-4'}" in out
    rerun = read_json(torn / "run.json")
    assert rerun["status"] == "finished" and rerun["resumed_from"] == str(torn / "checkpoint-4")
    (aside,) = rerun["set_aside"]
    assert aside["checkpoint"] == "checkpoint-6" and (torn / aside["moved_to"]).is_dir()
    assert losses(torn) == losses(whole)  # steps 5 and 6 trained again give what the uninterrupted run logged


def test_a_checkpoint_whose_save_did_not_finish_is_never_resumed_from(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    checkpoints.mark_whole(run / "checkpoint-2")  # checkpoint-4 has every file but its save never finished
    resume, aside = checkpoints.resumable(run, main=True)
    assert resume == str(run / "checkpoint-2")
    assert [a.checkpoint for a in aside] == ["checkpoint-4"] and "did not finish" in aside[0].why


def test_a_disk_too_small_for_the_next_checkpoint_stops_the_run_and_the_same_command_finishes_later(
    tmp_path, capsys, tiny_model, small_disk
):
    disk = small_disk(1600)  # one checkpoint of the tiny run (~0.9 MiB) fits, a second does not
    out = disk / "run"
    code, stdout, stderr = train(capsys, out)
    assert code == checkpoints.DISK_FULL_EXIT and "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert f"no room for the next checkpoint in {out}:" in line and "MiB free, a checkpoint takes" in line
    record = read_json(out / "run.json")
    assert (record["status"], record["global_step"]) == ("interrupted", 4)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not list(out.glob(".*tmp*"))

    small_disk(8000, disk)  # space freed: the same command resumes from the first checkpoint and finishes
    code, stdout, stderr = train(capsys, out)
    assert code == 0, stderr
    assert f"resuming from {out / 'checkpoint-2'}" in stdout and read_json(out / "run.json")["status"] == "finished"


def test_a_disk_that_fills_during_a_save_leaves_no_partial_checkpoint(tmp_path, capsys, tiny_model, small_disk):
    out = small_disk(400) / "run"  # not even one checkpoint fits: the first save fails half way
    code, stdout, stderr = train(capsys, out)
    assert code == checkpoints.DISK_FULL_EXIT and "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert f"the disk filled during a checkpoint in {out}" in line and "partial files removed: checkpoint-2" in line
    assert not list(out.glob("checkpoint-*")) and read_json(out / "run.json")["status"] == "interrupted"


def test_save_total_limit_makes_room_before_a_save_where_the_disk_is_tight(small_disk):
    run = small_disk(2500) / "run"
    for step in (2, 4):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "weights.bin").write_bytes(b"\0" * 900 * 1024)
    # 2 x 0.9 MiB used, 0.6 MiB free: keeping 2, the oldest goes before the next save rather than after it
    assert checkpoints.make_room(run, keep=2) is None
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4"]
    (run / "checkpoint-6").mkdir()
    (run / "checkpoint-6" / "weights.bin").write_bytes(b"\0" * 900 * 1024)
    why = checkpoints.make_room(run, keep=None)  # without a limit nothing may go: the save is refused instead
    assert why is not None and why.startswith(f"no room for the next checkpoint in {run}: 0.7 MiB free")
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_a_json_write_that_fails_leaves_no_half_file(small_disk):
    disk = small_disk(64)
    with pytest.raises(OSError):
        write_json_atomic(disk / "results.json", {"rows": "x" * 200_000})
    assert list(disk.iterdir()) == []


def test_the_evaluator_on_a_full_disk_is_one_line_and_leaves_no_half_results(tmp_path, capsys, tiny_model, small_disk):
    runs = small_disk(2200) / "runs"
    code, _, err = train(capsys, runs / "sft_s1", "--max_steps", 2, "--save_steps", 100)
    assert code == 0, err
    for checkpoint in (runs / "sft_s1").glob("checkpoint-*"):
        subprocess.run(["rm", "-r", str(checkpoint)], check=True)
    free = os.statvfs(runs).f_bavail * os.statvfs(runs).f_frsize
    (runs / "filler").write_bytes(b"\0" * (free - 8 * 1024))  # 8 KiB left: the lock fits, the results do not
    code, _, err = run_cli(capsys, "eval", "--runs_dir", runs, "--max_samples", 8, "--max_generation_samples", 1)
    assert code == checkpoints.DISK_FULL_EXIT and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert (
        line.startswith("error: the disk is full (No space left on device) writing ")
        and "run the same command" in line
    )
    assert not [p.name for p in runs.iterdir() if "results" in p.name or ".tmp" in p.name]
