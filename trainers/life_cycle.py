"""What every method shares around `trainer.train()`: train (resuming when a checkpoint exists), save the documented
layout, record the outcome, and turn a failure into one line (out of memory, a full disk, a store gone, a signal).

The recipes (sft.py, dpo.py, ...) call, in order: run_folder.prepare_output_dir, trainer_args.training_args and
trl_config, callbacks.progress_callback, then life_cycle.train_and_save."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from tunefleet.common.contract import RUN_RECORD
from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.common.jsonfile import write_json_atomic
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import StoreUnavailable
from tunefleet.trainers import checkpoints, data, heldout, recovery
from tunefleet.trainers.callbacks import Preempted, close_progress, preemption_callback, startup_clock
from tunefleet.trainers.cost import CostMeter
from tunefleet.trainers.data import Prepared
from tunefleet.trainers.run_folder import RunFolder, checkpoint_upload_callback, is_main_process
from tunefleet.trainers.run_record import disk_full, finish_record, peak_memory, start_record, store_failed

if TYPE_CHECKING:
    from tunefleet.trainers.config import TrainConfig


def check_world_size(launched: int, seen: int) -> None:
    """Refuse N launched processes that each train as a world of one (they would all write one folder).

    That is what `accelerate launch --multi_gpu` does on a CPU host without CPU mode, and what DeepSpeed on
    CPU did before tunefleet passed it a gloo backend: only a warning, N independent runs.
    """
    if seen != launched:
        raise TunefleetError(
            f"{launched} processes were launched but training sees a world of {seen}: each would "
            "train alone into the same folder; on CPU launch with ACCELERATE_USE_CPU=true "
            "(tunefleet train --num_processes N does)"
        )


def train_and_save(
    trainer,
    cfg: TrainConfig,
    folder: RunFolder,
    resume_from: str | None,
    train_data: Prepared,
    eval_data: Prepared | None = None,
    extra: dict | None = None,
) -> dict:
    """Train (resuming when a checkpoint exists), save the documented layout, record the outcome.

    run.json also records the data (layout, columns used and left out, rows dropped and why) and the first
    training example as the trainer tokenized it.
    """
    from transformers import PrinterCallback

    from tunefleet.trainers.model import count_4bit_layers, keep_4bit_training_layout

    if not cfg.verbose:
        trainer.remove_callback(PrinterCallback)  # progress_callback prints one compact line per log instead
    world = trainer.accelerator.num_processes
    check_world_size(int(os.environ.get("WORLD_SIZE", "1")), world)
    args = trainer.args
    extra = {
        "qlora_4bit_layers": count_4bit_layers(trainer.model),
        "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "data": {"train": train_data.record()} | ({"eval": eval_data.record()} if eval_data else {}),
        "example": data.example_text(trainer, trainer.processing_class),
        **(extra or {}),
    }
    if is_main_process():
        for line in train_data.notes("train data") + (eval_data.notes("eval data") if eval_data else []):
            print(line, flush=True)
        for column, text in extra["example"].items():
            print(f"example {column}: {text[:300]!r}", flush=True)
    keep_4bit_training_layout(trainer.model)
    metrics = heldout.held_out(cfg, trainer.processing_class)
    if metrics is not None:  # first: every later callback (progress.json, trackers) sees its numbers
        trainer.callback_handler.callbacks.insert(0, heldout.heldout_callback(metrics))
    preemption = preemption_callback()
    trainer.add_callback(preemption)
    clock = startup_clock()
    trainer.add_callback(clock)
    if folder.store.remote:
        trainer.add_callback(checkpoint_upload_callback(folder))  # marks each checkpoint itself, as it uploads
    trainer.add_callback(
        checkpoints.checkpoint_callback(folder.local, args.save_total_limit, mark=not folder.store.remote)
    )
    before = (folder.read_json(RUN_RECORD) or {}).get("cost") if resume_from else None
    meter = CostMeter(trainer, before)  # a resumed run's cost adds this attempt to the earlier ones
    record = start_record(cfg, folder, resume_from, extra)
    if resume_from:
        print(f"resuming from {resume_from}", flush=True)
    try:
        try:
            with meter.training():
                result = trainer.train(resume_from_checkpoint=resume_from)
        finally:
            close_progress(trainer)  # the bar gives the terminal back before any error is printed
    except KeyboardInterrupt:
        finish_record(folder, record, RunStatus.INTERRUPTED, clock)
        folder.clean_scratch()
        raise
    except StoreUnavailable as exc:
        raise store_failed(folder, record, trainer.state.global_step, exc) from None
    except Exception as exc:
        if isinstance(exc, checkpoints.DiskFull) or checkpoints.is_disk_full(exc, folder.local):
            raise disk_full(folder, record, clock, trainer.state.global_step, exc) from None
        error = f"{type(exc).__name__}: {first_line(exc)}"
        out_of_memory = recovery.is_out_of_memory(exc)
        step = trainer.state.global_step
        finish_record(
            folder,
            record,
            RunStatus.FAILED,
            clock,
            error=error,
            global_step=step,
            **({"out_of_memory": True} if out_of_memory else {}),
            # what the attempt cost (one process: a failed rank's peers may be gone, so no collective)
            **({"cost": meter.record(cfg.num_nodes, gather=False)} if world == 1 else {}),
        )
        folder.clean_scratch()
        if out_of_memory:
            if not is_main_process():
                recovery.mark_rank(folder.store, int(os.environ["RANK"]), step, error)
            raise recovery.OutOfMemory(step, error, bool(args.activation_checkpointing)) from exc
        raise
    if preemption.signum is not None:
        folder.clean_scratch()
        finish_record(
            folder,
            record,
            RunStatus.INTERRUPTED,
            clock,
            global_step=trainer.state.global_step,
            note=f"signal {preemption.signum}: checkpoint-{trainer.state.global_step} saved",
            **({"cost": meter.record(cfg.num_nodes, gather=False)} if world == 1 else {}),
        )
        raise Preempted(preemption.signum)
    trainer.save_model(str(folder.local))  # adapter, training_args.bin, tokenizer at the top level
    portable_adapter_config(folder, cfg)
    trainer.save_state()  # trainer_state.json at the top level
    try:
        folder.publish()  # before the record says finished: a finished run in a store is a whole one
    except StoreUnavailable as exc:
        raise store_failed(folder, record, trainer.state.global_step, exc) from None
    finish_record(
        folder,
        record,
        RunStatus.FINISHED,
        clock,
        global_step=trainer.state.global_step,
        **peak_memory(),
        train_runtime_s=result.metrics.get("train_runtime"),
        train_loss=result.metrics.get("train_loss"),
        world_size=trainer.accelerator.num_processes,
        cost=meter.record(cfg.num_nodes),
    )
    folder.clean_scratch()
    return record


def portable_adapter_config(folder: RunFolder, cfg: TrainConfig) -> None:
    """A pipeline child's adapter_config.json names its parent's merged model relative to itself
    (`../<parent>/merged`), not by the absolute path it had here: the study folder can then move."""
    import json

    from tunefleet.trainers.model import MERGED, relative_parent, run_folder

    config_file = folder.local / "adapter_config.json"
    parent = run_folder(cfg.model_name)
    if not is_main_process() or parent is None or not config_file.is_file() or folder.store.remote:
        return
    relative = relative_parent(Path(cfg.output_dir), str(parent / MERGED))
    if relative is None:
        return
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = relative
    write_json_atomic(config_file, config)
