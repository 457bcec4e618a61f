"""`tunefleet sweep SPEC --backend slurm`: one SLURM job array per sweep, one array task per run.

    tunefleet sweep sweeps/five_methods.yaml --backend slurm --dry-run   # print the scripts, submit nothing
    tunefleet sweep sweeps/five_methods.yaml --backend slurm --eval      # + an evaluation job after the array
    tunefleet status runs                                                # runs, SLURM states, log paths
    tunefleet cancel runs                                                # scancel; resubmit to resume

Reads as its steps: check sbatch -> refuse while the sweep's previous array is still queued/running -> pick
the runs that are not finished -> write `<runs_dir>/slurm/runs.json` and the sbatch scripts -> sbatch ->
record the job ids in `<runs_dir>/sweep.json`. Each array task runs `python -m tunefleet.launcher.slurm_task` (which
calls `execute.run_one`, as every backend does); the batch script only relays signals and requeues. SLURM
sends USR1 `signal_seconds` before the time limit: the trainer checkpoints, the task requeues itself and
resumes from that checkpoint.

The renderers (`render_array_script`, `render_eval_script`, `array_spec`, `parse_queue`) are pure.

Why one module of this size: the scripts it renders, their submission (ids, dependencies, sweep.json) and the
queue's states are one protocol with slurm_task.py, which runs them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tunefleet.common import schema
from tunefleet.common.errors import TunefleetError
from tunefleet.common.jsonfile import write_json_atomic
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import is_uri
from tunefleet.launcher.backend import Ran, SweepOptions
from tunefleet.launcher.execute import summarize
from tunefleet.launcher.placement import slurm_groups
from tunefleet.launcher.plan_check import PlanNeeds, check_in_slurm, leave_probe
from tunefleet.launcher.sweep_record import RunEntry, SweepRecord

# Job states that mean "SLURM may still start or is running it": resubmitting then could run a run twice.
MAIN = "main"  # the array of the runs that wait for nothing (every run of a plain sweep)
ACTIVE = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "RESV_DEL_HOLD",
}


# ---------------------------------------------------------------- pure: scripts
def array_spec(indices: list[int], limit: int | None) -> str:
    """`--array` value: compact ranges of the task indices, `%limit` for at most that many at once."""
    parts, start = [], None
    for i, idx in enumerate(indices):
        start = idx if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != idx + 1:
            parts.append(str(start) if start == idx else f"{start}-{idx}")
            start = None
    return ",".join(parts) + (f"%{limit}" if limit else "")


def _resource_lines(spec, gpus: int, cpus: int, memory_gb: float | None) -> list[str]:
    s, lines = spec.slurm, []
    if gpus > 0:
        lines.append(f"--gres=gpu:{gpus}")
    lines.append(f"--cpus-per-task={cpus}")
    if memory_gb:
        lines.append(
            f"--mem={int(memory_gb)}G" if float(memory_gb).is_integer() else f"--mem={int(memory_gb * 1024)}M"
        )
    if s.time:
        lines.append(f"--time={s.time}")
    return lines + site_lines(spec)


def site_lines(spec) -> list[str]:
    """Where the spec's jobs go: its partition, account and QoS, as sbatch and srun take them."""
    return [
        f"--{key}={getattr(spec.slurm, key)}" for key in ("partition", "account", "qos") if getattr(spec.slurm, key)
    ]


def task_resources(runs, tasks: list[list[int]]) -> tuple[int, int]:
    """(GPUs, runs) the largest array task needs: an array asks the same of every task."""
    gpus = max((math.ceil(sum(runs[i].placement.gpus for i in task) - 1e-9) for task in tasks), default=0)
    return gpus, max((len(task) for task in tasks), default=1)


def render_array_script(
    spec,
    runs,
    tasks: list[list[int]],
    sweep_dir: str,
    python: str,
    retries: int = 1,
    group: str = MAIN,
    after: str | None = None,
) -> str:
    """The sbatch script of one job array: array task i trains the runs `tasks[i]` (positions in runs.json); runs
    that share a GPU (gpus_per_run < 1) share one task, each in its own process. In a pipeline, the runs that wait
    for a parent still training form an array of their own (`group`) that starts only once that parent's task
    succeeded (`after`: `--dependency=afterok`); a failed parent cancels it (`--kill-on-invalid-dep`)."""
    s, r = spec.slurm, spec.resources
    slurm_dir = Path(sweep_dir) / "slurm"
    names = ", ".join(f"{t}={'+'.join(runs[i].name for i in task)}" for t, task in enumerate(tasks))
    requeue = s.requeue
    gpus, per_task = task_resources(runs, tasks)
    cpus = max((sum(runs[i].placement.cpus for i in task) for task in tasks), default=1)
    memory = max((sum(runs[i].placement.memory_gb or 0 for i in task) for task in tasks), default=0) or None
    wait = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
    lines = [
        f"--job-name=tf-{spec.name}" + ("" if group == MAIN else f"-{group}"),
        *wait,
        f"--array={array_spec(list(range(len(tasks))), s.array_limit or r.max_parallel)}",
        *_resource_lines(spec, gpus, cpus, memory),
        f"--output={slurm_dir}/%A_%a.log",
        "--open-mode=append",
    ]  # a requeued task appends to its log instead of truncating it
    if requeue:
        lines += ["--requeue", f"--signal=B:USR1@{s.signal_seconds}"]
    lines += [str(x).removeprefix("#SBATCH ") for x in s.extra]  # site-specific lines, verbatim
    header = "\n".join(f"#SBATCH {line}" for line in lines)
    task = (
        f"{shlex.quote(python)} -m tunefleet.launcher.slurm_task {shlex.quote(str(slurm_dir / 'runs.json'))} "
        f'"$SLURM_ARRAY_TASK_ID" --retries {retries}' + ("" if group == MAIN else f" --group {shlex.quote(group)}")
    )
    requeue_block = (
        """if [ "$signalled" = USR1 ] && [ "$rc" -ne 0 ]; then
    # USR1 = time limit near (--signal) or preemption notice: the trainer saved a checkpoint; come back
    # and resume from it. TERM (scancel, `tunefleet cancel`) does not requeue: a cancel stays cancelled.
    echo "=== $(date -Is) task $task signalled: checkpoint saved, requeueing to resume"
    scontrol requeue "$task"
    exit 0
fi
"""
        if requeue
        else ""
    )
    return f"""#!/bin/bash
# tunefleet sweep {spec.name}: one array task per run, or per group of runs sharing a GPU (runs.json "tasks").
# Written by `tunefleet sweep {spec.path or "<spec>"} --backend slurm`; tasks here: {names}
{header}

task="${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
echo "=== $(date -Is) task $task on $(hostname), restart ${{SLURM_RESTART_COUNT:-0}}," \
     "CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}}"

# The run is Python (runs.json -> execute.run_one); this shell relays signals to it and requeues.
signalled=""
relay() {{ signalled=$1; kill -s "$1" "$child" 2>/dev/null; }}
trap 'relay USR1' USR1
trap 'relay TERM' TERM
{task} &
child=$!
while :; do  # a trapped signal interrupts `wait`: keep waiting until the task has really exited
    wait "$child"; rc=$?
    kill -0 "$child" 2>/dev/null || break
done
{requeue_block}exit "$rc"
"""


def render_gang_script(
    spec, runs, index: int, sweep_dir: str, python: str, retries: int = 1, after: str | None = None
) -> str:
    """The sbatch script of a run over several nodes (num_nodes > 1): a job of its own, not an array task (a task
    cannot span nodes). One `srun` step starts one launcher per node (slurm_task.py --gang): machine rank = the
    task's rank, head = the allocation's first node, rendezvous port from the job id. A failed node ends the step
    (--kill-on-bad-exit); the step goes again up to `retries` times (resuming from the run's checkpoint); USR1 near
    the time limit checkpoints and requeues the job, as for an array task (pure)."""
    s, run = spec.slurm, runs[index]
    n = run.config.num_nodes
    slurm_dir = Path(sweep_dir) / "slurm"
    gpus = math.ceil(run.placement.gpus - 1e-9) if run.placement.gpus > 0 else 0
    if s.multinode == "nodes":
        shape = [f"--nodes={n}", "--ntasks-per-node=1"]
        step = f"--ntasks={n} --ntasks-per-node=1"
    else:  # each task stands for a node, wherever SLURM puts it
        shape, step = [f"--ntasks={n}"], f"--ntasks={n}"
        gpus *= n
    wait = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
    lines = [
        f"--job-name=tf-{spec.name}-{run.name}",
        *wait,
        *shape,
        *_resource_lines(spec, gpus, run.placement.cpus, run.placement.memory_gb),
        f"--output={slurm_dir}/%j.log",
        "--open-mode=append",
    ]
    if s.requeue:
        lines += ["--requeue", f"--signal=B:USR1@{s.signal_seconds}"]
    lines += [str(x).removeprefix("#SBATCH ") for x in s.extra]
    header = "\n".join(f"#SBATCH {line}" for line in lines)
    task = (
        f"srun --kill-on-bad-exit=1 {step} {shlex.quote(python)} -m tunefleet.launcher.slurm_task "
        f'{shlex.quote(str(slurm_dir / "runs.json"))} --gang {index} --head "$head" --port "$((port + attempt))" '
        f'--attempt "${{SLURM_JOB_ID}}-${{SLURM_RESTART_COUNT:-0}}-$attempt"'
    )
    requeue_block = (
        """if [ "$signalled" = USR1 ] && [ "$rc" -ne 0 ]; then
    echo "=== $(date -Is) job $SLURM_JOB_ID signalled: checkpoint saved, requeueing to resume"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
"""
        if s.requeue
        else ""
    )
    return f"""#!/bin/bash
# tunefleet sweep {spec.name}: run {run.name} over {n} nodes, one launcher per node (runs.json index {index}).
# Written by `tunefleet sweep {spec.path or "<spec>"} --backend slurm`.
{header}

head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # machine rank 0: the rendezvous
port=$((20000 + SLURM_JOB_ID % 20000))
echo "=== $(date -Is) job $SLURM_JOB_ID: {run.name} on $SLURM_JOB_NODELIST, head $head:$port, restart ${{SLURM_RESTART_COUNT:-0}}"

signalled=""
relay() {{ signalled=$1; kill -s "$1" "$child" 2>/dev/null; }}
trap 'relay USR1' USR1
trap 'relay TERM' TERM
rc=1
for attempt in $(seq 0 {retries}); do  # a failed step (a node lost, a rendezvous not met) goes again, resuming
    {task} &
    child=$!
    while :; do
        wait "$child"; rc=$?
        kill -0 "$child" 2>/dev/null || break
    done
    if [ "$rc" -eq 0 ] || [ -n "$signalled" ]; then break; fi
    echo "=== $(date -Is) step ended with exit code $rc: attempt $((attempt + 1)) of {retries + 1}"
done
{requeue_block}exit "$rc"
"""


def eval_backend(spec, gpus: int) -> str:
    """Shards on one GPU run one after the other in one process; with several GPUs a local Ray spreads them."""
    return spec.eval.backend or ("ray" if gpus > 1 else "local")


def eval_command(spec, runs_dir: str, python: str, gpus: int) -> list[str]:
    """`tunefleet eval` with the spec's `eval:` settings, turned into flags by their one definition (pure)."""
    settings = dataclasses.replace(spec.eval, backend=eval_backend(spec, gpus))
    return [python, "-m", "tunefleet.launcher.cli", "eval", "--runs_dir", runs_dir, *schema.to_argv(settings)]


def render_choice_script(spec, stage: str, sweep_dir: str, python: str, after: str | None) -> str:
    """The job that picks the best run of the stage `stage` starts from, once all of that stage's tasks ended
    (`afterany`): it evaluates that stage and writes slurm/choices.json, which the runs of `stage` read (pure)."""
    slurm_dir = Path(sweep_dir) / "slurm"
    wait = [f"--dependency=afterany:{after}"] if after else []
    lines = [
        f"--job-name=tf-{spec.name}-choose-{stage}",
        *wait,
        *_resource_lines(spec, 0, spec.resources.cpus_per_run, spec.resources.memory_gb),
        f"--output={slurm_dir}/choose_{stage}_%j.log",
        *[str(x).removeprefix("#SBATCH ") for x in spec.slurm.extra],
    ]
    header = "\n".join(f"#SBATCH {line}" for line in lines)
    cmd = " ".join(
        shlex.quote(c)
        for c in [python, "-m", "tunefleet.launcher.slurm_task", str(slurm_dir / "runs.json"), "--choose", stage]
    )
    return f"""#!/bin/bash
# tunefleet sweep {spec.name}: the run stage {stage} starts from (the best of its parent stage).
{header}

exec {cmd}
"""


def render_eval_script(spec, sweep_dir: str, python: str, after: str | None) -> str:
    """The evaluation job; with `after` (job ids joined by `:`), it starts once every task of those jobs succeeded
    (pure)."""
    r, shards = spec.resources, spec.eval.shards
    gpus = shards if r.gpus_per_run == "auto" or r.gpus_per_run > 0 else 0  # one GPU per eval shard on a GPU sweep
    wait = (
        [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
    )  # a failed run drops the eval job (no endless PENDING)
    lines = [
        f"--job-name=tf-{spec.name}-eval",
        *wait,
        *_resource_lines(
            spec, gpus, r.cpus_per_run * (shards if eval_backend(spec, gpus) == "ray" else 1), r.memory_gb
        ),
        f"--output={Path(sweep_dir) / 'slurm'}/eval_%j.log",
        *[str(x).removeprefix("#SBATCH ") for x in spec.slurm.extra],
    ]
    header = "\n".join(f"#SBATCH {line}" for line in lines)
    cmd = " ".join(shlex.quote(c) for c in eval_command(spec, sweep_dir, python, gpus))
    return f"""#!/bin/bash
# tunefleet sweep {spec.name}: evaluate every run{f" once training array job {after} has succeeded" if after else ""}.
{header}

echo "=== $(date -Is) evaluation on $(hostname), CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}}"
exec {cmd}
"""


# ---------------------------------------------------------------- pure: queue states
def expand_tasks(array_job: str, tasks: str) -> list[str]:
    """'7', '0-3%2' or '[1,4-5]' -> ['7_0', '7_1', ...] (the ids of the tasks squeue folds into one line)."""
    out = []
    for part in tasks.strip("[]").split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out += [f"{array_job}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def parse_queue(text: str) -> dict[str, str]:
    """Lines `JOBID|STATE` (squeue -o '%i|%T' or sacct -P -o JobID,State) -> {'12_0': 'RUNNING', '13': ...}."""
    states = {}
    for line in text.splitlines():
        if "|" not in line:
            continue
        job, state = line.split("|", 1)
        state = state.split()[0] if state.split() else "UNKNOWN"  # sacct: 'CANCELLED by 0'
        m = re.fullmatch(r"(\d+)_(\[?[\d,%-]+\]?)", job.strip())
        for jid in expand_tasks(m.group(1), m.group(2)) if m else [job.strip()]:
            states[jid] = state
    return states


# ---------------------------------------------------------------- SLURM commands
def _slurm(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise TunefleetError(
            f"'{cmd[0]}' not found: install SLURM's client tools (apt-get install slurm-wlm) "
            "or use --backend local / --backend ray"
        ) from None


def queue_states(job_ids: list) -> dict[str, str]:
    """{job id or 'ARRAY_TASK': SLURM state} for these jobs: sacct when accounting works, then squeue.

    squeue (with `-t all`) forgets finished jobs after MinJobAge; sacct remembers them but needs slurmdbd,
    so its failure is silent. squeue wins where both know a job: it is the live view.
    """
    ids = [str(j) for j in job_ids if j]
    if not ids:
        return {}
    states = {}
    acct = _slurm(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State"])
    if acct.returncode == 0:
        states.update(parse_queue(acct.stdout))
    for jid in ids:  # one by one: squeue fails for the whole list when one id is unknown to it
        proc = _slurm(["squeue", "-h", "-t", "all", "-j", jid, "-o", "%i|%T"])
        if proc.returncode == 0:
            states.update(parse_queue(proc.stdout))
    return states


def active_jobs(states: dict[str, str]) -> dict[str, str]:
    return {jid: st for jid, st in states.items() if st in ACTIVE}


def sbatch(script: Path, *flags: str) -> str:
    """Submit; the job id, or a TunefleetError with SLURM's own reason (bad partition, impossible gres...)."""
    proc = _slurm(["sbatch", "--parsable", *flags, str(script)])
    if proc.returncode != 0:
        errors = [line.split("error:", 1)[1].strip() for line in proc.stderr.splitlines() if "error:" in line]
        reason = errors[-1] if errors else (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise TunefleetError(f"SLURM rejected {script}: {reason}")
    return proc.stdout.strip().split(";")[0]  # '123' or '123;cluster'


# ---------------------------------------------------------------- submit
def submit_sweep(spec, runs, a: SweepOptions, needs: PlanNeeds | None = None) -> int:
    """Submit the sweep's unfinished runs as one job array (+ the evaluation job with --eval). `needs`: what the
    plan needs beyond tunefleet (launcher/plan_check.py), checked in an allocation before anything is submitted."""
    if not a.dry_run and shutil.which("sbatch") is None:
        raise TunefleetError(
            "sbatch not found on PATH: install SLURM's client tools (apt-get install slurm-wlm) "
            "or run the sweep with --backend local / --backend ray"
        )
    if is_uri(spec.runs_dir):
        raise TunefleetError(
            f"runs_dir {spec.runs_dir}: --backend slurm keeps its scripts and logs beside the runs, on the cluster's "
            "shared filesystem: give a shared path (URIs work with --backend local and ray)"
        )
    sweep_dir = Path(spec.runs_dir).resolve()
    slurm_dir = sweep_dir / "slurm"
    previous = SweepRecord.read(str(sweep_dir))
    python = spec.slurm.python or sys.executable

    old = (previous.slurm if previous else None) or {}
    if not a.dry_run:
        refuse_while_queued(spec, old.get("job_ids", []))

    todo = [i for i, run in enumerate(runs) if summarize(run.output_dir).status is not RunStatus.FINISHED]
    finished = len(runs) - len(todo)
    if not todo and not a.evaluate:
        print(f"sweep {spec.name}: all {len(runs)} runs already finished; nothing to submit")
        return 0

    # Everything the tasks need goes through runs.json (no YAML in bash); indices are positions in it.
    absolute = [
        dataclasses.replace(
            r,
            config=dataclasses.replace(
                r.config,
                output_dir=str(Path(r.output_dir).resolve()),
                model_name=str(Path(r.config.model_name).resolve()) if r.parent else r.config.model_name,
            ),
        )
        for r in runs
    ]
    groups = dependency_groups(runs, todo)
    gangs = {key: [i for i in members if runs[i].config.num_nodes > 1] for key, members in groups.items()}
    arrays = {
        key: [[singles[j] for j in task] for task in slurm_groups([runs[i].placement for i in singles])]
        for key, members in groups.items()
        if (singles := [i for i in members if runs[i].config.num_nodes == 1])
    }
    scripts = {
        key: render_array_script(spec, runs, tasks, str(sweep_dir), python, a.retries, key)
        for key, tasks in arrays.items()
    }
    if a.dry_run:
        print(
            f"# {spec.name}: {len(todo)} of {len(runs)} runs to submit ({finished} finished) in "
            f"{sum(len(t) for t in arrays.values())} task(s) of {len(arrays)} array(s); runs.json holds "
            + ", ".join(f"{i}={r.name}" for i, r in enumerate(runs))
        )
        for key, script in scripts.items():
            print(f"# ---- {slurm_dir / script_name(key)} ({waits_for(key, runs)})\n{script}")
        for key, members in gangs.items():
            for i in members:
                script = render_gang_script(spec, runs, i, str(sweep_dir), python, a.retries)
                print(f"# ---- {slurm_dir / gang_script_name(runs[i].name)} ({waits_for(key, runs)})\n{script}")
        if a.evaluate:
            print(
                f"# ---- {slurm_dir / 'eval.sbatch'}\n"
                + render_eval_script(spec, str(sweep_dir), python, "<array job ids>" if todo else None)
            )
        return 0

    if needs:
        # inside an allocation like the jobs' (their partition, account, QoS and Python), before any array exists
        leave_probe(needs)  # a multi-node run's folder: the allocation must read what the driver wrote
        check_in_slurm(needs, site_lines(spec), python, spec.name)
    slurm_dir.mkdir(parents=True, exist_ok=True)
    for i in (i for members in gangs.values() for i in members):  # more nodes than the cluster has: said now
        script = slurm_dir / gang_script_name(runs[i].name)
        script.write_text(render_gang_script(spec, runs, i, str(sweep_dir), python, a.retries))
        sbatch_test(script, runs[i])
    stages = {
        stage.name: {"from": stage.parent, "best": stage.best, "eval": schema.to_dict(stage.eval)}
        for stage in spec.stages
    }
    write_json_atomic(
        slurm_dir / "runs.json",
        {
            "sweep": spec.name,
            "runs_dir": str(sweep_dir),
            "runs": [r.to_json() for r in absolute],
            "tasks": arrays.get(MAIN, []),
            "groups": arrays,
            "gangs": [i for members in gangs.values() for i in members],
            "stages": stages,
        },
    )
    record = SweepRecord(
        name=spec.name,
        spec=a.spec_path,
        backend="slurm",
        runs={
            r.name: RunEntry(
                r.output_dir,
                r.method,
                RunStatus.QUEUED if i in todo else RunStatus.FINISHED,
                stage=r.lineage.stage if r.lineage else None,
                parent=r.lineage.parent if r.lineage else None,
                slurm=_earlier_job(previous, r.name),
            )
            for i, r in enumerate(runs)
        },
        slurm={
            "job_ids": [],
            "array_job_id": None,
            "arrays": {},
            "gangs": {},
            "choice_job_ids": {},
            "eval_job_id": None,
            "script": None,
            "previous_job_ids": old.get("previous_job_ids", []) + old.get("job_ids", []),
        },
    )
    jobs = record.slurm
    assert jobs is not None
    job_of: dict[str, str] = {}  # run name -> its array task, "ARRAY_TASK"
    array_of_stage: dict[str, list[str]] = {}
    for key in groups:
        after = dependency_of(key, runs, job_of, array_of_stage, spec, str(sweep_dir), python, slurm_dir, record)
        tasks = arrays.get(key, [])
        if tasks:
            script = slurm_dir / script_name(key)
            script.write_text(render_array_script(spec, runs, tasks, str(sweep_dir), python, a.retries, key, after))
            array_id = sbatch(script)
            jobs["job_ids"].append(array_id)
            jobs["arrays"][key] = array_id
            if key == MAIN:
                jobs.update(array_job_id=array_id, script=str(script))
            for t, task in enumerate(tasks):
                for i in task:
                    job_of[runs[i].name] = f"{array_id}_{t}"
                    record.runs[runs[i].name].slurm = {
                        "slurm_task": t,
                        "slurm_job": f"{array_id}_{t}",
                        "slurm_array": key,
                    }
                    if runs[i].lineage:
                        array_of_stage.setdefault(runs[i].lineage.stage, []).append(array_id)
        for i in gangs.get(key, []):  # each multi-node run: a job of its own, waiting for what its group waits for
            name = runs[i].name
            script = slurm_dir / gang_script_name(name)
            script.write_text(render_gang_script(spec, runs, i, str(sweep_dir), python, a.retries, after))
            job_id = sbatch(script)
            jobs["job_ids"].append(job_id)
            jobs["gangs"][name] = job_id
            job_of[name] = job_id
            record.runs[name].slurm = {"slurm_job": job_id, "slurm_array": f"nodes-{runs[i].config.num_nodes}"}
            if runs[i].lineage:
                array_of_stage.setdefault(runs[i].lineage.stage, []).append(job_id)
        record.write(str(sweep_dir))  # whatever happens next, a resubmission sees the jobs so far
    record.write(str(sweep_dir))

    eval_id = None
    if a.evaluate:
        arrays_submitted = ":".join([*jobs["arrays"].values(), *jobs["gangs"].values()]) or None
        (slurm_dir / "eval.sbatch").write_text(render_eval_script(spec, str(sweep_dir), python, arrays_submitted))
        try:
            eval_id = sbatch(slurm_dir / "eval.sbatch")
        except TunefleetError as exc:
            if arrays_submitted:
                raise TunefleetError(
                    f"{exc} (training arrays {arrays_submitted} are submitted; evaluate later with "
                    f"`tunefleet eval --runs_dir {spec.runs_dir}`)"
                ) from None
            raise
        jobs.update(job_ids=jobs["job_ids"] + [eval_id], eval_job_id=eval_id)
        record.write(str(sweep_dir))

    print_submitted(spec, runs, arrays, jobs["arrays"], eval_id, sweep_dir, jobs["gangs"])
    return 0


def gang_script_name(run: str) -> str:
    return f"nodes-{run}.sbatch"


def sbatch_test(script: Path, run) -> None:
    """`sbatch --test-only`: whether SLURM could ever start the job (its nodes exist), before anything is submitted."""
    proc = _slurm(["sbatch", "--test-only", str(script)])
    if proc.returncode != 0:
        errors = [line.split("error:", 1)[1].strip() for line in proc.stderr.splitlines() if "error:" in line]
        reason = errors[-1] if errors else (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise TunefleetError(
            f"run {run.name} spans {run.config.num_nodes} nodes, which SLURM cannot give it ({reason}): lower "
            "num_nodes, or ask another partition (slurm.partition)"
        )


def dependency_groups(runs, todo: list[int]) -> dict[str, list[int]]:
    """The runs to submit, by what they wait for (pure): nothing (`main`: a plain sweep's runs, a pipeline's first
    stage, and runs whose parent finished before), a parent still to train (`after-PARENT`), or the choice of the
    best run of another stage (`best-STAGE`)."""
    waiting = {runs[i].name for i in todo}
    groups: dict[str, list[int]] = {}
    for i in todo:
        run = runs[i]
        if run.lineage is not None and run.lineage.best is not None:
            key = f"best-{run.lineage.stage}"
        elif run.parent is not None and run.parent in waiting:
            key = f"after-{run.parent}"
        else:
            key = MAIN
        groups.setdefault(key, []).append(i)
    return dict(sorted(groups.items(), key=lambda g: g[1][0]))  # parents come before their children in runs


def script_name(group: str) -> str:
    return "sweep.sbatch" if group == MAIN else f"sweep-{group}.sbatch"


def waits_for(group: str, runs) -> str:
    if group == MAIN:
        return "starts at once"
    kind, _, what = group.partition("-")
    return (
        f"starts when {what} succeeded" if kind == "after" else f"starts once the best run for stage {what} is chosen"
    )


def dependency_of(
    key, runs, job_of, array_of_stage, spec, sweep_dir, python, slurm_dir, record: SweepRecord
) -> str | None:
    """The job(s) the array `key` waits for: its parent's task, or the job that chooses its stage's parent (which
    is submitted here, after every array of the stage it chooses from)."""
    kind, _, what = key.partition("-")
    if kind == "after":
        return job_of[what]
    if kind != "best":
        return None
    stage = next(s for s in spec.stages if s.name == what)
    before = ":".join(sorted(set(array_of_stage.get(stage.parent, [])))) or None
    script = slurm_dir / f"choose-{what}.sbatch"
    script.write_text(render_choice_script(spec, what, sweep_dir, python, before))
    choice_id = sbatch(script)
    jobs = record.slurm
    assert jobs is not None
    jobs["job_ids"].append(choice_id)
    jobs["choice_job_ids"][what] = choice_id
    return choice_id


def refuse_while_queued(spec, job_ids: list) -> None:
    """Never run a run twice: while SLURM may still start the sweep's previous jobs, refuse to resubmit."""
    busy = active_jobs(queue_states(job_ids))
    if busy:
        shown = ", ".join(f"{j} {s}" for j, s in sorted(busy.items())[:4]) + (" ..." if len(busy) > 4 else "")
        raise TunefleetError(
            f"sweep {spec.name} is still in SLURM ({shown}); resubmitting now could run a run "
            f"twice: wait for it or `tunefleet cancel {spec.runs_dir}` first"
        )


def print_submitted(
    spec, runs, arrays: dict, array_ids: dict, eval_id, sweep_dir: Path, gang_ids: dict | None = None
) -> None:
    slurm_dir = sweep_dir / "slurm"
    gang_ids = gang_ids or {}
    finished = len(runs) - sum(len(task) for tasks in arrays.values() for task in tasks) - len(gang_ids)
    by_name = {run.name: run for run in runs}
    for name, job_id in gang_ids.items():
        print(
            f"submitted {name}: SLURM job {job_id} over {by_name[name].config.num_nodes} nodes"
            f"  log {slurm_dir / f'{job_id}.log'}"
        )
    limit = spec.slurm.array_limit or spec.resources.max_parallel
    for key, tasks in arrays.items():
        array_id = array_ids[key]
        print(
            f"submitted sweep {spec.name}: SLURM array job {array_id}, {len(tasks)} task(s) "
            f"({array_spec(list(range(len(tasks))), None)})"
            + ("" if key == MAIN else f", {waits_for(key, runs)}")
            + (f", at most {limit} at once" if limit else "")
            + (f"; {finished} run(s) already finished" if finished and key == MAIN else "")
        )
        for t, task in enumerate(tasks):
            names = " + ".join(runs[i].name for i in task)
            print(f"  {array_id}_{t}: {names}  log {slurm_dir / f'{array_id}_{t}.log'}")
    if not arrays and not gang_ids:
        print(f"sweep {spec.name}: every run already finished" + (f" ({finished})" if finished else ""))
    if eval_id:
        every = ", ".join([*array_ids.values(), *gang_ids.values()])
        print(
            f"evaluation: job {eval_id}"
            + (f", starts when every task of {every} succeeded" if every else "")
            + f"; results in {sweep_dir / 'evaluation_results.json'}"
        )
    print(f"follow: tunefleet status {spec.runs_dir}    cancel: tunefleet cancel {spec.runs_dir}")


def _earlier_job(previous: SweepRecord | None, name: str) -> dict | None:
    """A run's task id from the previous submission (kept for a finished run: status shows its log)."""
    entry = previous.runs.get(name) if previous else None
    earlier = {k: v for k, v in ((entry.slurm if entry else None) or {}).items() if k in ("slurm_task", "slurm_job")}
    return earlier or None


# ---------------------------------------------------------------- cancel
def cancel(state: dict) -> int:
    """scancel the sweep's recorded jobs; the runs keep their checkpoints and resume on resubmission."""
    s = state["slurm"]
    ids = [str(j) for j in s.get("job_ids", []) if j]
    busy = active_jobs(queue_states(ids))
    if not busy:
        print(f"sweep {state['name']}: no queued or running SLURM jobs (jobs {', '.join(ids) or 'none'})")
        return 0
    proc = _slurm(["scancel", *ids])
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise TunefleetError(f"scancel {' '.join(ids)} failed: {reason}")
    roles = {str(j): f"training array ({key})" for key, j in (s.get("arrays") or {}).items()}
    roles |= {str(s.get("array_job_id")): "training array", str(s.get("eval_job_id")): "evaluation"}
    roles |= {str(j): f"choice of stage {stage}'s parent" for stage, j in (s.get("choice_job_ids") or {}).items()}
    roles |= {str(j): f"run {run} over several nodes" for run, j in (s.get("gangs") or {}).items()}
    for jid in ids:
        mine = {j: st for j, st in busy.items() if j == jid or j.startswith(f"{jid}_")}
        if mine:
            listed = ", ".join(f"{j} ({st})" for j, st in sorted(mine.items()))
            print(f"cancelled {roles.get(jid, 'job')} {jid}: {listed}")
    print(
        f"resume later with: tunefleet sweep {state.get('spec', 'SPEC')} --backend slurm "
        "(finished runs are skipped, the others resume from their checkpoints)"
    )
    return 0


# ---------------------------------------------------------------- the backend
class SlurmBackend:
    """SLURM job arrays (launcher/backend.py): `run` submits them (and the evaluation as a job) and returns."""

    name = "slurm"
    eval_backend = "local"  # the evaluation job picks its own (eval_backend): shards on the job's GPUs
    submits = True

    def __init__(self, options: SweepOptions):
        self.options = options
        self.needs: PlanNeeds | None = None

    def dry_run(self, spec, runs, searches: list[str]) -> int:
        return submit_sweep(spec, runs, self.options)  # prints the scripts, submits nothing

    def check_search(self) -> None:
        raise TunefleetError(SEARCH_ON_SLURM)

    def prepare(self) -> None:
        pass  # the runs start in their jobs

    def check_plan(self, needs: PlanNeeds) -> None:
        self.needs = needs  # checked inside an allocation, just before the arrays are submitted

    def run(self, spec, runs, chooser) -> Ran:
        return Ran(submitted=True, exit_code=submit_sweep(spec, runs, self.options, self.needs))

    def search(self, spec, setups) -> int:
        raise TunefleetError(SEARCH_ON_SLURM)


SEARCH_ON_SLURM = (
    "a search runs on Ray: start a Ray cluster on your allocation with cluster_configs/slurm/ray_cluster.sbatch, "
    "then: tunefleet sweep SPEC --backend ray --address <head>:6379"
)
