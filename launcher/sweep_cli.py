"""`tunefleet sweep`, `tunefleet status`, `tunefleet cancel`.

tunefleet sweep sweeps/demo.yaml --dry-run            # the plan: runs, resources, launch commands
tunefleet sweep sweeps/demo.yaml --backend ray --eval  # train on a local Ray, then evaluate
tunefleet sweep sweeps/five_methods.yaml --backend ray --address 10.0.0.1:6379 --retries 2
tunefleet sweep sweeps/search_demo.yaml --backend local  # search: on Ray Tune, then confirm: over seeds
tunefleet status runs/demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunefleet.common import schema
from tunefleet.common.contract import TRAIN_LOG
from tunefleet.common.errors import TunefleetError
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import Store, join, refuse_ray_job_temp
from tunefleet.eval.settings import EvalSettings
from tunefleet.launcher import orchestrate
from tunefleet.launcher import sweep as sweeps
from tunefleet.launcher.backend import SweepOptions
from tunefleet.launcher.sweep_record import SweepRecord
from tunefleet.trainers.cost import add_up


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunefleet sweep",
        description="Run every run of a sweep spec; a spec (or a stage) with search: searches each method's "
        "hyperparameters on Ray Tune (a local Ray for --backend local), then reruns the best over confirm: values.",
    )
    p.add_argument("spec", nargs="?", help="Sweep spec YAML (see sweeps/).")
    p.add_argument(
        "--from",
        dest="from_manifest",
        metavar="STUDY_JSON",
        help="Run a study again from its study.json (instead of a spec): its spec as run, after checking that this "
        "machine has its versions, code, data and models.",
    )
    p.add_argument(
        "--allow_drift",
        action="store_true",
        help="With --from: go on where this machine differs from the study.json, and record the differences.",
    )
    p.add_argument(
        "--backend",
        choices=orchestrate.BACKENDS,
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


def sweep_options(a: argparse.Namespace) -> SweepOptions:
    return SweepOptions(
        spec_path=str(a.spec),
        retries=a.retries,
        evaluate=a.eval,
        address=a.address,
        dry_run=a.dry_run,
        skip_data_check=a.skip_data_check,
        skip_plan_check=a.skip_plan_check,
        max_parallel=a.max_parallel,
        rerun_of=a.from_manifest,
        allow_drift=a.allow_drift,
    )


def cmd_sweep(argv: list[str]) -> int:
    a = sweep_parser().parse_args(argv)
    if bool(a.spec) == bool(a.from_manifest):
        raise TunefleetError("give a sweep spec or --from study.json (one of them)")
    if a.allow_drift and not a.from_manifest:
        raise TunefleetError("--allow_drift goes with --from study.json")
    if a.from_manifest:
        from tunefleet.launcher import manifest

        a.spec = manifest.rerun_spec(a.from_manifest, a.runs_dir)
    spec = sweeps.load_spec(a.spec)
    if a.runs_dir:
        spec.runs_dir = a.runs_dir
    refuse_ray_job_temp(spec.runs_dir, "runs_dir")
    Store(spec.runs_dir).check(write=not a.dry_run)
    if a.max_parallel:
        spec.resources.max_parallel = a.max_parallel
    options = sweep_options(a)
    backend = orchestrate.backend_for(a.backend, options)
    if spec.search is not None:
        return orchestrate.run_search_spec(spec, backend, options)
    return orchestrate.run_sweep(spec, backend, options)


def cmd_status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tunefleet status", description="State of a sweep's runs.")
    p.add_argument("sweep_dir", nargs="?", default="runs", help="The sweep's runs_dir (holds sweep.json).")
    p.add_argument("--gpu_hour_price", help="Price of one GPU-hour: the sweep's total cost in money.")
    a = p.parse_args(argv)
    price = schema.from_mapping(EvalSettings, {"gpu_hour_price": a.gpu_hour_price}).gpu_hour_price
    Store(a.sweep_dir).check()
    record = SweepRecord.read(a.sweep_dir)
    if record is None:
        raise TunefleetError(f"{a.sweep_dir} holds no sweep.json: not a sweep folder")
    from tunefleet.launcher.execute import summarize
    from tunefleet.launcher.progress import nodes_text

    jobs, slurm = {}, record.slurm or {}
    if slurm:
        from tunefleet.launcher.slurm import queue_states

        arrays = {str(entry.slurm_job or "").split("_")[0] for entry in record.runs.values()} - {""}
        jobs = queue_states(sorted(set(map(str, slurm.get("job_ids", []))) | arrays))
    print(f"sweep {record.name} ({record.backend}), started {record.started_at}")
    summaries = {name: summarize(entry.output_dir) for name, entry in record.runs.items()}
    statuses: dict[str, RunStatus] = {}
    for name, entry in record.runs.items():  # parents come before their children
        # run.json says where a run stands; without one it never started: blocked when its parent failed or was
        # blocked (sweep.json also says so after a local or Ray sweep), else queued
        status = summaries[name].status or RunStatus.of(entry.status) or RunStatus.QUEUED
        if summaries[name].status is None and statuses.get(entry.parent or "") in (
            RunStatus.FAILED,
            RunStatus.BLOCKED,
        ):
            status = RunStatus.BLOCKED
        statuses[name] = status
    for name, entry in record.runs.items():
        s, status = summaries[name], statuses[name]
        job = entry.slurm_job  # "ARRAYID_TASK" of the latest submission that included this run
        loss = s.final_loss
        logs = join(entry.output_dir, TRAIN_LOG)
        if job:
            logs += f"  {Path(a.sweep_dir) / 'slurm' / f'{job}.log'}"
        print(
            f"  {name:<32} {status:<12} step {s.steps or '-':<6} loss "
            f"{loss if loss is None else round(loss, 4)!s:<8} "
            + (f"{job} {jobs.get(job, '-'):<11} " if job else "")
            + logs
            + (f"  (stage {entry.stage}, from {entry.parent or 'the spec model'})" if entry.stage else "")
        )
        if s.nodes:
            print(f"    {len(s.nodes)} nodes: {nodes_text(s.nodes)}")
        for step in s.memory_steps:
            print(f"    memory: {step}")
        if s.cost:
            print(f"    cost: {cost_text(s.cost)}")
    costs = [s.cost for s in summaries.values() if s.cost]
    if costs:
        print(f"  cost of {len(costs)} runs: {cost_text(add_up(costs), price)}")
    if slurm.get("eval_job_id"):
        eid = str(slurm["eval_job_id"])
        print(f"  evaluation job {eid}: {jobs.get(eid, '-')}  {Path(a.sweep_dir) / 'slurm' / f'eval_{eid}.log'}")
    return 0


def cost_text(cost: dict, gpu_hour_price: float | None = None) -> str:
    """`12.3 s, 0.0034 GPU-hours, 4,066 tokens (4,594/s), peak 673 MiB, 812 J, 0.0085 at 2.5 per GPU-hour`."""
    gpu_hours = (cost.get("gpu_seconds") or 0) / 3600
    parts = [f"{cost.get('wall_seconds') or 0:.1f} s", f"{gpu_hours:.4f} GPU-hours"]
    tokens = f"{int(cost.get('tokens_trained') or 0):,} tokens"
    parts.append(tokens + (f" ({cost['tokens_per_second']:,.0f}/s)" if cost.get("tokens_per_second") else ""))
    peak = cost.get("peak_gpu_mb") or cost.get("peak_rss_mb")
    if peak:
        parts.append(f"peak {peak:,.0f} MiB")
    if isinstance(cost.get("energy_joules"), (int, float)):
        parts.append(f"{cost['energy_joules']:,.0f} J")
    if gpu_hour_price is not None:
        parts.append(f"{gpu_hours * gpu_hour_price:.4f} at {gpu_hour_price} per GPU-hour")
    return ", ".join(parts)


def cmd_cancel(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tunefleet cancel", description="Cancel a SLURM sweep's jobs.")
    p.add_argument("sweep_dir", help="The sweep's runs_dir (holds sweep.json).")
    a = p.parse_args(argv)
    Store(a.sweep_dir).check()
    record = SweepRecord.read(a.sweep_dir)
    if record is None or not record.slurm:
        raise TunefleetError(
            f"{a.sweep_dir} holds no SLURM sweep (sweep.json with job ids); local and Ray sweeps stop with Ctrl-C"
        )
    from tunefleet.launcher.slurm import cancel

    return cancel(record.to_json())
