"""Out-of-memory recovery: a run that runs out of memory resumes from its latest checkpoint with a smaller set-up.

The steps down, each recorded in run.json `memory_steps`: gradient checkpointing on; then half the per-device batch
and twice the accumulation (the same effective batch, so the same optimizer steps and learning-rate schedule),
down to batch 1. One process retries in place (`trainers.train.run`); a launch of several processes cannot (the
other ranks wait in a collective), so whoever launched it starts it again with the smaller set-up
(`launcher`). `--oom_recovery false` turns it off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunefleet.common.contract import PROGRESS_FILE, RUN_RECORD
from tunefleet.common.storage import Store

if TYPE_CHECKING:
    from tunefleet.trainers.config import TrainConfig

# What the CUDA caching allocator, torch's CPU allocator and Python say when memory runs out.
OUT_OF_MEMORY = (
    "OutOfMemoryError",
    "CUDA out of memory",
    "DefaultCPUAllocator: can't allocate memory",
    "std::bad_alloc",
    "MemoryError",
)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(sign in f"{type(exc).__name__}: {exc}" for sign in OUT_OF_MEMORY)


class OutOfMemory(Exception):
    """Training ran out of memory; run.json says so (`out_of_memory`), with the step reached."""

    def __init__(self, at_step: int, error: str, checkpointing: bool):
        super().__init__(error)
        self.at_step = at_step
        self.error = error
        self.checkpointing = checkpointing  # whether the failed attempt had gradient checkpointing on


@dataclass(frozen=True)
class MemoryStep:
    """One step down: where the run was, what failed, and the set-up it resumes with."""

    at_step: int
    error: str
    gradient_checkpointing: bool
    per_device_train_batch_size: int
    gradient_accumulation_steps: int

    def describe(self) -> str:
        return (
            f"out of memory at step {self.at_step}: resumed with batch {self.per_device_train_batch_size} x "
            f"accumulation {self.gradient_accumulation_steps}"
            + (", gradient checkpointing on" if self.gradient_checkpointing else "")
        )

    def record(self) -> dict:
        return dataclasses.asdict(self)


def smallest_factor(n: int) -> int:
    return next(f for f in range(2, n + 1) if n % f == 0)


def step_down(cfg: TrainConfig, checkpointing: bool):
    """The next smaller set-up of `cfg` (a TrainConfig) after running out of memory; None at the smallest (pure).

    An odd batch shrinks by its smallest factor (6 -> 3, 3 -> 1), so batch x accumulation stays exactly the same.
    """
    if not checkpointing:
        return dataclasses.replace(cfg, gradient_checkpointing=True)
    batch = cfg.per_device_train_batch_size
    if batch == 1:
        return None
    factor = smallest_factor(batch)
    return dataclasses.replace(
        cfg,
        gradient_checkpointing=True,
        per_device_train_batch_size=batch // factor,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps * factor,
    )


def keep_earlier_step(cfg: TrainConfig, record: dict | None):
    """`cfg` as the last memory step of an earlier attempt left it, for a run that starts again (a manual rerun, a
    SLURM requeue, a Ray retry): it resumes with the set-up that fit, instead of running out of memory again.

    The same `cfg` when there is no step, the run finished (it is retrained from scratch), or the command now asks
    for another effective batch or an even smaller per-device batch (a deliberate change wins)."""
    from tunefleet.common.status import RunStatus

    steps = (record or {}).get("memory_steps") or []
    if not steps or cfg.overwrite or RunStatus.of((record or {}).get("status")) is RunStatus.FINISHED:
        return cfg
    last = MemoryStep(**steps[-1])
    asked = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if asked != last.per_device_train_batch_size * last.gradient_accumulation_steps:
        return cfg
    if cfg.per_device_train_batch_size < last.per_device_train_batch_size:
        return cfg
    return dataclasses.replace(
        cfg,
        gradient_checkpointing=True if last.gradient_checkpointing else cfg.gradient_checkpointing,
        per_device_train_batch_size=last.per_device_train_batch_size,
        gradient_accumulation_steps=last.gradient_accumulation_steps,
    )


def record_step(store: Store, at_step: int, error: str, smaller) -> MemoryStep:
    """Append the step to the run's run.json (`memory_steps`); the next attempt keeps the list."""
    step = MemoryStep(
        at_step,
        error,
        bool(smaller.gradient_checkpointing),
        smaller.per_device_train_batch_size,
        smaller.gradient_accumulation_steps,
    )
    record = store.read_json(RUN_RECORD) or {}
    record["memory_steps"] = [*record.get("memory_steps", []), step.record()]
    store.write_json(RUN_RECORD, record)
    return step


RANK_MARKER = "out_of_memory-rank"  # `<prefix><rank>.json`: a rank other than 0 ran out of memory


def mark_rank(store: Store, rank: int, at_step: int, error: str) -> None:
    """A rank other than the main one ran out of memory: only the main rank writes run.json, and it is often
    the one the launcher stops (not the one that failed), so the failing rank leaves this marker for the launcher."""
    store.write_json(f"{RANK_MARKER}{rank}.json", {"rank": rank, "at_step": at_step, "error": error}, durable=False)


def launch_ran_out_of_memory(store: Store) -> bool:
    """Whether the launch that just ended ran out of memory on any rank (run.json or a rank's marker); the markers
    are consumed."""
    markers = [name for name in store.listdir() if name.startswith(RANK_MARKER)]
    for name in markers:
        store.remove(name)
    return bool((store.read_json(RUN_RECORD) or {}).get("out_of_memory")) or bool(markers)


def after_failed_launch(cfg: TrainConfig, store: Store, out_of_memory: bool):
    """For a launcher whose run failed (`out_of_memory`: its run.json or log says so): the smaller config to launch
    again with and its step (recorded in run.json); None when recovery is off or nothing smaller is left."""
    if not (cfg.oom_recovery and out_of_memory):
        return None
    record = store.read_json(RUN_RECORD) or {}
    cfg = keep_earlier_step(cfg, record)  # the launch that failed ran with it
    checkpointing = ((record.get("fast_path") or {}).get("gradient_checkpointing") or {}).get("on")
    smaller = step_down(cfg, bool(checkpointing if checkpointing is not None else cfg.gradient_checkpointing))
    if smaller is None:
        return None
    at_step = record.get("global_step") or (store.read_json(PROGRESS_FILE) or {}).get("step") or 0
    return smaller, record_step(store, at_step, record.get("error") or "out of memory", smaller)


def relaunch_smaller(
    cfg: TrainConfig,
    launch: Callable[[TrainConfig], tuple[int, bool]],
    say: Callable[[str], None],
    may_retry: Callable[[TrainConfig], bool] = lambda cfg: True,
) -> int:
    """A launcher's loop: `launch(cfg)` -> (exit code, ran out of memory); after a launch that ran out of memory,
    again with the next smaller set-up (its step recorded in run.json and told to `say`), until a launch ends
    otherwise or nothing smaller is left. `may_retry`: whether this launcher recovers at all now. The last code."""
    while True:
        rc, out_of_memory = launch(cfg)
        retry = after_failed_launch(cfg, Store(cfg.output_dir), out_of_memory) if rc and may_retry(cfg) else None
        if retry is None:
            return rc
        cfg, step = retry
        say(step.describe())


def describe_steps(record: dict) -> list[str]:
    """run.json's memory steps as lines for the sweep's table and `tunefleet status`."""
    return [MemoryStep(**step).describe() for step in record.get("memory_steps", [])]


def no_smaller_setup(exc: OutOfMemory, cfg: TrainConfig) -> str:
    """The one line for a run that ran out of memory at its smallest set-up (or with recovery off)."""
    if not cfg.oom_recovery:
        return f"out of memory at step {exc.at_step} ({exc.error}); --oom_recovery is off"
    return (
        f"out of memory at step {exc.at_step} with batch 1 and gradient checkpointing ({exc.error}): the model does "
        "not fit this device; lower --max_length, use a smaller model, or shard it (--num_processes with zero3)"
    )
