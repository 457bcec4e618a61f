"""Warm starts: runs forked from a process that has the training stack imported behave as cold ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from testkit import FAST, ROOT, TINY, checkpoint_steps, pids_in_tree, read_json, tunefleet

from tunefleet.common.contract import WARM_SOCKET_ENV, WARM_SWITCH_ENV
from tunefleet.launcher import warm

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_command(method: str, split: str, out, steps: int = 3, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tunefleet.trainers.train",
        "--method",
        method,
        *TINY,
        "--split",
        split,
        "--output_dir",
        str(out),
        "--max_steps",
        str(steps),
        "--use_qlora",
        "false",
        "--learning_rate",
        "1e-3",
        *FAST,
        *map(str, extra),
    ]


def start(cmd: list[str], log_path, env: dict | None = None):
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        return warm.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or ENV, cwd=str(ROOT))


def cold(cmd: list[str], log_path):
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)


def losses(run_dir) -> list[float]:
    return [e["loss"] for e in read_json(run_dir / "trainer_state.json")["log_history"] if "loss" in e]


@pytest.mark.slow
@pytest.mark.parametrize("method,split", [("sft", "train_sft"), ("dpo", "train_prefs")])
def test_warm_and_cold_runs_are_identical(method, split, tmp_path, tiny_model):
    """Same seed, same command: the same losses at every step and the same adapter, byte for byte."""
    cold_dir, warm_dir = tmp_path / "cold", tmp_path / "warm"
    proc = cold(train_command(method, split, cold_dir), tmp_path / "cold.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "cold.log").read_text()[-2000:]
    proc = start(train_command(method, split, warm_dir), tmp_path / "warm.log")
    assert isinstance(proc, warm.WarmProcess)
    assert proc.wait(timeout=300) == 0, (tmp_path / "warm.log").read_text()[-2000:]

    assert read_json(warm_dir / "run.json")["startup"]["kind"] == "warm"
    assert read_json(cold_dir / "run.json")["startup"]["kind"] == "cold"
    assert losses(warm_dir) == losses(cold_dir) and len(losses(cold_dir)) == 3
    adapter = "adapter_model.safetensors"
    assert (warm_dir / adapter).read_bytes() == (cold_dir / adapter).read_bytes()
    # The run's own output reached its log through the streams the launcher passed.
    assert "step 3 | max_steps 3" in (tmp_path / "warm.log").read_text()


@pytest.mark.slow
def test_warm_ranks_of_a_ddp_launch_train_as_cold_ones(tmp_path, tiny_model):
    """`accelerate launch` of 2 processes: each rank forked by the warm process (warm.rank) trains exactly as a
    rank started cold: same losses, same adapter bytes, one gloo world of 2."""
    from testkit import tunefleet

    args = ["train", "--method", "dpo", *TINY, "--split", "train_prefs", "--use_qlora", "false"]
    args += ["--num_processes", 2, "--max_steps", 3, "--learning_rate", "1e-3", *FAST]
    for kind in ("warm", "cold"):
        switch = {WARM_SWITCH_ENV: "0"} if kind == "cold" else {}
        tunefleet(*args, "--output_dir", tmp_path / kind, env={"OMP_NUM_THREADS": "1", **switch})
        record = read_json(tmp_path / kind / "run.json")
        assert record["startup"]["kind"] == kind and record["world_size"] == 2
    assert losses(tmp_path / "warm") == losses(tmp_path / "cold")
    adapter = "adapter_model.safetensors"
    assert (tmp_path / "warm" / adapter).read_bytes() == (tmp_path / "cold" / adapter).read_bytes()


@pytest.mark.slow
def test_a_warm_run_stopped_by_a_signal_checkpoints_and_exits_as_a_cold_one(tmp_path, tiny_model):
    """SIGTERM (a sweep's Ctrl-C, SLURM) mid-training: checkpoint, status interrupted, exit code 128 + 15."""
    outcomes = {}
    for kind in ("cold", "warm"):
        out = tmp_path / kind
        cmd = train_command("sft", "train_sft", out, 400, "--save_steps", 1000)
        proc = (cold if kind == "cold" else start)(cmd, tmp_path / f"{kind}.log")
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "progress.json").exists():
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        record = read_json(out / "run.json")
        outcomes[kind] = (code, record["status"], bool(checkpoint_steps(out)))
    assert outcomes["warm"] == outcomes["cold"] == (128 + signal.SIGTERM, "interrupted", True)


@pytest.mark.slow
def test_a_warm_run_out_of_memory_recovers_as_a_cold_one(tmp_path, tiny_model):
    """An address-space limit on the forked run: the first step fails, the run resumes with checkpointing on and a
    smaller batch, and finishes with the same effective batch (as tests/test_memory.py shows for a cold run)."""
    from test_memory import long_completions

    data = long_completions(tmp_path / "long.jsonl")

    def command(out):
        return [
            sys.executable,
            "-m",
            "tunefleet.trainers.train",
            "--method",
            "sft",
            "--model_name",
            "tunefleet/tiny-qwen2",
            "--dataset",
            str(data),
            "--output_dir",
            str(out),
            "--max_length",
            "1024",
            "--per_device_train_batch_size",
            "8",
            "--gradient_accumulation_steps",
            "2",
            "--max_steps",
            "2",
            "--logging_steps",
            "1",
        ]

    def peak_of(proc) -> int:
        peak = 0
        while proc.poll() is None:
            try:
                status = open(f"/proc/{proc.pid}/status").read()
                peak = max(peak, int(status.split("VmPeak:")[1].split()[0]) * 1024)
            except (OSError, IndexError, ValueError):
                pass
            time.sleep(0.05)
        return peak

    env = {**ENV, "MALLOC_ARENA_MAX": "2"}
    measure = start(command(tmp_path / "measure"), tmp_path / "measure.log", env)
    unlimited = peak_of(measure)
    assert measure.returncode == 0
    proc = start(command(tmp_path / "run"), tmp_path / "run.log", env)
    subprocess.run(["prlimit", f"--pid={proc.pid}", f"--as={unlimited - 400 * 2**20}"], check=True)
    assert proc.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    record = read_json(tmp_path / "run" / "run.json")
    assert record["startup"]["kind"] == "warm" and record["status"] == "finished"
    steps = record["memory_steps"]
    assert steps and steps[0]["gradient_checkpointing"] is True and "can't allocate memory" in steps[0]["error"]
    final = record["config"]
    assert final["per_device_train_batch_size"] < 8
    assert final["per_device_train_batch_size"] * final["gradient_accumulation_steps"] == 16


@pytest.mark.slow
def test_a_run_whose_launcher_dies_is_stopped_and_keeps_its_checkpoint(tmp_path, tiny_model):
    """The launcher (a sweep's thread, a Ray worker) is killed: its warm-started run gets SIGTERM, as a cold child
    gets it through PR_SET_PDEATHSIG, and saves a checkpoint. No process of the launcher's is left."""
    out = tmp_path / "run"
    script = (
        "import subprocess, sys, time\n"
        "from tunefleet.launcher import warm\n"
        f"cmd = {train_command('sft', 'train_sft', out, 400, '--save_steps', 1000)!r}\n"
        f"log = open({str(tmp_path / 'run.log')!r}, 'a')\n"
        "proc = warm.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)\n"
        "print(type(proc).__name__, proc.pid, flush=True)\n"
        "proc.wait()\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    kind, pid = launcher.stdout.readline().split()
    assert kind == "WarmProcess"
    tree = pids_in_tree(launcher.pid)
    assert int(pid) in tree  # the run is a descendant of its launcher (through the launcher's warm process)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "progress.json").exists():
        time.sleep(0.1)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 120
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in tree - {launcher.pid}):
        time.sleep(0.2)
    assert not [p for p in tree - {launcher.pid} if os.path.exists(f"/proc/{p}")]
    assert read_json(out / "run.json")["status"] == "interrupted" and checkpoint_steps(out)


@pytest.mark.slow
def test_warm_start_falls_back_to_cold_and_says_why(tmp_path, tiny_model):
    """Switched off, or an advertised warm process that is gone: the run starts cold and its log says why."""
    off = start(
        train_command("sft", "train_sft", tmp_path / "off", 1), tmp_path / "off.log", {**ENV, WARM_SWITCH_ENV: "0"}
    )
    assert isinstance(off, subprocess.Popen) and off.wait(timeout=300) == 0
    assert read_json(tmp_path / "off" / "run.json")["startup"]["kind"] == "cold"

    gone = {**ENV, WARM_SOCKET_ENV: str(tmp_path / "no-such-socket")}
    proc = start(train_command("sft", "train_sft", tmp_path / "gone", 1), tmp_path / "gone.log", gone)
    assert proc.wait(timeout=300) == 0
    # The advertised one is unreachable; this process's own warm process serves the run instead.
    assert read_json(tmp_path / "gone" / "run.json")["startup"]["kind"] == "warm"


def test_every_command_of_a_test_suite_forks_from_its_one_warm_process(tmp_path, tiny_model, warm_process):
    """pytest sets PYTEST_CURRENT_TEST anew for each test phase: no reason for another warm process (and its
    seconds of imports) per test."""
    if not warm_process:
        pytest.skip("warm starts are off")
    before = warm.own_sockets()
    out = tmp_path / "run"
    args = ["--method", "sft", *TINY, "--split", "train_sft", "--output_dir", out, "--max_steps", 1, *FAST]
    tunefleet("train", *args, "--use_qlora", "false")
    assert read_json(out / "run.json")["startup"]["warm_process"] == warm_process
    assert warm.own_sockets() == before


@pytest.mark.slow
def test_a_run_waits_for_an_advertised_warm_process_still_importing_and_not_for_a_killed_one(tmp_path, tiny_model):
    """A launcher given the address of a warm process that is still importing waits for it rather than start its
    own (seconds of imports again); one whose warm process was killed while importing does not wait at all."""
    env = {**ENV, "HF_HOME": str(tmp_path / "hf")}  # an environment of its own: no warm process here serves it
    script = "import sys\nfrom tunefleet.launcher import warm\nprint(warm.prestart(), flush=True)\nsys.stdin.read()\n"
    owner = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    advertised = owner.stdout.readline().strip()
    assert not os.path.exists(advertised + ".ready")  # still importing
    before = warm.own_sockets()
    log = tmp_path / "run.log"
    proc = start(train_command("sft", "train_sft", tmp_path / "run", 1), log, {**env, WARM_SOCKET_ENV: advertised})
    assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
    assert read_json(tmp_path / "run" / "run.json")["startup"]["warm_process"] == advertised
    assert warm.own_sockets() == before
    owner.stdin.close()  # the owner ends, and its warm process with it
    owner.wait(timeout=120)

    killed = warm.own_server({**env, "HF_HOME": str(tmp_path / "hf2")})
    assert warm.warm_process_lives(killed.socket) and not os.path.exists(killed.socket + ".ready")
    killed.proc.kill()
    killed.proc.wait()
    assert not warm.warm_process_lives(killed.socket)
    assert not warm.wait_ready(killed.socket)  # at once, not at its timeout (10 minutes)
    warm.stop({killed.socket})


def test_an_environment_read_at_import_gets_its_own_warm_process():
    """Variables read when used (the GPU, threads, tunefleet's own) may differ; others (HF_HOME, read when
    huggingface_hub is imported) may not: such a run is served by a warm process started with its environment."""
    base = {"HF_HOME": "/a", "PATH": "/bin"}
    assert warm.env_difference(base, {**base, "CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "4"}) is None
    assert warm.env_difference(base, {**base, "TUNEFLEET_NODE_ID": "x", "RAY_JOB_ID": "2"}) is None
    # what Ray Tune gives a trial, scikit-learn sets on import, pytest sets for each test
    others = {"PL_DISABLE_FORK": "1", "TUNE_ORIG_WORKING_DIR": "/w", "KMP_DUPLICATE_LIB_OK": "True", "LINES": "24"}
    assert warm.env_difference(base, {**base, **others, "PYTEST_CURRENT_TEST": "t.py::t (call)"}) is None
    assert warm.env_difference(base, {**base, "HF_HOME": "/b"}) == "HF_HOME"
    assert warm.env_difference(base, {"PATH": "/bin"}) == "HF_HOME"
    assert warm.warm_entry([sys.executable, "-m", "tunefleet.trainers.train", "--x"]) == "tunefleet.trainers.train"
    assert warm.warm_entry([sys.executable, "-m", "accelerate.commands.launch", "-m", "x"]) is None
    assert warm.warm_entry(["/other/python", "-m", "tunefleet.trainers.train"]) is None


@pytest.mark.slow
def test_the_warm_process_ends_with_its_owner(tmp_path):
    """A process that started a warm process and exits (or is killed) leaves nothing behind."""
    script = (
        "import os, time\n"
        "from tunefleet.launcher import warm\n"
        "path = warm.prestart()\n"
        "server = warm.own_server(dict(os.environ))\n"
        "print(server.proc.pid, flush=True)\n"
        "server.wait_ready()\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    server_pid = int(owner.stdout.readline())
    time.sleep(1)
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    deadline = time.time() + 60
    while time.time() < deadline and os.path.exists(f"/proc/{server_pid}"):
        status = open(f"/proc/{server_pid}/status").read() if os.path.exists(f"/proc/{server_pid}") else ""
        if "State:\tZ" in status:
            break
        time.sleep(0.2)
    status = open(f"/proc/{server_pid}/status").read() if os.path.exists(f"/proc/{server_pid}") else ""
    assert not status or "State:\tZ" in status


@pytest.mark.slow
def test_a_warm_process_for_another_environment_can_be_ended_alone(tmp_path):
    """What the tests' fixture does after each test: the warm processes started for environments of that test's own
    end, this process's first one stays."""
    kept = warm.own_sockets()
    server = warm.own_server({**os.environ, "HF_HOME": str(tmp_path / "hf")})
    assert warm.own_sockets() == kept | {server.socket}
    warm.stop({server.socket})
    assert warm.own_sockets() == kept and server.proc.poll() is not None
    assert not os.path.exists(server.socket)
