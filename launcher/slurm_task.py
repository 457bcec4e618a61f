"""One SLURM array task = one run of a sweep, or several that share its GPU (what `sweep.sbatch` runs).

    python -m tunefleet.launcher.slurm_task runs/demo/slurm/runs.json 3 --retries 1

Picks task INDEX of runs.json (written by `tunefleet sweep --backend slurm`): its runs train at once, each in
its own process with its own port and its share of the task's CPUs, through `execute.run_one` like every other
backend. A run that ran out of memory sharing the GPU goes again alone once the others are done. Exits 0 when
every run finished, 128+signal when stopped by USR1/TERM (after the trainers saved checkpoints; the batch script
then requeues on USR1), 1 when a run failed after `--retries` retries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from tunefleet.common.contract import WARM_SOCKET_ENV
from tunefleet.launcher import execute, warm
from tunefleet.launcher.records import RunOutcome, RunPlan


def relay_signals() -> list[int]:
    """Pass USR1/TERM on to the training process; returns the list the signals received are appended to.

    A watcher also signals a training process started after the signal arrived (the signal can come while
    run_one is still importing torch, before the child exists).
    """
    received: list[int] = []
    told: set[int] = set()

    def tell_children():
        for proc in execute.training_processes():
            if received and proc.pid not in told and proc.poll() is None:
                proc.send_signal(received[0])
                told.add(proc.pid)

    def handler(signum, frame):
        received.append(signum)
        tell_children()

    def watch():
        while True:
            time.sleep(0.5)
            tell_children()

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)
    threading.Thread(target=watch, daemon=True).start()
    return received


def train(run: RunPlan, retries: int, received: list[int], env: dict) -> RunOutcome:
    """One run with its retries (none once a signal arrived: its checkpoint resumes when the task runs again)."""
    for attempt in range(retries + 1):
        print(f"=== {run.name}: attempt {attempt + 1}, log {run.output_dir}/train.log", flush=True)
        outcome = execute.run_one(run, env)
        if outcome.ok:
            detail = " (already finished)" if outcome.skipped else f", step {outcome.steps}, loss {outcome.final_loss}"
            print(f"=== {run.name}: {outcome.status}{detail}", flush=True)
            return outcome
        if received:
            print(f"=== {run.name}: stopped by signal {received[0]} at step {outcome.steps}", flush=True)
            return outcome
        print(f"=== {run.name}: {outcome.status}: {outcome.error}", flush=True)
        if outcome.out_of_memory and run.placement.shared:
            return outcome  # not again beside the others: alone, once they are done
    return outcome


def choose(spec: dict, stage: str, slurm_dir: Path) -> int:
    """The job that picks the run `stage` starts from: the best of its parent stage, into slurm/choices.json."""
    from tunefleet.common import schema
    from tunefleet.common.jsonfile import read_json, write_json_atomic
    from tunefleet.eval.settings import EvalSettings
    from tunefleet.launcher.choose import best_run

    wanted = spec["stages"][stage]
    parent = wanted["from"]
    members = {
        plan.name: plan.output_dir
        for plan in map(RunPlan.from_json, spec["runs"])
        if plan.lineage is not None and plan.lineage.stage == parent
    }
    settings = schema.from_mapping(EvalSettings, spec["stages"][parent]["eval"])
    choice = best_run(parent, wanted["best"], members, spec["runs_dir"], settings)
    path = slurm_dir / "choices.json"
    write_json_atomic(path, (read_json(path) or {}) | {stage: choice.record()})
    print(f"=== stage {stage} starts from {choice.why}" if choice.run else f"=== stage {stage}: {choice.why}")
    return 0 if choice.run else 1


def with_chosen_parent(run: RunPlan, slurm_dir: Path) -> RunPlan:
    """A run of a `best:` stage with the parent its choice job picked (slurm/choices.json)."""
    from tunefleet.common.jsonfile import read_json

    if run.lineage is None or not run.lineage.waits_for_choice:
        return run
    choice = (read_json(slurm_dir / "choices.json") or {}).get(run.lineage.stage) or {}
    if not choice.get("run"):
        raise SystemExit(f"=== {run.name}: no parent chosen for stage {run.lineage.stage}: {choice.get('why')}")
    parent = str(Path(run.output_dir).parent / choice["run"])
    return dataclasses.replace(
        run,
        config=dataclasses.replace(run.config, model_name=parent),
        lineage=dataclasses.replace(run.lineage, parent=choice["run"]),
    )


def gang_node(spec: dict, index: int, head: str, port: int, attempt: str, slurm_dir: Path) -> int:
    """One node's launcher of a run over several nodes (its job's `srun` step starts one per node): machine rank =
    this task's rank. Rank 0's node holds the run's folder and records, and watches the rendezvous: when the
    processes have not met in `rendezvous_timeout`, it says which nodes did not join and ends the step."""
    from tunefleet.common.contract import GangSeat
    from tunefleet.launcher.gang import RendezvousWatch

    run = with_chosen_parent(RunPlan.from_json(spec["runs"][index]), slurm_dir)
    rank, count = int(os.environ.get("SLURM_PROCID", "0")), int(os.environ.get("SLURM_NTASKS", "1"))
    if count != run.config.num_nodes:
        print(f"=== {run.name}: {count} SLURM task(s) for a run over {run.config.num_nodes} nodes", flush=True)
        return 2
    hosts = node_hosts(count)
    seats = [
        GangSeat(attempt, m, count, head, port, None, hosts[m] if m < len(hosts) else f"task {m}")
        for m in range(count)
    ]
    seat = dataclasses.replace(seats[rank], host=socket.gethostname(), node_id=os.environ.get("SLURMD_NODENAME"))
    received = relay_signals()
    os.environ.pop(WARM_SOCKET_ENV, None)
    print(f"=== {run.name}: node {rank} of {count} on {socket.gethostname()}, head {head}:{port}", flush=True)
    if rank != 0:
        outcome = execute.run_node(run, seat)
    else:
        watch = RendezvousWatch(run, seats)
        stop = threading.Event()

        def watching():  # end this node's processes (and with --kill-on-bad-exit, the step) if the gang never met
            while not stop.wait(2):
                why = watch.failure()
                if why:
                    print(f"=== {run.name}: {why}", flush=True)
                    execute.terminate_children()
                    return

        threading.Thread(target=watching, daemon=True).start()
        outcome = execute.run_one(run, {}, seat)
        stop.set()
        watch.done()
        if watch.why:
            outcome = dataclasses.replace(outcome, error=watch.why)
    detail = f"step {outcome.steps}, loss {outcome.final_loss}" if outcome.ok else outcome.error
    print(f"=== {run.name} node {rank}: {outcome.status}: {detail}", flush=True)
    if received and not outcome.ok:
        return 128 + received[0]
    return 0 if outcome.ok else 1


def node_hosts(count: int) -> list[str]:
    """The allocation's host names, in node order (empty when scontrol cannot say)."""
    import subprocess

    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    hosts = out.stdout.split()
    return hosts * count if len(hosts) == 1 else hosts  # one node: every task stands for a node on it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tunefleet.launcher.slurm_task", description="Run one array task of a sweep."
    )
    p.add_argument("runs_json", help="<runs_dir>/slurm/runs.json")
    p.add_argument("index", type=int, nargs="?", help="Task of its array to run ($SLURM_ARRAY_TASK_ID).")
    p.add_argument("--group", default="main", help="The array of runs.json the task belongs to (its `groups`).")
    p.add_argument("--retries", type=int, default=1, help="Retries of a failed run inside this task.")
    p.add_argument("--choose", metavar="STAGE", help="Pick the run a `best:` stage starts from, then exit.")
    p.add_argument(
        "--gang", type=int, metavar="INDEX", help="This node's part of run INDEX, a run over several nodes."
    )
    p.add_argument("--head", help="--gang: the node machine rank 0 runs on (the rendezvous).")
    p.add_argument("--port", type=int, default=29500, help="--gang: the rendezvous port on the head.")
    p.add_argument("--attempt", default="0", help="--gang: this attempt's id (the nodes' arrival files carry it).")
    a = p.parse_args(argv)
    with open(a.runs_json) as fh:
        spec = json.load(fh)
    slurm_dir = Path(a.runs_json).parent
    if a.choose:
        return choose(spec, a.choose, slurm_dir)
    if a.gang is not None:
        return gang_node(spec, a.gang, a.head or socket.gethostname(), a.port, a.attempt, slurm_dir)
    groups = spec.get("groups") or {"main": spec.get("tasks", [[i] for i in range(len(spec["runs"]))])}
    task = groups[a.group][a.index]
    runs = [with_chosen_parent(RunPlan.from_json(spec["runs"][i]), slurm_dir) for i in task]
    received = relay_signals()
    # One warm process inside the job, importing the training stack once for its runs: not one the submitter's
    # environment may name, whose runs would live outside the job's cgroup (its GPUs, its memory, scancel)
    os.environ.pop(WARM_SOCKET_ENV, None)
    warm.prestart()
    cpus = max(1, int(os.environ.get("SLURM_CPUS_PER_TASK", len(runs))) // len(runs))
    env = {"OMP_NUM_THREADS": str(cpus)} if len(runs) > 1 else {}

    outcomes: dict[str, RunOutcome] = {}
    threads = [
        threading.Thread(target=lambda r=r: outcomes.__setitem__(r.name, train(r, a.retries, received, env)))
        for r in runs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for run in runs:  # out of memory beside the others: once more with the whole GPU
        if not received and outcomes[run.name].out_of_memory and run.placement.shared:
            alone = dataclasses.replace(run, placement=run.placement.alone())
            print(f"=== {run.name}: out of memory sharing the GPU: again alone", flush=True)
            outcomes[run.name] = train(alone, 0, received, {})
    if received and not all(o.ok for o in outcomes.values()):
        return 128 + received[0]
    return 0 if all(o.ok for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
