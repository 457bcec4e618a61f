"""`run.json`: the run's record from its start to its end (config, versions, lineage, data, start-up, peak memory,
status, metrics), and the trackers it reports to."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from tunefleet.common.contract import (
    NODE_ID_ENV,
    RUN_RECORD,
    launch_record,
)
from tunefleet.common.jsonfile import utc_now, write_json_atomic
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import Store, StoreUnavailable
from tunefleet.trainers import checkpoints, memory, world
from tunefleet.trainers.lineage import parent_lineage
from tunefleet.trainers.run_folder import RunFolder, is_main_process, kept_checkpoint

if TYPE_CHECKING:
    from tunefleet.trainers.config import TrainConfig


VERSIONED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed")


def versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str | None]:
    """Python's version and each package's (None where it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    """The commit of the tunefleet checkout this code runs from; None when installed from a wheel.

    Only a checkout whose top level holds this package's folder counts: a wheel inside some other git repository
    (a venv in the user's project) must not record that project's commit as tunefleet's.
    """
    package_dir = Path(__file__).resolve().parent
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package_dir, capture_output=True, text=True, timeout=5
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    if len(top) != 2 or Path(top[0]).resolve() != package_dir.parent:
        return None
    return top[1]


def start_record(cfg: TrainConfig, folder: RunFolder, resume_from: str | None, extra: dict | None = None) -> dict:
    record = {
        "status": RunStatus.RUNNING,
        "method": cfg.method,
        "base_model": cfg.model_name,
        "dataset": cfg.dataset,
        "split": cfg.split,
        "eval_split": cfg.eval_split,
        "seed": cfg.seed,
        "config": cfg.resolved(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "launch": launch_record() or {"accelerate_config": None, "reason": "one process", "num_processes": 1},
        "placement": memory.launched_placement(),
        "stage": cfg.stage,
        "lineage": parent_lineage(cfg),
        "node_id": os.environ.get(NODE_ID_ENV),
        **({"num_nodes": len(world.NODES), "nodes": list(world.NODES)} if world.NODES else {}),
        "resumed_from": resume_from,
        **({"set_aside": [a.record() for a in folder.set_aside]} if folder.set_aside else {}),
        "versions": versions(),
        "git_commit": git_commit(),
        "host": platform.node(),
        "started_at": utc_now(),
        "ended_at": None,
        **({"tracking": folder.tracking.record()} if folder.tracking else {}),
        **(extra or {}),
    }
    if is_main_process():
        previous = folder.read_json(RUN_RECORD) or {}
        record["attempts"] = previous.get("attempts", 0) + 1
        if previous.get("memory_steps"):
            record["memory_steps"] = previous["memory_steps"]
        folder.write_json(RUN_RECORD, record)
    return record


def peak_memory() -> dict:
    """Peak resident memory of this process and peak GPU memory (MiB), for run.json and the benchmarks."""
    import resource

    import torch

    from tunefleet.trainers.model import RESIDENT_BEFORE_MODEL_MB

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if RESIDENT_BEFORE_MODEL_MB:
        out["rss_before_model_mb"] = RESIDENT_BEFORE_MODEL_MB[0]
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def finish_record(folder: RunFolder, record: dict, status: RunStatus, clock=None, **fields) -> None:
    """run.json at the end of an attempt. `memory_steps` is a log others append to too (the launcher of a
    multi-process run, an operator): a step recorded while this attempt ran is kept, not written over."""
    record.update(status=status, ended_at=utc_now(), **fields)
    if clock is not None:
        record["startup"] = clock.record()
    if is_main_process():
        recorded = (folder.read_json(RUN_RECORD) or {}).get("memory_steps") or []
        if len(recorded) > len(record.get("memory_steps") or []):
            record["memory_steps"] = recorded
    folder.write_json(RUN_RECORD, record)


def store_failed(folder: RunFolder, record: dict, step: int, exc: StoreUnavailable) -> StoreUnavailable:
    """The one line for a run whose store stopped taking its uploads. Its scratch stays: the checkpoint saved whole
    there is what a rerun on this node uploads and resumes from. run.json says so in scratch, and in the store
    if it answers now."""
    kept = kept_checkpoint(folder.local)
    note = f"the store failed: checkpoint-{kept} kept in {folder.local}" if kept is not None else "the store failed"
    record.update(status=RunStatus.FAILED, ended_at=utc_now(), global_step=step, error=str(exc), note=note)
    write_json_atomic(folder.local / RUN_RECORD, record)
    try:
        Store(folder.output_dir, timeout_s=10).write_json(RUN_RECORD, record)
    except StoreUnavailable:
        pass
    where = f"checkpoint-{kept} is kept in {folder.local}" if kept is not None else "no checkpoint was saved yet"
    return StoreUnavailable(
        f"{exc}; training stopped at step {step} ({where}): rerun the same command once the store answers, on this "
        "node to upload it and resume from it, elsewhere to resume from the store's latest complete checkpoint"
    )


def disk_full(folder: RunFolder, record: dict, clock, step: int, exc: Exception) -> checkpoints.DiskFull:
    """The disk could not take a checkpoint: its partial files go, the last whole one stays, the run is interrupted
    (the same command resumes once there is room). One line says where, how much is free and what a save needs."""
    steps = checkpoints.steps_of(folder.local)
    written = checkpoints.size_of(steps[0][1]) if steps else 0  # the partial one, before it goes
    removed = checkpoints.remove_partial(folder.local) if is_main_process() else []
    if isinstance(exc, checkpoints.DiskFull):
        why = str(exc)
    else:
        mib = 2**20
        why = (
            f"the disk filled during a checkpoint in {folder.local}: {written / mib:.1f} MiB of it were written, "
            f"{shutil.disk_usage(folder.local).free / mib:.1f} MiB are free now"
            + (f" (its partial files removed: {', '.join(removed)})" if removed else "")
            + "; free some space (or lower save_total_limit) and run the same command again: it resumes from the "
            "last whole checkpoint"
        )
    finish_record(folder, record, RunStatus.INTERRUPTED, clock, error=why, global_step=step)
    folder.clean_scratch()
    return checkpoints.DiskFull(why)
