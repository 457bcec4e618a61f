"""What every method shares around `trainer.train()`: the output folder's life cycle and `run.json`.

- A finished run (run.json status "finished") is never retrained unless `--overwrite`.
- An interrupted run (checkpoints, no finished status) resumes from its latest checkpoint.
- Only the main process writes `run.json`, `progress.json` and the final files; JSON is written atomically.
- The top level of `output_dir` gets the layout the original tool documented: adapter files,
  `trainer_state.json`, `training_args.bin`, tokenizer files, `checkpoint-{step}/`.
- `output_dir` may be a URI (s3://, gs://, ...): the run then trains in node-local scratch, uploads each checkpoint
  as it is saved (complete once its marker is written, last; older ones are deleted only after that), and its
  final files at the end; a rerun on any node downloads the latest complete checkpoint and resumes from it.
- An upload that fails is retried with backoff for `--store_retry_s`; then the run stops in one line, the checkpoint
  kept whole in scratch. A rerun on the same node uploads it (marker last) and resumes from it; elsewhere, from
  the store's latest complete checkpoint. A half-uploaded checkpoint (no marker) is never used.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

from tunefleet.common import schema, tracking
from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.common.jsonfile import read_json, utc_now, write_json_atomic
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import Store, StoreUnavailable, refuse_ray_job_temp, scratch_dir
from tunefleet.common.tracking import Tracking
from tunefleet.trainers import checkpoints, data, heldout, memory, recovery, trl_fields
from tunefleet.trainers.config import model_short
from tunefleet.trainers.data import Prepared
from tunefleet.trainers.speed import FastPath

VERSIONED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


CHECKPOINT_MARKER = checkpoints.MARKER  # written last into a checkpoint (and a stored one): what makes it whole


def complete_checkpoints(store: Store) -> list[int]:
    """Steps of the checkpoints in a store whose upload finished (their marker exists), ascending."""
    steps = [int(n.split("-")[1]) for n in store.listdir() if n.startswith("checkpoint-") and n[11:].isdigit()]
    return sorted(step for step in steps if store.exists(f"checkpoint-{step}/{CHECKPOINT_MARKER}"))


def kept_checkpoint(scratch: Path) -> int | None:
    """The latest checkpoint this node saved whole but has not uploaded (its marker is in scratch), if any."""
    steps = [
        int(p.name.split("-")[1])
        for p in scratch.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (read_json(p / CHECKPOINT_MARKER) or {}).get("uploaded") is False
    ]
    return max(steps) if steps else None


def with_retries(what: str, seconds: float, attempt) -> None:
    """`attempt(store)` against the store, retried with backoff (1, 2, 4 ... 60 s) until `seconds` have passed;
    each attempt gets the time that is left. Then one StoreUnavailable line saying for how long it was tried."""
    deadline = time.monotonic() + seconds
    wait = 1.0
    while True:
        try:
            attempt(max(1.0, deadline - time.monotonic()))
            return
        except StoreUnavailable as exc:
            if time.monotonic() + wait >= deadline:
                raise StoreUnavailable(f"{exc} (tried to {what} for {seconds:g} s, --store_retry_s)") from exc
            print(f"store: {exc}; retrying in {wait:g} s", file=sys.stderr, flush=True)
            time.sleep(wait)
            wait = min(wait * 2, 60.0)


class RunFolder:
    """Where a run lives (`output_dir`: a folder or a URI) and where it trains (`local`: that folder itself, or
    node-local scratch whose checkpoints and final files go up to the store).

    `store_retry_s`: how long an upload to the store is retried before the run stops (with_retries)."""

    def __init__(self, output_dir: str, store_retry_s: float = 600):
        self.output_dir = output_dir
        self.store = Store(output_dir)
        self.local = scratch_dir(output_dir) if self.store.remote else Path(output_dir)
        self.store_retry_s = store_retry_s
        self.tracking: Tracking | None = None  # set by start_tracking in the main process
        self.progress_failed = False
        self.set_aside: list[checkpoints.SetAside] = []  # torn checkpoints a rerun moved aside (run.json)

    def write_json(self, name: str, data, durable: bool = True) -> None:
        if is_main_process():
            self.store.write_json(name, data, durable)

    def write_progress(self, data: dict) -> None:
        """progress.json for the live view: worth a few seconds, not a run (a store that does not answer is told
        once, and training goes on)."""
        if not is_main_process():
            return
        try:
            Store(self.output_dir, timeout_s=10).write_json("progress.json", data, durable=False)
        except StoreUnavailable as exc:
            if not self.progress_failed:
                print(f"store: progress not written ({exc}); training goes on", file=sys.stderr, flush=True)
            self.progress_failed = True

    def read_json(self, name: str) -> dict | None:
        return self.store.read_json(name)

    def upload_checkpoint(self, step: int, keep: int | None) -> None:
        """Checkpoint `step` up to the store, its marker last; then the older ones beyond `keep` go.

        The marker is first written in scratch (`uploaded: false`): the checkpoint is whole here. If the store
        keeps failing for `store_retry_s`, the run stops (StoreUnavailable) and a rerun on this node uploads it."""
        if not self.store.remote or not is_main_process():
            return
        name = f"checkpoint-{step}"
        files = {
            p.relative_to(self.local / name).as_posix(): p.stat().st_size
            for p in (self.local / name).rglob("*")
            if p.is_file() and p.name != CHECKPOINT_MARKER
        }
        marker = {"step": step, "files": files}
        write_json_atomic(self.local / name / CHECKPOINT_MARKER, marker | {"uploaded": False})

        def upload(seconds: float) -> None:
            store = Store(self.output_dir, timeout_s=seconds)
            store.upload(self.local / name, name, skip=(CHECKPOINT_MARKER,))
            store.write_json(f"{name}/{CHECKPOINT_MARKER}", marker)

        with_retries(f"upload {name}", self.store_retry_s, upload)
        write_json_atomic(self.local / name / CHECKPOINT_MARKER, marker | {"uploaded": True})
        older = [s for s in complete_checkpoints(self.store) if s < step]
        for old in older[: max(0, len(older) - (keep - 1))] if keep else []:
            self.store.remove(f"checkpoint-{old}")

    def publish(self) -> None:
        """The final files (adapter, tokenizer, trainer state) up to the store, beside the checkpoints."""
        if not (self.store.remote and is_main_process()):
            return

        def upload(seconds: float) -> None:
            store = Store(self.output_dir, timeout_s=seconds)
            for path in sorted(self.local.iterdir()):
                if (path.is_file() and not path.name.startswith(".")) or path.name == tracking.TENSORBOARD_DIR:
                    store.upload(path, path.name)

        with_retries("upload the final files", self.store_retry_s, upload)

    def clean_scratch(self) -> None:
        if self.store.remote and is_main_process():
            shutil.rmtree(self.local, ignore_errors=True)


def prepare_output_dir(cfg) -> tuple[RunFolder, str | None]:
    """Refuse a finished run (unless --overwrite); the run's folder and the checkpoint to resume from, if any.

    With a URI, the main process starts from an empty scratch folder holding only the latest complete
    checkpoint of the store; the other processes of the launch wait until it is there.
    """
    refuse_ray_job_temp(cfg.output_dir, "--output_dir")
    folder = RunFolder(cfg.output_dir, cfg.store_retry_s)
    record = folder.read_json("run.json") or {}
    if RunStatus.of(record.get("status")) is RunStatus.FINISHED:
        if not cfg.overwrite:
            raise TunefleetError(
                f"{cfg.output_dir} holds a finished run; pass --overwrite to retrain it or choose another --output_dir"
            )
        if is_main_process():
            clear(folder.store)
        record = {}
    changed = parent_changed(cfg, record) if record else None  # hashes the parent's adapter: once
    if changed:
        if not cfg.overwrite:
            raise TunefleetError(changed)
        if is_main_process():
            clear(folder.store)
        record = {}
    start_tracking(cfg, folder, record)
    if not folder.store.remote:
        if folder.local.exists() and not folder.local.is_dir():
            raise TunefleetError(f"--output_dir {cfg.output_dir} is a file, not a folder")
        return folder, resume_point(folder)
    ready = folder.local / ".ready"
    launch = os.environ.get("MASTER_PORT", "one process")  # tells this launch's marker from an older one
    if is_main_process():
        steps = complete_checkpoints(folder.store)
        kept = kept_checkpoint(folder.local) if folder.local.is_dir() else None
        if kept is not None and kept > (steps[-1] if steps else -1):
            # saved whole on this node by an attempt the store failed: it goes up first, then training resumes from it
            print(f"uploading checkpoint-{kept}, kept in {folder.local} when the store failed", flush=True)
            for path in folder.local.iterdir():
                if path.name != f"checkpoint-{kept}":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            folder.upload_checkpoint(kept, cfg.save_total_limit)
        else:
            shutil.rmtree(folder.local, ignore_errors=True)
            folder.local.mkdir(parents=True)
            if steps:
                print(f"downloading checkpoint-{steps[-1]} from {cfg.output_dir}", flush=True)
                folder.store.download(f"checkpoint-{steps[-1]}", folder.local / f"checkpoint-{steps[-1]}")
                (folder.local / f"checkpoint-{steps[-1]}" / CHECKPOINT_MARKER).unlink(missing_ok=True)
        ready.write_text(launch)
    else:
        deadline = time.time() + 900
        while not (ready.exists() and ready.read_text() == launch):
            if time.time() > deadline:
                raise TunefleetError(f"timed out waiting for the main process to fetch {cfg.output_dir}")
            time.sleep(0.5)
    return folder, resume_point(folder)


def resume_point(folder: RunFolder) -> str | None:
    """The newest whole checkpoint of the run's local folder; torn ones are set aside (and remembered for run.json)."""
    if not folder.local.is_dir():
        return None
    resume, folder.set_aside = checkpoints.resumable(folder.local, is_main_process())
    return resume


LAUNCHER_FILES = ("train.log", "launch.json", "config.yaml")  # written by the launcher of this very attempt


def clear(store: Store) -> None:
    """An output folder emptied for --overwrite, but for what the launcher of this attempt has written there (its
    log, which it is appending to, and the run's config)."""
    for name in store.listdir():
        if name not in LAUNCHER_FILES:
            store.remove(name)


def parent_lineage(cfg) -> dict | None:
    """run.json's `lineage` when the run starts from a run folder: the parent, its base, its adapter's and the merged
    weights' hashes (what trainers.model recorded when it merged the parent)."""
    from tunefleet.trainers import model

    folder = model.run_folder(cfg.model_name)
    if folder is not None:
        return {
            "parent_name": folder.resolve().name,
            "root_model": model.root_model(cfg.model_name),
            **model.lineage(folder),
        }
    full = model.full_run_folder(cfg.model_name)
    if full is None:
        return None
    return {  # a full fine-tuning parent is its own model: its weights' hashes stand for it
        "parent_name": full.resolve().name,
        "root_model": model.root_model(cfg.model_name),
        "parent": str(full.resolve()),
        "base_model": (read_json(full / "run.json") or {}).get("base_model"),
        "weights_sha256": model.model_digests(full),
    }


def parent_changed(cfg, record: dict) -> str | None:
    """Why this run's checkpoints no longer fit its parent (retrained or overwritten since), or None."""
    from tunefleet.trainers import model

    full = model.full_run_folder(cfg.model_name)
    weights_before = (record.get("lineage") or {}).get("weights_sha256")
    if full is not None and weights_before and model.model_digests(full) != weights_before:
        return (
            f"{cfg.output_dir} was trained from {cfg.model_name}, whose weights changed since (retrained), so this "
            "run's checkpoints continue a model that is gone: pass --overwrite to train it again from the new parent"
        )
    before = (record.get("lineage") or {}).get("adapter_sha256")
    folder = model.run_folder(cfg.model_name)
    if not before or folder is None or not (folder / "adapter_model.safetensors").is_file():
        return None
    now = model.file_digest(folder / "adapter_model.safetensors")
    if now == before:
        return None
    return (
        f"{cfg.output_dir} was trained from {cfg.model_name} when its adapter was {before}; it holds another one "
        f"now ({now}: retrained since), so this run's checkpoints continue a model that is gone: pass --overwrite to "
        "train it again from the new parent"
    )


def run_name(cfg) -> str:
    """The run's name in trackers: --run_name (a sweep gives its run name), else the output folder's name."""
    return cfg.run_name or cfg.output_dir.rstrip("/").rsplit("/", 1)[-1]


def start_tracking(cfg, folder: RunFolder, previous: dict) -> None:
    """Name, group and tag the run in the --report_to trackers (main process; a resumed run keeps its ids)."""
    trackers = tracking.parse_report_to(cfg.report_to)
    if not trackers:
        return
    tracking.check_installed(trackers)
    if not is_main_process():
        return
    tags = {"method": cfg.method, "seed": str(cfg.seed), "model": model_short(cfg.model_name)}
    folder.tracking = tracking.start(
        trackers, run_name(cfg), cfg.tracking_group, tags, str(folder.local), previous.get("tracking")
    )


def checkpoint_upload_callback(folder: RunFolder):
    """Uploads each checkpoint to the store as soon as the trainer saved it (runs kept in a store only)."""
    from transformers import TrainerCallback

    class UploadCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder.upload_checkpoint(state.global_step, args.save_total_limit)  # its failure stops training

    return UploadCheckpoints()


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
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


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU accelerator compiles its shared-memory all-reduce (`deepspeed_shm_comm`, 30-70 s of g++ in
    every new environment: a fresh venv, node image or CI clone) when its communication backend starts. Only its
    tensor-parallel inference uses that op; training reduces through torch.distributed (gloo) either way. Marked
    unavailable in DeepSpeed's table of compatible ops (probed once per process, kept for edits like this one),
    DeepSpeed goes on without it, as it does where the op cannot build."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def training_args(cfg, folder: RunFolder, dtype, fast: FastPath) -> dict:
    """TrainingArguments shared by all five TRL configs (`fast`: speed choices)."""
    import torch

    on = {k: v.on for k, v in vars(fast).items()}
    evaluate = cfg.evaluates
    deepspeed_on_cpu = (
        not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    )
    if deepspeed_on_cpu:
        skip_deepspeed_shm_build()
    return dict(
        output_dir=str(folder.local),
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
        report_to=tracking.parse_report_to(cfg.report_to),
        run_name=run_name(cfg),
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16,
        # On CPU: use_cpu, or TRL resolves bf16=True and fails; but not under DeepSpeed, which accelerate then
        # ignores (DeepSpeed runs on CPU through its own CPU accelerator and gloo).
        use_cpu=not torch.cuda.is_available() and not deepspeed_on_cpu,
        ddp_backend="gloo" if deepspeed_on_cpu else None,  # without it accelerate forms no world (size 1)
        activation_checkpointing=on["gradient_checkpointing"],  # TRL's configs default to on
        disable_tqdm=True,  # progress_callback draws the bar (and prints one line per log off a terminal)
        ddp_find_unused_parameters=False,
        **(
            {"train_sampling_strategy": "group_by_length", "length_column_name": "length"}
            if on.get("group_by_length")
            else {}
        ),
        **({"use_liger_kernel": True} if on.get("use_liger_kernel") else {}),
        **({"tf32": True} if on.get("tf32") else {}),
    )


# tunefleet settings named as TRL's that tunefleet turns into another TRL option (`activation_checkpointing`).
DECIDED_ELSEWHERE = ("gradient_checkpointing",)


def trl_config(config_class, cfg, **values):
    """The method's TRL config: tunefleet's choices (`values`), every tunefleet setting that TRL's class has under
    the same name, then every TRL option the run was given (`cfg.trl_args`, which win). TRL's own checks
    (`__post_init__`) run here: a value TRL refuses is one line with TRL's message."""
    import dataclasses

    own = {f.name for f in dataclasses.fields(config_class) if f.init}
    args = dict(values)
    for name in own.intersection(schema.fields(type(cfg))) - set(args) - set(DECIDED_ELSEWHERE):
        value = getattr(cfg, name)
        if value is not None:
            args[name] = value
    args.update({k: v for k, v in cfg.trl_args.items() if k in own})
    hints = typing.get_type_hints(config_class)
    for name, value in args.items():
        if isinstance(value, list) and len(value) == 1 and "list" not in trl_fields.type_forms(hints[name])[0]:
            args[name] = value[0]  # one name given as tunefleet's list (loss_type) where this class takes one
    try:
        return config_class(**args)
    except (ValueError, TypeError) as exc:
        raise TunefleetError(f"TRL's {config_class.__name__} refused the settings: {first_line(exc)}") from None


def group_by_token_length(trainer) -> None:
    """Give the tokenized train (and eval) set a `length` column for length-grouped batches.

    TRL's preference trainers tokenize into prompt/chosen/rejected id columns, and the HF sampler only infers
    lengths from `input_ids`; the column must also survive the trainer's unused-column removal. transformers
    groups the eval set by length too once the train set is, so it needs the column as well. Lengths are counted
    by arrow over whole columns (a row at a time took ~0.1 ms per row)."""
    if trainer.train_dataset is None or "length" in trainer.train_dataset.column_names:
        return
    with_lengths = with_token_lengths(trainer.train_dataset)
    if with_lengths is None:
        return
    trainer.train_dataset = with_lengths
    if trainer.eval_dataset is not None and not isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = with_token_lengths(trainer.eval_dataset) or trainer.eval_dataset
    trainer._set_signature_columns_if_needed()
    trainer._signature_columns = [*trainer._signature_columns, "length"]
    trainer.add_callback(lengths_as_list_callback())


def with_token_lengths(ds):
    """The dataset with a `length` column (prompt ids plus the longest reply's), or None without id columns."""
    import pyarrow.compute as pc

    if "length" in ds.column_names:
        return ds
    id_cols = [c for c in ds.column_names if c.endswith("_ids") and "attention" not in c and "labels" not in c]
    if not id_cols:
        return None
    prompt = [c for c in id_cols if c.startswith("prompt")]
    replies = [c for c in id_cols if c not in prompt]
    table = ds.select_columns(id_cols).with_format("arrow")[:]
    counts = {c: pc.fill_null(pc.call_function("list_value_length", [table[c]]), 0).to_numpy() for c in id_cols}
    lengths = sum(counts[c] for c in prompt) + max_of([counts[c] for c in replies])
    return ds.add_column("length", [int(n) for n in lengths])


def max_of(arrays: list):
    import numpy as np

    return np.maximum.reduce(arrays) if len(arrays) > 1 else arrays[0]


def lengths_as_list_callback():
    """transformers' length-grouped sampler keeps `dataset["length"]`, which datasets 4+ returns as a lazy column:
    each of its N lookups per epoch then reads the table (0.2 s per 1,000 rows). It gets a list instead."""
    from transformers import TrainerCallback
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class LengthsAsList(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            batches = getattr(train_dataloader, "batch_sampler", None)
            for sampler in (
                getattr(train_dataloader, "sampler", None),
                getattr(batches, "sampler", None),
                getattr(getattr(batches, "batch_sampler", None), "sampler", None),
            ):
                if isinstance(sampler, LengthGroupedSampler) and not isinstance(sampler.lengths, list):
                    sampler.lengths = list(sampler.lengths)

    return LengthsAsList()


def progress_callback(folder: RunFolder):
    """A progress bar (step/total, loss, time left) when stdout is a terminal, else one line per log; and
    `progress.json` (step, loss, and every evaluation's metrics) for the sweep's live view and a search."""
    from transformers import TrainerCallback

    every = 2.0 if folder.store.remote else 0.0  # a store gets at most one progress write per 2 s
    name = folder.output_dir.rstrip("/").rsplit("/", 1)[-1]

    class Progress(TrainerCallback):
        def __init__(self):
            self.t0 = time.time()
            self.written = 0.0
            self.bar = sys.stdout.isatty()
            self.view = None
            self.evaluations: list[dict] = []

        def on_train_begin(self, args, state, control, **kwargs):
            if not self.bar or not state.is_world_process_zero:
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.view = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("left"),
                TimeRemainingColumn(),
            )
            self.task = self.view.add_task(name, total=state.max_steps, completed=state.global_step, loss="–")
            self.view.start()

        def on_step_end(self, args, state, control, **kwargs):
            if self.view is not None:
                self.view.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            info = {
                "step": state.global_step,
                "max_steps": state.max_steps,
                "elapsed_s": round(time.time() - self.t0, 2),
            }
            info.update({k: logs[k] for k in ("loss", "eval_loss", "learning_rate") if k in logs})
            line = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
            evaluated = any(k.startswith("eval_") for k in logs)
            if evaluated:  # every evaluation of this attempt, for a search's scheduler (launcher/tune_search.py)
                numbers = {k: v for k, v in logs.items() if k.startswith("eval_") and isinstance(v, int | float)}
                self.evaluations.append({"step": state.global_step, **numbers})
            info["evaluations"] = self.evaluations
            if self.view is not None:
                if "loss" in logs:
                    self.view.update(self.task, loss=f"{logs['loss']:.4g}")
                if "eval_loss" in logs:
                    self.view.console.print(line)
            elif "loss" in logs or "eval_loss" in logs:
                print(line, flush=True)
            if evaluated or time.time() - self.written >= every or state.global_step >= state.max_steps:
                folder.write_progress(info)
                self.written = time.time()
            if evaluated and state.global_step < state.max_steps and os.environ.get(SEARCH_GATE_ENV):
                wait_at_search_gate(Path(os.environ[SEARCH_GATE_ENV]), state.global_step, control)

        def on_train_end(self, args, state, control, **kwargs):
            self.close()

        def close(self):
            if self.view is not None:
                self.view.stop()
                self.view = None

    return Progress()


SEARCH_GATE_ENV = "TUNEFLEET_SEARCH_GATE"  # a search trial's file: the step its run may go on past
SEARCH_GATE_TIMEOUT_S = 600.0
stop_signal = threading.Event()  # SIGUSR1, SIGTERM or SIGINT arrived (preemption_callback)


def wait_at_search_gate(gate: Path, step: int, control) -> None:
    """A search trial's run waits after each evaluation until the trial lets it go on past `step` (the gate file
    holds a step at or beyond it) or ends it (SIGTERM: a checkpoint here, then stop), so a trial its scheduler
    stops ends at the step it was judged at. Only a run of one process waits (ranks would wait in different
    places); after SEARCH_GATE_TIMEOUT_S without an answer it goes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    deadline = time.monotonic() + SEARCH_GATE_TIMEOUT_S
    while time.monotonic() < deadline:
        if stop_signal.is_set():
            control.should_save = True
            control.should_training_stop = True
            return
        try:
            if json.loads(gate.read_text()).get("step", -1) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    print(
        f"search: no answer after the evaluation at step {step} for {SEARCH_GATE_TIMEOUT_S:.0f} s; going on",
        flush=True,
    )


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
        signum: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.signum is not None:
                control.should_save = True
                control.should_training_stop = True

    callback = Preemption()

    def handler(signum, frame):
        if signum == signal.SIGINT and callback.signum is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        callback.signum = signum
        stop_signal.set()

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (in-process use from a thread): no signal handling
            pass
    return callback


def process_started_at() -> float:
    """When this run's process was started: by its launcher's clock (TUNEFLEET_STARTED_AT, set for warm and cold
    starts alike), else the process's own start time from /proc."""
    stamp = os.environ.get("TUNEFLEET_STARTED_AT")
    if stamp:
        return float(stamp)
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def startup_clock():
    """Notes when the first training step begins: run.json's `startup` is the time from process start to it."""
    from transformers import TrainerCallback

    class StartupClock(TrainerCallback):
        first_step_at: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first_step_at is None:
                self.first_step_at = time.time()

        def record(self) -> dict:
            seconds = None if self.first_step_at is None else round(self.first_step_at - process_started_at(), 2)
            kind = os.environ.get("TUNEFLEET_START", "cold")
            out = {"kind": kind, "to_first_step_s": seconds}
            if kind == "warm":  # which warm process it was forked from: a launcher's own, or one it was given
                out["warm_process"] = os.environ.get("TUNEFLEET_WARM_SOCKET")
            return out

    return StartupClock()


def close_progress(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        if hasattr(callback, "close") and callable(callback.close):
            callback.close()


def start_record(cfg, folder: RunFolder, resume_from: str | None, extra: dict | None = None) -> dict:
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
        "placement": memory.launched_placement(),
        "stage": cfg.stage,
        "lineage": parent_lineage(cfg),
        "node_id": os.environ.get("TUNEFLEET_NODE_ID"),
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
        previous = folder.read_json("run.json") or {}
        record["attempts"] = previous.get("attempts", 0) + 1
        if previous.get("memory_steps"):
            record["memory_steps"] = previous["memory_steps"]
        folder.write_json("run.json", record)
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
        recorded = (folder.read_json("run.json") or {}).get("memory_steps") or []
        if len(recorded) > len(record.get("memory_steps") or []):
            record["memory_steps"] = recorded
    folder.write_json("run.json", record)


def store_failed(folder: RunFolder, record: dict, step: int, exc: StoreUnavailable) -> StoreUnavailable:
    """The one line for a run whose store stopped taking its uploads. Its scratch stays: the checkpoint saved whole
    there is what a rerun on this node uploads and resumes from. run.json says so in scratch, and in the store
    if it answers now."""
    kept = kept_checkpoint(folder.local)
    note = f"the store failed: checkpoint-{kept} kept in {folder.local}" if kept is not None else "the store failed"
    record.update(status=RunStatus.FAILED, ended_at=utc_now(), global_step=step, error=str(exc), note=note)
    write_json_atomic(folder.local / "run.json", record)
    try:
        Store(folder.output_dir, timeout_s=10).write_json("run.json", record)
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
    record = start_record(cfg, folder, resume_from, extra)
    if resume_from:
        print(f"resuming from {resume_from}", flush=True)
    try:
        try:
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
        )
        raise Preempted(preemption.signum)
    trainer.save_model(str(folder.local))  # adapter, training_args.bin, tokenizer at the top level
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
    )
    folder.clean_scratch()
    return record
