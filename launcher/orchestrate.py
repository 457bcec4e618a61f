"""What runs when in a sweep, whatever the backend: the plan checked, the runs run (a pipeline's children once
their parent finished, a stage's best parent chosen by evaluating its stage), the record kept, the evaluation after,
then the search stages. The one place that picks a backend by its name; everything else goes through `Backend`.

    backend = backend_for("ray", options)
    code = run_sweep(spec, backend, options)       # a plain sweep or a pipeline
    code = run_search_spec(spec, backend, options) # a spec with `search:`
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from tunefleet.common.contract import LAUNCH_FILE, RESULTS_FILE
from tunefleet.common.errors import TunefleetError
from tunefleet.common.jsonfile import utc_now
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import Store, is_uri, join
from tunefleet.eval.settings import EvalSettings
from tunefleet.launcher import manifest, plan_check
from tunefleet.launcher import sweep as sweeps
from tunefleet.launcher.backend import Backend, Ran, SweepOptions
from tunefleet.launcher.records import RunOutcome, RunPlan
from tunefleet.launcher.sweep_record import OUTCOME_FIELDS, RunEntry, SweepRecord

BACKENDS = ("local", "ray", "slurm")  # as `--backend` spells them


def backend_for(name: str, options: SweepOptions) -> Backend:
    """The backend `--backend NAME` means, set up with the sweep's options."""
    if name == "local":
        from tunefleet.launcher.backends import LocalBackend

        return LocalBackend(options)
    if name == "ray":
        from tunefleet.launcher.backends import RayBackend

        return RayBackend(options)
    if name == "slurm":
        from tunefleet.launcher.slurm import SlurmBackend

        return SlurmBackend(options)
    raise TunefleetError(f"unknown backend '{name}': one of {', '.join(BACKENDS)}")


def run_sweep(spec: sweeps.SweepSpec, backend: Backend, options: SweepOptions) -> int:
    """A plain sweep or a pipeline: plan, check, run, record, evaluate, then the search stages. The exit code."""
    from tunefleet.launcher.progress import final_table

    searches = [stage for stage in spec.stages if stage.search is not None]
    if searches:
        backend.check_search()
    runs = sweeps.place_runs(sweeps.expand(spec), spec, local_gpu_memory())
    if options.dry_run:
        return backend.dry_run(spec, runs, [search_stage_text(spec, stage) for stage in searches])
    needs = plan_check.plan_needs(spec, runs, options.evaluate)
    if not options.skip_plan_check and needs:
        backend.check_plan(needs)
    backend.prepare()  # the runs' warm process imports while the data is checked and Ray starts
    sweeps.check_existing_runs(runs)
    loaded = sweeps.validate_data(runs) if not options.skip_data_check else None
    write_manifest(spec, runs, options, backend.name, loaded)
    record = SweepRecord(
        name=spec.name,
        spec=options.spec_path,
        backend=backend.name,
        runs={r.name: RunEntry(r.output_dir, r.method, RunStatus.QUEUED) for r in runs},
    )
    chosen: dict[str, dict[str, Any]] = {}  # a stage that takes the best run of another -> which, by what

    def choose(stage: str) -> tuple[RunPlan | None, str]:
        best, why, choice = best_parent(spec, stage, runs, backend, options.address)
        chosen[stage] = choice
        return best, why

    if backend.submits:  # SLURM: the backend writes its submission's record itself
        return backend.run(spec, runs, choose).exit_code
    record.write(spec.runs_dir)
    ran, code = Ran(), 0
    try:
        ran = backend.run(spec, runs, choose)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: stopped the running runs; they keep their checkpoints and resume on rerun", file=sys.stderr
        )
        code = 130
    record_outcomes(record, runs, ran, chosen)
    record.write(spec.runs_dir)
    print(final_table(ran.outcomes))
    failed = [o for o in ran.outcomes if not o.ok]
    if code:
        return code
    if options.evaluate:
        code = evaluate_sweep(spec, backend, options)
    for stage in searches:
        code = max(code, search_stage(spec, stage, runs, backend, options))
    return 1 if failed or code else 0


def record_outcomes(record: SweepRecord, runs: list[RunPlan], ran: Ran, chosen: dict[str, dict[str, Any]]) -> None:
    """What each run came to, every launch of it since the sweep started, its stage and parent, the choices."""
    for outcome in ran.outcomes:
        entry = record.runs[outcome.name]
        entry.status = outcome.status
        entry.outcome = outcome_fields(outcome)
    for run in runs:  # every launch of every run: where it ran and when (a run re-run after a node loss has two)
        launches = (Store(run.output_dir).read_json(LAUNCH_FILE) or {}).get("attempts", [])
        entry = record.runs[run.name]
        entry.placement = run.placement.record()
        entry.attempts = [
            {k: a[k] for k in ("host", "node_id", "started_at", "pid", "gang") if k in a}
            for a in launches
            if a.get("started_at", "") >= record.started_at
        ]
        if run.lineage:
            entry.stage = run.lineage.stage
            entry.parent = run.lineage.parent or (chosen.get(run.lineage.stage) or {}).get("run")
    record.choices.update(chosen)
    record.lost_nodes = ran.lost_nodes
    record.ended_at = utc_now()


def outcome_fields(outcome: RunOutcome) -> dict[str, Any]:
    fields = {k: getattr(outcome, k) for k in OUTCOME_FIELDS if k != "nodes"}
    return fields | ({"nodes": outcome.nodes} if outcome.nodes else {})  # a multi-node run: each node and its ranks


def run_search_spec(spec: sweeps.SweepSpec, backend: Backend, options: SweepOptions) -> int:
    """A spec with `search:`: each method's trials on Ray Tune, then `confirm:` (launcher/tune_search.py)."""
    from tunefleet.launcher import tune_search

    assert spec.search is not None
    backend.check_search()
    setups = tune_search.trial_setups(spec, spec.search)
    if options.dry_run:
        print(tune_search.plan_text(spec, spec.search, setups))
        return 0
    probes = [setup.probe for setup in setups.values()]
    needs = plan_check.plan_needs(spec, probes, True)
    if not options.skip_plan_check and needs:
        backend.check_plan(needs)
    loaded = sweeps.validate_data(probes) if not options.skip_data_check else None
    write_manifest(spec, probes, options, backend.name, loaded)
    return backend.search(spec, setups)


def write_manifest(
    spec: sweeps.SweepSpec,
    runs: list[RunPlan],
    options: SweepOptions,
    backend_name: str,
    loaded: dict[tuple, Any] | None = None,
) -> None:
    """study.json in the runs folder, before training; a rerun (--from) is checked against the study it reruns
    first: a difference is one line, or with --allow_drift recorded in the new manifest."""
    recorded = manifest.read(options.rerun_of) if options.rerun_of else None
    spec_data = manifest.spec_as_run(options.spec_path, spec.runs_dir, options.max_parallel)
    command = {"backend": backend_name, "eval": options.evaluate, "retries": options.retries}
    current = manifest.build(spec_data, runs, command, loaded)
    if recorded is not None and options.rerun_of:
        current.drift = manifest.check_drift(recorded, current, options.rerun_of, options.allow_drift) or None
        current.rerun_of = options.rerun_of
        for line in (current.drift or []) + manifest.unverifiable(recorded):
            print(f"warning: {options.rerun_of}: {line}", file=sys.stderr, flush=True)
    manifest.write(spec.runs_dir, current)


def stage_search_spec(spec: sweeps.SweepSpec, stage: sweeps.Stage, model: str | None) -> sweeps.SweepSpec:
    """A search stage as a spec of its own: the stage's settings, its runs and results in <runs_dir>/<stage>/, and
    its model the chosen parent run (None: the spec's model)."""
    base = {**stage.base, "stage": stage.name}
    if model is not None:
        model = model if is_uri(model) else str(Path(model).resolve())
    return sweeps.SweepSpec(
        name=f"{spec.name}-{stage.name}",
        runs_dir=join(spec.runs_dir, stage.name),
        base=base,
        methods=stage.methods,
        resources=stage.resources,
        naming=stage.naming or spec.naming,
        eval=stage.eval,
        path=spec.path,
        search=stage.search,
        starts_from=model,
    )


def search_stage_text(spec: sweeps.SweepSpec, stage: sweeps.Stage) -> str:
    from tunefleet.launcher import tune_search

    assert stage.search is not None
    where = (
        f"the best run of stage {stage.parent} by {stage.best}, once chosen" if stage.parent else "the spec's model"
    )
    sub = stage_search_spec(spec, stage, None)
    text = tune_search.plan_text(sub, stage.search, tune_search.trial_setups(sub, stage.search))
    return f"stage {stage.name}: a search from {where}, after the other stages\n" + text


def search_stage(
    spec: sweeps.SweepSpec, stage: sweeps.Stage, runs: list[RunPlan], backend: Backend, options: SweepOptions
) -> int:
    """Once the other stages ended: the stage's parent chosen (its stage evaluated), then its search from it."""
    from tunefleet.launcher import tune_search

    assert stage.search is not None
    model = None
    if stage.parent is not None:
        best, why, choice = best_parent(spec, stage.name, runs, backend, options.address)
        if best is None:
            print(f"stage {stage.name}: blocked, no parent to search from ({why})", flush=True)
            return 1
        print(f"stage {stage.name}: searching from {best.name} ({why})", flush=True)
        model = best.output_dir
        record = SweepRecord.read(spec.runs_dir)
        if record is not None:
            record.choices[stage.name] = choice
            record.write(spec.runs_dir)
    sub = stage_search_spec(spec, stage, model)
    return backend.search(sub, tune_search.trial_setups(sub, stage.search))


def local_gpu_memory() -> int | None:
    """Memory of this machine's first GPU, for gpus_per_run: auto (None without a GPU)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def eval_settings(settings: EvalSettings, backend: Backend, runs: list[str] | None = None) -> EvalSettings:
    """A stage's (or the spec's) eval settings, on the sweep's backend unless they name one."""
    return dataclasses.replace(settings, backend=settings.backend or backend.eval_backend, runs=runs or settings.runs)


def best_parent(
    spec: sweeps.SweepSpec, stage_name: str, runs: list[RunPlan], backend: Backend, address: str | None
) -> tuple[RunPlan | None, str, dict[str, Any]]:
    """(the best finished run of the stage `stage_name` starts from, why, what sweep.json records)."""
    from tunefleet.launcher.choose import best_run

    stage = next(s for s in spec.stages if s.name == stage_name)
    parent = next(s for s in spec.stages if s.name == stage.parent)
    assert stage.best is not None
    members = {r.name: r.output_dir for r in runs if r.lineage and r.lineage.stage == parent.name}
    choice = best_run(parent.name, stage.best, members, spec.runs_dir, parent.eval, backend.eval_backend, address)
    chosen = next((r for r in runs if r.name == choice.run), None)
    return chosen, choice.why, choice.record()


def evaluate_sweep(spec: sweeps.SweepSpec, backend: Backend, options: SweepOptions) -> int:
    """The sweep's runs evaluated (a pipeline: each stage's with its own settings) into one results file."""
    from tunefleet.common.terminal import calm
    from tunefleet.eval.evaluate import evaluate
    from tunefleet.eval.report import table

    calm()  # the evaluator loads models here: no library bars, as `tunefleet eval` has it

    if not spec.stages:
        merged = evaluate(spec.runs_dir, eval_settings(spec.eval, backend), None, options.address)
    else:  # each stage's runs with its own eval settings; the results file and report hold them all
        by_stage: dict[str, list[str]] = {}
        for run in sweeps.expand(spec):
            if run.lineage:
                by_stage.setdefault(run.lineage.stage, []).append(run.name)
        merged = {}
        for stage in spec.stages:
            names = [n for n in by_stage.get(stage.name, []) if has_model(Store(join(spec.runs_dir, n)))]
            if names:
                merged = evaluate(spec.runs_dir, eval_settings(stage.eval, backend, names), None, options.address)
    print(table(merged))
    print(f"results: {join(spec.runs_dir, RESULTS_FILE)}")
    return 1 if any(e.get("error") for e in merged.values()) else 0


def has_model(run: Store) -> bool:
    """A run folder holding what the evaluator scores: an adapter, or a full fine-tuning run's model."""
    return run.exists("adapter_config.json") or run.exists("model.safetensors")
