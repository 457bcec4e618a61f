"""One writer per run folder: two sweeps of one spec (on a local runs folder and in a bucket) train every run once and
both end well; a `tunefleet train` by hand into a folder being trained is refused naming the holder; a killed
holder's lock is taken over at once."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from testkit import Started, kill_tree, read_json, tunefleet

from tunefleet.common.runlock import LOCK_NAME, Holder, RunLock
from tunefleet.common.storage import Store

BASE = {
    "model_name": "tunefleet/tiny-qwen2",
    "dataset": "tunefleet/tiny-ultrafeedback",
    "split": "train_sft",
    "max_steps": 40,
    "save_steps": 20,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "use_qlora": False,
}


def spec(tmp_path: Path, runs_dir: str, **base) -> Path:
    path = tmp_path / "spec.yaml"
    data = {
        "name": "twice",
        "runs_dir": runs_dir,
        "base": {**BASE, **base},
        "grid": {"method": ["sft"], "seed": [1, 2, 3]},
        "eval": {"max_samples": 8, "max_generation_samples": 1},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def starts(log: str) -> int:
    """How many times a run's train.log says it was launched."""
    return sum(1 for line in log.splitlines() if line.startswith("=== ") and " on " in line and "-m " in line)


def two_sweeps(spec_path: Path, env: dict | None = None) -> tuple[str, str]:
    first = Started("sweep", spec_path, "--backend", "local", "--eval", env=env)
    time.sleep(1)
    second = Started("sweep", spec_path, "--backend", "local", "--eval", env=env)
    out_first, out_second = first.output(600), second.output(600)
    assert first.returncode == 0, out_first[-3000:]
    assert second.returncode == 0, out_second[-3000:]
    return out_first, out_second


@pytest.mark.slow
def test_two_sweeps_of_one_spec_train_every_run_once(tmp_path, tiny_model):
    runs = tmp_path / "runs"
    out_first, out_second = two_sweeps(spec(tmp_path, str(runs)))
    for seed in (1, 2, 3):
        run = runs / f"sft_tiny-qwen2_s{seed}"
        assert starts((run / "train.log").read_text()) == 1
        record = read_json(run / "run.json")
        assert (record["status"], record["global_step"], record["attempts"]) == ("finished", 40, 1)
        assert not (run / LOCK_NAME).exists()
    assert "trained elsewhere" in out_first + out_second  # they met: one waited for the other's run
    assert "finished 3 failed 0" in out_first and "finished 3 failed 0" in out_second
    results = read_json(runs / "evaluation_results.json")  # both evaluated: one wrote, the other reused its rows
    assert {f"sft_tiny-qwen2_s{s}" for s in (1, 2, 3)} <= set(results)
    assert all(results[f"sft_tiny-qwen2_s{s}"]["error"] is None for s in (1, 2, 3))


@pytest.mark.slow
def test_two_sweeps_of_one_spec_in_a_bucket_train_every_run_once(tmp_path, tiny_model):
    from local_s3 import LocalS3

    server = LocalS3().start()
    try:
        bucket = server.make_bucket("twice")
        env = {**server.env, "TUNEFLEET_SCRATCH": str(tmp_path / "scratch")}
        two_sweeps(spec(tmp_path, f"{bucket}/runs", max_steps=20, save_steps=10), env)
        os.environ.update(server.env)  # this process reads the bucket too (conftest restores the environment)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # a client made for an earlier test's server would ask that one
        for seed in (1, 2, 3):
            run = Store(f"{bucket}/runs/sft_tiny-qwen2_s{seed}")
            assert starts((run.read_bytes("train.log") or b"").decode()) == 1
            record = run.read_json("run.json") or {}
            assert (record["status"], record["attempts"]) == ("finished", 1) and not run.exists(LOCK_NAME)
        results = Store(f"{bucket}/runs").read_json("evaluation_results.json") or {}
        assert all(results[f"sft_tiny-qwen2_s{s}"]["error"] is None for s in (1, 2, 3))
    finally:
        server.stop()


@pytest.mark.slow
def test_a_train_by_hand_into_a_folder_a_sweep_trains_is_refused_and_a_killed_driver_is_taken_over(tmp_path):
    runs = tmp_path / "runs"
    path = spec(tmp_path, str(runs), max_steps=100000, save_steps=50)
    data = yaml.safe_load(path.read_text())
    data["grid"]["seed"] = [1]
    path.write_text(yaml.safe_dump(data))
    out = runs / "sft_tiny-qwen2_s1"
    driver = Started("sweep", path, "--backend", "local")
    try:
        deadline = time.time() + 180
        while not list(out.glob("checkpoint-*")) and time.time() < deadline:
            time.sleep(0.5)
        by_hand = tunefleet(
            "train", "--method", "sft", "--model_name", "tunefleet/tiny-qwen2", "--dataset",
            "tunefleet/tiny-ultrafeedback", "--split", "train_sft", "--output_dir", out, "--max_steps", 10, check=False,
        )  # fmt: skip
        assert by_hand.returncode == 2 and by_hand.stderr.strip().count("\n") == 0, by_hand.stderr
        assert f"error: {out} is being written by " in by_hand.stderr and "sweep twice" in by_hand.stderr
        holder = read_json(out / LOCK_NAME)
        assert holder["pids"][0] == driver.pid and len(holder["pids"]) == 2  # the driver and the training it started
    finally:
        kill_tree(driver.pid)  # SIGKILL, the training with it: nobody lets go of the lock
        driver.wait(60)
    assert (out / LOCK_NAME).exists()
    data["base"]["max_steps"] = 60
    path.write_text(yaml.safe_dump(data))
    started = time.time()
    rerun = tunefleet("sweep", path, "--backend", "local")  # taken over at once: its holders are gone, no lease wait
    log = (out / "train.log").read_text()
    assert "took over the stale lock of " in log and "resuming from" in log
    assert read_json(out / "run.json")["status"] == "finished" and not (out / LOCK_NAME).exists()
    assert "finished 1 failed 0" in rerun.stdout and time.time() - started < 120


def test_a_lock_from_another_host_is_stale_only_once_its_lease_ran_out(tmp_path):
    store = Store(str(tmp_path))
    other = Holder("another-host", [1], "2026-01-01T00:00:00+00:00", time.time() + 60, "t0", "s")
    store.write_bytes(LOCK_NAME, json.dumps(other.__dict__).encode())
    with pytest.raises(Exception, match="is being written by another-host, pid 1, sweep s"):
        RunLock(store).acquire()
    store.write_bytes(LOCK_NAME, json.dumps(other.__dict__ | {"lease_until": time.time() - 1}).encode())
    lock = RunLock(store).acquire()
    assert lock.notes == ["took over the stale lock of another-host, pid 1, sweep s, since 2026-01-01T00:00:00+00:00"]
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_training_rank_keeps_its_launchers_lock_live_after_the_launcher_is_gone(tmp_path):
    """A rank forked by a warm process (no child of its launcher) adds its pid; the launcher's renewals keep it; once
    the launcher is gone the lock is still held while the rank lives, then stale."""
    import subprocess
    import sys

    store = Store(str(tmp_path / "run"))
    launcher = RunLock(store, sweep="s").acquire()
    assert launcher.holder is not None
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert RunLock(store).register_pid(launcher.holder.token, rank.pid)
        assert not RunLock(store).register_pid("another holder's token", rank.pid)
        launcher.write(launcher.read())  # a renewal: the rank's pid stays
        held = RunLock(store).read()
        assert held is not None and rank.pid in held.pids
        launcher.stop.set()  # the launcher dies: its pid goes, its lock file stays
        held.pids = [p for p in held.pids if p != os.getpid()] + [2**22 + 7]  # (a pid that does not live)
        store.write_bytes(LOCK_NAME, json.dumps(held.__dict__).encode())
        with pytest.raises(Exception, match="is being written by"):
            RunLock(store).acquire()
    finally:
        rank.kill()
        rank.wait()
    taken = RunLock(store).acquire()
    assert taken.notes and "took over the stale lock" in taken.notes[0]
    taken.release()
