"""Outputs that outlive the cluster: runs_dir in an object store (a real S3 API server on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from testkit import ROOT, TINY, Started, kill_tree, read_json, sft_train, tunefleet

from tunefleet.common.errors import TunefleetError
from tunefleet.common.jsonfile import read_json as maybe_json  # None while the file does not exist yet
from tunefleet.common.storage import Store, join, refuse_ray_job_temp, scratch_dir
from tunefleet.trainers.run_folder import CHECKPOINT_MARKER, complete_checkpoints

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


def test_missing_store_driver_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed (the test environment has it)
    with pytest.raises(TunefleetError, match=r"pip install 'tunefleet\[gcs\]'"):
        Store("gs://bucket/runs").read_json("run.json")


# ------------------------------------------------------------------ against S3
@pytest.mark.ray
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
                "eval": {"max_samples": 8, "max_generation_samples": 1},
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

    # The winner, chosen from the results in the bucket and exported from the bucket
    best = min(("sft_tiny-qwen2_s1", "sft_tiny-qwen2_s2"), key=lambda name: results[name]["test_loss"])
    exported = cli("export", "--runs_dir", f"{bucket}/runs", "--best", "test_loss", "--output_dir", tmp_path / "best")
    assert f"wrote merged model of {best} to" in exported.stdout
    assert (tmp_path / "best" / "model.safetensors").is_file() and (tmp_path / "best" / "config.json").is_file()
    assert best in (tmp_path / "best" / "README.md").read_text()


@pytest.mark.slow
def test_a_killed_run_resumes_from_the_bucket_on_a_fresh_node(s3, s3_env, tmp_path, tiny_model):
    bucket = s3.make_bucket("killed")
    out = f"{bucket}/run"
    args = [
        *sft_train(out),
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


# ------------------------------------------------------------------ a store that is down or refuses
@pytest.fixture(scope="module")
def s3_checking_credentials():
    from local_s3 import LocalS3

    server = LocalS3(authenticate=True).start()
    try:
        yield server
    finally:
        server.stop()


def bad_store_cases(s3, s3_checking_credentials) -> dict[str, tuple[str, dict[str, str], str]]:
    """case -> (runs_dir URI, environment, what the line must say)."""
    from tunefleet.launcher.launch import free_port

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    return {
        "unreachable": (
            "s3://nobucket/runs",
            {**s3.env, "AWS_ENDPOINT_URL": closed},
            f"endpoint {closed} is unreachable",
        ),
        "no such bucket": ("s3://nobucket/runs", s3.env, "no such bucket 'nobucket'"),
        "credentials refused": (
            "s3://anybucket/runs",
            {**s3_checking_credentials.env, "AWS_ACCESS_KEY_ID": "AKIAWRONGKEY", "AWS_SECRET_ACCESS_KEY": "wrong"},
            "the store refused the credentials",
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unreachable", "no such bucket", "credentials refused"])
def test_a_store_that_is_down_or_refuses_is_one_line_for_every_command(
    case, s3, s3_checking_credentials, tmp_path, tiny_model
):
    """train, sweep, eval, report, status and export each ask the store first: one line naming the URI and the
    cause, exit 2, within 30 s, nothing loaded or trained."""
    runs_dir, env, cause = bad_store_cases(s3, s3_checking_credentials)[case]
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "down", "runs_dir": runs_dir, "base": {**BASE, "max_steps": 2}}))
    commands = {
        "train": ["train", "--method", "sft", *TINY, "--split", "train_sft", "--output_dir", f"{runs_dir}/one"],
        "sweep": ["sweep", spec, "--skip_data_check"],
        "eval": ["eval", "--runs_dir", runs_dir],
        "report": ["report", "--runs_dir", runs_dir],
        "status": ["status", runs_dir],
        "export": ["export", "--runs_dir", runs_dir, "--best", "test_loss", "--output_dir", tmp_path / "best"],
    }
    for command, args in commands.items():
        t0 = time.monotonic()
        done = cli(*args, env={**env, "TUNEFLEET_SCRATCH": str(tmp_path / "scratch")}, check=False, timeout=120)
        seconds = time.monotonic() - t0
        assert done.returncode == 2, (command, done.stdout[-2000:], done.stderr[-2000:])
        assert done.stderr.startswith("error: cannot use s3://") and done.stderr.count("\n") == 1, (
            command,
            done.stderr,
        )
        assert cause in done.stderr and runs_dir in done.stderr, (command, done.stderr)
        assert "Traceback" not in done.stdout + done.stderr and seconds < 30, (command, seconds)
        assert "wrong" not in done.stderr  # no secret in the line
    assert not (tmp_path / "scratch").exists() and not (tmp_path / "best").exists()


@pytest.mark.slow
def test_a_store_that_stops_answering_mid_upload_loses_nothing(s3, s3_env, tmp_path, tiny_model):
    """The server stops answering while a checkpoint goes up: the upload is retried for --store_retry_s, then the
    run stops in one line, the checkpoint kept whole in scratch and the half upload never counted. With the server
    back, the same command on the same node uploads the kept checkpoint (marker last) and resumes from it."""
    bucket = s3.make_bucket("flaky")
    out = f"{bucket}/run"
    args = [
        *sft_train(out),
        "--max_steps",
        "120",
        "--save_steps",
        "4",
        "--store_retry_s",
        "3",
        "--use_qlora",
        "false",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--logging_steps",
        "1",
    ]
    store, scratch = Store(out), scratch_dir(out)
    first = Started(*args)
    caught = None  # the checkpoint whose upload the pause interrupted
    deadline = time.time() + 240
    try:
        while caught is None and first.returncode is None and time.time() < deadline:
            for marker in sorted(scratch.glob(f"checkpoint-*/{CHECKPOINT_MARKER}")):
                if (maybe_json(marker) or {}).get("uploaded") is False:  # saved whole here, its upload under way
                    s3.pause()
                    if (maybe_json(marker) or {}).get("uploaded") is False:
                        caught = int(marker.parent.name.split("-")[1])
                        break
                    s3.resume()  # that upload won the race: try the next one
            first.proc.poll()
            time.sleep(0.01)
        assert caught is not None, "no upload was caught under way"
        t0 = time.monotonic()
        output = first.output(timeout=120)
        stopped_after = time.monotonic() - t0
    finally:
        s3.resume()
    last = output.strip().splitlines()[-1]
    assert first.returncode == 2 and last.startswith("error: cannot upload to "), output[-3000:]
    assert f"tried to upload checkpoint-{caught} for 3 s" in last and f"checkpoint-{caught} is kept in" in last
    assert "Traceback" not in output and stopped_after < 60
    kept = read_json(scratch / f"checkpoint-{caught}" / CHECKPOINT_MARKER)
    assert kept["uploaded"] is False and (scratch / f"checkpoint-{caught}" / "adapter_model.safetensors").exists()
    complete = complete_checkpoints(store)
    assert caught not in complete and (not complete or complete[-1] < caught)  # the half upload does not count

    resumed = cli(*args)  # same node, the store answering again
    assert f"uploading checkpoint-{caught}, kept in {scratch} when the store failed" in resumed.stdout
    assert f"checkpoint-{caught}" in resumed.stdout.split("resuming from", 1)[1].splitlines()[0]
    record = store.read_json("run.json")
    assert record["status"] == "finished" and record["global_step"] == 120 and record["attempts"] == 2
    assert record["resumed_from"].endswith(f"checkpoint-{caught}")
    assert store.read_json(f"checkpoint-{caught}/{CHECKPOINT_MARKER}")["step"] == caught
    assert files_under(scratch) == []


@pytest.mark.slow
def test_a_search_keeps_its_trials_and_tune_state_in_the_bucket(s3, s3_env, tmp_path, tiny_model):
    """Optuna's TPE through Ray Tune, trials and Tune's experiment state in the store; a rerun restores from it."""
    bucket = s3.make_bucket("search")
    spec = tmp_path / "search.yaml"
    base = {**BASE, "eval_split": "test_sft", "max_eval_samples": 16, "max_steps": 4, "eval_steps": 2}
    search = {
        "searcher": "optuna",
        "scheduler": "fifo",
        "num_samples": 2,
        "space": {"sft": {"learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}, "lora_r": {"choice": [4, 8]}}},
    }
    base.pop("method")
    spec.write_text(
        yaml.safe_dump({"name": "cloud-search", "runs_dir": f"{bucket}/runs", "base": base, "search": search})
    )
    cli("sweep", spec, "--backend", "local")
    store = Store(f"{bucket}/runs")
    trials = store.read_json("search.json")["methods"]["sft"]["trials"]
    assert len(trials) == 2 and all(t["status"] == "finished" and t["steps"] == 4 for t in trials)
    assert len({t["values"]["learning_rate"] for t in trials}) == 2  # TPE sampled two points
    for trial in trials:
        assert trial["output_dir"].startswith(f"{bucket}/runs/trials/")
        assert Store(trial["output_dir"]).read_json("run.json")["config"]["lora_r"] == trial["values"]["lora_r"]
    assert any(name.startswith("experiment_state") for name in store.listdir("tune/sft"))
    assert files_under(s3_env) == [], files_under(s3_env)
    logs = {t["name"]: Store(t["output_dir"]).read_bytes("train.log") for t in trials}

    again = cli("sweep", spec, "--backend", "local")
    assert "restoring" in again.stdout
    assert {t["name"]: Store(t["output_dir"]).read_bytes("train.log") for t in trials} == logs  # none trained again
