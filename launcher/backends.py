"""Two backends (launcher/backend.py): `LocalBackend`, processes on this machine, and `RayBackend`, tasks on a Ray
cluster (or a local Ray started for the sweep). (SLURM: launcher/slurm.py.)

Both backends read as the same steps: check resources -> queue the runs that may start (all of a plain sweep; in a
pipeline, those whose parent finished: launcher/dag.py) -> start each as its GPU share (or CPU slot) frees up -> a
failed run is retried up to `retries` times, then reported; a run that ran out of memory sharing a GPU is retried
once with a whole GPU -> the others go on; a run whose parent did not finish is blocked, never started.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from tunefleet.common.contract import LAUNCH_FILE, NODE_ID_ENV, TRAIN_LOG
from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import Store, join
from tunefleet.launcher import plan_check, warm
from tunefleet.launcher.backend import Chooser, Ran, SweepOptions
from tunefleet.launcher.dag import Dag
from tunefleet.launcher.dry_run import plan_text
from tunefleet.launcher.execute import run_one, stopping, terminate_children
from tunefleet.launcher.gang import RayGang, check_gang_fits
from tunefleet.launcher.placement import Allocator
from tunefleet.launcher.progress import SweepView
from tunefleet.launcher.ray_session import ray_for_runs
from tunefleet.launcher.records import RunOutcome, RunPlan
from tunefleet.launcher.sweep import Resources, SweepSpec

if TYPE_CHECKING:
    from tunefleet.launcher.plan_check import PlanNeeds
    from tunefleet.launcher.tune_search import TrialSetup


ONE_MACHINE = (
    "num_nodes > 1 spans several machines, which the local backend (this one) cannot give a run: use --backend ray "
    "(a Ray cluster: --address) or --backend slurm; on this machine, use num_processes instead"
)


class Retries:
    """Which failed runs go again: up to `retries` times each, plus once alone after an out-of-memory."""

    def __init__(self, retries: int):
        self.retries = retries
        self.attempts: dict[str, int] = {}
        self.alone: set[str] = set()

    def started(self, name: str) -> int:
        self.attempts[name] = self.attempts.get(name, 0) + 1
        return self.attempts[name]

    def again(self, plan: RunPlan, outcome: RunOutcome) -> tuple[RunPlan, str] | None:
        """(the plan to run again, why), or None when the outcome stands."""
        if outcome.ok or stopping.is_set():
            return None
        if outcome.out_of_memory and plan.placement.shared and plan.name not in self.alone:
            self.alone.add(plan.name)
            return dataclasses.replace(plan, placement=plan.placement.alone()), "out of memory: again with a whole GPU"
        if self.attempts[plan.name] <= self.retries:
            return plan, f"retry {self.attempts[plan.name]}/{self.retries}: {outcome.error or ''}"
        return None


def gpu_ids() -> list[str]:
    """This machine's GPUs as the ids CUDA_VISIBLE_DEVICES takes (within the visible ones, if set)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return (visible or [str(i) for i in range(count)])[:count]


def check_local_resources(runs: list[RunPlan], allocator: Allocator) -> None:
    for run in runs:
        if run.config.num_nodes > 1:
            raise TunefleetError(f"run {run.name}: {ONE_MACHINE}")
        if not allocator.can_ever_fit(run.placement.gpus):
            raise TunefleetError(
                f"run {run.name} needs {run.placement.gpus:g} GPU(s) but this machine has {len(allocator.free)}; "
                "lower resources.gpus_per_run or use --backend ray/slurm"
            )


class Choices:
    """Stages waiting for the best run of the stage they start from: each chosen in a thread of its own (the choice
    evaluates that stage) while the sweep goes on."""

    def __init__(self, chooser: Chooser | None):
        self.chooser = chooser
        self.threads: dict[str, threading.Thread] = {}
        self.results: dict[str, tuple[RunPlan | None, str]] = {}

    def start(self, stages: list[str]) -> None:
        for stage in stages:
            if stage in self.threads:
                continue

            def choose(stage=stage):
                try:
                    self.results[stage] = self.chooser(stage) if self.chooser else (None, "no chooser")
                except Exception as exc:  # the evaluation failed: its children are blocked, said why
                    self.results[stage] = (None, f"choosing failed: {type(exc).__name__}: {first_line(exc)}")

            self.threads[stage] = threading.Thread(target=choose, daemon=True)
            self.threads[stage].start()

    def done(self) -> list[tuple[str, RunPlan | None, str]]:
        out = [(stage, *self.results.pop(stage)) for stage in list(self.results)]
        return out

    @property
    def busy(self) -> bool:
        return any(t.is_alive() for t in self.threads.values()) or bool(self.results)


def blocked_outcome(plan: RunPlan, why: str) -> RunOutcome:
    return RunOutcome(plan.name, RunStatus.BLOCKED, join(plan.output_dir, TRAIN_LOG), error=why)


class Schedule:
    """A sweep's DAG as both backends drive it: each outcome settled (the view, the DAG), the stages that take the
    best run of another chosen in threads, the children of a run that did not finish blocked, and the runs that may
    start now."""

    def __init__(self, runs: list[RunPlan], view: SweepView, chooser: Chooser | None):
        self.dag, self.choices, self.view = Dag(runs), Choices(chooser), view
        self.outcomes: dict[str, RunOutcome] = {}

    def settle(self, outcome: RunOutcome) -> None:
        self.outcomes[outcome.name] = outcome
        self.view.set(outcome.name, outcome.status, outcome.error or "; ".join(outcome.memory_steps))
        self.dag.ended(outcome.name, outcome.ok)

    def ready(self) -> list[RunPlan]:
        """The runs that may start now (each returned once); what can never start is settled as blocked."""
        for stage, best, why in self.choices.done():
            for plan, reason in self.dag.choose(stage, best, why):
                self.settle(blocked_outcome(plan, reason))
        for plan, reason in self.dag.blocked():
            self.settle(blocked_outcome(plan, reason))
        self.choices.start(self.dag.choices())
        return self.dag.ready()

    @property
    def waiting(self) -> bool:
        """Runs not started yet, or a stage's choice still under way."""
        return bool(self.dag.pending) or self.choices.busy

    def in_order(self, runs: list[RunPlan]) -> list[RunOutcome]:
        return [self.outcomes[r.name] for r in runs if r.name in self.outcomes]


def run_local(
    runs: list[RunPlan], resources: Resources, retries: int, view: SweepView, chooser: Chooser | None = None
) -> list[RunOutcome]:
    allocator = Allocator(gpu_ids(), resources.strategy)
    check_local_resources(runs, allocator)
    cores = os.cpu_count() or 1
    most = resources.max_parallel or len(runs)
    warm.prestart()  # imports the training stack while the first runs are placed; each run is forked from it
    schedule = Schedule(runs, view, chooser)
    pending: deque[RunPlan] = deque()  # may start, waiting for a slot
    running = {}
    tries = Retries(retries)

    def cpu_env(plan: RunPlan) -> dict:
        # Each run gets its own cores' worth of threads, as Ray does: N runs x all cores each would thrash the CPU.
        return {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(plan.placement.cpus)}

    def start(plan: RunPlan, ids: list[str]) -> None:
        result: dict[str, RunOutcome] = {}
        env = {**cpu_env(plan), **({"CUDA_VISIBLE_DEVICES": ",".join(ids)} if plan.placement.gpus > 0 else {})}

        def work():
            try:
                result["outcome"] = run_one(plan, env)
            except Exception as exc:  # a launch that cannot even start: recorded, and the sweep goes on
                log = join(plan.output_dir, TRAIN_LOG)
                error = f"{type(exc).__name__}: {first_line(exc)}"
                result["outcome"] = RunOutcome(plan.name, RunStatus.FAILED, log, error=error)

        attempt = tries.started(plan.name)
        view.set(plan.name, RunStatus.RUNNING, f"(attempt {attempt})" if attempt > 1 else "")
        thread = threading.Thread(target=work, daemon=True)
        running[plan.name] = (plan, ids, thread, result)
        thread.start()

    try:
        while (not stopping.is_set() and (schedule.waiting or pending)) or running:
            pending.extend(schedule.ready())
            for plan in list(pending) if not stopping.is_set() else []:  # start what fits, in order
                busy_cores = sum(p.placement.cpus for p, *_ in running.values() if p.placement.gpus == 0)
                cpu_bound = plan.placement.gpus == 0
                if len(running) >= most or (cpu_bound and busy_cores and busy_cores + plan.placement.cpus > cores):
                    break
                ids = allocator.take(plan.placement.gpus)
                if ids is None:
                    continue
                pending.remove(plan)
                start(plan, ids)
            for name, (plan, ids, thread, result) in list(running.items()):
                if thread.is_alive():
                    continue
                del running[name]
                allocator.give(ids, plan.placement.gpus)
                outcome = result["outcome"]
                again = tries.again(plan, outcome)
                if again:
                    pending.appendleft(again[0])
                    view.set(name, RunStatus.QUEUED, again[1])
                else:
                    schedule.settle(outcome)
            view.refresh()
            time.sleep(0.2)
    except KeyboardInterrupt:
        terminate_children()
        raise
    return schedule.in_order(runs)


def check_ray_resources(runs: list[RunPlan], resources: Resources, nodes: list[dict]) -> None:
    """Refuse up front a run that no node can hold (pure: `nodes` as from ray.nodes())."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    max_gpus = max((r.get("GPU", 0) for r in alive), default=0)
    max_cpus = max((r.get("CPU", 0) for r in alive), default=0)
    gpus = max((r.placement.gpus for r in runs), default=0)
    if gpus > max_gpus:
        raise TunefleetError(
            f"each run needs {gpus:g} GPU(s) but the largest Ray node has {int(max_gpus)}; lower "
            "resources.gpus_per_run or add bigger nodes"
        )
    cpus = max((r.placement.cpus for r in runs), default=1)
    if cpus > max_cpus:
        raise TunefleetError(
            f"a run needs {cpus} CPU(s) but the largest Ray node has {int(max_cpus)}; lower resources.cpus_per_run"
        )


def run_on_ray_node(plan: RunPlan) -> RunOutcome:
    """The Ray task of one run: the run, told which node it is on (recorded in launch.json and run.json)."""
    import ray

    return run_one(plan, {NODE_ID_ENV: ray.get_runtime_context().get_node_id()})


def run_ray(
    runs: list[RunPlan],
    resources: Resources,
    retries: int,
    view: SweepView,
    address: str | None,
    chooser: Chooser | None = None,
) -> tuple[list[RunOutcome], list[dict]]:
    """Outcomes, and the nodes lost during the sweep (id, host, when). A run's task is submitted once it may start
    (in a pipeline: the moment its parent's task returned finished); Ray places it as resources free."""
    import ray
    from ray.exceptions import RayError

    with ray_for_runs(address):
        check_ray_resources(runs, resources, ray.nodes())
        for plan in runs:
            if plan.config.num_nodes > 1:
                check_gang_fits(plan, ray.nodes())
        # One task per run on the share of a GPU and the CPUs it asks for; Ray queues what does not fit. A task whose
        # worker or node dies is re-executed by Ray (max_retries) and the run resumes from its checkpoint.
        remote_run = ray.remote(run_on_ray_node)
        strategy = "SPREAD" if resources.strategy == "spread" else "DEFAULT"
        by_name = {r.name: r for r in runs}
        tries = Retries(retries)
        inflight = {}
        nodes = NodeWatch(ray.nodes())
        schedule = Schedule(runs, view, chooser)

        gangs: dict[str, RayGang] = {}  # multi-node runs: each a placement group of its nodes

        def submit(plan: RunPlan):
            by_name[plan.name] = plan
            tries.started(plan.name)
            if plan.config.num_nodes > 1:
                gangs[plan.name] = RayGang(plan)
                return
            where = plan.placement
            task = remote_run.options(
                num_cpus=where.cpus,
                num_gpus=where.gpus,
                memory=int(where.memory_gb * 2**30) if where.memory_gb else None,
                max_retries=3,
                retry_exceptions=False,
                scheduling_strategy=strategy,
            )
            inflight[task.remote(plan)] = plan.name

        running = set()

        def ended(name: str, outcome: RunOutcome) -> None:
            again = tries.again(by_name[name], outcome)
            if again:
                view.set(name, RunStatus.QUEUED, again[1])
                submit(again[0])
                return
            schedule.settle(outcome)

        try:
            while inflight or gangs or (schedule.waiting and not stopping.is_set()):
                for plan in schedule.ready():
                    submit(plan)
                if inflight:
                    done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0 if not gangs else 0.5)
                else:
                    done = []
                    time.sleep(0.5 if gangs else 0.2)
                _mark_running(by_name, inflight, running, view)
                nodes.check(ray.nodes(), view)
                for ref in done:
                    name = inflight.pop(ref)
                    running.discard(name)
                    try:
                        outcome = ray.get(ref)
                    except RayError as exc:
                        log = join(by_name[name].output_dir, TRAIN_LOG)
                        outcome = RunOutcome(name, RunStatus.FAILED, log, error=first_line(exc))
                    ended(name, outcome)
                for name, gang in list(gangs.items()):
                    outcome = gang.poll(view)
                    if outcome is not None:
                        del gangs[name]
                        ended(name, outcome)
                view.refresh()
        except KeyboardInterrupt:
            for ref in inflight:
                ray.cancel(ref, force=True)  # kills the worker; its training child gets SIGTERM (PDEATHSIG)
            for gang in gangs.values():
                gang.end()
            raise
        return schedule.in_order(runs), nodes.lost


class NodeWatch:
    """Nodes that die during a sweep (Ray re-executes their tasks elsewhere): said once, recorded in sweep.json."""

    def __init__(self, nodes: list[dict]):
        self.alive = {n["NodeID"]: n.get("NodeManagerAddress") for n in nodes if n.get("Alive")}
        self.lost: list[dict] = []

    def check(self, nodes: list[dict], view: SweepView) -> None:
        from tunefleet.common.jsonfile import utc_now

        now_alive = {n["NodeID"] for n in nodes if n.get("Alive")}
        for node_id in [n for n in self.alive if n not in now_alive]:
            host = self.alive.pop(node_id)
            self.lost.append({"node_id": node_id, "address": host, "lost_at": utc_now()})
            view.note(f"node {node_id[:12]} ({host}) lost: Ray re-runs its runs elsewhere, from their checkpoints")


def _mark_running(by_name: dict[str, RunPlan], inflight: dict, running: set, view: SweepView) -> None:
    """A run counts as running once its process has written launch.json (Ray queues the rest)."""
    for name in inflight.values():
        if name in running:
            continue
        started = (Store(by_name[name].output_dir).read_json(LAUNCH_FILE) or {}).get("started_at", "")
        if started >= view.started_at:
            running.add(name)
            view.set(name, RunStatus.RUNNING)


# ---------------------------------------------------------------- the two backends
class LocalBackend:
    """Processes on this machine: each run in its GPU share (or its CPU slot), forked from one warm process."""

    name = "local"
    eval_backend = "local"
    submits = False

    def __init__(self, options: SweepOptions):
        self.options = options

    def dry_run(self, spec: SweepSpec, runs: list[RunPlan], searches: list[str]) -> int:
        print("\n".join([plan_text(spec, runs), *searches]))
        return 0

    def check_search(self) -> None:
        pass  # on a local Ray started for it

    def prepare(self) -> None:
        warm.prestart()  # the runs' warm process imports while the data is checked

    def check_plan(self, needs: PlanNeeds) -> None:
        if needs.num_nodes > 1:
            raise TunefleetError(ONE_MACHINE)
        self.check_driver(needs)

    def check_driver(self, needs: PlanNeeds) -> None:
        plan_check.refuse(plan_check.check_here(needs), f"this machine ({socket.gethostname()}, the sweep's driver)")

    def run(self, spec: SweepSpec, runs: list[RunPlan], chooser: Chooser | None) -> Ran:
        with SweepView(runs) as view:
            return Ran(run_local(runs, spec.resources, self.options.retries, view, chooser))

    def search(self, spec: SweepSpec, setups: dict[str, TrialSetup]) -> int:
        return RayBackend(self.options).search(spec, setups)  # trials and confirmation on a local Ray


class RayBackend(LocalBackend):
    """Tasks on the Ray cluster at the options' address (or RAY_ADDRESS), else on a local Ray started for the sweep
    (whose workers fork each run from this machine's warm process)."""

    name = "ray"
    eval_backend = "ray"

    @property
    def on_cluster(self) -> bool:
        return bool(self.options.address or os.environ.get("RAY_ADDRESS"))

    def prepare(self) -> None:
        if not self.on_cluster:
            warm.prestart()  # a local Ray's workers fork the runs from it

    def check_plan(self, needs: PlanNeeds) -> None:
        plan_check.leave_probe(needs)  # a multi-node run's folder: every node must read what the driver wrote
        self.check_driver(needs)  # the driver: it evaluates, and writes the runs folder
        if self.on_cluster:  # every node (a local Ray's workers are this very Python)
            with ray_for_runs(self.options.address):  # the connection stays for the runs
                plan_check.check_ray_nodes(needs)

    def run(self, spec: SweepSpec, runs: list[RunPlan], chooser: Chooser | None) -> Ran:
        with SweepView(runs) as view:
            outcomes, lost = run_ray(runs, spec.resources, self.options.retries, view, self.options.address, chooser)
        return Ran(outcomes, lost)

    def search(self, spec: SweepSpec, setups: dict[str, TrialSetup]) -> int:
        from tunefleet.launcher.tune_search import run_search

        def confirm(spec: SweepSpec, runs: list[RunPlan]) -> list[RunOutcome]:
            return self.run(spec, runs, None).outcomes

        return run_search(spec, setups, self.options.address, self.options.retries, confirm)
