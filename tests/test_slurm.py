"""`tunefleet sweep --backend slurm` against a real single-node SLURM 22.05 (tests/slurm/start_local_slurm.sh:
2 CPUs, 2 fake GPUs, no accounting), plus the pure script renderers.

The cluster is started once for this module and stopped at its end; a machine where SLURM cannot be
installed skips the cluster tests (the pure ones still run).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from cluster_venv import set_up_node, shared_packages
from testkit import ROOT, checkpoint_steps, read_json, run_cli

from tunefleet.common.jsonfile import read_json as maybe_json  # None while the file does not exist yet
from tunefleet.common.storage import Store
from tunefleet.launcher import slurm
from tunefleet.launcher import sweep as sweeps
from tunefleet.trainers import recovery
from tunefleet.trainers.config import from_dict

START, STOP = ROOT / "tests" / "slurm" / "start_local_slurm.sh", ROOT / "tests" / "slurm" / "stop_local_slurm.sh"
SLURM_DIR = "/tmp/tfslurm-test"  # short: slurmstepd puts unix sockets under it
CANNOT_INSTALL = (
    "apt-get not available",
    "apt-get install of slurm-wlm/munge failed",
    "must run as root",
    "still missing after installing",
)
TINY = {
    "model_name": "tunefleet/tiny-qwen2",
    "dataset": "tunefleet/tiny-ultrafeedback",
    "method": "sft",
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "use_qlora": False,
    "max_steps": 4,
    "split": "train_sft",
    "logging_steps": 1,
}


def write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def wait_for(what: str, check, timeout: float, logs: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    dump = ""
    if logs and logs.exists():
        dump = "\n".join(f"---- {p}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(logs.rglob("*.log")))
    dump += "\n" + cluster_view()
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{dump}")


def cluster_view() -> str:
    """What SLURM says about its queue and node, for a wait that timed out (a job pending on what?)."""
    views = []
    for command in (
        ["squeue", "--all", "-h", "-o", "%i %T %r cpus=%C gres=%b"],
        ["sinfo", "-N", "-h", "-o", "%N %T cpus(A/I/O/T)=%C reason=%E"],
    ):
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=20)
            views.append(f"---- {' '.join(command[:2])}\n{proc.stdout}{proc.stderr}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            views.append(f"---- {command[0]}: {exc}")
    ctld_log = Path(SLURM_DIR) / "log" / "slurmctld.log"
    if ctld_log.exists():
        views.append(f"---- {ctld_log}\n{ctld_log.read_text(errors='replace')[-2500:]}")
    return "\n".join(views)


def queue_is_empty() -> bool:
    proc = subprocess.run(["squeue", "-h", "-t", "PD,R,CG,CF,S"], capture_output=True, text=True, timeout=20)
    return proc.returncode == 0 and not proc.stdout.strip()


def states(*job_ids) -> dict:
    return slurm.queue_states([str(j) for j in job_ids])


def settled(*job_ids) -> bool:
    found = states(*job_ids)
    return bool(found) and not slurm.active_jobs(found)


@pytest.fixture(scope="module")
def cluster():
    proc = subprocess.run([str(START), SLURM_DIR], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        if any(reason in proc.stderr for reason in CANNOT_INSTALL):
            why = [line for line in proc.stderr.splitlines() if "ERROR:" in line] or ["?"]
            pytest.skip(f"SLURM cannot be installed here: {why[0].split('ERROR:', 1)[-1].strip()}")
        raise AssertionError(f"start_local_slurm.sh failed:\n{proc.stderr[-3000:]}")
    with pytest.MonkeyPatch.context() as mp:
        for line in proc.stdout.splitlines():  # "export K=V"
            key, value = line.removeprefix("export ").split("=", 1)
            mp.setenv(key, value)
        yield Path(SLURM_DIR)
    subprocess.run([str(STOP), SLURM_DIR], capture_output=True, timeout=120)


# ------------------------------------------------------------------ pure: renderers
def spec_of(**data):
    return sweeps.parse_spec({"name": "rs", "base": TINY, **data})


def test_array_script_has_the_sbatch_lines_of_the_spec():
    spec = spec_of(
        grid={"seed": [1, 2, 3]},
        resources={"gpus_per_run": 2, "cpus_per_run": 6, "memory_gb": 48},
        slurm={
            "partition": "gpu",
            "account": "lab",
            "qos": "high",
            "time": "04:00:00",
            "array_limit": 2,
            "extra": ["--constraint=a100", "#SBATCH --mail-type=END"],
            "signal_seconds": 300,
        },
    )
    runs = sweeps.place_runs(sweeps.expand(spec), spec)
    text = slurm.render_array_script(spec, runs, [[0], [2]], "/data/rs", "/venv/bin/python", retries=2)
    lines = set(text.splitlines())
    for line in [
        "--job-name=tf-rs",
        "--array=0-1%2",
        "--gres=gpu:2",
        "--cpus-per-task=6",
        "--mem=48G",
        "--time=04:00:00",
        "--partition=gpu",
        "--account=lab",
        "--qos=high",
        "--output=/data/rs/slurm/%A_%a.log",
        "--constraint=a100",
        "--mail-type=END",
        "--requeue",
        "--signal=B:USR1@300",
    ]:
        assert f"#SBATCH {line}" in lines, line
    assert (
        '/venv/bin/python -m tunefleet.launcher.slurm_task /data/rs/slurm/runs.json "$SLURM_ARRAY_TASK_ID" --retries 2 &'
        in text
    )
    assert "trap 'relay USR1' USR1" in text and 'scontrol requeue "$task"' in text
    assert "0=sft_tiny-qwen2_s1, 1=sft_tiny-qwen2_s3" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0

    plain = spec_of(slurm={"requeue": False})
    text = slurm.render_array_script(plain, sweeps.expand(plain), [[0]], "/d", "python")
    assert (
        "--gres" not in text and "--requeue" not in text and "--signal" not in text and "scontrol requeue" not in text
    )
    assert "#SBATCH --array=0\n" in text and "#SBATCH --cpus-per-task=1" in text  # no limit: no %N
    assert "#SBATCH --signal=B:USR1@120" in slurm.render_array_script(
        spec_of(), sweeps.expand(spec_of()), [[0]], "/d", "p"
    )


def test_runs_sharing_a_gpu_share_an_array_task():
    spec = spec_of(grid={"seed": [1, 2, 3]}, resources={"gpus_per_run": 0.5, "cpus_per_run": 2, "memory_gb": 8})
    runs = sweeps.place_runs(sweeps.expand(spec), spec)
    from tunefleet.launcher.placement import slurm_groups

    tasks = slurm_groups([r.placement for r in runs])
    assert tasks == [[0, 1], [2]]
    text = slurm.render_array_script(spec, runs, tasks, "/d", "python")
    for line in ("--array=0-1", "--gres=gpu:1", "--cpus-per-task=4", "--mem=16G"):
        assert f"#SBATCH {line}" in text.splitlines(), line
    assert "0=sft_tiny-qwen2_s1+sft_tiny-qwen2_s2, 1=sft_tiny-qwen2_s3" in text


def test_eval_script_depends_on_the_array_and_carries_the_eval_settings():
    spec = spec_of(
        resources={"gpus_per_run": 1},
        eval={"max_samples": 10, "max_generation_samples": 1, "shards": 2, "batch_size": 8, "skip_perplexity": True},
    )
    text = slurm.render_eval_script(spec, "/data/rs", "/venv/bin/python", "4711")
    assert "#SBATCH --dependency=afterok:4711" in text and "#SBATCH --gres=gpu:2" in text
    assert "#SBATCH --cpus-per-task=2" in text  # one CPU per Ray shard
    assert (
        "exec /venv/bin/python -m tunefleet.launcher.cli eval --runs_dir /data/rs --max_samples 10 "
        "--max_generation_samples 1 --skip_perplexity true --backend ray --shards 2 --batch_size 8\n"
    ) in text
    one_gpu = slurm.render_eval_script(spec_of(resources={"gpus_per_run": 1}), "/d", "p", None)
    assert "--backend local" in one_gpu and "#SBATCH --gres=gpu:1" in one_gpu and "--dependency" not in one_gpu
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_array_ranges_and_queue_parsing():
    assert slurm.array_spec([0, 1, 2, 5, 7, 8], 3) == "0-2,5,7-8%3"
    assert slurm.array_spec([4], None) == "4"
    text = "12_[1-3%1]|PENDING\n12_0|RUNNING\n13|PENDING\n12_[5,7-8]|CANCELLED by 0\n"
    assert slurm.parse_queue(text) == {
        "12_1": "PENDING",
        "12_2": "PENDING",
        "12_3": "PENDING",
        "12_0": "RUNNING",
        "13": "PENDING",
        "12_5": "CANCELLED",
        "12_7": "CANCELLED",
        "12_8": "CANCELLED",
    }
    assert slurm.active_jobs({"1_0": "COMPLETED", "1_1": "PENDING"}) == {"1_1": "PENDING"}


def test_dry_run_submits_only_unfinished_runs_and_needs_no_slurm(tmp_path, capsys, monkeypatch):
    spec = write_spec(
        tmp_path / "s.yaml",
        name="dr",
        runs_dir=str(tmp_path / "runs"),
        base=TINY,
        grid={"seed": [1, 2, 3]},
        slurm={"array_limit": 4},
    )
    (tmp_path / "runs" / "sft_tiny-qwen2_s2").mkdir(parents=True)
    (tmp_path / "runs" / "sft_tiny-qwen2_s2" / "run.json").write_text(json.dumps({"status": "finished"}))
    monkeypatch.setenv("PATH", "/nonexistent")
    code, out, _ = run_cli(capsys, "sweep", spec, "--backend", "slurm", "--dry-run", "--eval", "--skip_data_check")
    assert code == 0 and "2 of 3 runs to submit (1 finished)" in out
    assert "#SBATCH --array=0-1%4" in out and "#SBATCH --dependency=afterok:<array job ids>" in out
    assert "0=sft_tiny-qwen2_s1, 1=sft_tiny-qwen2_s3" in out  # tasks hold the unfinished runs only
    assert not (tmp_path / "runs" / "slurm").exists()  # a dry run writes nothing


def test_ray_cluster_sbatch_is_ray_documented_pattern():
    path = ROOT / "cluster_configs" / "slurm" / "ray_cluster.sbatch"
    text = path.read_text()
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert (
        "sbatch --nodes 2 cluster_configs/slurm/ray_cluster.sbatch sweeps/five_methods.yaml"
        in text.split("\n#SBATCH")[0]
    )
    for step in [
        'scontrol show hostnames "$SLURM_JOB_NODELIST"',
        "hostname --ip-address",
        "ray start --head",
        '--port="$port"',
        'ray start --address "$ip_head"',
        "--block &",
        '--num-gpus="$gpus"',
        'tunefleet sweep "$SPEC" --backend ray --address "$ip_head"',
    ]:
        assert step in text, step
    assert text.index("ray start --head") < text.index("ray start --address") < text.index('tunefleet sweep "$SPEC"')


# ------------------------------------------------------------------ bad input
def test_no_sbatch_on_path_is_one_line(tmp_path, capsys, monkeypatch):
    spec = write_spec(tmp_path / "s.yaml", name="np", runs_dir=str(tmp_path / "runs"), base=TINY)
    monkeypatch.setenv("PATH", "/nonexistent")
    code, _, err = run_cli(capsys, "sweep", spec, "--backend", "slurm", "--skip_data_check")
    assert code == 2 and err.count("\n") == 1
    assert "sbatch not found on PATH" in err and "slurm-wlm" in err and "--backend local" in err


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,reason",
    [
        ({"slurm": {"partition": "nosuch"}}, "Invalid partition name specified"),
        ({"resources": {"gpus_per_run": 3}}, "Requested node configuration is not available"),
    ],
)
def test_sbatch_rejection_shows_slurms_reason(cluster, tmp_path, capsys, extra, reason):
    spec = write_spec(tmp_path / "s.yaml", name="bad", runs_dir=str(tmp_path / "runs"), base=TINY, **extra)
    code, _, err = run_cli(capsys, "sweep", spec, "--backend", "slurm", "--skip_data_check")
    assert code == 2 and err.count("\n") == 1 and "SLURM rejected" in err and reason in err, err
    assert not (tmp_path / "runs" / "sweep.json").exists()


# ------------------------------------------------------------------ real SLURM
@pytest.mark.slurm
@pytest.mark.slow
def test_two_runs_one_array_on_a_gpu_each_then_the_eval_job(cluster, tmp_path, capsys, tiny_model):
    runs_dir = tmp_path / "runs"
    spec = write_spec(
        tmp_path / "s.yaml",
        name="two",
        runs_dir=str(runs_dir),
        base=TINY,
        grid={"seed": [1, 2]},
        resources={"gpus_per_run": 1},
        slurm={"array_limit": 2},
        eval={"max_samples": 10, "max_generation_samples": 1, "tasks": ["tiny_world"]},
    )
    code, out, err = run_cli(capsys, "sweep", spec, "--backend", "slurm", "--eval", "--skip_data_check")
    assert code == 0, out + err
    state = read_json(runs_dir / "sweep.json")
    array, eval_job = state["slurm"]["array_job_id"], state["slurm"]["eval_job_id"]
    # the plan check ran first in an allocation of its own (an srun job, ended before the array was submitted)
    listed = subprocess.run(
        ["squeue", "-h", "-t", "all", "-n", "tf-two-check", "-o", "%i %T"], capture_output=True, text=True
    ).stdout.split()
    checks = dict(zip(listed[::2], listed[1::2], strict=True))  # this module's earlier sweeps named "two" too
    assert any(int(job) < int(array) and state == "COMPLETED" for job, state in checks.items()), checks
    assert state["backend"] == "slurm" and state["slurm"]["job_ids"] == [array, eval_job]
    assert {n: r["slurm_task"] for n, r in state["runs"].items()} == {"sft_tiny-qwen2_s1": 0, "sft_tiny-qwen2_s2": 1}
    script = (runs_dir / "slurm" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --gres=gpu:1" in script
    assert f"SLURM array job {array}" in out and f"evaluation: job {eval_job}" in out and "tunefleet status" in out

    wait_for("the array and the evaluation job", lambda: settled(array, eval_job), 240, runs_dir)
    final = states(array, eval_job)
    assert final == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED", eval_job: "COMPLETED"}, final
    devices, spans = [], []
    for seed in (1, 2):
        run = runs_dir / f"sft_tiny-qwen2_s{seed}"
        record = read_json(run / "run.json")
        assert record["status"] == "finished" and (run / "adapter_model.safetensors").exists()
        devices.append(read_json(run / "launch.json")["cuda_visible_devices"])  # set by SLURM for --gres=gpu:1
        spans.append((record["started_at"], record["ended_at"]))
    assert set(devices) <= {"0", "1"} and all(devices), devices
    if max(s for s, _ in spans) < min(e for _, e in spans):  # they ran at the same time: one GPU each
        assert sorted(devices) == ["0", "1"]
    results = read_json(runs_dir / "evaluation_results.json")
    assert {"sft_tiny-qwen2_s1", "sft_tiny-qwen2_s2"} <= set(results)
    assert results["sft_tiny-qwen2_s1"]["benchmarks"]["tiny_world"]["acc"] is not None

    code, out, _ = run_cli(capsys, "status", runs_dir)
    assert code == 0 and out.count(" COMPLETED ") == 3 and f"evaluation job {eval_job}: COMPLETED" in out
    assert (
        str(runs_dir / "slurm" / f"{array}_1.log") in out and str(runs_dir / "sft_tiny-qwen2_s1" / "train.log") in out
    )


@pytest.mark.slurm
@pytest.mark.slow
def test_one_array_task_trains_two_runs_that_share_its_gpu(cluster, tmp_path, capsys, tiny_model):
    wait_for("the jobs of earlier tests to leave the node (this task needs all its CPUs)", queue_is_empty, 120)
    runs_dir = tmp_path / "runs"
    spec = write_spec(
        tmp_path / "s.yaml",
        name="pack",
        runs_dir=str(runs_dir),
        base={**TINY, "max_steps": 120},  # long enough that both runs outlast the timestamps' one-second grain
        grid={"seed": [1, 2]},
        resources={"gpus_per_run": 0.5, "cpus_per_run": 1},
    )
    code, out, err = run_cli(capsys, "sweep", spec, "--backend", "slurm", "--skip_data_check")
    assert code == 0, out + err
    state = read_json(runs_dir / "sweep.json")
    array = state["slurm"]["array_job_id"]
    assert {r["slurm_job"] for r in state["runs"].values()} == {f"{array}_0"}  # one task for both
    script = (runs_dir / "slurm" / "sweep.sbatch").read_text()
    assert (
        "#SBATCH --array=0\n" in script and "#SBATCH --gres=gpu:1" in script and "#SBATCH --cpus-per-task=2" in script
    )
    wait_for("the packed task", lambda: settled(array), 240, runs_dir)
    assert states(array) == {f"{array}_0": "COMPLETED"}
    devices, spans = set(), []
    for seed in (1, 2):
        run = runs_dir / f"sft_tiny-qwen2_s{seed}"
        record = read_json(run / "run.json")
        assert record["status"] == "finished" and record["placement"]["gpus"] == 0.5
        launch = read_json(run / "launch.json")
        devices.add(launch["cuda_visible_devices"])
        spans.append((launch["started_at"], record["ended_at"]))  # process start (not training start: load times vary)
    assert len(devices) == 1 and devices != {None}  # the task's one GPU, shared
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # both running at once in the one task


@pytest.mark.slurm
@pytest.mark.slow
def test_cancelled_run_resubmits_alone_and_resumes_from_its_checkpoint(cluster, tmp_path, capsys, tiny_model):
    runs_dir = tmp_path / "runs"
    # array_limit 1: the long run starts after the short one has finished, so it can be cancelled at its first
    # checkpoint (far from its end) without a race against the short run.
    spec = write_spec(
        tmp_path / "s.yaml",
        name="cr",
        runs_dir=str(runs_dir),
        base={**TINY, "save_steps": 3},
        grid={"max_steps": [4, 30]},
        naming="{method}_m{max_steps}",
        slurm={"array_limit": 1},
    )
    short, long = runs_dir / "sft_m4", runs_dir / "sft_m30"
    code, out, err = run_cli(capsys, "sweep", spec, "--backend", "slurm", "--skip_data_check")
    assert code == 0, out + err
    array = read_json(runs_dir / "sweep.json")["slurm"]["array_job_id"]
    wait_for("the long run's first checkpoint", lambda: checkpoint_steps(long), 180, runs_dir)
    assert states(array)[f"{array}_0"] == "COMPLETED"

    code, _, err = run_cli(capsys, "sweep", spec, "--backend", "slurm", "--skip_data_check")  # still running
    assert code == 2 and err.count("\n") == 1 and "still in SLURM" in err and f"{array}_1 RUNNING" in err

    code, out, _ = run_cli(capsys, "cancel", runs_dir)
    assert code == 0 and f"cancelled training array {array}: {array}_1 (RUNNING)" in out
    wait_for("the cancel", lambda: settled(array), 30, runs_dir)
    assert states(array)[f"{array}_1"] == "CANCELLED"
    saved = checkpoint_steps(long)[-1]
    assert saved < 30 and (maybe_json(long / "run.json") or {}).get("status") != "finished"

    code, out, err = run_cli(capsys, "sweep", spec, "--backend", "slurm", "--skip_data_check")
    assert code == 0, out + err
    again = read_json(runs_dir / "sweep.json")["slurm"]["array_job_id"]
    assert again != array and "1 task(s) (0)" in out and "1 run(s) already finished" in out
    assert f"{again}_0: {long.name}" in out  # the one task holds the unfinished run only
    assert "#SBATCH --array=0%1\n" in (runs_dir / "slurm" / "sweep.sbatch").read_text()
    wait_for("the resubmitted run", lambda: settled(again), 180, runs_dir)
    assert read_json(long / "run.json")["status"] == "finished", (long / "train.log").read_text()[-2000:]
    resumed = re.findall(r"resuming from (\S+)", (long / "train.log").read_text())
    assert resumed and int(resumed[-1].rsplit("-", 1)[1]) >= saved
    assert read_json(short / "run.json")["attempts"] == 1  # the finished run was not run again


@pytest.mark.slurm
@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes(cluster, tmp_path, capsys, tiny_model):
    """Preemption / time limit: SLURM signals the batch step with USR1 (here by hand, as `--signal=B:USR1@N` would)."""
    runs_dir = tmp_path / "runs"
    spec = write_spec(
        tmp_path / "s.yaml", name="pre", runs_dir=str(runs_dir), base={**TINY, "max_steps": 300, "save_steps": 1000}
    )  # no checkpoint but the one USR1 asks for; long enough that USR1 comes mid-training
    run = runs_dir / "sft_tiny-qwen2_s42"
    code, out, err = run_cli(capsys, "sweep", spec, "--backend", "slurm", "--skip_data_check")
    assert code == 0, out + err
    array = read_json(runs_dir / "sweep.json")["slurm"]["array_job_id"]
    task = f"{array}_0"
    wait_for("training to start", lambda: (maybe_json(run / "progress.json") or {}).get("step", 0) >= 2, 120, runs_dir)
    subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True)

    # The task requeues itself. SLURM holds a requeued job ~2 min (BeginTime = now + CredExpire) so that the
    # revoked credential of its last start cannot be confused with a new one; release it sooner, but not within
    # the same second as the requeue (slurmd compares credential times in seconds: "Job credential revoked").
    wait_for("the requeue", lambda: states(array).get(task) == "PENDING", 60, runs_dir)
    saved = checkpoint_steps(run)[-1]
    assert read_json(run / "run.json")["status"] == "interrupted"
    # This attempt had stepped down for memory (batch 4 x 1 -> checkpointing -> 2 x 2), as its own recovery records
    # it: the requeued task must resume with 2 x 2, not run out of memory at 4 again.
    asked = from_dict({**TINY, "output_dir": str(run)})
    smaller = recovery.step_down(recovery.step_down(asked, False), True)
    recovery.record_step(Store(str(run)), saved, "CUDA out of memory. Tried to allocate 2.00 GiB", smaller)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)
    wait_for("the requeued task", lambda: settled(array), 150, runs_dir)
    assert states(array)[task] == "COMPLETED", (runs_dir / "slurm" / f"{task}.log").read_text()[-2000:]

    record = read_json(run / "run.json")
    assert record["status"] == "finished" and record["global_step"] == 300 and record["attempts"] == 2
    assert record["resumed_from"].endswith(f"checkpoint-{saved}")
    assert len(record["memory_steps"]) == 1 and record["effective_batch_size"] == 4
    assert (record["config"]["per_device_train_batch_size"], record["config"]["gradient_accumulation_steps"]) == (2, 2)
    assert (
        "keeping the memory step-down of an earlier attempt: batch 2 x accumulation 2"
        in (run / "train.log").read_text()
    )
    slurm_log = (runs_dir / "slurm" / f"{task}.log").read_text()
    assert "signalled: checkpoint saved, requeueing to resume" in slurm_log and "restart 1" in slurm_log
    assert "Restarts=1" in subprocess.run(["scontrol", "show", "job", task], capture_output=True, text=True).stdout


@pytest.mark.slurm
@pytest.mark.slow
def test_a_pipeline_on_slurm_starts_children_after_their_parent_and_blocks_those_of_a_failed_one(
    cluster, tmp_path, capsys, tiny_model, monkeypatch
):
    """A child array waits on its parent's task (afterok); a failed parent's children are cancelled by SLURM and
    shown blocked; a `best:` stage waits on a choice job that evaluated its parent stage. Fixed, the same command
    completes the study: finished runs are skipped."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests" / "helpers"))  # the failing reward, in every job
    runs_dir = tmp_path / "runs"
    methods = {
        "sft": {"split": "train_sft"},
        "dpo": {"split": "train_prefs", "max_steps": 2},
        "grpo": {"split": "train_gen", "max_steps": 2, "num_generations": 2, "max_completion_length": 4},
    }

    def spec(reward: str) -> Path:
        return write_spec(
            tmp_path / "s.yaml",
            name="study",
            runs_dir=str(runs_dir),
            base={k: v for k, v in TINY.items() if k not in ("method", "split")},
            methods=methods,
            eval={"max_samples": 8, "max_generation_samples": 0},
            stages={
                "sft": {"grid": {"method": ["sft"], "seed": [1]}},
                "broken": {"grid": {"method": ["grpo"], "seed": [1]}, "base": {"reward_funcs": [reward]}},
                "aligned": {"from": "sft", "grid": {"method": ["dpo"]}},
                "after_broken": {"from": "broken", "grid": {"method": ["dpo"]}},
                "tuned": {"from": "sft", "best": "test_loss", "grid": {"method": ["dpo"], "seed": [3]}},
            },
        )

    code, out, err = run_cli(capsys, "sweep", spec("failing_reward:boom"), "--backend", "slurm", "--skip_data_check")
    assert code == 0, out + err
    state = read_json(runs_dir / "sweep.json")
    arrays, chooser = state["slurm"]["arrays"], state["slurm"]["choice_job_ids"]["tuned"]
    assert set(arrays) == {"main", "after-sft_tiny-qwen2_s1", "after-grpo_tiny-qwen2_s1", "best-tuned"}
    child_script = (runs_dir / "slurm" / "sweep-after-sft_tiny-qwen2_s1.sbatch").read_text()
    parent_task = state["runs"]["sft_tiny-qwen2_s1"]["slurm_job"]
    assert (
        f"#SBATCH --dependency=afterok:{parent_task}" in child_script and "--kill-on-invalid-dep=yes" in child_script
    )
    choice_script = (runs_dir / "slurm" / "choose-tuned.sbatch").read_text()
    assert f"--dependency=afterany:{arrays['main']}" in choice_script

    every = [*arrays.values(), chooser]
    wait_for("the study's jobs", lambda: settled(*every), 400, runs_dir)
    child, parent = (read_json(runs_dir / n / "run.json") for n in ("sft_tiny-qwen2_s1-dpo", "sft_tiny-qwen2_s1"))
    assert child["status"] == "finished" and child["started_at"] >= parent["ended_at"]
    assert child["lineage"]["parent_name"] == "sft_tiny-qwen2_s1"
    tuned = read_json(runs_dir / "dpo_tiny-qwen2_s3_from_best_sft" / "run.json")
    assert tuned["status"] == "finished" and tuned["lineage"]["parent_name"] == "sft_tiny-qwen2_s1"
    assert read_json(runs_dir / "slurm" / "choices.json")["tuned"]["run"] == "sft_tiny-qwen2_s1"
    assert not (runs_dir / "grpo_tiny-qwen2_s1-dpo" / "run.json").exists()  # never started
    code, out, _ = run_cli(capsys, "status", runs_dir)
    blocked_line = next(line for line in out.splitlines() if "grpo_tiny-qwen2_s1-dpo" in line)
    assert " blocked " in blocked_line, out

    code, out, err = run_cli(capsys, "sweep", spec("friendly"), "--backend", "slurm", "--skip_data_check")
    assert code == 0, out + err
    again = read_json(runs_dir / "sweep.json")
    assert set(again["slurm"]["arrays"]) == {"main", "after-grpo_tiny-qwen2_s1"}  # the rest finished before
    wait_for("the rerun", lambda: settled(*again["slurm"]["arrays"].values()), 300, runs_dir)
    assert read_json(runs_dir / "grpo_tiny-qwen2_s1-dpo" / "run.json")["status"] == "finished"


@pytest.mark.slow
@pytest.mark.slurm
def test_a_jobs_python_without_lm_eval_is_refused_before_any_array(cluster, tmp_path, capsys):
    """The jobs' Python (slurm.python) set up without the bench extra: `--eval` with benchmark tasks is refused in
    one line naming the compute node and the extra, from a step inside an allocation, and nothing is submitted."""
    node = set_up_node(
        tmp_path / "node", ["python -m pip install -q -e ~/tunefleet"], shared_packages(tmp_path / "shared")
    )
    runs_dir = tmp_path / "runs"
    spec = write_spec(
        tmp_path / "s.yaml",
        name="nolm",
        runs_dir=str(runs_dir),
        base=TINY,
        eval={"tasks": ["tiny_world"]},
        slurm={"python": str(node.bin / "python")},
    )
    started = time.time()
    code, out, err = run_cli(capsys, "sweep", spec, "--backend", "slurm", "--eval", "--skip_data_check")
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert lines[0].startswith(
        f"error: the plan cannot run on SLURM node {socket.gethostname()} (python {node.bin}"
    ), err
    assert "eval.tasks (tiny_world)" in lines[0] and "pip install 'tunefleet[bench]'" in lines[0], err
    assert not (runs_dir / "sweep.json").exists() and not (runs_dir / "slurm").exists()
    assert time.time() - started < 120
    arrays = subprocess.run(["squeue", "-h", "-t", "all", "-n", "tf-nolm", "-o", "%i"], capture_output=True, text=True)
    assert arrays.returncode == 0 and not arrays.stdout.strip(), arrays.stdout  # no array was submitted


# ------------------------------------------------------------------ a run over several nodes
def test_a_multi_node_run_is_a_job_of_its_own_with_one_launcher_per_node():
    spec = spec_of(
        base={**TINY, "num_nodes": 2},
        resources={"gpus_per_run": 1, "cpus_per_run": 4, "memory_gb": 16},
        slurm={"partition": "gpu", "time": "01:00:00"},
    )
    runs = sweeps.place_runs(sweeps.expand(spec), spec)
    script = slurm.render_gang_script(spec, runs, 0, "/shared/runs", "/venv/bin/python", retries=2, after="41_0")
    for line in (
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gres=gpu:1",  # each node's GPUs
        "--cpus-per-task=4",
        "--mem=16G",
        "--partition=gpu",
        "--dependency=afterok:41_0",
        "--requeue",
        "--output=/shared/runs/slurm/%j.log",
    ):
        assert f"#SBATCH {line}\n" in script, line
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert (
        "srun --kill-on-bad-exit=1 --ntasks=2 --ntasks-per-node=1 /venv/bin/python -m tunefleet.launcher.slurm_task"
        in script
    )
    assert '--gang 0 --head "$head"' in script and "for attempt in $(seq 0 2)" in script
    assert runs[0].config.processes_per_node == 1 and runs[0].config.world_size == 2  # one process per GPU
    # the stand-in where one machine runs every task (a one-node cluster)
    tasks = slurm.render_gang_script(
        spec_of(base={**TINY, "num_nodes": 2}, slurm={"multinode": "tasks"}), runs, 0, "/r", "py"
    )
    assert "#SBATCH --ntasks=2\n" in tasks and "--nodes" not in tasks


@pytest.mark.slurm
@pytest.mark.slow
def test_a_two_node_run_beside_an_array_and_the_evaluation(cluster, tmp_path, capsys, tiny_model):
    """On this one-node SLURM each task of the job stands for a node (slurm.multinode: tasks): two launchers, machine
    ranks 0 and 1, meeting at the allocation's head; an array run beside it and the evaluation after both."""
    runs_dir = tmp_path / "runs"
    base = {**TINY, "per_device_train_batch_size": 2, "max_steps": 5}
    spec = write_spec(
        tmp_path / "s.yaml",
        name="nodes",
        runs_dir=str(runs_dir),
        base=base,
        grid={"num_nodes": [2, 1]},
        naming="sft_n{num_nodes}",
        slurm={"multinode": "tasks"},
        eval={"max_samples": 10, "max_generation_samples": 1, "skip_perplexity": True},
    )
    code, out, err = run_cli(capsys, "sweep", spec, "--backend", "slurm", "--eval", "--skip_data_check")
    assert code == 0, out + err
    jobs = read_json(runs_dir / "sweep.json")["slurm"]
    gang, array, eval_job = jobs["gangs"]["sft_n2"], jobs["arrays"]["main"], jobs["eval_job_id"]
    assert f"submitted sft_n2: SLURM job {gang} over 2 nodes" in out
    assert f"starts when every task of {array}, {gang} succeeded" in out
    wait_for("the multi-node job, the array and the evaluation", lambda: settled(gang, array, eval_job), 300, runs_dir)
    assert states(gang, array, eval_job) == {gang: "COMPLETED", f"{array}_0": "COMPLETED", eval_job: "COMPLETED"}
    run = runs_dir / "sft_n2"
    record = read_json(run / "run.json")
    assert record["status"] == "finished" and record["world_size"] == 2
    assert [(n["machine_rank"], n["ranks"]) for n in record["nodes"]] == [(0, [0]), (1, [1])]
    log = (runs_dir / "slurm" / f"{gang}.log").read_text()
    assert (
        "node 0 of 2" in log and "node 1 of 2" in log and "--machine_rank 1" in (run / "train.node1.log").read_text()
    )
    assert {"sft_n1", "sft_n2"} <= set(read_json(runs_dir / "evaluation_results.json"))
    # the same run as two processes on this machine: the same losses
    one = tmp_path / "one"
    code, out, err = run_cli(
        capsys, "train", *[f"--{k}={v}" for k, v in base.items()], "--num_processes", "2", "--output_dir", one
    )
    assert code == 0, out + err

    def losses(folder):
        return [e["loss"] for e in read_json(folder / "trainer_state.json")["log_history"] if "loss" in e]

    assert max(abs(a - b) for a, b in zip(losses(run), losses(one), strict=True)) < 1e-5
    code, out, _ = run_cli(capsys, "status", runs_dir)
    assert code == 0 and f"{gang} COMPLETED" in out and "2 nodes: " in out


@pytest.mark.slurm
def test_more_nodes_than_slurm_has_is_refused_before_anything_is_submitted(cluster, tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    spec = write_spec(tmp_path / "s.yaml", name="toobig", runs_dir=str(runs_dir), base={**TINY, "num_nodes": 2})
    code, out, err = run_cli(capsys, "sweep", spec, "--backend", "slurm", "--skip_data_check")
    assert code == 2 and err.count("\n") == 1, out + err
    assert (
        err.startswith("error: run sft_tiny-qwen2_s42 spans 2 nodes, which SLURM cannot give it (")
        and "lower num_nodes" in err
    )
    listed = subprocess.run(
        ["squeue", "-h", "-t", "all", "-n", "tf-toobig", "-o", "%i"], capture_output=True, text=True
    )
    assert not listed.stdout.strip() and not (runs_dir / "sweep.json").exists()
