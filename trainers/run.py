"""What every method shares around `trainer.train()`: the output folder's life cycle and `run.json`.

- A finished run (run.json status "finished") is never retrained unless `--overwrite`.
- An interrupted run (checkpoints, no finished status) resumes from its latest checkpoint.
- Only the main process writes `run.json`, `progress.json` and the final files; JSON is written atomically.
- The top level of `output_dir` gets the layout the original tool documented: adapter files,
  `trainer_state.json`, `training_args.bin`, tokenizer files, `checkpoint-{step}/`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.common.jsonfile import read_json, utc_now, write_json_atomic
from tunefleet.common.status import RunStatus
from tunefleet.trainers import data
from tunefleet.trainers.data import Prepared
from tunefleet.trainers.speed import FastPath

VERSIONED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def latest_checkpoint(output_dir: Path) -> str | None:
    steps = [
        (int(p.name.split("-")[1]), p)
        for p in output_dir.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").exists()
    ]
    return str(max(steps)[1]) if steps else None


def prepare_output_dir(output_dir: str, overwrite: bool) -> str | None:
    """Refuse a finished run (unless overwrite); return the checkpoint to resume from, if any."""
    out = Path(output_dir)
    record = read_json(out / "run.json") or {}
    if RunStatus.of(record.get("status")) is RunStatus.FINISHED:
        if not overwrite:
            raise TunefleetError(
                f"{output_dir} holds a finished run; pass --overwrite to retrain it or choose another --output_dir"
            )
        if is_main_process():
            shutil.rmtree(out)
        return None
    if out.exists() and not out.is_dir():
        raise TunefleetError(f"--output_dir {output_dir} is a file, not a folder")
    return latest_checkpoint(out) if out.exists() else None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in VERSIONED:
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


def training_args(cfg, dtype, fast: FastPath | None = None) -> dict:
    """TrainingArguments shared by all five TRL configs (`fast`: speed choices)."""
    import torch

    on = {k: v.on for k, v in vars(fast).items()} if fast else {}
    evaluate = cfg.eval_split is not None
    deepspeed_on_cpu = (
        not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    )
    return dict(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.lr,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=(cfg.eval_steps or cfg.logging_steps) if evaluate else None,
        report_to=[] if cfg.report_to == "none" else cfg.report_to.split(","),
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16,
        # On CPU: use_cpu, or TRL resolves bf16=True and fails; but not under DeepSpeed, which accelerate then
        # ignores (DeepSpeed runs on CPU through its own CPU accelerator and gloo).
        use_cpu=not torch.cuda.is_available() and not deepspeed_on_cpu,
        ddp_backend="gloo" if deepspeed_on_cpu else None,  # without it accelerate forms no world (size 1)
        gradient_checkpointing=cfg.gradient_checkpointing,
        disable_tqdm=not sys.stderr.isatty(),
        ddp_find_unused_parameters=False,
        **(
            {"train_sampling_strategy": "group_by_length", "length_column_name": "length"}
            if on.get("group_by_length")
            else {}
        ),
        **({"use_liger_kernel": True} if on.get("use_liger_kernel") else {}),
        **({"tf32": True} if on.get("tf32") else {}),
    )


def group_by_token_length(trainer) -> None:
    """Give the tokenized train set a `length` column for length-grouped batches.

    TRL's preference trainers tokenize into prompt/chosen/rejected id columns, and the HF sampler only infers
    lengths from `input_ids`; the column must also survive the trainer's unused-column removal.
    """
    ds = trainer.train_dataset
    id_cols = [c for c in ds.column_names if c.endswith("_ids") and "attention" not in c and "labels" not in c]
    prompt = [c for c in id_cols if c.startswith("prompt")]
    replies = [c for c in id_cols if c not in prompt]
    if not id_cols or "length" in ds.column_names:
        return
    lengths = [
        sum(len(row[c]) for c in prompt) + max(len(row[c]) for c in replies) for row in ds.select_columns(id_cols)
    ]
    trainer.train_dataset = ds.add_column("length", lengths)
    trainer._set_signature_columns_if_needed()
    trainer._signature_columns = [*trainer._signature_columns, "length"]


def progress_callback(output_dir: str):
    """One line per log and `progress.json` (step, loss, tokens/s) for the sweep's live view."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.t0 = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            info = {
                "step": state.global_step,
                "max_steps": state.max_steps,
                "elapsed_s": round(time.time() - self.t0, 2),
            }
            info.update({k: logs[k] for k in ("loss", "eval_loss", "learning_rate") if k in logs})
            if "loss" in logs or "eval_loss" in logs:
                print(
                    " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()),
                    flush=True,
                )
            write_json_atomic(Path(output_dir) / "progress.json", info, durable=False)

    return Progress()


class Preempted(Exception):
    """SIGUSR1/SIGTERM/SIGINT arrived: a checkpoint was saved and training stopped (SLURM preemption, Ctrl-C of a sweep)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum} after saving a checkpoint")
        self.signum = signum


def preemption_callback():
    """On SIGUSR1, SIGTERM or Ctrl-C: save a checkpoint at the end of the current step, then stop training.

    SLURM sends SIGUSR1 before the time limit (`--signal=B:USR1@120`, forwarded by the batch script); a
    sweep's Ctrl-C reaches its runs as SIGINT or SIGTERM. Either way the run resumes from that checkpoint when
    started again. A second Ctrl-C stops at once.
    """
    import signal

    from transformers import TrainerCallback

    class Preemption(TrainerCallback):
        signum = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.signum is not None:
                control.should_save = True
                control.should_training_stop = True

    callback = Preemption()

    def handler(signum, frame):
        if signum == signal.SIGINT and callback.signum is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        callback.signum = signum

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (in-process use from a thread): no signal handling
            pass
    return callback


def start_record(cfg, resume_from: str | None, extra: dict | None = None) -> dict:
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
        "launch": json.loads(os.environ.get("TUNEFLEET_LAUNCH") or "null")
        or {"accelerate_config": None, "reason": "one process", "num_processes": 1},
        "placement": json.loads(os.environ.get("TUNEFLEET_PLACEMENT") or "null"),
        "node_id": os.environ.get("TUNEFLEET_NODE_ID"),
        "resumed_from": resume_from,
        "versions": versions(),
        "git_commit": git_commit(),
        "host": platform.node(),
        "started_at": utc_now(),
        "ended_at": None,
        **(extra or {}),
    }
    if is_main_process():
        previous = read_json(Path(cfg.output_dir) / "run.json") or {}
        record["attempts"] = previous.get("attempts", 0) + 1
        write_json_atomic(Path(cfg.output_dir) / "run.json", record)
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


def finish_record(cfg, record: dict, status: RunStatus, **fields) -> None:
    record.update(status=status, ended_at=utc_now(), **fields)
    if is_main_process():
        write_json_atomic(Path(cfg.output_dir) / "run.json", record)


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
    cfg,
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

    from tunefleet.trainers.model import count_4bit_layers

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
    preemption = preemption_callback()
    trainer.add_callback(preemption)
    record = start_record(cfg, resume_from, extra)
    if resume_from:
        print(f"resuming from {resume_from}", flush=True)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        finish_record(cfg, record, RunStatus.INTERRUPTED)
        raise
    except Exception as exc:
        finish_record(cfg, record, RunStatus.FAILED, error=f"{type(exc).__name__}: {first_line(exc)}")
        raise
    if preemption.signum is not None:
        finish_record(
            cfg,
            record,
            RunStatus.INTERRUPTED,
            global_step=trainer.state.global_step,
            note=f"signal {preemption.signum}: checkpoint-{trainer.state.global_step} saved",
        )
        raise Preempted(preemption.signum)
    trainer.save_model(cfg.output_dir)  # adapter, training_args.bin, tokenizer at the top level
    trainer.save_state()  # trainer_state.json at the top level
    finish_record(
        cfg,
        record,
        RunStatus.FINISHED,
        global_step=trainer.state.global_step,
        **peak_memory(),
        train_runtime_s=result.metrics.get("train_runtime"),
        train_loss=result.metrics.get("train_loss"),
        world_size=trainer.accelerator.num_processes,
    )
    return record
