"""A run's output folder: where it trains (the folder itself, or node-local scratch for a store), what it keeps
(the documented layout, whole checkpoints), and uploads with retries when the folder is in an object store.

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

import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tunefleet.common import tracking
from tunefleet.common.contract import (
    LAUNCH_FILE,
    PROGRESS_FILE,
    RUN_CONFIG,
    RUN_RECORD,
    TRAIN_LOG,
)
from tunefleet.common.errors import TunefleetError
from tunefleet.common.jsonfile import read_json, write_json_atomic
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import Store, StoreUnavailable, refuse_ray_job_temp, scratch_dir
from tunefleet.common.tracking import Tracking
from tunefleet.trainers import checkpoints
from tunefleet.trainers.config import model_short
from tunefleet.trainers.lineage import parent_changed

if TYPE_CHECKING:
    from tunefleet.trainers.config import TrainConfig


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
            Store(self.output_dir, timeout_s=10).write_json(PROGRESS_FILE, data, durable=False)
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


def prepare_output_dir(cfg: TrainConfig) -> tuple[RunFolder, str | None]:
    """Refuse a finished run (unless --overwrite); the run's folder and the checkpoint to resume from, if any.

    With a URI, the main process starts from an empty scratch folder holding only the latest complete
    checkpoint of the store; the other processes of the launch wait until it is there.
    """
    refuse_ray_job_temp(cfg.output_dir, "--output_dir")
    folder = RunFolder(cfg.output_dir, cfg.store_retry_s)
    record = folder.read_json(RUN_RECORD) or {}
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


LAUNCHER_FILES = (TRAIN_LOG, LAUNCH_FILE, RUN_CONFIG)  # written by the launcher of this very attempt


def clear(store: Store) -> None:
    """An output folder emptied for --overwrite, but for what the launcher of this attempt has written there (its
    log, which it is appending to, and the run's config)."""
    for name in store.listdir():
        if name not in LAUNCHER_FILES:
            store.remove(name)


def checkpoint_upload_callback(folder: RunFolder):
    """Uploads each checkpoint to the store as soon as the trainer saved it (runs kept in a store only)."""
    from transformers import TrainerCallback

    class UploadCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder.upload_checkpoint(state.global_step, args.save_total_limit)  # its failure stops training

    return UploadCheckpoints()


def run_name(cfg: TrainConfig) -> str:
    """The run's name in trackers: --run_name (a sweep gives its run name), else the output folder's name."""
    return cfg.run_name or cfg.output_dir.rstrip("/").rsplit("/", 1)[-1]


def start_tracking(cfg: TrainConfig, folder: RunFolder, previous: dict) -> None:
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
