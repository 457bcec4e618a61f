"""Per-process entry of one run: what `accelerate launch` (and every backend) runs.

    python -m tunefleet.trainers.train --method sft --model_name tunefleet/tiny-qwen2 \
      --dataset tunefleet/tiny-ultrafeedback --split train_sft --output_dir runs/sft_tiny --max_steps 10
    accelerate launch --multi_gpu --num_processes 2 -m tunefleet.trainers.train --config run.yaml
"""

from __future__ import annotations

import importlib
import os
import sys

from tunefleet.common import hub, terminal
from tunefleet.common.contract import LAUNCH_ENV, LOCK_TOKEN_ENV, RUN_RECORD
from tunefleet.common.errors import TunefleetError
from tunefleet.common.runlock import RunLock
from tunefleet.common.storage import Store
from tunefleet.trainers import memory, recovery, world
from tunefleet.trainers.callbacks import Preempted
from tunefleet.trainers.checkpoints import DISK_FULL_EXIT, DiskFull
from tunefleet.trainers.config import TrainConfig, parse_args


def run(cfg: TrainConfig) -> dict:
    """Train one method in this process; returns the run record.

    Out of memory, a run of one process resumes here from its latest checkpoint with the next smaller set-up
    (trainers.recovery); in a launch of several processes, or on a GPU share (where the sweep first moves the
    run to a GPU of its own), the error goes up to the launcher.
    """
    trainer_module = importlib.import_module(f"tunefleet.trainers.{cfg.method}")  # sft.py ... grpo.py
    world.join(cfg.output_dir)  # a multi-node run's ranks meet first: the backend learns at once who did not come
    if int(os.environ.get("RANK", "0")) == 0:
        say_what_was_read(cfg)
        if cfg.trl_args.get("push_to_hub"):  # TRL uploads at saves and at the end: find out now, not then
            hub.check_reachable("push_to_hub", hub.token_for("push_to_hub"))
    earlier = recovery.keep_earlier_step(cfg, Store(cfg.output_dir).read_json(RUN_RECORD))
    if earlier != cfg and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"keeping the memory step-down of an earlier attempt: batch {earlier.per_device_train_batch_size} x "
            f"accumulation {earlier.gradient_accumulation_steps}"
            + (", gradient checkpointing on" if earlier.gradient_checkpointing else ""),
            flush=True,
        )
    cfg = earlier
    while True:
        try:
            return trainer_module.train(cfg)
        except recovery.OutOfMemory as exc:
            smaller = recovery.step_down(cfg, exc.checkpointing) if recover_here(cfg) else None
            if smaller is None:
                raise
            step = recovery.record_step(Store(cfg.output_dir), exc.at_step, exc.error, smaller)
            print(f"{step.describe()} ({exc.error})", file=sys.stderr, flush=True)
        release_memory()
        cfg = smaller


def hold_folder(cfg: TrainConfig) -> RunLock | None:
    """The run folder's lock, for a run started by hand: refused in one line while another process writes it. A
    launcher that started this process holds it already (and so does this process for the ranks it launches): rank
    0 then adds its own pid to it, so the lock stays live while this process does, even if its launcher is gone (a
    gang's node lost: the next attempt waits for this one to end before it trains)."""
    token = os.environ.get(LOCK_TOKEN_ENV)
    if token and int(os.environ.get("RANK", "0")) == 0:
        RunLock(Store(cfg.output_dir)).register_pid(token, os.getpid())
    if token or int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = RunLock(Store(cfg.output_dir), sweep=cfg.tracking_group).acquire()
    assert lock.holder is not None
    os.environ[LOCK_TOKEN_ENV] = lock.holder.token  # the processes it launches (accelerate's ranks) write under it
    for note in lock.notes:
        print(f"{cfg.output_dir}: {note}", flush=True)
    return lock


def let_go(lock: RunLock | None) -> None:
    if lock is not None:
        lock.release()
        os.environ.pop(LOCK_TOKEN_ENV, None)


def say_what_was_read(cfg: TrainConfig) -> None:
    """The log's first lines: the form the settings were written in, what was translated, and what trains."""
    for note in cfg.config_notes:
        print(f"config: {note}", flush=True)
    trains = {"qlora": "LoRA adapters on a quantized base", "lora": "LoRA adapters", "full": "every weight"}
    options = ", ".join(f"{k}={v}" for k, v in cfg.trl_args.items())
    print(
        f"config: {cfg.config_form}'s form; {cfg.method} trains {trains[cfg.finetune]} of {cfg.model_name}"
        + (f"; TRL options: {options}" if options else ""),
        flush=True,
    )


def recover_here(cfg: TrainConfig) -> bool:
    return cfg.oom_recovery and int(os.environ.get("WORLD_SIZE", "1")) == 1 and memory.gpu_share() == 1


def release_memory() -> None:
    """What the failed attempt held (its trainer and model went with the exception) back to the device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


OUT_OF_MEMORY_EXIT = 3  # out of memory at the smallest set-up (or with --oom_recovery off)


def run_to_exit(cfg: TrainConfig) -> tuple[int, dict | None]:
    """`run(cfg)` as a process ends it: (exit code, run.json's record when it finished). How a run stopped is one
    line on stderr: out of memory (3), a signal that checkpointed it (128 + the signal), a full disk (75)."""
    try:
        return 0, run(cfg)
    except recovery.OutOfMemory as exc:
        print(f"error: {recovery.no_smaller_setup(exc, cfg)}", file=sys.stderr)
        return OUT_OF_MEMORY_EXIT, None
    except Preempted as exc:
        print(f"preempted: {exc}; rerun the same command to resume", file=sys.stderr)
        return 128 + exc.signum, None
    except DiskFull as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return DISK_FULL_EXIT, None


def main(argv: list[str] | None = None) -> int:
    lock = None
    try:
        cfg = parse_args(argv)
        terminal.calm(cfg.verbose)
        if LAUNCH_ENV not in os.environ and int(os.environ.get("RANK", "0")) == 0:
            Store(cfg.output_dir).check(write=True)  # started directly, not by a launcher that checked
        lock = hold_folder(cfg)
        return run_to_exit(cfg)[0]
    except TunefleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        let_go(lock)
        close_process_group()


def close_process_group() -> None:
    """Destroy the process group before exit: a gloo group left to interpreter shutdown can abort a rank
    ("terminate called without an active exception") after its run finished, failing the whole launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
