"""Sweep specs (pure) and sweeps on a real local Ray (2 CPUs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from testkit import ROOT, Started, checkpoint_steps, read_json, run_cli, tunefleet, wait_for_checkpoint

from tunefleet.common.errors import TunefleetError
from tunefleet.common.jsonfile import read_json as run_record  # None while missing or half-written
from tunefleet.launcher import sweep as sweeps

HELPERS = str(Path(__file__).parent / "helpers")
TINY_BASE = {
    "model_name": "tunefleet/tiny-qwen2",
    "dataset": "tunefleet/tiny-ultrafeedback",
    "max_steps": 4,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "use_qlora": False,
    "save_steps": 2,
    "logging_steps": 1,
}
SPLITS = {"sft": {"split": "train_sft"}, "dpo": {"split": "train_prefs"}, "grpo": {"split": "train_gen"}}


def write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ------------------------------------------------------------------ pure
def test_demo_spec_expands_with_precedence():
    spec = sweeps.load_spec(str(ROOT / "sweeps" / "demo.yaml"))
    runs = sweeps.expand(spec)
    assert len(runs) == 12 and runs[0].name == "sft_tiny-qwen2_s1" and runs[-1].name == "rm_tiny-qwen2_s2"
    by = {r.name: r.config for r in runs}
    assert by["dpo_tiny-qwen2_s2"].split == "train_prefs" and by["dpo_tiny-qwen2_s2"].seed == 2
    assert by["grpo_tiny-qwen2_s1"].max_steps == 100 and by["kto_tiny-qwen2_s1"].max_steps == 60  # method > base
    assert by["dpo_tiny-qwen2_s1"].loss_type == ["sigmoid", "sft"] and by["sft_tiny-qwen2_s1"].assistant_only_loss
    assert all(r.output_dir == f"runs/demo/{r.name}" for r in runs)


def test_grid_beats_method_overrides(tmp_path):
    spec = sweeps.parse_spec(
        {
            "name": "x",
            "base": TINY_BASE,
            "methods": {"sft": {"learning_rate": 1e-3, **SPLITS["sft"]}},
            "grid": {"method": ["sft"], "learning_rate": [1e-4, 2e-4]},
            "naming": "{method}_lr{learning_rate}",
        }
    )
    assert [r.config.learning_rate for r in sweeps.expand(spec)] == [1e-4, 2e-4]


def test_five_methods_spec_is_the_original_readme():
    runs = sweeps.expand(sweeps.load_spec(str(ROOT / "sweeps" / "five_methods.yaml")))
    assert [r.name for r in runs] == [f"{m}_qwen2-0.5b-instruct" for m in ("sft", "dpo", "orpo", "kto", "grpo")]
    assert {r.config.model_name for r in runs} == {"Qwen/Qwen2-0.5B-Instruct"}
    assert runs[0].config.split == "train_sft" and runs[1].config.eval_split == "test_prefs"


def test_every_shipped_sweep_validates():
    from tunefleet.launcher.tune_search import trial_setups

    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        spec = sweeps.load_spec(str(path))
        assert trial_setups(spec, spec.search) if spec.search else sweeps.expand(spec), path
        assert path.read_text().startswith("#"), f"{path} must start with the command that runs it"


@pytest.mark.parametrize(
    "text,message",
    [
        ("name: x\nbase:\n  lerning_rate: 1\n", ":3: unknown key 'lerning_rate' (did you mean 'learning_rate'?)"),
        ("name: x\ngrids:\n  seed: [1]\n", ":2: unknown key 'grids' (did you mean 'grid'?)"),
        (
            "name: x\nresources:\n  gpus_per_run: two\n",
            ":3: bad value for 'resources.gpus_per_run': expected auto or a number of GPUs, got 'two'",
        ),
        ("name: x\ngrid:\n  seed: [1, oops]\n", ":3: bad value for 'seed'"),
        ("name: x\nmethods:\n  dpx: {}\n", ":3: unknown method 'dpx' (did you mean 'dpo'?)"),
        ("name: x\ngrid: [1\n", "not valid YAML"),
    ],
)
def test_bad_specs_name_key_and_line(tmp_path, text, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(TunefleetError) as exc:
        sweeps.load_spec(str(path))
    assert str(exc.value).startswith(str(path)) and message in str(exc.value), str(exc.value)


def test_duplicate_names_are_refused():
    spec = sweeps.parse_spec({"name": "x", "base": {**TINY_BASE, "method": "sft"}, "grid": {"learning_rate": [1, 2]}})
    with pytest.raises(TunefleetError, match=r"add \{learning_rate\} to 'naming'"):
        sweeps.expand(spec)


def test_grid_value_invalid_for_a_method_is_caught_before_any_run(tmp_path, capsys):
    data = tmp_path / "d"
    data.mkdir()
    (data / "train.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
    )
    spec = write_spec(
        tmp_path / "s.yaml",
        name="bad",
        runs_dir=str(tmp_path / "runs"),
        base={**TINY_BASE, "dataset": str(data), "split": "train"},
        grid={"method": ["sft", "dpo"]},
    )
    code, _, err = run_cli(capsys, "sweep", spec)
    assert code == 2 and "dpo on" in err and "no dpo layout fits the columns messages" in err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_dry_run_prints_plan(capsys):
    code, out, _ = run_cli(capsys, "sweep", ROOT / "sweeps" / "five_methods.yaml", "--dry-run")
    assert (
        code == 0
        and "5 runs" in out
        and "1 GPU, 4 CPU, 32 GB" in out
        and "-m tunefleet.trainers.train --config" in out
    )


def test_unreachable_address(tmp_path, capsys):
    spec = write_spec(
        tmp_path / "s.yaml",
        name="x",
        runs_dir=str(tmp_path / "r"),
        base={**TINY_BASE, **SPLITS["sft"]},
        grid={"method": ["sft"]},
    )
    code, _, err = run_cli(capsys, "sweep", spec, "--backend", "ray", "--address", "127.0.0.1:1")
    assert code == 2 and err.strip().count("\n") == 0 and "cannot reach the Ray cluster at 127.0.0.1:1" in err


# ------------------------------------------------------------------ real Ray
@pytest.mark.ray
@pytest.mark.slow
def test_more_gpus_than_any_node_is_refused_up_front(tmp_path, capsys, tiny_model):
    spec = write_spec(
        tmp_path / "s.yaml",
        name="g",
        runs_dir=str(tmp_path / "runs"),
        base={**TINY_BASE, **SPLITS["sft"]},
        grid={"method": ["sft"]},
        resources={"gpus_per_run": 1},
    )
    code, _, err = run_cli(capsys, "sweep", spec, "--backend", "ray")
    assert code == 2 and "each run needs 1 GPU(s) but the largest Ray node has 0" in err
    assert not (tmp_path / "runs" / "sft_tiny-qwen2_s42").exists()  # nothing started


@pytest.mark.ray
@pytest.mark.slow
def test_failed_run_is_retried_reported_and_does_not_stop_others(tmp_path, capsys, tiny_model, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", HELPERS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    spec = write_spec(
        tmp_path / "s.yaml",
        name="rf",
        runs_dir=str(tmp_path / "runs"),
        base=TINY_BASE,
        grid={"method": ["sft", "grpo"]},
        methods={
            "sft": SPLITS["sft"],
            "grpo": {**SPLITS["grpo"], "reward_funcs": ["failing_reward:boom"], "max_completion_length": 8},
        },
    )
    code, out, _ = run_cli(capsys, "sweep", spec, "--backend", "ray", "--retries", "1")
    assert code == 1
    assert read_json(tmp_path / "runs" / "sft_tiny-qwen2_s42" / "run.json")["status"] == "finished"
    grpo = tmp_path / "runs" / "grpo_tiny-qwen2_s42"
    assert read_json(grpo / "run.json")["status"] == "failed" and read_json(grpo / "run.json")["attempts"] == 2
    assert "retry 1/1" in out and "failed grpo_tiny-qwen2_s42" in out and "reward exploded on purpose" in out
    assert (grpo / "train.log").read_text().count("=== ") == 2  # two attempts logged


@pytest.mark.ray
@pytest.mark.slow
def test_killed_run_resumes_from_checkpoint_on_rerun(tmp_path, tiny_model):
    spec = write_spec(
        tmp_path / "s.yaml",
        name="rk",
        runs_dir=str(tmp_path / "runs"),
        base={**TINY_BASE, "max_steps": 80, "save_steps": 3},
        grid={"method": ["sft"]},
        methods={"sft": SPLITS["sft"]},
    )
    args = ["sweep", spec, "--backend", "ray", "--retries", "0"]
    run = tmp_path / "runs" / "sft_tiny-qwen2_s42"
    proc = Started(*args)
    wait_for_checkpoint(run, 240)
    os.kill(read_json(run / "launch.json")["pid"], signal.SIGKILL)  # the training process dies mid-run
    out = proc.output(timeout=240)
    assert proc.returncode == 1 and "failed" in out
    ckpts = checkpoint_steps(run)
    assert ckpts and ckpts[-1] < 80

    again = tunefleet(*args, timeout=300, check=False)
    assert again.returncode == 0, again.stdout[-2000:]
    log = (run / "train.log").read_text()
    assert f"resuming from {run.resolve() / f'checkpoint-{ckpts[-1]}'}" in log
    assert read_json(run / "run.json")["resumed_from"].endswith(f"checkpoint-{ckpts[-1]}")
    assert read_json(run / "trainer_state.json")["global_step"] == 80


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_runs_a_sweep_on_a_started_head(tmp_path, tiny_model):
    from local_ray import LocalRayHead, pids_under

    spec = write_spec(
        tmp_path / "s.yaml",
        name="rj",
        runs_dir=str(tmp_path / "runs"),
        base={**TINY_BASE, "max_steps": 2, **SPLITS["sft"]},
        grid={"method": ["sft"], "seed": [1, 2]},
    )
    head = LocalRayHead().start()
    try:
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
        }  # Ray 2.60 enables token auth; the client reads ~/.ray/auth_token
        env.pop("RAY_ADDRESS", None)
        job = subprocess.run(
            [
                str(Path(sys.executable).parent / "ray"),
                "job",
                "submit",
                "--address",
                head.dashboard,
                "--",
                sys.executable,
                "-m",
                "tunefleet.launcher.cli",
                "sweep",
                str(spec),
                "--backend",
                "ray",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=400,
            env=env,
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr and "finished 2" in job.stdout
        for seed in (1, 2):
            assert read_json(tmp_path / "runs" / f"sft_tiny-qwen2_s{seed}" / "run.json")["status"] == "finished"

        # The README's recipe with --working-dir: a relative runs_dir would land in the job's temporary copy,
        # which Ray deletes with the job. Refused before any run starts.
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        write_spec(job_dir / "s.yaml", name="j", runs_dir="runs/j", base={**TINY_BASE, **SPLITS["sft"]})
        refused = subprocess.run(
            [
                str(Path(sys.executable).parent / "ray"),
                "job",
                "submit",
                "--address",
                head.dashboard,
                "--working-dir",
                str(job_dir),
                "--",
                sys.executable,
                "-m",
                "tunefleet.launcher.cli",
                "sweep",
                "s.yaml",
                "--backend",
                "ray",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        out = refused.stdout + refused.stderr
        assert refused.returncode != 0
        assert "runs_dir 'runs/j' is relative, and this command runs in a Ray job's temporary working dir" in out
        assert "use an absolute path on shared storage or a URI such as s3://bucket/runs" in out
        assert "sft_tiny-qwen2_s42: running" not in out  # nothing started
    finally:
        head.stop()
    assert not pids_under(head.temp_dir)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_runs_resume(tmp_path, tiny_model):
    spec = write_spec(
        tmp_path / "s.yaml",
        name="rc",
        runs_dir=str(tmp_path / "runs"),
        base={**TINY_BASE, "max_steps": 300, "save_steps": 1000},
        grid={"method": ["sft"]},
        methods={"sft": SPLITS["sft"]},
    )
    run = tmp_path / "runs" / "sft_tiny-qwen2_s42"
    proc = Started("sweep", spec, "--backend", "local")
    deadline = time.time() + 240
    while time.time() < deadline and not (run_record(run / "progress.json") or {}).get("step"):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out = proc.output(timeout=120)
    assert proc.returncode == 130 and "they keep their checkpoints" in out
    record = read_json(run / "run.json")
    assert record["status"] == "interrupted" and "checkpoint" in record["note"]  # saved on the way out
    step = record["global_step"]
    assert (run / f"checkpoint-{step}" / "trainer_state.json").exists() and 0 < step < 300
