"""The callbacks every run's trainer gets: one progress line per log (and progress.json), preemption signals that
checkpoint and stop, a search trial's gate, the start-up clock."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from tunefleet.common.contract import (
    SEARCH_GATE_ENV,
    START_KIND_ENV,
    WARM_SOCKET_ENV,
    started_at,
)
from tunefleet.trainers.run_folder import RunFolder


def lengths_as_list_callback():
    """transformers' length-grouped sampler keeps `dataset["length"]`, which datasets 4+ returns as a lazy column:
    each of its N lookups per epoch then reads the table (0.2 s per 1,000 rows). It gets a list instead."""
    from transformers import TrainerCallback
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class LengthsAsList(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            batches = getattr(train_dataloader, "batch_sampler", None)
            for sampler in (
                getattr(train_dataloader, "sampler", None),
                getattr(batches, "sampler", None),
                getattr(getattr(batches, "batch_sampler", None), "sampler", None),
            ):
                if isinstance(sampler, LengthGroupedSampler) and not isinstance(sampler.lengths, list):
                    sampler.lengths = list(sampler.lengths)

    return LengthsAsList()


def progress_callback(folder: RunFolder):
    """A progress bar (step/total, loss, time left) when stdout is a terminal, else one line per log; and
    `progress.json` (step, loss, and every evaluation's metrics) for the sweep's live view and a search."""
    from transformers import TrainerCallback

    every = 2.0 if folder.store.remote else 0.0  # a store gets at most one progress write per 2 s
    name = folder.output_dir.rstrip("/").rsplit("/", 1)[-1]

    class Progress(TrainerCallback):
        def __init__(self):
            self.t0 = time.time()
            self.written = 0.0
            self.bar = sys.stdout.isatty()
            self.view = None
            self.evaluations: list[dict] = []

        def on_train_begin(self, args, state, control, **kwargs):
            if not self.bar or not state.is_world_process_zero:
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.view = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("left"),
                TimeRemainingColumn(),
            )
            self.task = self.view.add_task(name, total=state.max_steps, completed=state.global_step, loss="–")
            self.view.start()

        def on_step_end(self, args, state, control, **kwargs):
            if self.view is not None:
                self.view.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            info = {
                "step": state.global_step,
                "max_steps": state.max_steps,
                "elapsed_s": round(time.time() - self.t0, 2),
            }
            info.update({k: logs[k] for k in ("loss", "eval_loss", "learning_rate") if k in logs})
            line = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
            evaluated = any(k.startswith("eval_") for k in logs)
            if evaluated:  # every evaluation of this attempt, for a search's scheduler (launcher/tune_search.py)
                numbers = {k: v for k, v in logs.items() if k.startswith("eval_") and isinstance(v, int | float)}
                self.evaluations.append({"step": state.global_step, **numbers})
            info["evaluations"] = self.evaluations
            if self.view is not None:
                if "loss" in logs:
                    self.view.update(self.task, loss=f"{logs['loss']:.4g}")
                if "eval_loss" in logs:
                    self.view.console.print(line)
            elif "loss" in logs or "eval_loss" in logs:
                print(line, flush=True)
            if evaluated or time.time() - self.written >= every or state.global_step >= state.max_steps:
                folder.write_progress(info)
                self.written = time.time()
            if evaluated and state.global_step < state.max_steps and os.environ.get(SEARCH_GATE_ENV):
                wait_at_search_gate(Path(os.environ[SEARCH_GATE_ENV]), state.global_step, control)

        def on_train_end(self, args, state, control, **kwargs):
            self.close()

        def close(self):
            if self.view is not None:
                self.view.stop()
                self.view = None

    return Progress()


SEARCH_GATE_TIMEOUT_S = 600.0


stop_signal = threading.Event()  # SIGUSR1, SIGTERM or SIGINT arrived (preemption_callback)


def wait_at_search_gate(gate: Path, step: int, control) -> None:
    """A search trial's run waits after each evaluation until the trial lets it go on past `step` (the gate file
    holds a step at or beyond it) or ends it (SIGTERM: a checkpoint here, then stop), so a trial its scheduler
    stops ends at the step it was judged at. Only a run of one process waits (ranks would wait in different
    places); after SEARCH_GATE_TIMEOUT_S without an answer it goes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    deadline = time.monotonic() + SEARCH_GATE_TIMEOUT_S
    while time.monotonic() < deadline:
        if stop_signal.is_set():
            control.should_save = True
            control.should_training_stop = True
            return
        try:
            if json.loads(gate.read_text()).get("step", -1) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    print(
        f"search: no answer after the evaluation at step {step} for {SEARCH_GATE_TIMEOUT_S:.0f} s; going on",
        flush=True,
    )


class Preempted(Exception):
    """SIGUSR1/SIGTERM/SIGINT arrived: a checkpoint was saved and training stopped (SLURM preemption, Ctrl-C of a sweep)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum} after saving a checkpoint")
        self.signum = signum


def preemption_callback():
    """On SIGUSR1, SIGTERM or Ctrl-C: save a checkpoint at the end of the current step, then stop training.

    SLURM sends SIGUSR1 before the time limit (`--signal=B:USR1@120`, forwarded by the batch script); a
    sweep's Ctrl-C reaches its runs as SIGINT or SIGTERM. Either way the run resumes from that checkpoint when
    started again. A second Ctrl-C stops at once.
    """
    import signal

    from transformers import TrainerCallback

    class Preemption(TrainerCallback):
        signum: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.signum is not None:
                control.should_save = True
                control.should_training_stop = True

    callback = Preemption()

    def handler(signum, frame):
        if signum == signal.SIGINT and callback.signum is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        callback.signum = signum
        stop_signal.set()

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (in-process use from a thread): no signal handling
            pass
    return callback


def process_started_at() -> float:
    """When this run's process was started: by its launcher's clock (TUNEFLEET_STARTED_AT, set for warm and cold
    starts alike), else the process's own start time from /proc."""
    stamp = started_at()
    if stamp is not None:
        return stamp
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def startup_clock():
    """Notes when the first training step begins: run.json's `startup` is the time from process start to it."""
    from transformers import TrainerCallback

    class StartupClock(TrainerCallback):
        first_step_at: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first_step_at is None:
                self.first_step_at = time.time()

        def record(self) -> dict:
            seconds = None if self.first_step_at is None else round(self.first_step_at - process_started_at(), 2)
            kind = os.environ.get(START_KIND_ENV, "cold")
            out = {"kind": kind, "to_first_step_s": seconds}
            if kind == "warm":  # which warm process it was forked from: a launcher's own, or one it was given
                out["warm_process"] = os.environ.get(WARM_SOCKET_ENV)
            return out

    return StartupClock()


def close_progress(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        if hasattr(callback, "close") and callable(callback.close):
            callback.close()
