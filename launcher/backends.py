"""Where a sweep's runs execute: local processes or Ray. (SLURM: launcher/slurm.py.)

Both backends read as the same steps: check resources -> queue every run -> as slots free up, start the
next -> a failed run is retried up to `retries` times, then reported -> the others go on.
"""

from __future__ import annotations

import os
import queue
import threading

from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.common.raycluster import ensure_ray
from tunefleet.common.status import RunStatus
from tunefleet.launcher.progress import SweepView
from tunefleet.launcher.runner import RunOutcome, run_one, stopping, terminate_children
from tunefleet.launcher.sweep import Resources, RunPlan


def local_slots(resources: Resources, gpu_count: int, cpu_count: int) -> tuple[int, list[list[str]]]:
    """How many runs fit at once here, and the GPU ids each slot owns (pure)."""
    if resources.gpus_per_run > 0:
        if gpu_count < resources.gpus_per_run:
            raise TunefleetError(
                f"each run needs {resources.gpus_per_run} GPU(s) but this machine has {gpu_count}; "
                "lower resources.gpus_per_run or use --backend ray/slurm"
            )
        n = gpu_count // resources.gpus_per_run
        groups = [
            [str(g) for g in range(i * resources.gpus_per_run, (i + 1) * resources.gpus_per_run)] for i in range(n)
        ]
    else:
        n = max(1, cpu_count // max(1, resources.cpus_per_run))
        groups = [[] for _ in range(n)]
    if resources.max_parallel:
        n = min(n, resources.max_parallel)
        groups = groups[:n]
    return n, groups


def run_local(runs: list[RunPlan], resources: Resources, retries: int, view: SweepView) -> list[RunOutcome]:
    import torch

    n, gpu_groups = local_slots(
        resources, torch.cuda.device_count() if torch.cuda.is_available() else 0, os.cpu_count() or 1
    )
    pending: queue.Queue = queue.Queue()
    for run in runs:
        pending.put(run)
    outcomes: dict[str, RunOutcome] = {}
    lock = threading.Lock()

    # Each run gets its own cores' worth of threads, as Ray does: N runs x all cores each would thrash the CPU.
    cpu_env = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(resources.cpus_per_run)}

    def slot(gpus: list[str]):
        env = {**cpu_env, **({"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {})}
        while True:
            try:
                run = pending.get_nowait()
            except queue.Empty:
                return
            for attempt in range(retries + 1):
                if stopping.is_set():
                    return
                with lock:
                    view.set(run.name, RunStatus.RUNNING, f"(attempt {attempt + 1})" if attempt else "")
                try:
                    outcome = run_one(run, env)
                except Exception as exc:  # a launch that cannot even start: recorded, and the sweep goes on
                    log = os.path.join(run.output_dir, "train.log")
                    outcome = RunOutcome(
                        run.name, RunStatus.FAILED, log, error=f"{type(exc).__name__}: {first_line(exc)}"
                    )
                if outcome.ok:
                    break
            with lock:
                outcomes[run.name] = outcome
                view.set(run.name, outcome.status, outcome.error or "")

    threads = [threading.Thread(target=slot, args=(g,), daemon=True) for g in gpu_groups[:n]]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(timeout=1.0)
                view.refresh()
    except KeyboardInterrupt:
        terminate_children()
        raise
    return [outcomes[r.name] for r in runs if r.name in outcomes]


def check_ray_resources(resources: Resources, nodes: list[dict]) -> None:
    """Refuse up front a run that no node can hold (pure: `nodes` as from ray.nodes())."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    max_gpus = max((r.get("GPU", 0) for r in alive), default=0)
    max_cpus = max((r.get("CPU", 0) for r in alive), default=0)
    if resources.gpus_per_run > max_gpus:
        raise TunefleetError(
            f"each run needs {resources.gpus_per_run} GPU(s) but the largest Ray node has "
            f"{int(max_gpus)}; lower resources.gpus_per_run or add bigger nodes"
        )
    if resources.cpus_per_run > max_cpus:
        raise TunefleetError(
            f"each run needs {resources.cpus_per_run} CPU(s) but the largest Ray node has "
            f"{int(max_cpus)}; lower resources.cpus_per_run"
        )


def run_ray(
    runs: list[RunPlan], resources: Resources, retries: int, view: SweepView, address: str | None
) -> list[RunOutcome]:
    import ray

    started = ensure_ray(address)
    try:
        check_ray_resources(resources, ray.nodes())
        # One task per run on the resources it asks for; Ray queues what does not fit. A task whose worker
        # or node dies is re-executed by Ray (max_retries) and the run resumes from its checkpoint.
        remote_run = ray.remote(run_one).options(
            num_cpus=resources.cpus_per_run,
            num_gpus=resources.gpus_per_run,
            max_retries=3,
            retry_exceptions=False,
            memory=int(resources.memory_gb * 2**30) if resources.memory_gb else None,
        )
        attempts = {r.name: 0 for r in runs}
        by_name = {r.name: r for r in runs}
        inflight = {}

        def submit(run: RunPlan):
            attempts[run.name] += 1
            inflight[remote_run.remote(run)] = run.name

        for run in runs:
            submit(run)
        outcomes: dict[str, RunOutcome] = {}
        running = set()
        try:
            while inflight:
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                _mark_running(by_name, inflight, running, view)
                for ref in done:
                    name = inflight.pop(ref)
                    running.discard(name)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        log = os.path.join(by_name[name].output_dir, "train.log")
                        outcome = RunOutcome(name, RunStatus.FAILED, log, error=first_line(exc))
                    if not outcome.ok and attempts[name] <= retries:
                        view.set(name, RunStatus.QUEUED, f"retry {attempts[name]}/{retries}: {outcome.error or ''}")
                        submit(by_name[name])
                        continue
                    outcomes[name] = outcome
                    view.set(name, outcome.status, outcome.error or "")
                view.refresh()
        except KeyboardInterrupt:
            for ref in inflight:
                ray.cancel(ref, force=True)  # kills the worker; its training child gets SIGTERM (PDEATHSIG)
            raise
        return [outcomes[r.name] for r in runs if r.name in outcomes]
    finally:
        if started:
            ray.shutdown()


def _mark_running(by_name: dict[str, RunPlan], inflight: dict, running: set, view: SweepView) -> None:
    """A run counts as running once its process has written launch.json (Ray queues the rest)."""
    for name in inflight.values():
        launch = os.path.join(by_name[name].output_dir, "launch.json")
        if name not in running and os.path.exists(launch) and os.path.getmtime(launch) >= view.t0:
            running.add(name)
            view.set(name, RunStatus.RUNNING)
