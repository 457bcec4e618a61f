"""`sweep.json`: the one record of a sweep (its runs, where each stands, the stages' choices, the nodes lost, a SLURM
submission's jobs), typed, with one writer: every backend and the search write it through `SweepRecord.write`,
`tunefleet status` reads it with `SweepRecord.read`.

The file's form is kept as earlier versions wrote it (a key is present when its part applies: outcome fields once
a run's outcome is known, stage and parent for a pipeline's runs, SLURM ids for a submitted run), so older sweep
folders still read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from tunefleet.common.contract import SWEEP_RECORD
from tunefleet.common.jsonfile import utc_now
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import Store

OUTCOME_FIELDS = ("steps", "final_loss", "wall_s", "log", "error", "host", "node_id", "memory_steps", "nodes")
SLURM_FIELDS = ("slurm_task", "slurm_job", "slurm_array")


@dataclass
class RunEntry:
    """One run of the sweep, as sweep.json holds it."""

    output_dir: str
    method: str
    status: str = RunStatus.QUEUED
    # once the run's outcome is known (local and Ray sweeps)
    outcome: dict[str, Any] | None = None  # OUTCOME_FIELDS
    placement: dict[str, Any] | None = None  # placement.Placement.record()
    attempts: list[dict[str, Any]] | None = None  # each launch: host, node_id, started_at, pid
    # a pipeline's run: its stage and the run it started from (None: the spec's model)
    stage: str | None = None
    parent: str | None = None
    # a SLURM submission: the array task that trains it ("ARRAY_TASK"), its index and array group
    slurm: dict[str, Any] | None = None  # SLURM_FIELDS
    trial: bool = False  # a search's trial
    confirm: bool = False  # a search's confirmation run

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"output_dir": self.output_dir, "method": self.method, "status": self.status}
        if self.outcome is not None:
            out.update(self.outcome)
            out["status"] = self.status
        if self.placement is not None:
            out["placement"] = self.placement
        if self.attempts is not None:
            out["attempts"] = self.attempts
        if self.stage is not None:
            out.update(stage=self.stage, parent=self.parent)
        if self.slurm:
            out.update(self.slurm)
        if self.trial:
            out["trial"] = True
        if self.confirm:
            out["confirm"] = True
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunEntry:
        outcome = {k: data[k] for k in OUTCOME_FIELDS if k in data} or None
        return cls(
            output_dir=str(data.get("output_dir", "")),
            method=str(data.get("method", "")),
            status=str(data.get("status") or RunStatus.QUEUED),
            outcome=outcome,
            placement=data.get("placement"),
            attempts=data.get("attempts"),
            stage=data.get("stage"),
            parent=data.get("parent"),
            slurm={k: data[k] for k in SLURM_FIELDS if k in data} or None,
            trial=bool(data.get("trial")),
            confirm=bool(data.get("confirm")),
        )

    @property
    def slurm_job(self) -> str | None:
        """The array task of its latest submission, "ARRAYID_TASK"."""
        return (self.slurm or {}).get("slurm_job")


@dataclass
class SweepRecord:
    """A sweep: what runs it has and where each stands."""

    name: str
    spec: str
    backend: str
    runs: dict[str, RunEntry] = field(default_factory=lambda: dict[str, RunEntry]())
    started_at: str = field(default_factory=utc_now)
    ended_at: str | None = None
    choices: dict[str, dict[str, Any]] = field(default_factory=lambda: dict[str, dict[str, Any]]())  # stage -> best
    lost_nodes: list[dict[str, Any]] | None = None  # Ray nodes lost while the sweep ran
    slurm: dict[str, Any] | None = None  # a SLURM submission's job ids (launcher/slurm.py)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "spec": self.spec,
            "backend": self.backend,
            "started_at": self.started_at,
            "runs": {name: entry.to_json() for name, entry in self.runs.items()},
        }
        if self.slurm is not None:
            out["slurm"] = self.slurm
        if self.choices:
            out["choices"] = self.choices
        if self.lost_nodes is not None:
            out["lost_nodes"] = self.lost_nodes
        if self.ended_at is not None:
            out["ended_at"] = self.ended_at
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepRecord:
        runs = cast(dict[str, dict[str, Any]], data.get("runs") or {})
        return cls(
            name=str(data.get("name", "")),
            spec=str(data.get("spec", "")),
            backend=str(data.get("backend", "")),
            runs={name: RunEntry.from_json(entry) for name, entry in runs.items()},
            started_at=str(data.get("started_at") or ""),
            ended_at=data.get("ended_at"),
            choices=data.get("choices") or {},
            lost_nodes=data.get("lost_nodes"),
            slurm=data.get("slurm"),
        )

    @classmethod
    def read(cls, runs_dir: str) -> SweepRecord | None:
        data = Store(runs_dir).read_json(SWEEP_RECORD)
        return cls.from_json(data) if data is not None else None

    def write(self, runs_dir: str) -> None:
        """The one writer of sweep.json (atomic, in a folder or an object store)."""
        Store(runs_dir).write_json(SWEEP_RECORD, self.to_json())
