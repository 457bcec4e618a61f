"""The records every backend passes around: what a run of a sweep is (RunPlan), where it stands (RunSummary) and
how an attempt at it ended (RunOutcome). Typed strictly (pyproject.toml, [tool.basedpyright]): the local, Ray and
SLURM backends, the progress view and sweep.json all read these fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tunefleet.common import schema
from tunefleet.common.status import RunStatus
from tunefleet.launcher.placement import Placement
from tunefleet.trainers import config
from tunefleet.trainers.config import TrainConfig


def on_cpu() -> Placement:
    return Placement(0.0, "CPU")


@dataclass
class Lineage:
    """Where a run of a pipeline (a spec with stages) starts: the spec's model, or a run of an earlier stage."""

    stage: str
    root_model: str  # the model the pipeline's first stage starts from (the architecture of every run)
    parent: str | None = None  # the run it starts from (None: the spec's model, or not chosen yet)
    parent_stage: str | None = None
    best: str | None = None  # the parent is the best run of parent_stage by this metric, chosen once it is evaluated

    @property
    def waits_for_choice(self) -> bool:
        return self.best is not None and self.parent is None


@dataclass
class RunPlan:
    """One run of a sweep: its name, its whole validated train config (output_dir included), and its place."""

    name: str
    config: TrainConfig
    placement: Placement = field(default_factory=on_cpu)
    lineage: Lineage | None = None  # None: a spec without stages

    @property
    def output_dir(self) -> str:
        return self.config.output_dir

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def parent(self) -> str | None:
        return self.lineage.parent if self.lineage else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": {k: v for k, v in schema.to_dict(self.config).items() if v is not None},
            "placement": self.placement.record(),
            **({"lineage": asdict(self.lineage)} if self.lineage else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunPlan:
        placement: dict[str, Any] = data.get("placement") or {}
        placed = {k: v for k, v in placement.items() if k != "runs_per_gpu"}
        lineage: dict[str, Any] | None = data.get("lineage")
        return cls(
            data["name"],
            config.from_dict(data["config"]),
            Placement(**placed) if placed else on_cpu(),
            Lineage(**lineage) if lineage else None,
        )


@dataclass
class RunSummary:
    """Where a run stands, read from its own files (works for any backend)."""

    status: RunStatus | None  # None: never started
    steps: int | None = None
    max_steps: int | None = None
    final_loss: float | None = None
    memory_steps: list[str] = field(default_factory=list[str])  # out-of-memory steps down, described
    nodes: list[dict[str, Any]] = field(default_factory=lambda: list[dict[str, Any]]())  # a multi-node run's nodes
    cost: dict[str, Any] | None = None  # run.json `cost`: wall and GPU time, tokens trained, peak memory, energy


@dataclass
class RunOutcome:
    """How one attempt at a run ended, as every backend reports it."""

    name: str
    status: RunStatus  # FINISHED, FAILED, INTERRUPTED, or BLOCKED (never started: its parent failed)
    log: str
    wall_s: float = 0.0
    skipped: bool = False  # finished before this sweep: not started again
    returncode: int | None = None
    host: str | None = None
    steps: int | None = None
    final_loss: float | None = None
    error: str | None = None
    node_id: str | None = None  # the Ray node it ran on
    out_of_memory: bool = False  # failed by running out of GPU (or CPU allocator) memory
    memory_steps: list[str] = field(default_factory=list[str])  # out-of-memory steps down it took
    elsewhere: str | None = None  # trained by another holder of its folder (another driver, a train by hand)
    nodes: list[dict[str, Any]] = field(default_factory=lambda: list[dict[str, Any]]())  # a multi-node run's nodes

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.FINISHED
