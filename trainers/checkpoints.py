"""Whole checkpoints only: the marker that makes a checkpoint whole, the one a run resumes from, torn ones set aside,
and room on the disk before a save.

A checkpoint is whole when its save finished (the marker, written after the trainer saved it), its trainer state
reads and every weights file is readable to its end. A rerun resumes from the newest whole one; a torn one (a kill or
a full disk during its save, a truncated file) is renamed `torn-checkpoint-N-<time>` with a line in the log and
`run.json` (`set_aside`), never resumed from. Before each save, the free space of the run's disk is compared with the
size of its last checkpoint: checkpoints beyond `save_total_limit` go first, and a save that still cannot fit stops
the run as interrupted (one line; the same command resumes once space is freed), as does a disk that fills during
the save (its partial files removed).
"""

from __future__ import annotations

import errno
import json
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tunefleet.common.errors import first_line

MARKER = ".tunefleet-complete"  # written last into a checkpoint: what makes it whole (locally and in a store)
SPARE = 1.1  # a save needs the last checkpoint's size and a tenth more (sizes move a little between saves)
FULL_BELOW = 2**20  # a disk with less than this free is full, whatever the failed write said
DISK_FULL_EXIT = 75  # EX_TEMPFAIL: interrupted for lack of room; the same command resumes once space is freed


@dataclass
class SetAside:
    """A checkpoint a rerun found torn: its name, why, and where it was moved."""

    checkpoint: str
    why: str
    moved_to: str

    def record(self) -> dict:
        return {"checkpoint": self.checkpoint, "why": self.why, "moved_to": self.moved_to}


class DiskFull(Exception):
    """The run's disk cannot hold its next checkpoint: the run stops as interrupted, resumable once space is freed."""


def steps_of(folder: Path) -> list[tuple[int, Path]]:
    """The checkpoint folders of a run folder, newest first."""
    found = [(int(p.name[11:]), p) for p in folder.glob("checkpoint-*") if p.name[11:].isdigit() and p.is_dir()]
    return sorted(found, reverse=True)


def problem_of(path: Path, marked: bool) -> str | None:
    """Why `path` is not a whole checkpoint, or None. `marked`: the run marks its checkpoints (older runs did not)."""
    if marked and not (path / MARKER).is_file():
        return "its save did not finish (no completion marker)"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or unreadable"
    for weights in sorted(path.glob("*.safetensors")):
        from safetensors import safe_open

        try:
            with safe_open(str(weights), "pt"):  # reads the header and checks the file covers every tensor
                pass
        except Exception as exc:
            return f"{weights.name} is unreadable ({first_line(exc)})"
    for pickled in sorted([*path.glob("*.pt"), *path.glob("*.bin")]):
        try:
            with zipfile.ZipFile(pickled) as archive:  # torch.save's zip: a cut file has no central directory
                archive.namelist()
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{pickled.name} is unreadable ({first_line(exc)})"
    return None


def resumable(folder: Path, main: bool) -> tuple[str | None, list[SetAside]]:
    """The newest whole checkpoint of `folder` (None: start afresh) and the torn ones newer than it, which the main
    process moves aside (every process chooses alike: the choice depends only on the files)."""
    steps = steps_of(folder)
    marked = any((path / MARKER).is_file() for _, path in steps)
    set_aside = []
    for _, path in steps:
        why = problem_of(path, marked)
        if why is None:
            return str(path), set_aside
        moved = path.with_name(f"torn-{path.name}-{time.strftime('%Y%m%dT%H%M%S')}")
        if main:
            path.rename(moved)
            print(f"set aside {path.name}: {why} (moved to {moved.name}); resuming from the one before", flush=True)
        set_aside.append(SetAside(path.name, why, moved.name))
    return None, set_aside


def mark_whole(checkpoint: Path) -> None:
    (checkpoint / MARKER).write_text(json.dumps({"complete": True, "at": time.time()}))


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_room(folder: Path, keep: int | None) -> str | None:
    """Before a save: None when the disk can take a checkpoint the size of the last one (after removing those beyond
    `keep`, oldest first, as the trainer would after the save), else why not."""
    steps = steps_of(folder)
    if not steps:
        return None
    need = int(size_of(steps[0][1]) * SPARE)
    if keep:
        for _, old in steps[keep - 1 :][::-1]:  # the save adds one: keep-1 stay beside it
            if shutil.disk_usage(folder).free >= need:
                break
            shutil.rmtree(old, ignore_errors=True)
    free = shutil.disk_usage(folder).free
    if free >= need:
        return None
    return no_room(folder, free, need)


def no_room(folder: Path, free: int, need: int) -> str:
    mib = 2**20
    return (
        f"no room for the next checkpoint in {folder}: {free / mib:.1f} MiB free, a checkpoint takes "
        f"{need / SPARE / mib:.1f} MiB; free some space (or lower save_total_limit) and run the same command again: "
        "it resumes from the last whole checkpoint"
    )


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """A write failed for lack of space: the OS's ENOSPC or EDQUOT, safetensors' text for it, or any failure while
    the run's disk has (almost) nothing left (torch.save says only "iostream error" or "unexpected pos")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return folder.is_dir() and shutil.disk_usage(folder).free < FULL_BELOW


def remove_partial(folder: Path) -> list[str]:
    """The checkpoints a failed save left without their marker (the main process marks each whole one)."""
    steps = steps_of(folder)
    if not any((path / MARKER).is_file() for _, path in steps) and len(steps) <= 1:
        partial = [path for _, path in steps]  # the run's first save failed: nothing is whole yet
    else:
        partial = [path for _, path in steps if not (path / MARKER).is_file()]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return [path.name for path in partial]


def checkpoint_callback(folder: Path, keep: int | None, mark: bool = True):
    """Marks each checkpoint whole once the trainer saved it (`mark`: a run kept in a store marks its own as they
    upload); before a save, makes room or stops the run."""
    from transformers import TrainerCallback

    class WholeCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save and state.is_world_process_zero:
                why = make_room(folder, keep)
                if why:
                    raise DiskFull(why)

        def on_save(self, args, state, control, **kwargs):
            if mark and state.is_world_process_zero:
                mark_whole(folder / f"checkpoint-{state.global_step}")

    return WholeCheckpoints()
