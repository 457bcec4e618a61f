"""Outputs that outlive the cluster: runs_dir in an object store (a real S3 API server on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, kill_tree, tunefleet

from tunefleet.common.errors import TunefleetError
from tunefleet.common.storage import Store, join, refuse_ray_job_temp
from tunefleet.trainers.run import CHECKPOINT_MARKER, complete_checkpoints

BASE = {
    "model_name": "tunefleet/tiny-qwen2",
    "dataset": "tunefleet/tiny-ultrafeedback",
    "method": "sft",
    "split": "train_sft",
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "use_qlora": False,
    "logging_steps": 1,
}


@pytest.fixture(scope="module")
def s3():
    from local_s3 import LocalS3

    server = LocalS3().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3, tmp_path, monkeypatch):
    """The standard AWS variables for this server, and a scratch folder of this test's own."""
    for key, value in {**s3.env, "TUNEFLEET_SCRATCH": str(tmp_path / "scratch")}.items():
        monkeypatch.setenv(key, value)
    return tmp_path / "scratch"


def cli(*args, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    return tunefleet(*args, env=env, timeout=timeout, check=check)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ------------------------------------------------------------------ pure
def test_uris_stay_uris():
    assert join("s3://bucket/runs", "dpo_s1") == "s3://bucket/runs/dpo_s1"
    assert join("runs", "dpo_s1") == str(Path("runs") / "dpo_s1")
    from tunefleet.launcher import sweep as sweeps

    (run,) = sweeps.expand(sweeps.parse_spec({"name": "x", "runs_dir": "s3://bucket/sweep", "base": BASE}))
    assert run.output_dir == "s3://bucket/sweep/sft_tiny-qwen2_s42"  # not a local folder named s3:/bucket/...


def test_relative_paths_in_a_ray_job_working_dir_are_refused(tmp_path, monkeypatch):
    job_dir = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    with pytest.raises(TunefleetError, match="Ray job's temporary working dir .* use an absolute path on shared"):
        refuse_ray_job_temp("runs/demo", "runs_dir")
    refuse_ray_job_temp("/shared/runs", "runs_dir")
    refuse_ray_job_temp("s3://bucket/runs", "runs_dir")


def test_missing_store_driver_names_the_extra():
    with pytest.raises(TunefleetError, match=r"pip install 'tunefleet\[gcs\]'"):
        Store("gs://bucket/runs").read_json("run.json")


# ------------------------------------------------------------------ against S3
@pytest.mark.slow
def test_ray_sweep_and_eval_live_in_the_bucket(s3, s3_env, tmp_path, tiny_model):
    bucket = s3.make_bucket("sweep")
    spec = tmp_path / "s.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "cloud",
                "runs_dir": f"{bucket}/runs",
                "base": {**BASE, "max_steps": 6, "save_steps": 3, "save_total_limit": 1},
                "grid": {"seed": [1, 2]},
                "eval": {"max_samples": 8, "max_generation_samples": 1, "skip_perplexity": True},
            }
        )
    )
    done = cli("sweep", spec, "--backend", "ray", "--eval")
    store = Store(f"{bucket}/runs")
    assert store.read_json("sweep.json")["runs"]["sft_tiny-qwen2_s1"]["status"] == "finished"
    for seed in (1, 2):
        run = store.child(f"sft_tiny-qwen2_s{seed}")
        assert run.read_json("run.json")["status"] == "finished" and run.read_json("run.json")["global_step"] == 6
        for name in (
            "adapter_model.safetensors",
            "adapter_config.json",
            "trainer_state.json",
            "config.yaml",
            "launch.json",
            "progress.json",
            "train.log",
        ):
            assert run.exists(name), name
        assert complete_checkpoints(run) == [6]  # save_total_limit 1: checkpoint-3 went once 6 was whole
        assert run.read_json(f"checkpoint-6/{CHECKPOINT_MARKER}")["files"]["adapter_model.safetensors"] > 0
    results = store.read_json("evaluation_results.json")
    assert {"sft_tiny-qwen2_s1", "sft_tiny-qwen2_s2"} <= set(results)
    assert results["sft_tiny-qwen2_s1"]["model_path"] == f"{bucket}/runs/sft_tiny-qwen2_s1"
    assert store.exists("evaluation_report.md") and store.exists("loss_curves.png")
    assert not any(Path(ROOT, "s3:").exists() for _ in [0])  # no local folder named after the URI
    assert files_under(s3_env) == [], files_under(s3_env)  # nothing left in scratch
    status = cli("status", f"{bucket}/runs").stdout
    assert (
        "sft_tiny-qwen2_s1" in status
        and "finished" in status
        and f"{bucket}/runs/sft_tiny-qwen2_s1/train.log" in status
    )
    assert "AWS_SECRET_ACCESS_KEY" not in done.stdout + done.stderr and "testing" not in (done.stdout + done.stderr)


@pytest.mark.slow
def test_a_killed_run_resumes_from_the_bucket_on_a_fresh_node(s3, s3_env, tmp_path, tiny_model):
    bucket = s3.make_bucket("killed")
    out = f"{bucket}/run"
    args = [
        "train",
        "--method",
        "sft",
        *TINY,
        "--split",
        "train_sft",
        "--output_dir",
        out,
        "--max_steps",
        "80",
        "--save_steps",
        "5",
        "--use_qlora",
        "false",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--logging_steps",
        "1",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "tunefleet.launcher.cli", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TUNEFLEET_SCRATCH": str(tmp_path / "node-a")},
    )
    store = Store(out)
    deadline = time.time() + 240
    while time.time() < deadline and len(complete_checkpoints(store)) < 2:
        time.sleep(0.3)
    kill_tree(first.pid)  # the node is gone: nothing gets a chance to clean up
    first.wait()
    saved = complete_checkpoints(store)
    assert saved and saved[-1] < 80 and store.read_json("run.json")["status"] == "running"

    # As a node lost mid-upload leaves it: a later checkpoint's files, but no marker. It must not count.
    partial = saved[-1] + 5
    store.write_bytes(f"checkpoint-{partial}/trainer_state.json", b'{"global_step": %d}' % partial)
    store.write_bytes(f"checkpoint-{partial}/adapter_model.safetensors", b"half an upload")
    assert complete_checkpoints(store) == saved

    resumed = cli(*args, env={"TUNEFLEET_SCRATCH": str(tmp_path / "node-b")})  # another node, empty scratch
    assert f"downloading checkpoint-{saved[-1]} from {out}" in resumed.stdout
    assert f"checkpoint-{saved[-1]}" in resumed.stdout.split("resuming from", 1)[1].splitlines()[0]
    record = store.read_json("run.json")
    assert record["status"] == "finished" and record["attempts"] == 2 and record["global_step"] == 80
    assert record["resumed_from"].endswith(f"checkpoint-{saved[-1]}")
    assert complete_checkpoints(store)[-1] == 80 and store.exists("adapter_model.safetensors")
    assert files_under(tmp_path / "node-b") == []
