"""One SLURM array task = one run of a sweep (what `<runs_dir>/slurm/sweep.sbatch` runs).

    python -m tunefleet.launcher.slurm_task runs/demo/slurm/runs.json 3 --retries 1

Picks run number INDEX from runs.json (written by `tunefleet sweep --backend slurm`), trains it with
`runner.run_one` like every other backend, and exits 0 when it finished, 128+signal when it was stopped by
USR1/TERM (after the trainer saved a checkpoint; the batch script then requeues on USR1), 1 when it failed
after `--retries` retries.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

from tunefleet.launcher import runner
from tunefleet.launcher.sweep import RunPlan


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tunefleet.launcher.slurm_task", description="Run one array task of a sweep."
    )
    p.add_argument("runs_json", help="<runs_dir>/slurm/runs.json")
    p.add_argument("index", type=int, help="Position of the run in runs.json ($SLURM_ARRAY_TASK_ID).")
    p.add_argument("--retries", type=int, default=1, help="Retries of a failed run inside this task.")
    a = p.parse_args(argv)
    with open(a.runs_json) as fh:
        run = RunPlan.from_json(json.load(fh)["runs"][a.index])
    received = relay_signals()

    for attempt in range(a.retries + 1):
        print(f"=== {run.name}: attempt {attempt + 1}, log {run.output_dir}/train.log", flush=True)
        outcome = runner.run_one(run)
        if outcome.ok:
            print(
                f"=== {run.name}: {outcome.status}"
                + (" (already finished)" if outcome.skipped else f", step {outcome.steps}, loss {outcome.final_loss}"),
                flush=True,
            )
            return 0
        if received:  # stopped on purpose: no retry; the checkpoint is resumed when the task runs again
            print(f"=== {run.name}: stopped by signal {received[0]} at step {outcome.steps}", flush=True)
            return 128 + received[0]
        print(f"=== {run.name}: {outcome.status}: {outcome.error}", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
