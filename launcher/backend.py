"""The one interface every backend implements: where a sweep's runs execute (this machine, a Ray cluster, SLURM).

The orchestration (launcher/orchestrate.py) decides what runs when and picks the backend; a backend carries out:

    backend.prepare()                        # before the data is checked: what may start early (warm imports)
    backend.check_plan(needs)                # what the evaluation and the store need, where this backend runs them
    ran = backend.run(spec, runs, chooser)   # the runs (a pipeline's DAG), each retried as the options say
    backend.search(spec, setups)             # a spec's search on Ray Tune, then its confirmation

`LocalBackend` and `RayBackend` (launcher/backends.py) run every run before `run` returns; `SlurmBackend`
(launcher/slurm.py) submits job arrays (and the evaluation as a job) and returns at once (`Ran.submitted`).

A run over several nodes (`num_nodes > 1`): `RayBackend` reserves its nodes together as one gang (a placement group,
launcher/gang.py), `SlurmBackend` submits it as a job of its own (`srun`, one launcher per node), and `LocalBackend`
refuses it in `check_plan` (one machine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tunefleet.launcher.records import RunOutcome, RunPlan

if TYPE_CHECKING:
    from tunefleet.launcher.plan_check import PlanNeeds
    from tunefleet.launcher.sweep import SweepSpec
    from tunefleet.launcher.tune_search import TrialSetup

# a stage -> the best run of the stage it starts from (None: none), and why
Chooser = Callable[[str], tuple[RunPlan | None, str]]


@dataclass(frozen=True)
class SweepOptions:
    """How `tunefleet sweep` runs a spec, whatever the backend: its flags as a typed record."""

    spec_path: str = ""  # the spec's file, as given (recorded in sweep.json)
    retries: int = 1  # retries of a failed run (or search trial) before it is reported
    evaluate: bool = False  # evaluate the runs once they ended (--eval)
    address: str | None = None  # a Ray cluster's address (None: RAY_ADDRESS, else a local Ray)
    dry_run: bool = False
    skip_data_check: bool = False
    skip_plan_check: bool = False
    max_parallel: int | None = None  # --max_parallel (study.json records it in the spec as run)
    rerun_of: str | None = None  # --from: the study.json this sweep runs again
    allow_drift: bool = False  # --allow_drift: go on where this machine differs from that study.json


@dataclass
class Ran:
    """What a backend's `run` gives back."""

    outcomes: list[RunOutcome] = field(default_factory=lambda: list[RunOutcome]())  # in the sweep's order
    lost_nodes: list[dict[str, Any]] = field(
        default_factory=lambda: list[dict[str, Any]]()
    )  # Ray nodes lost meanwhile
    submitted: bool = False  # the runs were submitted as jobs that end later (SLURM); `outcomes` is empty
    exit_code: int = 0  # the backend's own verdict where it ends early (a dry run, nothing to submit)


@runtime_checkable
class Backend(Protocol):
    """Where a sweep's runs execute."""

    name: str  # as `--backend` spells it
    eval_backend: str  # where the evaluator scores this backend's runs: "local" or "ray"
    submits: bool  # True: `run` submits jobs that end later (and keeps the sweep's record itself)

    def dry_run(self, spec: SweepSpec, runs: list[RunPlan], searches: list[str]) -> int:
        """Print what would run (`searches`: the search stages' plans, as text); run nothing."""
        ...

    def check_search(self) -> None:
        """Refuse in one line a search this backend cannot run (before anything trains)."""
        ...

    def prepare(self) -> None:
        """Work that may start before the plan is checked (the runs' warm process importing)."""
        ...

    def check_plan(self, needs: PlanNeeds) -> None:
        """Refuse in one line what the nodes lack of `needs` (launcher/plan_check.py), before anything trains."""
        ...

    def run(self, spec: SweepSpec, runs: list[RunPlan], chooser: Chooser | None) -> Ran:
        """Run (or submit) `runs`; a pipeline's children once their parent finished (`chooser`: a stage's best)."""
        ...

    def search(self, spec: SweepSpec, setups: dict[str, TrialSetup]) -> int:
        """A spec's `search:` on Ray Tune, then its `confirm:` runs; the exit code."""
        ...
