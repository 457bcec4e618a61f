"""`tunefleet sweep`, `tunefleet status`, `tunefleet cancel`.

tunefleet sweep sweeps/demo.yaml --dry-run            # the plan: runs, resources, launch commands
tunefleet sweep sweeps/demo.yaml --backend ray --eval  # train on a local Ray, then evaluate
tunefleet sweep sweeps/five_methods.yaml --backend ray --address 10.0.0.1:6379 --retries 2
tunefleet sweep sweeps/search_demo.yaml --backend local  # search: on Ray Tune, then confirm: over seeds
tunefleet status runs/demo
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from pathlib import Path

from tunefleet.common.errors import TunefleetError
from tunefleet.common.jsonfile import utc_now
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import Store, is_uri, join, refuse_ray_job_temp
from tunefleet.launcher import plan_check
from tunefleet.launcher import sweep as sweeps
from tunefleet.launcher.launch import launch_command


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunefleet sweep",
        description="Run every run of a sweep spec; a spec (or a stage) with search: searches each method's "
        "hyperparameters on Ray Tune (a local Ray for --backend local), then reruns the best over confirm: values.",
    )
    p.add_argument("spec", help="Sweep spec YAML (see sweeps/).")
    p.add_argument(
        "--backend",
        choices=["local", "ray", "slurm"],
        default="local",
        help="local processes, a Ray cluster, or SLURM job arrays (default: local).",
    )
    p.add_argument("--dry-run", action="store_true", help="Print the plan (runs, resources, commands); run nothing.")
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="Retries of a failed run (or search trial) before it is reported (default: 1).",
    )
    p.add_argument("--eval", action="store_true", help="Evaluate the sweep's runs when training ends.")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray for this sweep).")
    p.add_argument("--max_parallel", type=int, help="At most this many runs at once (overrides resources).")
    p.add_argument("--runs_dir", help="Where the runs go (overrides the spec): a shared path or a URI (s3://...).")
    p.add_argument("--skip_data_check", action="store_true", help="Do not load each split before starting.")
    p.add_argument(
        "--skip_plan_check",
        action="store_true",
        help="Do not check, before training, that the nodes have what the evaluation and the store need (lm-eval "
        "and its tasks, the reward model, the store's driver, Optuna); checked here, on every Ray node, or in a "
        "SLURM allocation.",
    )
    return p


def plan_text(spec, runs) -> str:
    r = spec.resources
    lines = [
        f"sweep {spec.name}: {len(runs)} runs into {spec.runs_dir}",
        f"resources per run: {r.gpus_per_run if r.gpus_per_run == 'auto' else format(r.gpus_per_run, 'g')} GPU, "
        f"{r.cpus_per_run} CPU"
        + (f", {r.memory_gb:g} GB" if r.memory_gb else "")
        + (f"; at most {r.max_parallel} at once" if r.max_parallel else ""),
    ]
    for run in runs:
        c = run.config
        cmd = launch_command(
            ["--config", f"{run.output_dir}/config.yaml"],
            c.num_processes,
            "<free port>",
            c.accelerate_config,
            python="python",
        )
        p = run.placement
        where = (f"{p.gpus:g} GPU" + (f" ({p.runs_per_gpu} per GPU)" if p.shared else "")) if p.gpus else "CPU"
        estimate = f", estimated {p.estimate_gb:g} GiB" if p.estimate_gb is not None else ""
        lines.append(
            f"  {run.name}: {c.method} {c.model_name} seed {c.seed} split {c.split} lr {c.lr} {c.finetune}\n"
            + (f"    {starts_from(run)}\n" if run.lineage else "")
            + (f"    recipe: {c.recipe} ({c.config_form}'s form)\n" if c.recipe else "")
            + (f"    TRL: {', '.join(f'{k}={v}' for k, v in c.trl_args.items())}\n" if c.trl_args else "")
            + f"    placement: {where}{estimate}, {p.cpus} CPU ({p.reason})\n"
            f"    {' '.join(map(str, cmd))}"
        )
    return "\n".join(lines)


def starts_from(run) -> str:
    """A run's place in a pipeline's DAG, for --dry-run."""
    lineage = run.lineage
    if lineage.parent:
        return f"stage {lineage.stage}: starts from {lineage.parent} (once it finished)"
    if lineage.best:
        return (
            f"stage {lineage.stage}: starts from the best run of stage {lineage.parent_stage} by {lineage.best} "
            "(once that stage has ended and is evaluated)"
        )
    return f"stage {lineage.stage}: starts from {lineage.root_model}"


def cmd_sweep(argv: list[str]) -> int:
    from tunefleet.launcher.progress import SweepView, final_table

    a = sweep_parser().parse_args(argv)
    spec = sweeps.load_spec(a.spec)
    if a.runs_dir:
        spec.runs_dir = a.runs_dir
    refuse_ray_job_temp(spec.runs_dir, "runs_dir")
    Store(spec.runs_dir).check(write=not a.dry_run)
    if a.max_parallel:
        spec.resources.max_parallel = a.max_parallel
    if spec.search is not None:
        return cmd_search(spec, a)
    searches = [stage for stage in spec.stages if stage.search is not None]
    if searches and a.backend == "slurm":
        raise TunefleetError(SEARCH_ON_SLURM)
    runs = sweeps.place_runs(sweeps.expand(spec), spec, local_gpu_memory())
    if a.dry_run and a.backend != "slurm":
        print(plan_text(spec, runs))
        for stage in searches:
            print(search_stage_text(spec, stage))
        return 0
    needs = check_plan(plan_check.plan_needs(spec, runs, a.eval), a)
    if a.backend == "local" or (a.backend == "ray" and not (a.address or os.environ.get("RAY_ADDRESS"))):
        from tunefleet.launcher import warm

        warm.prestart()  # the runs' warm process imports while the data is checked and Ray starts
    sweeps.check_existing_runs(runs)
    if not a.skip_data_check:
        sweeps.validate_data(runs)
    if a.backend == "slurm":
        from tunefleet.launcher.slurm import submit_sweep

        return submit_sweep(spec, runs, a, None if a.skip_plan_check else needs)
    store = Store(spec.runs_dir)
    state = {
        "name": spec.name,
        "spec": str(a.spec),
        "backend": a.backend,
        "started_at": utc_now(),
        "runs": {r.name: {"output_dir": r.output_dir, "method": r.method, "status": RunStatus.QUEUED} for r in runs},
    }
    store.write_json("sweep.json", state)
    outcomes, lost, code = [], [], 0
    chosen: dict[str, dict] = {}  # a stage that takes the best run of another -> which, by what

    def choose(stage: str):
        best, why, record = best_parent(spec, stage, runs, a.backend, a.address)
        chosen[stage] = record
        return best, why

    try:
        with SweepView(runs) as view:
            if a.backend == "ray":
                from tunefleet.launcher.backends import run_ray

                outcomes, lost = run_ray(runs, spec.resources, a.retries, view, a.address, choose)
            else:
                from tunefleet.launcher.backends import run_local

                outcomes = run_local(runs, spec.resources, a.retries, view, choose)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: stopped the running runs; they keep their checkpoints and resume on rerun", file=sys.stderr
        )
        code = 130
    for o in outcomes:
        state["runs"][o.name].update(
            {
                k: getattr(o, k)
                for k in ("status", "steps", "final_loss", "wall_s", "log", "error", "host", "node_id", "memory_steps")
            }
        )
    for run in runs:  # every launch of every run: where it ran and when (a run re-run after a node loss has two)
        launches = (Store(run.output_dir).read_json("launch.json") or {}).get("attempts", [])
        state["runs"][run.name]["placement"] = run.placement.record()
        state["runs"][run.name]["attempts"] = [
            {k: a.get(k) for k in ("host", "node_id", "started_at", "pid")}
            for a in launches
            if a.get("started_at", "") >= state["started_at"]
        ]
    for run in runs:
        if run.lineage:
            state["runs"][run.name]["stage"] = run.lineage.stage
            state["runs"][run.name]["parent"] = run.lineage.parent or (chosen.get(run.lineage.stage) or {}).get("run")
    if chosen:
        state["choices"] = chosen
    state["lost_nodes"] = lost
    state["ended_at"] = utc_now()
    store.write_json("sweep.json", state)
    print(final_table(outcomes))
    failed = [o for o in outcomes if not o.ok]
    if code:
        return code
    if a.eval:
        code = _evaluate(spec, a)
    for stage in searches:
        code = max(code, search_stage(spec, stage, runs, a))
    return 1 if failed or code else 0


SEARCH_ON_SLURM = (
    "a search runs on Ray: start a Ray cluster on your allocation with cluster_configs/slurm/ray_cluster.sbatch, "
    "then: tunefleet sweep SPEC --backend ray --address <head>:6379"
)


def cmd_search(spec, a) -> int:
    """A spec with `search:`: each method's trials on Ray Tune, then `confirm:` (launcher/tune_search.py)."""
    from tunefleet.launcher import tune_search

    if a.backend == "slurm":
        raise TunefleetError(SEARCH_ON_SLURM)
    setups = tune_search.trial_setups(spec, spec.search)
    if a.dry_run:
        print(tune_search.plan_text(spec, spec.search, setups))
        return 0
    check_plan(plan_check.plan_needs(spec, [setup.probe for setup in setups.values()], True), a)
    if not a.skip_data_check:
        sweeps.validate_data([setup.probe for setup in setups.values()])
    return tune_search.run_search(spec, setups, a.address, a.retries)


def stage_search_spec(spec, stage, model: str | None):
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


def search_stage_text(spec, stage) -> str:
    from tunefleet.launcher import tune_search

    where = (
        f"the best run of stage {stage.parent} by {stage.best}, once chosen" if stage.parent else "the spec's model"
    )
    sub = stage_search_spec(spec, stage, None)
    text = tune_search.plan_text(sub, stage.search, tune_search.trial_setups(sub, stage.search))
    return f"stage {stage.name}: a search from {where}, after the other stages\n" + text


def search_stage(spec, stage, runs, a) -> int:
    """Once the other stages ended: the stage's parent chosen (its stage evaluated), then its search from it."""
    from tunefleet.launcher import tune_search

    model = None
    if stage.parent is not None:
        best, why, record = best_parent(spec, stage.name, runs, a.backend, a.address)
        if best is None:
            print(f"stage {stage.name}: blocked, no parent to search from ({why})", flush=True)
            return 1
        print(f"stage {stage.name}: searching from {best.name} ({why})", flush=True)
        model = best.output_dir
        state = Store(spec.runs_dir).read_json("sweep.json") or {}
        state.setdefault("choices", {})[stage.name] = record
        Store(spec.runs_dir).write_json("sweep.json", state)
    sub = stage_search_spec(spec, stage, model)
    return tune_search.run_search(sub, tune_search.trial_setups(sub, stage.search), a.address, a.retries)


def check_plan(needs: plan_check.PlanNeeds, a) -> plan_check.PlanNeeds:
    """Before anything trains: what the plan needs (lm-eval and its tasks, the reward model, the store's driver,
    Optuna) here, and on every node of a Ray cluster at an address (a local Ray's workers are this Python). SLURM's
    check runs in an allocation when the arrays are about to be submitted."""
    if not needs or a.skip_plan_check or a.backend == "slurm":  # SLURM: checked in an allocation, at submission
        return needs
    plan_check.refuse(plan_check.check_here(needs), f"this machine ({socket.gethostname()}, the sweep's driver)")
    if a.backend == "ray" and (a.address or os.environ.get("RAY_ADDRESS")):
        from tunefleet.launcher.backends import ray_for_runs

        with ray_for_runs(a.address):  # the connection stays for the runs
            plan_check.check_ray_nodes(needs)
    return needs


def local_gpu_memory() -> int | None:
    """Memory of this machine's first GPU, for gpus_per_run: auto (None without a GPU)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def eval_settings(settings, backend: str, runs: list[str] | None = None):
    """A stage's (or the spec's) eval settings, on the sweep's backend unless they name one."""
    return dataclasses.replace(
        settings, backend=settings.backend or ("ray" if backend == "ray" else "local"), runs=runs or settings.runs
    )


def best_parent(spec, stage_name: str, runs, backend: str, address: str | None):
    """(the best finished run of the stage `stage_name` starts from, why, what sweep.json records)."""
    from tunefleet.launcher.choose import best_run

    stage = next(s for s in spec.stages if s.name == stage_name)
    parent = next(s for s in spec.stages if s.name == stage.parent)
    members = {r.name: r.output_dir for r in runs if r.lineage and r.lineage.stage == parent.name}
    choice = best_run(parent.name, stage.best, members, spec.runs_dir, parent.eval, backend_of(backend), address)
    chosen = next((r for r in runs if r.name == choice.run), None)
    return chosen, choice.why, choice.record()


def backend_of(sweep_backend: str) -> str:
    return "ray" if sweep_backend == "ray" else "local"


def _evaluate(spec, a) -> int:
    from tunefleet.common.terminal import calm
    from tunefleet.eval.evaluate import evaluate
    from tunefleet.eval.report import table

    calm()  # the evaluator loads models here: no library bars, as `tunefleet eval` has it

    if not spec.stages:
        merged = evaluate(spec.runs_dir, eval_settings(spec.eval, a.backend), None, a.address)
    else:  # each stage's runs with its own eval settings; the results file and report hold them all
        by_stage: dict[str, list[str]] = {}
        for run in sweeps.expand(spec):
            if run.lineage:
                by_stage.setdefault(run.lineage.stage, []).append(run.name)
        merged = {}
        for stage in spec.stages:
            names = [n for n in by_stage.get(stage.name, []) if has_model(Store(join(spec.runs_dir, n)))]
            if names:
                merged = evaluate(spec.runs_dir, eval_settings(stage.eval, a.backend, names), None, a.address)
    print(table(merged))
    print(f"results: {join(spec.runs_dir, 'evaluation_results.json')}")
    return 1 if any(e.get("error") for e in merged.values()) else 0


def has_model(run: Store) -> bool:
    """A run folder holding what the evaluator scores: an adapter, or a full fine-tuning run's model."""
    return run.exists("adapter_config.json") or run.exists("model.safetensors")


def cmd_status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tunefleet status", description="State of a sweep's runs.")
    p.add_argument("sweep_dir", nargs="?", default="runs", help="The sweep's runs_dir (holds sweep.json).")
    a = p.parse_args(argv)
    Store(a.sweep_dir).check()
    state = Store(a.sweep_dir).read_json("sweep.json")
    if not state:
        raise TunefleetError(f"{a.sweep_dir} holds no sweep.json: not a sweep folder")
    from tunefleet.launcher.runner import summarize

    jobs, slurm = {}, state.get("slurm") or {}
    if slurm:
        from tunefleet.launcher.slurm import queue_states

        arrays = {str(i.get("slurm_job", "")).split("_")[0] for i in state["runs"].values()} - {""}
        jobs = queue_states(sorted(set(map(str, slurm.get("job_ids", []))) | arrays))
    print(f"sweep {state['name']} ({state.get('backend')}), started {state.get('started_at')}")
    summaries = {name: summarize(info["output_dir"]) for name, info in state["runs"].items()}
    statuses: dict[str, RunStatus] = {}
    for name, info in state["runs"].items():  # parents come before their children
        parent = info.get("parent")
        # run.json says where a run stands; without one it never started: blocked when its parent failed or was
        # blocked (sweep.json also says so after a local or Ray sweep), else queued
        status = summaries[name].status or RunStatus.of(info.get("status")) or RunStatus.QUEUED
        if summaries[name].status is None and statuses.get(parent) in (RunStatus.FAILED, RunStatus.BLOCKED):
            status = RunStatus.BLOCKED
        statuses[name] = status
    for name, info in state["runs"].items():
        s, status = summaries[name], statuses[name]
        job = info.get("slurm_job")  # "ARRAYID_TASK" of the latest submission that included this run
        loss = s.final_loss
        logs = join(info["output_dir"], "train.log")
        if job:
            logs += f"  {Path(a.sweep_dir) / 'slurm' / f'{job}.log'}"
        print(
            f"  {name:<32} {status:<12} step {s.steps or '-':<6} loss "
            f"{loss if loss is None else round(loss, 4)!s:<8} "
            + (f"{job} {jobs.get(job, '-'):<11} " if job else "")
            + logs
            + (
                f"  (stage {info['stage']}, from {info.get('parent') or 'the spec model'})"
                if info.get("stage")
                else ""
            )
        )
        for step in s.memory_steps:
            print(f"    memory: {step}")
    if slurm.get("eval_job_id"):
        eid = str(slurm["eval_job_id"])
        print(f"  evaluation job {eid}: {jobs.get(eid, '-')}  {Path(a.sweep_dir) / 'slurm' / f'eval_{eid}.log'}")
    return 0


def cmd_cancel(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tunefleet cancel", description="Cancel a SLURM sweep's jobs.")
    p.add_argument("sweep_dir", help="The sweep's runs_dir (holds sweep.json).")
    a = p.parse_args(argv)
    Store(a.sweep_dir).check()
    state = Store(a.sweep_dir).read_json("sweep.json")
    if not state or not state.get("slurm"):
        raise TunefleetError(
            f"{a.sweep_dir} holds no SLURM sweep (sweep.json with job ids); local and Ray sweeps stop with Ctrl-C"
        )
    from tunefleet.launcher.slurm import cancel

    return cancel(state)
