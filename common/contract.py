"""The launcher-run contract: every environment variable and file name that passes between a launcher (a sweep's
backend, `tunefleet train`, a search, the evaluator) and a run's processes, named once; typed readers for the ones
that carry data.

A launcher sets the variables below in a run's environment; the run reads them (and only them) to learn what the
launcher decided. Both sides read and write the run folder's files by these names.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, cast

# ---------------------------------------------------------------- set by a launcher for a run's processes
LAUNCH_ENV = "TUNEFLEET_LAUNCH"  # JSON: this attempt's launch record (launch.json), from launch.plan_launch
NODE_ID_ENV = "TUNEFLEET_NODE_ID"  # the Ray node a run was placed on (run.json and launch.json: node_id)
PLACEMENT_ENV = "TUNEFLEET_PLACEMENT"  # JSON: the launcher's placement of the run (placement.Placement.record())
STARTED_AT_ENV = "TUNEFLEET_STARTED_AT"  # epoch seconds: when the launcher started the run's process (startup_s)
START_KIND_ENV = "TUNEFLEET_START"  # "warm" or "cold" (run.json: start)
WARM_SOCKET_ENV = "TUNEFLEET_WARM_SOCKET"  # the warm process a run (or a rank) is forked from
LOCK_TOKEN_ENV = "TUNEFLEET_LOCK_TOKEN"  # the run folder's lock, held for the run by its launcher
SEARCH_GATE_ENV = "TUNEFLEET_SEARCH_GATE"  # a search trial's gate file: the step its run may go on past
GANG_ENV = "TUNEFLEET_GANG"  # JSON: a multi-node run's seat on this node (GangSeat)

# ---------------------------------------------------------------- set by the user
WARM_SWITCH_ENV = "TUNEFLEET_WARM_START"  # "0": every run starts cold
SCRATCH_ENV = "TUNEFLEET_SCRATCH"  # node-local scratch for runs whose folder is in an object store
CACHE_ENV = "TUNEFLEET_CACHE"  # where the table of TRL's options is cached

# ---------------------------------------------------------------- a run folder's files
RUN_RECORD = "run.json"  # the run's record: status, config, lineage, metrics (written by the run)
PROGRESS_FILE = "progress.json"  # step and loss while it trains (written by the run, read by the sweep's view)
LAUNCH_FILE = "launch.json"  # every launch of the run: host, node, command, placement (written by the launcher)
TRAIN_LOG = "train.log"  # the run's output, every attempt appended (written by the launcher)
RUN_CONFIG = "config.yaml"  # the config the run's processes read (written by the launcher)
GANG_FOLDER = "gang"  # a multi-node run's nodes: gang/<id>-node<M>.json once its launcher reached the head (launcher)
GANG_FILE = "gang.json"  # the gang that met: its id, world size and nodes (by the run's rank 0, once all joined)

# ---------------------------------------------------------------- a sweep folder's files
SWEEP_RECORD = "sweep.json"  # the sweep's runs and where each stands (launcher.sweep_record)
SEARCH_RECORD = "search.json"  # a search's trials, best values and confirmation runs
RESULTS_FILE = "evaluation_results.json"  # the evaluator's results, merged
STATISTICS_FILE = "evaluation_statistics.json"  # intervals over seeds, paired comparisons, cost (eval/report.py)
HTML_REPORT = "evaluation_report.html"  # the whole report, one self-contained page
MANIFEST_FILE = "study.json"  # what a sweep ran with: spec, versions, commit, data, models, hardware


def json_from_env(name: str) -> Any:
    """The JSON a launcher put in `name`, or None where it did not set it."""
    return json.loads(os.environ.get(name) or "null")


def launch_record() -> dict[str, Any] | None:
    """This attempt's launch record, when a launcher started this process."""
    record = json_from_env(LAUNCH_ENV)
    return cast(dict[str, Any], record) if isinstance(record, dict) else None


def started_at() -> float | None:
    """When the launcher started this process (its clock), if it said."""
    stamp = os.environ.get(STARTED_AT_ENV)
    try:
        return float(stamp) if stamp else None
    except ValueError:
        return None


@dataclass(frozen=True)
class GangSeat:
    """One node's place in a multi-node run, as its launcher starts the node's processes: accelerate launch's
    machine rank, and the head (rank 0's node) every rank meets at."""

    gang_id: str  # this attempt of the gang (the nodes' arrival files carry it)
    machine_rank: int
    num_machines: int
    head: str  # rank 0's node address
    port: int  # the rendezvous port on the head
    node_id: str | None = None  # the Ray node, or the SLURM host, this seat is on
    host: str | None = None

    def to_env(self) -> str:
        return json.dumps(asdict(self))


def gang_seat() -> GangSeat | None:
    """This process's seat in a multi-node run, when its launcher gave it one."""
    seat = json_from_env(GANG_ENV)
    return GangSeat(**cast(dict[str, Any], seat)) if isinstance(seat, dict) else None
