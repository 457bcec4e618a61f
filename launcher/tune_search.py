"""A spec's `search:` on Ray Tune: per method, trials that are tunefleet runs; then the best confirmed over seeds.

Each method gets a `ray.tune.Tuner` of its own (ASHA compares trials of one method: DPO's eval loss is not KTO's).
A trial is a Tune class trainable that runs one tunefleet run (run_one: the same launch as a Ray sweep's runs, one
process or `accelerate launch`, warm-started) in `<runs_dir>/trials/<method>_<model>_<trial id>` and hands Tune
each evaluation the run logs (progress.json) as one result: `step` (training steps, ASHA's time) and the metric.
After each evaluation the run waits at a gate (a local file, trainers.callbacks.wait_at_search_gate) until Tune asks
for the trial's next result (go on) or ends the trial: then Tune calls its `cleanup`, the run gets SIGTERM, saves a
checkpoint at the step it was judged at and exits, and its run.json becomes `stopped` with the step and the last
metric; no process is left behind.

Tune's own state lives under `<runs_dir>/tune/<method>` (a folder or the runs' object store): rerunning the same
command restores each method's search (`Tuner.restore`): finished and stopped trials are kept, unfinished ones
start again and their runs resume from their checkpoints, failed ones are retried.

After the search, `confirm:` reruns each method's best configuration (the best finished trial by its last
metric) once per confirm value, at full length, evaluates those runs with the evaluator and writes
`search_report.md`: per method the chosen values and mean ± std over the seeds of every metric, the search plots
(metric against each searched value, stopped trials marked) and the training steps early stopping saved.

Why one module of this size: the trial (Tune's trainable), one method's search, the confirmation and the search's
report share the trial records and Tune's state folder; each part is a section below.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from tunefleet.common.contract import (
    NODE_ID_ENV,
    PROGRESS_FILE,
    RUN_RECORD,
    SEARCH_GATE_ENV,
    SEARCH_RECORD,
)
from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.common.jsonfile import utc_now, write_json_atomic
from tunefleet.common.runlock import RunLock
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import Store, is_uri, join
from tunefleet.launcher import sweep as sweeps
from tunefleet.launcher.placement import Placement
from tunefleet.launcher.ray_session import ray_for_runs
from tunefleet.launcher.records import RunOutcome, RunPlan
from tunefleet.launcher.search_settings import SearchSettings, reported_name
from tunefleet.launcher.sweep_record import RunEntry, SweepRecord
from tunefleet.trainers import config
from tunefleet.trainers.config import model_short

TRIALS = "trials"  # <runs_dir>/trials/<trial run>
TUNE_STATE = "tune"  # <runs_dir>/tune/<method>: Tune's experiment state


# the backend's runs of a search's confirmation: (the search's spec, the runs) -> their outcomes
ConfirmRunner = Callable[[sweeps.SweepSpec, list[RunPlan]], list[RunOutcome]]


@dataclass
class TrialSetup:
    """What every trial of one method needs (sent to Tune's actors): its runs' settings and where they go."""

    search: str  # the spec's name (trackers group its runs by it)
    method: str
    values: dict[str, Any]  # base < methods[method]: the flags every trial shares
    runs_dir: str  # absolute, or a URI
    metric: str
    placement: Placement
    cwd: str  # the driver's folder: relative data paths in the spec mean what they meant there
    starts_from: str | None = None  # a search stage's parent run (trials are still named by the spec's model)

    @property
    def probe(self) -> RunPlan:
        """A plan of this method's trials (before sampling) whose data the sweep checks first."""
        return self.plan("check", {})

    def plan(self, trial_id: str, sampled: dict[str, Any]) -> RunPlan:
        name = f"{self.method}_{model_short(str(self.values.get('model_name') or 'model'))}_{trial_id}"
        values = {
            **self.values,
            **({"model_name": self.starts_from} if self.starts_from else {}),
            **sampled,
            "method": self.method,
            "output_dir": join(self.runs_dir, TRIALS, name),
            "run_name": name,
            "tracking_group": self.search,
        }
        return RunPlan(name, config.from_dict(values, where=f"trial {name}: "), self.placement)


class TrialRun(tune.Trainable):
    """One trial: a tunefleet run in a thread of this actor; each of its evaluations is one Tune result."""

    # Tune passes tune.with_parameters' values to setup() as keyword arguments: the override adds one
    def setup(self, config: dict[str, Any], trial: TrialSetup | None = None) -> None:  # pyright: ignore[reportIncompatibleMethodOverride] - see above
        from tunefleet.launcher.execute import run_one

        assert trial is not None
        if os.path.isdir(trial.cwd):
            os.chdir(trial.cwd)  # Tune starts a trial in its own folder
        self.trial = trial
        self.plan = trial.plan(self.trial_id, config)
        self.key = reported_name(trial.metric)
        self.reported_step = -1
        self.queue: list[tuple[int, float]] = []
        self.last: tuple[int, float] | None = None
        self.outcome: dict[str, Any] = {}
        # The run waits after each evaluation until this trial lets it go on (step() is called again: Tune keeps
        # it) or ends it (cleanup(): SIGTERM), so a stopped trial ends at the step it was judged at.
        self.gate = Path(tempfile.mkdtemp(prefix="tunefleet-trial-")) / "gate.json"
        env = {NODE_ID_ENV: node_id(), SEARCH_GATE_ENV: str(self.gate)}

        def work():
            try:
                self.outcome["run"] = run_one(self.plan, env)
            except Exception as exc:  # a launch that cannot start: the trial fails with its reason
                self.outcome["error"] = f"{type(exc).__name__}: {first_line(exc)}"

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()

    def step(self) -> dict[str, Any]:
        if self.last is not None:
            self.open_gate(self.last[0])  # Tune asks for more: the run goes on past its last evaluation
        while True:
            self.collect()
            if self.queue:
                self.last = self.queue.pop(0)
                return {self.key: self.last[1], "step": self.last[0]}
            if not self.thread.is_alive():
                return self.ended()
            time.sleep(0.5)

    def open_gate(self, step: int) -> None:
        write_json_atomic(self.gate, {"step": step}, durable=False)

    def collect(self) -> None:
        """New evaluations from the run's progress.json, oldest first."""
        progress = Store(self.plan.output_dir).read_json(PROGRESS_FILE) or {}
        for evaluation in progress.get("evaluations") or []:
            step, value = evaluation.get("step"), evaluation.get(self.trial.metric)
            if isinstance(step, int) and isinstance(value, int | float) and step > self.reported_step:
                self.queue.append((step, float(value)))
                self.reported_step = step

    def ended(self) -> dict[str, Any]:
        run = self.outcome.get("run")
        if run is not None and run.ok:
            if self.last is None:
                raise TunefleetError(
                    f"{self.plan.name} finished without an evaluation: set eval_steps at most max_steps"
                )
            return {self.key: self.last[1], "step": run.steps or self.last[0], "done": True}
        why = run.error if run is not None else self.outcome.get("error")
        status = run.status if run is not None else RunStatus.FAILED
        raise TunefleetError(f"{self.plan.name} {status}: {why} (log: {join(self.plan.output_dir, 'train.log')})")

    def cleanup(self) -> None:
        """Tune ends the trial while its run trains (ASHA stopped it): the run saves a checkpoint and exits."""
        from tunefleet.launcher.execute import terminate_children

        try:
            if not self.thread.is_alive():
                return
            if self.last is not None and self.last[0] >= self.plan.config.max_steps:
                self.open_gate(self.last[0])
                self.thread.join()  # its last evaluation came in (ASHA's max_t): the run is saving its adapter
                return
            terminate_children()  # SIGTERM: the run, waiting at its gate, saves a checkpoint there and exits
            self.thread.join(timeout=120)
            mark_stopped(self.plan.output_dir, self.trial.metric, self.last)
        finally:
            shutil.rmtree(self.gate.parent, ignore_errors=True)


def trial_folder(trial: Any) -> str:
    return trial.trial_id


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def mark_stopped(output_dir: str, metric: str, last: tuple[int, float] | None) -> None:
    store = Store(output_dir)
    record = store.read_json(RUN_RECORD) or {}
    record["status"] = RunStatus.STOPPED
    record["stopped"] = {
        "by": "the search's scheduler",
        "at": utc_now(),
        "step": record.get("global_step"),
        "last_evaluation_step": last[0] if last else None,
        metric: last[1] if last else None,
    }
    store.write_json(RUN_RECORD, record)


# ---------------------------------------------------------------- the search, per method
@dataclass
class TrialResult:
    """One trial as the search ended: its run, its sampled values, where it stopped and its last metric."""

    name: str
    method: str
    values: dict[str, Any]
    status: RunStatus
    steps: int
    metric: float | None
    output_dir: str
    error: str | None = None
    cost: dict[str, Any] | None = None  # its run.json `cost` (train time, GPU-seconds, tokens)

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class MethodSearch:
    method: str
    trials: list[TrialResult]
    max_steps: int
    best: TrialResult | None = None

    @property
    def steps_used(self) -> int:
        return sum(t.steps for t in self.trials)

    @property
    def steps_without_stopping(self) -> int:
        return self.max_steps * len(self.trials)

    def saved(self) -> dict[str, Any]:
        """What early stopping saved: the steps the stopped trials did not train, and their time and GPU-seconds
        at the trials' own mean cost per step (run.json `cost`)."""
        costs = [t.cost for t in self.trials if t.cost and t.steps]
        steps = sum(t.steps for t in self.trials if t.cost and t.steps)
        saved_steps = self.steps_without_stopping - self.steps_used
        out: dict[str, Any] = {"steps": saved_steps}
        if costs and steps:
            out["train_seconds"] = round(saved_steps * sum(c.get("train_seconds") or 0 for c in costs) / steps, 1)
            out["gpu_seconds"] = round(saved_steps * sum(c.get("gpu_seconds") or 0 for c in costs) / steps, 1)
        return out

    def record(self) -> dict[str, Any]:
        return {
            "trials": [t.record() for t in self.trials],
            "best": self.best.record() if self.best else None,
            "steps_used": self.steps_used,
            "steps_without_early_stopping": self.steps_without_stopping,
            "saved_by_early_stopping": self.saved(),
        }


def trial_setups(spec: sweeps.SweepSpec, settings: SearchSettings) -> dict[str, TrialSetup]:
    """Per method: the shared flags, checked with each distribution's first value (`probe`, whose data is checked
    before anything starts), and the trials' place (a GPU share, whole GPUs or CPU, as sweep runs are placed)."""
    runs_dir = spec.runs_dir if is_uri(spec.runs_dir) else str(Path(spec.runs_dir).resolve())
    setups = {}
    for method, flags in settings.space.items():
        values = {**spec.base, **spec.methods.get(method, {}), "method": method}
        metric = settings.metric_for(method)
        setup = TrialSetup(
            spec.name, method, values, runs_dir, metric, Placement(0.0, "CPU"), os.getcwd(), spec.starts_from
        )
        (placed,) = sweeps.place_runs([setup.plan("check", {f: d.values[0] for f, d in flags.items()})], spec)
        setup.placement = placed.placement
        setups[method] = setup
    return setups


def plan_text(spec: sweeps.SweepSpec, settings: SearchSettings, setups: dict[str, TrialSetup]) -> str:
    """--dry-run: what each method searches, how, where its trials run, and what confirm reruns."""
    asha = (
        f"asha (grace_period {settings.grace_period}, reduction_factor {settings.reduction_factor}, max_t "
        f"{settings.max_t or 'max_steps'}, in training steps)"
        if settings.scheduler == "asha"
        else "fifo (every trial to its end)"
    )
    lines = [
        f"search {spec.name}: {settings.num_samples} trials per method by {settings.searcher}, {asha}; "
        "each trial's metric from its run's evaluation every eval_steps",
        f"  trials: {join(spec.runs_dir, TRIALS)}/<method>_<model>_<trial id>; Tune's state: "
        f"{join(spec.runs_dir, TUNE_STATE)}/<method> (a rerun restores it)",
    ]
    for method, setup in setups.items():
        p = setup.placement
        where = f"{p.gpus:g} GPU" if p.gpus else "CPU"
        lines.append(
            f"  {method}: {setup.metric} ({settings.direction(method)}), max_steps {setup.values.get('max_steps')}, "
            f"placement {where}, {p.cpus} CPU"
        )
        lines += [f"    {dist.describe()}" for dist in settings.space[method].values()]
    if settings.confirm:
        lines.append(
            "confirm: each method's best values, over "
            + ", ".join(f"{k} {v}" for k, v in settings.confirm.items())
            + ", then evaluated"
        )
    return "\n".join(lines)


def search_method(
    spec: sweeps.SweepSpec, settings: SearchSettings, setup: TrialSetup, retries: int, seed: int
) -> MethodSearch:
    """Run (or restore and finish) one method's Tuner; the trials as they ended and the best finished one."""
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner

    method = setup.method
    storage, filesystem = Store(join(spec.runs_dir, TUNE_STATE)).for_ray()
    trainable = tune.with_resources(
        tune.with_parameters(TrialRun, trial=setup),
        {"cpu": setup.placement.cpus, "gpu": setup.placement.gpus},
    )
    experiment = join(storage, method)  # a local path, or the store's path without its scheme
    if Tuner.can_restore(experiment, storage_filesystem=filesystem):
        print(f"search {method}: restoring from {join(spec.runs_dir, TUNE_STATE, method)}", flush=True)
        tuner = Tuner.restore(
            experiment,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    else:
        space = {flag: dist.sampler() for flag, dist in settings.space[method].items()}
        tuner = Tuner(
            trainable,
            param_space=space,
            tune_config=TuneConfig(
                metric=reported_name(setup.metric),
                mode=settings.direction(method),
                num_samples=settings.num_samples,
                search_alg=searcher(settings, seed),
                scheduler=scheduler(settings, int(setup.values.get("max_steps") or 0)),
                # Tune applies this limit to a Searcher (Optuna's); the random and grid generator takes its own
                max_concurrent_trials=settings.max_concurrent if settings.searcher == "optuna" else None,
                reuse_actors=False,  # one run per actor: cleanup() ends exactly that run
                trial_dirname_creator=trial_folder,
            ),
            run_config=RunConfig(
                name=method,
                storage_path=storage,
                storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=retries),
                checkpoint_config=CheckpointConfig(checkpoint_at_end=False),
                callbacks=[TrialLines(method, setup.metric)],
                verbose=0,
            ),
        )
    grid = tuner.fit()
    trials = []
    for result in grid:
        trial_id = Path(result.path).name if result.path else ""  # trial_folder(): the trial's id
        run = setup.plan(trial_id, dict(result.config or {})) if trial_id else None
        trials.append(trial_result(setup, result, run))
    found = MethodSearch(method, trials, int(setup.values.get("max_steps") or 0))
    finished = [t for t in trials if t.status is RunStatus.FINISHED and t.metric is not None]
    if finished:
        sign = 1 if settings.direction(method) == "min" else -1
        found.best = min(finished, key=lambda t: sign * (t.metric or 0.0))
    return found


def trial_result(setup: TrialSetup, result: Any, run: RunPlan | None) -> TrialResult:
    metrics = result.metrics or {}
    record = (Store(run.output_dir).read_json(RUN_RECORD) or {}) if run else {}
    status = RunStatus.of(record.get("status")) or RunStatus.FAILED
    value = metrics.get(reported_name(setup.metric))
    return TrialResult(
        name=run.name if run else "?",
        method=setup.method,
        values=dict(result.config or {}),
        status=status,
        steps=int(record.get("global_step") or metrics.get("step") or 0),
        metric=float(value) if isinstance(value, int | float) else None,
        output_dir=run.output_dir if run else "",
        error=trial_error(result.error),
        cost=record.get("cost") if isinstance(record.get("cost"), dict) else None,
    )


def trial_error(error: BaseException | None) -> str | None:
    """The trial's own reason (Ray wraps it: its first line names the actor, not what went wrong)."""
    if error is None:
        return None
    cause = getattr(error, "cause", None)
    return first_line(cause if isinstance(cause, BaseException) else error)


def searcher(settings: SearchSettings, seed: int) -> Any:
    if settings.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=settings.max_concurrent or 0)


def scheduler(settings: SearchSettings, max_steps: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        max_t=settings.max_t or max_steps,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )


class TrialLines(tune.Callback):
    """One line per trial event (started, evaluated, stopped, finished, failed), as the sweep's view prints."""

    def __init__(self, method: str, metric: str):
        self.method, self.metric, self.t0 = method, metric, time.time()

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.t0:6.1f}s] {self.method} {text}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.say(f"trial {trial.trial_id}: running ({described(trial.config)})")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(reported_name(self.metric))
        if isinstance(value, int | float):
            self.say(f"trial {trial.trial_id}: step {result.get('step')} {self.metric} {value:.4g}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.say(f"trial {trial.trial_id}: ended at step {(trial.last_result or {}).get('step')}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.say(f"trial {trial.trial_id}: failed")


# ---------------------------------------------------------------- the whole search, then confirm
def run_search(
    spec: sweeps.SweepSpec,
    setups: dict[str, TrialSetup],
    address: str | None,
    retries: int,
    run_confirm: ConfirmRunner,
) -> int:
    """The search of every method on Ray (the cluster at `address`, else a local Ray started for it), then the
    confirmation runs, their evaluation and the report. Exit code: 1 when a trial or confirm run failed."""
    settings = spec.search
    assert settings is not None
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    seed = int(spec.base.get("seed") or 0)
    with ray_for_runs(address):
        found = {m: locked_search(spec, settings, setups[m], retries, seed) for m in settings.methods}
        state = search_record(spec, settings, found)
        Store(spec.runs_dir).write_json(SEARCH_RECORD, state)
        record_sweep(spec, found)
        print(search_table(settings, found))
        code = 1 if any(t.status is RunStatus.FAILED for f in found.values() for t in f.trials) else 0
        if settings.confirm:
            code = max(code, confirm(spec, settings, found, address, run_confirm, state))
        write_search_report(spec, settings, found, state)
        print(f"search: {join(spec.runs_dir, 'search.json')}, report: {join(spec.runs_dir, 'search_report.md')}")
        return code


def locked_search(
    spec: sweeps.SweepSpec, settings: SearchSettings, setup: TrialSetup, retries: int, seed: int
) -> MethodSearch:
    """One method's search, by one driver at a time: a second driver of the same spec waits, then restores it (its
    finished trials are kept, so it trains none of them again)."""
    name = f".tunefleet-search-{setup.method}.lock"
    with RunLock(Store(spec.runs_dir), sweep=spec.name, purpose=f"{setup.method} search", name=name).acquire_waiting():
        return search_method(spec, settings, setup, retries, seed)


def record_sweep(spec: sweeps.SweepSpec, found: dict[str, MethodSearch], confirmed: list | None = None) -> None:
    """sweep.json: every trial (and confirm run) with its status, so `tunefleet status` shows the search."""
    record = SweepRecord.read(spec.runs_dir) or SweepRecord(name=spec.name, spec=spec.path, backend="ray")
    record.name, record.spec, record.backend = spec.name, spec.path, "ray"
    for f in found.values():
        for t in f.trials:
            record.runs[t.name] = RunEntry(t.output_dir, t.method, t.status, outcome={"steps": t.steps}, trial=True)
    for outcome, output_dir, method in confirmed or []:
        record.runs[outcome.name] = RunEntry(output_dir, method, outcome.status, confirm=True)
    record.ended_at = utc_now()
    record.write(spec.runs_dir)


def search_record(spec: sweeps.SweepSpec, settings: SearchSettings, found: dict[str, MethodSearch]) -> dict:
    return {
        "name": spec.name,
        "metrics": {m: {"metric": settings.metric_for(m), "mode": settings.direction(m)} for m in found},
        "searcher": settings.searcher,
        "scheduler": settings.scheduler,
        "ended_at": utc_now(),
        "methods": {m: f.record() for m, f in found.items()},
    }


def search_table(settings: SearchSettings, found: dict[str, MethodSearch]) -> str:
    lines = []
    for method, f in found.items():
        stopped = sum(t.status is RunStatus.STOPPED for t in f.trials)
        lines.append(
            f"search {method}: {len(f.trials)} trials, {stopped} stopped early; {f.steps_used} of "
            f"{f.steps_without_stopping} training steps"
        )
        for t in sorted(f.trials, key=lambda t: t.name):
            value = f"{t.metric:.4f}" if t.metric is not None else "-"
            mark = "  <- best" if f.best and t.name == f.best.name else ""
            lines.append(
                f"  {t.name}  {t.status:<9} step {t.steps:<5} {settings.metric_for(method)} {value}  "
                f"{described(t.values)}{mark}"
            )
            if t.error:
                lines.append(f"    {t.error}")
        if f.best is None:
            lines.append(f"  no trial of {method} finished: nothing to confirm")
    return "\n".join(lines)


def confirm(
    spec: sweeps.SweepSpec,
    settings: SearchSettings,
    found: dict[str, MethodSearch],
    address: str | None,
    run_confirm: ConfirmRunner,
    state: dict,
) -> int:
    """Each method's best values rerun once per confirm value, at full length, then evaluated."""
    from tunefleet.eval.evaluate import evaluate
    from tunefleet.launcher.progress import final_table

    best = {m: f.best.values for m, f in found.items() if f.best is not None}
    if not best:
        return 1
    runs = sweeps.place_runs(sweeps.expand_confirm(spec, settings.confirm, best), spec)
    outcomes = run_confirm(spec, runs)
    print(final_table(outcomes))
    by_name = {r.name: r for r in runs}
    state["confirm"] = {o.name: {"status": o.status, "output_dir": by_name[o.name].output_dir} for o in outcomes}
    Store(spec.runs_dir).write_json(SEARCH_RECORD, state)
    record_sweep(spec, found, [(o, by_name[o.name].output_dir, by_name[o.name].method) for o in outcomes])
    names = [o.name for o in outcomes if o.ok]
    if not names:
        return 1
    evaluate(
        spec.runs_dir, dataclasses.replace(spec.eval, backend=spec.eval.backend or "ray", runs=names), None, address
    )
    return 0 if len(names) == len(outcomes) else 1


# ---------------------------------------------------------------- report
def write_search_report(
    spec: sweeps.SweepSpec, settings: SearchSettings, found: dict[str, MethodSearch], state: dict
) -> None:
    """search_report.md (and a plot per method) in runs_dir: the confirmed comparison first, then the search."""
    from tunefleet.eval.report import SUMMARY
    from tunefleet.eval.results import load_results, results_path

    results = load_results(results_path(spec.runs_dir))
    confirmed = state.get("confirm") or {}  # search.json's record, as confirm() left it
    lines = [
        f"# Search {spec.name}: {settings.searcher} searcher, {settings.scheduler} scheduler",
        "",
    ]
    if confirmed:
        shown = [m for m in SUMMARY if any(isinstance(results.get(n, {}).get(m), int | float) for n in confirmed)]
        lines += [
            f"## Best configuration per method, over {' × '.join(f'{k} {v}' for k, v in settings.confirm.items())}",
            "",
            "| method | chosen | runs | " + " | ".join(shown) + " |",
            "|---|---|---|" + "---|" * len(shown),
        ]
        for method, f in found.items():
            if f.best is None:
                continue
            mine = [n for n, c in confirmed.items() if (results.get(n) or {}).get("method") == method]
            cells = []
            for metric in shown:
                values = [results[n][metric] for n in mine if isinstance(results.get(n, {}).get(metric), int | float)]
                cells.append(mean_std(values))
            chosen = described(f.best.values)
            lines.append(f"| {method} | {chosen} | {len(mine)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## The search", ""]
    for method, f in found.items():
        saved = f.saved()
        cost = (
            f", about {saved['train_seconds']} s of training and {saved['gpu_seconds'] / 3600:.4f} GPU-hours at the "
            "trials' cost per step"
            if "train_seconds" in saved
            else ""
        )
        lines += [
            f"### {method}: {len(f.trials)} trials, {sum(t.status is RunStatus.STOPPED for t in f.trials)} stopped early",
            "",
            f"Training steps: {f.steps_used} of {f.steps_without_stopping} had every trial run to the end "
            f"({saved['steps']} saved by early stopping{cost}).",
            "",
            f"Compared by {settings.metric_for(method)} ({settings.direction(method)}) at each trial's last evaluation.",
            "",
            f"| trial | status | steps | {settings.metric_for(method)} | values |",
            "|---|---|---|---|---|",
        ]
        sign = 1 if settings.direction(method) == "min" else -1
        for t in sorted(f.trials, key=lambda t: (t.metric is None, sign * (t.metric or 0.0))):
            value = f"{t.metric:.4f}" if t.metric is not None else "–"
            best = " **best**" if f.best and t.name == f.best.name else ""
            lines.append(f"| {t.name}{best} | {t.status} | {t.steps} | {value} | {described(t.values)} |")
        plot = plot_search(spec.runs_dir, settings, f)
        if plot:
            lines += ["", f"![{method}]({plot})"]
        lines.append("")
    Store(spec.runs_dir).write_bytes("search_report.md", "\n".join(lines).encode())


def described(values: dict[str, Any]) -> str:
    """`learning_rate 0.00292, beta 0.171`: sampled values, three significant digits."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def plot_search(runs_dir: str, settings: SearchSettings, found: MethodSearch) -> str | None:
    """search_<method>.png: the metric against each searched value; stopped trials hollow. Its file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flags = list(settings.space[found.method])
    scored = [t for t in found.trials if t.metric is not None]
    if not scored:
        return None
    fig, axes = plt.subplots(1, len(flags), figsize=(4 * len(flags), 3.2), squeeze=False)
    for ax, flag in zip(axes[0], flags):
        dist = settings.space[found.method][flag]
        for stopped in (False, True):
            chosen = [t for t in scored if (t.status is RunStatus.STOPPED) is stopped]
            xs = [t.values.get(flag) for t in chosen]
            ys = [t.metric for t in chosen]
            ax.scatter(
                xs,
                ys,
                facecolors="none" if stopped else "C0",
                edgecolors="C0",
                label="stopped early" if stopped else "ran to the end",
            )
        if found.best is not None:
            ax.scatter([found.best.values.get(flag)], [found.best.metric], marker="*", s=160, color="C3", label="best")
        if dist.kind == "loguniform":
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones overlap
        ax.set_xlabel(flag)
        ax.set_ylabel(settings.metric_for(found.method))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{found.method}: {settings.metric_for(found.method)} at each trial's last evaluation")
    fig.tight_layout()
    name = f"search_{found.method}.png"
    local = Path(runs_dir) / name if not is_uri(runs_dir) else Path(os.environ.get("TMPDIR", "/tmp")) / name
    local.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(local, dpi=100)
    plt.close(fig)
    if is_uri(runs_dir):
        Store(runs_dir).write_bytes(name, local.read_bytes())
        local.unlink()
    return name
