"""Carry out one run of a sweep: the same function runs in a local thread, a Ray task and a SLURM array task.

It writes the run's `config.yaml`, launches `python -m trainers.train --config ...` (or `accelerate launch`
for several processes) on a free port, appends its output to `<run>/train.log`, and reports the outcome
from the run's own `run.json`. A finished run is skipped; an interrupted one resumes from its checkpoint
(the trainer does that by itself).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from launcher.launch import free_port, launch_command, plan_launch
from trainers.run import now, read_json, write_json_atomic

_children: set[subprocess.Popen] = set()
stopping = threading.Event()  # set on Ctrl-C: no new run or retry starts


def _die_with_parent() -> None:
    """Linux: the training process gets SIGTERM when the thread that started it dies (Ctrl-C, killed worker)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def write_run_config(run: dict) -> Path:
    import yaml
    out = Path(run["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    tmp = path.with_name(f".config.yaml.tmp-{os.getpid()}")
    tmp.write_text(f"# {run['name']}: written by tunefleet sweep; rerun with\n"
                   f"#   tunefleet train --config {path}\n" + yaml.safe_dump(run["config"], sort_keys=False))
    tmp.replace(path)
    return path


def summary(run: dict) -> dict:
    """Status, steps and last loss of a run, from its own files (works for any backend)."""
    out = Path(run["output_dir"])
    record = read_json(out / "run.json") or {}
    progress = read_json(out / "progress.json") or {}
    state = read_json(out / "trainer_state.json") or {}
    losses = [e["loss"] for e in state.get("log_history", []) if isinstance(e, dict) and "loss" in e]
    return {"run_status": record.get("status"), "steps": record.get("global_step") or progress.get("step"),
            "max_steps": progress.get("max_steps"), "final_loss": losses[-1] if losses else progress.get("loss")}


def run_one(run: dict, env_extra: dict | None = None) -> dict:
    """Train one run to completion in a child process; returns its outcome (never raises for a failed run)."""
    out = Path(run["output_dir"]).resolve()
    run = {**run, "output_dir": str(out), "config": {**run["config"], "output_dir": str(out)}}
    t0 = time.time()
    if (read_json(out / "run.json") or {}).get("status") == "finished":
        return {"name": run["name"], "status": "done", "skipped": True, "returncode": 0, "wall_s": 0.0,
                "log": str(out / "train.log"), "host": socket.gethostname(), **summary(run)}
    from trainers.config import from_dict
    choice, env = plan_launch(from_dict(run["config"]), env_extra)
    run["config"]["accelerate_config"] = choice.config or "auto"
    if stopping.is_set():
        return {"name": run["name"], "status": "failed", "skipped": False, "returncode": None, "wall_s": 0.0,
                "log": str(out / "train.log"), "error": "sweep interrupted before this run started", **summary(run)}
    cfg_path = write_run_config(run)
    cmd = launch_command(["--config", str(cfg_path)], int(run["config"].get("num_processes", 1)), free_port(),
                         choice.config)
    with open(out / "train.log", "a") as log:
        log.write(f"\n=== {now()} on {socket.gethostname()}: {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        _children.add(proc)
        write_json_atomic(out / "launch.json", {"pid": proc.pid, "host": socket.gethostname(), "command": cmd,
                                                "started_at": now(),
                                                "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES")})
        try:
            rc = proc.wait()
        finally:
            _children.discard(proc)
    info = summary(run)
    ok = rc == 0 and info["run_status"] == "finished"
    result = {"name": run["name"], "status": "done" if ok else "failed", "skipped": False, "returncode": rc,
              "wall_s": round(time.time() - t0, 2), "log": str(out / "train.log"), "host": socket.gethostname(), **info}
    if not ok:
        result["error"] = _last_error(out / "train.log") or f"exit code {rc}"
    return result


def _last_error(log: Path) -> str | None:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    for line in reversed(lines[-50:]):
        if line.startswith("error:") or "Error" in line.split(":")[0]:
            return line[:300]
    return lines[-1][:300] if lines else None


def terminate_children() -> None:
    """Stop the training processes this process started (Ctrl-C): they save a checkpoint and exit."""
    stopping.set()
    for proc in list(_children):
        if proc.poll() is None:
            proc.terminate()
    for proc in list(_children):
        try:
            proc.wait(timeout=60)  # the trainer finishes its step and writes a checkpoint
        except subprocess.TimeoutExpired:
            proc.kill()
