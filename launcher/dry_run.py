"""What `tunefleet sweep --dry-run` prints for local and Ray sweeps: each run, its resources and placement, where
a pipeline's run starts from, and the command that launches it. (SLURM's dry run prints its scripts.)"""

from __future__ import annotations

from tunefleet.common.contract import GangSeat
from tunefleet.launcher.launch import launch_command
from tunefleet.launcher.records import RunPlan
from tunefleet.launcher.sweep import SweepSpec


def plan_text(spec: SweepSpec, runs: list[RunPlan]) -> str:
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
        seat = GangSeat("<gang>", 0, c.num_nodes, "<rank 0's node>", 0) if c.num_nodes > 1 else None
        cmd = launch_command(
            ["--config", f"{run.output_dir}/config.yaml"],
            c.world_size,
            "<free port>",
            c.accelerate_config,
            python="python",
            seat=seat,
        )
        if seat is not None:  # each node's machine rank; the head's port is asked of rank 0's node once placed
            shown = {"--main_process_port": "<port>", "--machine_rank": "<I>"}
            cmd = [shown.get(cmd[i - 1], part) if i else part for i, part in enumerate(cmd)]
        p = run.placement
        where = (f"{p.gpus:g} GPU" + (f" ({p.runs_per_gpu} per GPU)" if p.shared else "")) if p.gpus else "CPU"
        estimate = f", estimated {p.estimate_gb:g} GiB" if p.estimate_gb is not None else ""
        lines.append(
            f"  {run.name}: {c.method} {c.model_name} seed {c.seed} split {c.split} lr {c.lr} {c.finetune}\n"
            + (f"    {starts_from(run)}\n" if run.lineage else "")
            + (f"    recipe: {c.recipe} ({c.config_form}'s form)\n" if c.recipe else "")
            + (f"    TRL: {', '.join(f'{k}={v}' for k, v in c.trl_args.items())}\n" if c.trl_args else "")
            + f"    placement: {where}{estimate}, {p.cpus} CPU ({p.reason})"
            + (
                f" on each of {c.num_nodes} nodes, reserved together; {c.node_processes} process(es) a node, "
                f"world {c.world_size}; each node runs (machine rank I):\n"
                if c.num_nodes > 1
                else "\n"
            )
            + f"    {' '.join(map(str, cmd))}"
        )
    return "\n".join(lines)


def starts_from(run: RunPlan) -> str:
    """A run's place in a pipeline's DAG, for --dry-run."""
    lineage = run.lineage
    assert lineage is not None
    if lineage.parent:
        return f"stage {lineage.stage}: starts from {lineage.parent} (once it finished)"
    if lineage.best:
        return (
            f"stage {lineage.stage}: starts from the best run of stage {lineage.parent_stage} by {lineage.best} "
            "(once that stage has ended and is evaluated)"
        )
    return f"stage {lineage.stage}: starts from {lineage.root_model}"
