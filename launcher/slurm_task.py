"""One SLURM array task = one run of a sweep, or several that share its GPU (what `sweep.sbatch` runs).

    python -m tunefleet.launcher.slurm_task runs/demo/slurm/runs.json 3 --retries 1

Picks task INDEX of runs.json (written by `tunefleet sweep --backend slurm`): its runs train at once, each in
its own process with its own port and its share of the task's CPUs, through `runner.run_one` like every other
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
import sys
import threading
import time

from tunefleet.launcher import runner, warm
from tunefleet.launcher.runs import RunOutcome, RunPlan


def relay_signals() -> list[int]:
    """Pass USR1/TERM on to the training process; returns the list the signals received are appended to.

    A watcher also signals a training process started after the signal arrived (the signal can come while
    run_one is still importing torch, before the child exists).
    """
    received: list[int] = []
    told: set[int] = set()

    def tell_children():
        for proc in runner.training_processes():
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
        outcome = runner.run_one(run, env)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tunefleet.launcher.slurm_task", description="Run one array task of a sweep."
    )
    p.add_argument("runs_json", help="<runs_dir>/slurm/runs.json")
    p.add_argument("index", type=int, help="Task of runs.json to run ($SLURM_ARRAY_TASK_ID).")
    p.add_argument("--retries", type=int, default=1, help="Retries of a failed run inside this task.")
    a = p.parse_args(argv)
    with open(a.runs_json) as fh:
        spec = json.load(fh)
    task = spec.get("tasks", [[i] for i in range(len(spec["runs"]))])[a.index]
    runs = [RunPlan.from_json(spec["runs"][i]) for i in task]
    received = relay_signals()
    warm.prestart()  # imports the training stack once for the runs of this task
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
