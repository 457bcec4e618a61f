"""One vocabulary for the state of a run: run.json, sweep.json, `tunefleet status` and every backend use it."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"  # planned, not started (sweep.json only)
    RUNNING = "running"  # training, or killed without a chance to say so (run.json keeps "running")
    FINISHED = "finished"  # adapter and trainer state saved
    FAILED = "failed"  # stopped by an error; the error is recorded
    INTERRUPTED = "interrupted"  # stopped on purpose (signal, Ctrl-C) after saving a checkpoint
    BLOCKED = "blocked"  # never started: a run it starts from (its parent) failed or was blocked itself
    STOPPED = "stopped"  # a search trial its scheduler (ASHA) ended early, after saving a checkpoint

    @classmethod
    def of(cls, value: object) -> RunStatus | None:
        """The status a file records, or None for a missing or unknown value."""
        try:
            return cls(value)
        except ValueError:
            return None
