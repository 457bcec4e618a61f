"""Carry out one run of a sweep: the same function runs in a local thread, a Ray task and a SLURM array task.

It writes the run's `config.yaml`, launches `python -m tunefleet.trainers.train --config ...` (or `accelerate
launch` for several processes) on a free port, appends its output to `<run>/train.log`, and reports the outcome
from the run's own `run.json`. A finished run is skipped; an interrupted one resumes from its checkpoint
(the trainer does that by itself).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tunefleet.common import schema
from tunefleet.common.contract import (
    GANG_ENV,
    GANG_FOLDER,
    LAUNCH_FILE,
    LOCK_TOKEN_ENV,
    NODE_ID_ENV,
    PLACEMENT_ENV,
    PROGRESS_FILE,
    RUN_CONFIG,
    RUN_RECORD,
    TRAIN_LOG,
    GangSeat,
)
from tunefleet.common.errors import first_line
from tunefleet.common.jsonfile import utc_now
from tunefleet.common.runlock import Held, RunLock
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import Store, is_uri, join, scratch_dir
from tunefleet.launcher import warm
from tunefleet.launcher.launch import free_port, launch_command, plan_launch
from tunefleet.launcher.records import RunOutcome, RunPlan, RunSummary
from tunefleet.trainers import recovery
from tunefleet.trainers.lineage import parent_changed

if TYPE_CHECKING:
    from tunefleet.trainers.config import TrainConfig


_children: set[subprocess.Popen | warm.WarmProcess] = set()
stopping = threading.Event()  # set on Ctrl-C: no new run or retry starts


def training_processes() -> list[subprocess.Popen | warm.WarmProcess]:
    """The training processes this process started and that have not been reaped yet."""
    return list(_children)


def write_run_config(plan: RunPlan, folder: Path) -> Path:
    """The run's config.yaml in `folder` (the run's own folder, or node-local scratch for a run in a store)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_CONFIG
    tmp = path.with_name(f".config.yaml.tmp-{os.getpid()}")
    values = {k: v for k, v in schema.to_dict(plan.config).items() if v is not None}
    tmp.write_text(
        f"# {plan.name}: written by tunefleet sweep; rerun with\n"
        f"#   tunefleet train --config {join(plan.output_dir, 'config.yaml')}\n"
        + yaml.safe_dump(values, sort_keys=False)
    )
    tmp.replace(path)
    return path


def summarize(output_dir: str | Path) -> RunSummary:
    """Status, steps and last loss of a run, from its run.json, progress.json and trainer_state.json."""
    store = Store(str(output_dir))
    record = store.read_json(RUN_RECORD) or {}
    progress = store.read_json(PROGRESS_FILE) or {}
    state = store.read_json("trainer_state.json") or {}
    losses = [e["loss"] for e in state.get("log_history", []) if isinstance(e, dict) and "loss" in e]
    return RunSummary(
        status=RunStatus.of(record.get("status")),
        steps=record.get("global_step") or progress.get("step"),
        max_steps=progress.get("max_steps"),
        final_loss=losses[-1] if losses else progress.get("loss"),
        memory_steps=recovery.describe_steps(record),
        nodes=record.get("nodes") or [],
        cost=record.get("cost") if isinstance(record.get("cost"), dict) else None,
    )


def absolute(plan: RunPlan) -> RunPlan:
    """The plan with its folder (and a parent run's folder, its base) as absolute paths, wherever it starts."""
    out = plan.output_dir if is_uri(plan.output_dir) else str(Path(plan.output_dir).resolve())
    model = plan.config.model_name
    if plan.parent and not is_uri(model):
        model = str(Path(model).resolve())
    return dataclasses.replace(plan, config=dataclasses.replace(plan.config, output_dir=out, model_name=model))


def run_one(plan: RunPlan, env_extra: dict | None = None, seat: GangSeat | None = None) -> RunOutcome:
    """Train one run to completion in a child process; returns its outcome (never raises for a failed run).

    `env_extra`: what the backend gives this run (CUDA_VISIBLE_DEVICES of its GPU share, TUNEFLEET_NODE_ID of
    the Ray node it runs on, ...). A run kept in a store (`s3://...`) is launched from node-local scratch (its
    config.yaml and log), which goes once the log is appended to the store's train.log. `seat`: machine rank 0
    of a multi-node run (its other nodes run `run_node`): this node holds the run's folder and its records.
    """
    if plan.lineage is not None and plan.lineage.waits_for_choice:
        raise ValueError(f"{plan.name} starts from the best run of stage {plan.lineage.parent_stage}, not chosen yet")
    plan = absolute(plan)
    out = plan.output_dir
    store = Store(out)
    here = scratch_dir(out, "launch") if store.remote else Path(out)  # config.yaml and train.log while it runs
    log, host, t0 = here / TRAIN_LOG, socket.gethostname(), time.time()
    env_extra = {**(env_extra or {}), PLACEMENT_ENV: json.dumps(plan.placement.record())}
    node_id = env_extra.get(NODE_ID_ENV)

    def outcome(status: RunStatus, **fields) -> RunOutcome:
        info = summarize(out)
        return RunOutcome(
            plan.name,
            status,
            join(out, TRAIN_LOG),
            host=host,
            steps=info.steps,
            final_loss=info.final_loss,
            node_id=node_id,
            memory_steps=info.memory_steps,
            **fields,
        )

    if summarize(out).status is RunStatus.FINISHED:
        changed = parent_changed(plan.config, store.read_json(RUN_RECORD) or {}) if plan.parent else None
        if not changed:
            return outcome(RunStatus.FINISHED, skipped=True, returncode=0)
    # One writer per run folder: taken before anything is written (another driver, or a `tunefleet train` by hand,
    # may be training this very run: then wait for it and report what it did).
    lock = RunLock(store, sweep=plan.config.tracking_group)
    try:
        lock.acquire()
    except Held as held:
        if seat is None:
            return trained_elsewhere(held, store, outcome)
        # a gang's earlier attempt still ending on a node (its rank 0 checkpoints as it stops): wait for it, then
        # train (or find the run finished) as this attempt
        print(f"{store.url()}: waiting for the earlier attempt ({held.holder.describe()}) to end", flush=True)
        lock.acquire_waiting()
    if lock.notes:  # a killed driver's lock, taken over: the run's log says so
        here.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as log_file:
            log_file.writelines(f"\n=== {note}\n" for note in lock.notes)
    try:
        return run_locked(plan, lock, env_extra, store, out, here, log, host, node_id, t0, outcome, seat)
    finally:
        lock.release()


def trained_elsewhere(held: Held, store: Store, outcome) -> RunOutcome:
    """The run is being trained by another holder of its folder: wait until it lets go, then report its outcome."""
    print(f"{store.url()}: running elsewhere ({held.holder.describe()}); waiting for it", flush=True)
    lock = RunLock(store)
    while not stopping.is_set():
        holder = lock.read()
        if holder is None or not holder.alive():
            break
        time.sleep(2)
    recorded = summarize(store.url()).status
    where = held.holder.describe()
    if recorded is RunStatus.FINISHED:
        return outcome(RunStatus.FINISHED, skipped=True, returncode=0, elsewhere=where)
    status = RunStatus.INTERRUPTED if recorded is RunStatus.INTERRUPTED else RunStatus.FAILED
    ended = recorded.value if recorded else "without a record"
    return outcome(status, elsewhere=where, error=f"trained elsewhere ({where}): it ended {ended}")


def run_locked(
    plan: RunPlan,
    lock: RunLock,
    env_extra,
    store: Store,
    out: str,
    here: Path,
    log: Path,
    host: str,
    node_id,
    t0: float,
    outcome,
    seat: GangSeat | None = None,
) -> RunOutcome:
    """run_one's work once the run's folder is this process's to write."""
    if summarize(out).status is RunStatus.FINISHED:
        changed = parent_changed(plan.config, store.read_json(RUN_RECORD) or {}) if plan.parent else None
        if not changed:
            return outcome(RunStatus.FINISHED, skipped=True, returncode=0)
        # its parent was retrained since: this run is trained again from the new one (its log says why)
        plan = dataclasses.replace(plan, config=dataclasses.replace(plan.config, overwrite=True))
        here.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as log_file:
            log_file.write(f"\n=== {changed.split(':')[0]}: trained again from it\n")
    assert lock.holder is not None
    choice, env = plan_launch(plan.config, {**env_extra, LOCK_TOKEN_ENV: lock.holder.token})
    plan = dataclasses.replace(
        plan, config=dataclasses.replace(plan.config, accelerate_config=choice.config or "auto")
    )
    if stopping.is_set():
        return outcome(RunStatus.FAILED, error="sweep interrupted before this run started")
    last: dict = {}  # the latest launch's error and whether it ran out of memory

    def launch(cfg: TrainConfig) -> tuple[int, bool]:
        launched = dataclasses.replace(plan, config=cfg)
        rc, last["error"], last["out_of_memory"] = launch_once(
            launched, choice.config, env, store, here, host, node_id, lock, seat
        )
        return rc, last["out_of_memory"]

    def say(line: str) -> None:
        with open(log, "a") as log_file:
            log_file.write(f"\n=== {line}\n")

    # one process recovers itself (trainers/train.py); a run of several, or sharing a GPU, is relaunched smaller
    # (not a multi-node run: its other nodes would not follow; it goes up to the backend, which retries the gang)
    rc = recovery.relaunch_smaller(
        plan.config,
        launch,
        say,
        lambda cfg: cfg.num_processes > 1 and seat is None and not plan.placement.shared and not stopping.is_set(),
    )
    error, out_of_memory = last["error"], last["out_of_memory"]
    if store.remote:  # this attempt's log joins the earlier ones in the store; the scratch goes
        store.write_bytes(TRAIN_LOG, (store.read_bytes(TRAIN_LOG) or b"") + log.read_bytes())
        shutil.rmtree(here, ignore_errors=True)
    wall = round(time.time() - t0, 2)
    recorded = summarize(out).status
    if rc == 0 and recorded is RunStatus.FINISHED:
        return outcome(RunStatus.FINISHED, returncode=rc, wall_s=wall)
    status = RunStatus.INTERRUPTED if recorded is RunStatus.INTERRUPTED else RunStatus.FAILED
    return outcome(status, returncode=rc, wall_s=wall, error=error, out_of_memory=out_of_memory)


def launch_once(
    plan: RunPlan,
    accelerate_config: str | None,
    env: dict,
    store: Store,
    here: Path,
    host: str,
    node_id: str | None,
    lock: RunLock | None = None,
    seat: GangSeat | None = None,
    log_name: str = TRAIN_LOG,
) -> tuple[int, str, bool]:
    """One launch of the run's processes, its output appended to `here`/train.log (a multi-node run's other nodes:
    `log_name`): exit code, last error line, and whether it ran out of memory (run.json or any line of this launch's
    output says so)."""
    cfg_path = write_run_config(plan, here)
    if store.remote and (seat is None or seat.machine_rank == 0):
        store.upload(cfg_path, RUN_CONFIG)
    world = plan.config.world_size
    cmd = launch_command(["--config", str(cfg_path)], world, free_port(), accelerate_config, seat=seat)
    if world > 1:  # the ranks ask this warm process to fork them (warm.rank)
        env = warm.with_advertised(env)
    if seat is not None:
        env = {**env, GANG_ENV: seat.to_env()}
    log = here / log_name
    with open(log, "a") as log_file:
        log_file.write(f"\n=== {utc_now()} on {host}: {' '.join(cmd)}\n")
        log_file.flush()
        start = log_file.tell()
        # Forked from a warm process that has the training stack imported (one process of two or more: cold).
        proc = warm.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        _children.add(proc)
        if seat is not None:  # say when this node's launcher reaches the head (who did not come, if they never meet)
            threading.Thread(target=report_reaching_head, args=(seat, store, proc), daemon=True).start()
        if lock is not None:
            lock.add_pid(proc.pid)  # the lock stays live while the training does, even if this process is killed
        if seat is None or seat.machine_rank == 0:
            record_launch(
                store,
                {
                    "pid": proc.pid,
                    "host": host,
                    "node_id": node_id,
                    "command": cmd,
                    "started_at": utc_now(),
                    "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
                    **({"gang": {"id": seat.gang_id, "head": f"{seat.head}:{seat.port}"}} if seat else {}),
                },
            )
        try:
            rc = proc.wait()
        finally:
            _children.discard(proc)
    with open(log, errors="replace") as log_file:
        log_file.seek(start)
        output = log_file.read()
    error = _last_error(output) or f"exit code {rc}"
    ran_out = recovery.launch_ran_out_of_memory(store)  # also consumes the ranks' markers
    out_of_memory = rc != 0 and (ran_out or any(sign in output for sign in recovery.OUT_OF_MEMORY))
    return rc, error, out_of_memory


def run_node(plan: RunPlan, seat: GangSeat, env_extra: dict | None = None) -> RunOutcome:
    """A node of a multi-node run other than rank 0's: start this node's processes (machine rank `seat`), which join
    the gang at the head. Rank 0's node (run_one) holds the run's folder and writes its records; this node's output
    goes to `train.node<I>.log` beside train.log."""
    plan = absolute(plan)
    out, host = plan.output_dir, socket.gethostname()
    store = Store(out)
    # config.yaml (the same as rank 0's node writes) and the log: in the run's folder, or node-local scratch for a
    # run in a store (the log appended to the store's copy at the end)
    here = scratch_dir(out, f"node{seat.machine_rank}") if store.remote else Path(out)
    here.mkdir(parents=True, exist_ok=True)
    log_name, node_id = node_log(seat.machine_rank), (env_extra or {}).get(NODE_ID_ENV)
    env_extra = {**(env_extra or {}), PLACEMENT_ENV: json.dumps(plan.placement.record())}
    t0 = time.time()
    try:
        choice, env = plan_launch(plan.config, env_extra)
        plan = dataclasses.replace(
            plan, config=dataclasses.replace(plan.config, accelerate_config=choice.config or "auto")
        )
        rc, error, out_of_memory = launch_once(
            plan, choice.config, env, store, here, host, node_id, None, seat, log_name
        )
    except Exception as exc:  # this node could not even start its processes: the gang ends
        rc, error, out_of_memory = 1, f"{type(exc).__name__}: {first_line(exc)}", False
    if store.remote and (here / log_name).exists():
        store.write_bytes(log_name, (store.read_bytes(log_name) or b"") + (here / log_name).read_bytes())
        shutil.rmtree(here, ignore_errors=True)
    return RunOutcome(
        plan.name,
        RunStatus.FINISHED if rc == 0 else RunStatus.FAILED,
        join(out, log_name),
        host=host,
        node_id=node_id,
        returncode=rc,
        wall_s=round(time.time() - t0, 2),
        error=None if rc == 0 else f"node {seat.machine_rank} ({host}): {error}",
        out_of_memory=out_of_memory,
    )


def report_reaching_head(seat: GangSeat, store: Store, proc) -> None:
    """Once the head's rendezvous port answers from this node (while this node's launch runs), write
    gang/<id>-node<M>.json: the backend names the nodes that never did when the gang does not meet in time."""
    while proc.poll() is None:
        try:
            socket.create_connection((seat.head, seat.port), timeout=2).close()
        except OSError:
            time.sleep(0.5)
            continue
        arrival = {"machine_rank": seat.machine_rank, "host": socket.gethostname(), "reached_at": utc_now()}
        store.write_json(f"{GANG_FOLDER}/{seat.gang_id}-node{seat.machine_rank}.json", arrival, durable=False)
        return


def node_log(machine_rank: int) -> str:
    """The log of a multi-node run's node (rank 0's node writes train.log)."""
    return TRAIN_LOG if machine_rank == 0 else f"train.node{machine_rank}.log"


def record_launch(store: Store, launch: dict) -> None:
    """launch.json: the latest launch at the top, every launch of the run (host, Ray node, time) in `attempts`."""
    earlier = (store.read_json(LAUNCH_FILE) or {}).get("attempts", [])
    store.write_json(LAUNCH_FILE, launch | {"attempts": [*earlier, launch]})


def _last_error(output: str) -> str | None:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
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
