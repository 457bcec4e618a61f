"""What a sweep's plan needs where it runs, checked before the first run trains: the runs folder's object-store
driver, lm-eval and its benchmark tasks, the reward model, Optuna for a TPE search.

A missing piece used to surface after training (the evaluation stopped on it); here it is one line at the start,
naming the node and the extra that brings it. The driver checks itself; on a Ray cluster every live node runs the
same check as a small task (the nodes' environments are what `setup_commands` made, not the driver's); on SLURM one
`srun` step runs it inside an allocation of the sweep's partition, with the jobs' Python, before any array is
submitted.

    needs = plan_needs(spec, runs, evaluate=True)
    refuse(check_here(needs), "this machine")      # one line per missing piece, then no run starts

    python -m tunefleet.launcher.plan_check '<needs as JSON>'   # what a SLURM step runs: prints its findings
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunefleet.common.contract import RUN_RECORD
from tunefleet.common.errors import TunefleetError, first_line

if TYPE_CHECKING:
    from tunefleet.eval.settings import EvalSettings
    from tunefleet.launcher.records import RunPlan
    from tunefleet.launcher.search_settings import SearchSettings
    from tunefleet.launcher.sweep import SweepSpec

# How long the nodes' checks may take: a worker starts and imports lm-eval and transformers (seconds); a SLURM step
# may first wait for its allocation.
RAY_CHECK_TIMEOUT_S = 300
SLURM_CHECK_TIMEOUT_S = 900


@dataclass(frozen=True)
class PlanNeeds:
    """What a sweep's runs and evaluations need on a node beyond tunefleet's own dependencies."""

    store: str | None = None  # the runs folder's URI scheme ("s3", "gs"); None: a path
    tasks: tuple[str, ...] = ()  # benchmark tasks the evaluation runs (lm-eval)
    include_path: str | None = None  # the user's own task YAMLs
    reward_models: tuple[str, ...] = ()  # folders, URIs or hub ids the evaluation loads (not runs of this sweep)
    optuna: bool = False  # a search with `searcher: optuna`
    num_nodes: int = 1  # the most nodes one run spans
    shared_folder: str | None = None  # a multi-node run's sweep: the runs folder every node must see ...
    probe: str | None = None  # ... where the driver left PROBE_FILE holding this token

    def __bool__(self) -> bool:
        return bool(self.store or self.tasks or self.reward_models or self.optuna or self.num_nodes > 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PlanNeeds:
        data = json.loads(text)
        return cls(
            store=data.get("store"),
            tasks=tuple(data.get("tasks") or ()),
            include_path=data.get("include_path"),
            reward_models=tuple(data.get("reward_models") or ()),
            optuna=bool(data.get("optuna")),
            num_nodes=int(data.get("num_nodes") or 1),
            shared_folder=data.get("shared_folder"),
            probe=data.get("probe"),
        )


def plan_needs(spec: SweepSpec, runs: list[RunPlan], evaluate: bool) -> PlanNeeds:
    """What `spec` needs: evaluations that will run (`--eval`, a stage choosing the best run of another, a search's
    confirmation), the runs folder's store and a TPE search. `runs`: the sweep's runs (their names may be a
    reward model the sweep trains itself)."""
    from tunefleet.common.storage import is_uri

    settings: list[EvalSettings] = []
    if evaluate:
        settings += [stage.eval for stage in spec.stages] if spec.stages else [spec.eval]
    chosen_from = {stage.parent for stage in spec.stages if stage.best}
    settings += [stage.eval for stage in spec.stages if stage.name in chosen_from]
    searches: list[SearchSettings] = (
        [spec.search] if spec.search else [stage.search for stage in spec.stages if stage.search]
    )
    if spec.search:
        settings.append(spec.eval)  # a search's confirmation runs are evaluated
    settings += [stage.eval for stage in spec.stages if stage.search]
    own_runs = {run.name for run in runs}
    reward_models = [s.reward_model for s in settings if s.reward_model and s.reward_model not in own_runs]
    # a name the evaluator finds under runs_dir (an rm run of an earlier sweep there) is that folder
    reward_models = [earlier_run(spec.runs_dir, name) or name for name in reward_models]
    tasks = tuple(dict.fromkeys(task for s in settings for task in s.benchmark_tasks()))
    num_nodes = max((run.config.num_nodes for run in runs), default=1)
    return PlanNeeds(
        store=spec.runs_dir.split("://", 1)[0] if is_uri(spec.runs_dir) else None,
        tasks=tasks,
        include_path=next((s.include_path for s in settings if s.tasks and s.include_path), None),
        reward_models=tuple(dict.fromkeys(reward_models)),
        optuna=any(search.searcher == "optuna" for search in searches),
        num_nodes=num_nodes,
        shared_folder=(spec.runs_dir if is_uri(spec.runs_dir) else str(Path(spec.runs_dir).resolve()))
        if num_nodes > 1
        else None,
        probe=uuid.uuid4().hex if num_nodes > 1 else None,
    )


PROBE_FILE = ".tunefleet-shared-check"  # what the driver leaves in a multi-node sweep's runs folder for the nodes


def leave_probe(needs: PlanNeeds) -> None:
    """Write the token every node must then read from the runs folder (a multi-node sweep's only)."""
    from tunefleet.common.storage import Store

    if needs.shared_folder and needs.probe:
        Store(needs.shared_folder).write_bytes(PROBE_FILE, needs.probe.encode())


def shared_folder_problems(needs: PlanNeeds) -> list[str]:
    """A runs folder this node does not share with the driver: one line."""
    from tunefleet.common.storage import Store

    if not (needs.shared_folder and needs.probe):
        return []
    try:
        seen = Store(needs.shared_folder).read_bytes(PROBE_FILE)
    except Exception as exc:  # a store this node cannot reach (credentials, endpoint)
        seen, why = None, first_line(exc)
    else:
        why = "it is not there" if seen is None else "it holds another sweep's check"
    if seen == needs.probe.encode():
        return []
    return [
        f"runs_dir {needs.shared_folder} is not the folder the sweep's driver wrote ({PROBE_FILE}: {why}): a run over "
        f"{needs.num_nodes} nodes reads and writes one folder from all of them: put runs_dir on a filesystem every "
        "node mounts (NFS, Lustre, ...) or in a bucket (s3://..., gs://...)"
    ]


def earlier_run(runs_dir: str, name: str) -> str | None:
    """`runs_dir/name` when it holds a run (run.json), else None."""
    from tunefleet.common.storage import Store, join

    if "/" in name or "://" in name:
        return None
    folder = join(runs_dir, name)
    return folder if Store(folder).exists(RUN_RECORD) else None


def check_here(needs: PlanNeeds) -> list[str]:
    """What this Python lacks of `needs`: one line each (empty when nothing)."""
    problems = []
    if needs.store:
        problems += store_driver_problems(needs.store)
    problems += shared_folder_problems(needs)
    if needs.tasks and importlib.util.find_spec("lm_eval") is None:
        problems.append(
            f"eval.tasks ({', '.join(needs.tasks)}) run through lm-evaluation-harness, which is not installed: "
            "pip install 'tunefleet[bench]'"
        )
    elif needs.tasks:
        from tunefleet.common.terminal import calm

        calm()  # datasets' bars while the tasks load are not the check's to show
        task_log = logging.getLogger("lm_eval.api.task")  # a note tiny_world's loader gets each time it loads
        level = task_log.level
        task_log.setLevel(logging.ERROR)
        try:
            from tunefleet.eval.benchmarks import check_tasks

            check_tasks(list(needs.tasks), needs.include_path)  # unknown tasks, unreachable data
        except TunefleetError as exc:
            problems.append(f"eval.tasks: {first_line(exc)}")
        finally:
            task_log.setLevel(level)
    for name in needs.reward_models:
        try:
            from tunefleet.trainers.model import reward_model_path

            reward_model_path(name)
        except TunefleetError as exc:
            problems.append(f"eval.reward_model: {first_line(exc)}")
    if needs.optuna and importlib.util.find_spec("optuna") is None:
        problems.append("search.searcher optuna needs Optuna, which is not installed: pip install 'tunefleet[optuna]'")
    return problems


def store_driver_problems(scheme: str) -> list[str]:
    """The fsspec driver of `scheme://`, if it is not installed."""
    from tunefleet.common.storage import install_hint, missing_driver

    module = missing_driver(scheme)
    return (
        [f"runs_dir {scheme}://... needs {module}, which is not installed: {install_hint(scheme)}"] if module else []
    )


def refuse(problems: list[str], where: str, fix: str = "") -> None:
    """One line per missing piece, each naming where it is missing; nothing when there is none."""
    if problems:
        raise TunefleetError(
            "\n".join(f"the plan cannot run on {where}: {problem}" for problem in problems)
            + (f"\n{fix}" if fix else "")
        )


# ---------------------------------------------------------------- Ray: every live node
def node_findings(needs: PlanNeeds) -> tuple[str, list[str]]:
    """The Ray task each node runs: (its host name, what it lacks)."""
    return socket.gethostname(), check_here(needs)


def check_ray_nodes(needs: PlanNeeds) -> None:
    """Run `check_here` on every live node of the connected Ray cluster (the head included), pinned to each; one
    line per node and missing piece. A node where tunefleet itself cannot be imported says so."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    remote = ray.remote(node_findings)
    asked = {
        node["NodeID"]: remote.options(
            num_cpus=0,  # never waits behind runs for a CPU
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            max_retries=0,
        ).remote(needs)
        for node in nodes
    }
    problems = []
    for node in nodes:
        host = None
        try:
            host, found = ray.get(asked[node["NodeID"]], timeout=RAY_CHECK_TIMEOUT_S)
        except GetTimeoutError:
            found = [f"the check did not answer within {RAY_CHECK_TIMEOUT_S} s"]
        except RayError as exc:  # tunefleet missing on the node, or its import failed there
            found = [f"the check could not run there ({first_line(exc)}): install tunefleet on every node"]
        named = (
            [f"name {node['NodeName']}"] if node.get("NodeName") not in (None, node.get("NodeManagerAddress")) else []
        )
        about = ", ".join([*named, *([f"host {host}"] if host else [])])
        where = f"Ray node {node.get('NodeManagerAddress')}" + (f" ({about})" if about else "")
        problems += [(f"the plan cannot run on {where}: {problem}", problem) for problem in found]
    if problems:
        missing_extras = any(not problem.startswith("runs_dir ") for _, problem in problems)
        raise TunefleetError(
            "\n".join(line for line, _ in problems)
            + (
                "\ninstall the extras on every node (the cluster's setup_commands: see cluster_configs/README.md)"
                if missing_extras
                else ""
            )
        )


# ---------------------------------------------------------------- SLURM: inside an allocation
def check_in_slurm(needs: PlanNeeds, slurm_options: list[str], python: str, name: str) -> None:
    """One `srun` step with the sweep's partition, account and QoS runs the check with the jobs' Python, in the
    environment the job scripts get, before any array is submitted."""
    cmd = [
        "srun",
        f"--job-name=tf-{name}-check",
        "--ntasks=1",
        "--cpus-per-task=1",
        "--time=00:15:00",
        *slurm_options,
        python,
        "-m",
        "tunefleet.launcher.plan_check",
        needs.to_json(),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SLURM_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TunefleetError(
            f"the plan check in a SLURM allocation did not end within {SLURM_CHECK_TIMEOUT_S} s (a full queue?): "
            "rerun later, or with --skip_plan_check"
        ) from None
    lines = proc.stdout.strip().splitlines()
    try:
        host, problems = json.loads(lines[-1]) if lines else (None, None)
    except ValueError:
        host, problems = None, None
    if proc.returncode != 0 or problems is None:
        # a traceback's last line says it (No module named 'tunefleet'); srun's own errors are one line
        said = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()[-1]
        raise TunefleetError(
            f"the plan check in a SLURM allocation failed with {python}: {said} (slurm.python must be a Python "
            "with tunefleet installed on the compute nodes)"
        )
    refuse(problems, f"SLURM node {host} (python {python})", "install the extras in the jobs' environment")


def main(argv: list[str] | None = None) -> int:
    """A SLURM step's check: the needs as JSON in, `[host, problems]` as JSON on the last line out."""
    args = sys.argv[1:] if argv is None else argv
    print(json.dumps(node_findings(PlanNeeds.from_json(args[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
