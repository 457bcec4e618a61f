"""Sweep specs: one YAML -> a validated list of runs (pure; no Ray, SLURM or model needed).

    name: demo                       # required
    runs_dir: runs/demo              # default runs/<name>
    base: {model_name: ..., dataset: ..., max_steps: 40}        # any `tunefleet train` flag
    grid: {method: [sft, dpo], seed: [1, 2]}                    # lists to cross (any flag)
    methods: {dpo: {split: train_prefs, learning_rate: 1e-3}}   # per-method overrides
    resources: {gpus_per_run: 1, cpus_per_run: 4, memory_gb: 32, max_parallel: null}
    naming: "{method}_{model_short}_s{seed}"                    # any flag, plus model_short
    slurm: {partition: gpu, time: "04:00:00", array_limit: 4}   # --backend slurm only
    eval: {max_samples: 100, shards: 2}                         # `tunefleet eval` flags for --eval

Precedence inside a run: base < methods[<method>] < the grid values of that run.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from tunefleet.common import schema
from tunefleet.common.errors import TunefleetError
from tunefleet.common.schema import nearest, option
from tunefleet.common.storage import join
from tunefleet.eval.settings import EvalSettings
from tunefleet.launcher.placement import parse_gpus, place
from tunefleet.launcher.runs import RunPlan
from tunefleet.trainers import config
from tunefleet.trainers.config import DatasetPart, TrainConfig, model_short

TOP_KEYS = ("name", "runs_dir", "base", "grid", "methods", "resources", "naming", "slurm", "eval")
DEFAULT_NAMING = "{method}_{model_short}_s{seed}"


@dataclass
class Resources:
    gpus_per_run: float | str = option(
        0.0,
        "GPUs per run: 0 (CPU), a share of one (0.5: two runs per GPU), whole GPUs (2), or auto (packed by "
        "estimated memory).",
        parse=parse_gpus,
    )
    gpu_memory_gb: float | None = option(
        None, "Memory of one GPU, for gpus_per_run: auto when the planning machine has no GPU.", above=0
    )
    strategy: str = option(
        "pack", "Ray and local placement: pack (fill a node first) or spread.", choices=("pack", "spread")
    )
    cpus_per_run: int = option(1, "CPU cores per run.", at_least=1)
    memory_gb: float | None = option(None, "Memory per run in GB (Ray and SLURM reserve it).", above=0)
    max_parallel: int | None = option(None, "At most this many runs at once.", at_least=1)


@dataclass
class SlurmSettings:
    partition: str | None = option(None, "#SBATCH --partition.")
    account: str | None = option(None, "#SBATCH --account.")
    qos: str | None = option(None, "#SBATCH --qos.")
    time: str | None = option(None, "#SBATCH --time, e.g. 04:00:00.")
    array_limit: int | None = option(None, "At most this many array tasks at once (--array=...%N).", at_least=1)
    extra: list[str] = option([], "Extra #SBATCH lines, verbatim (site-specific).")
    requeue: bool = option(True, "Requeue a task that was signalled before its time limit (it resumes).")
    signal_seconds: int = option(
        120, "Seconds before the time limit that USR1 arrives (checkpoint, requeue).", at_least=1
    )
    python: str | None = option(None, "Python on the compute nodes (default: the one running tunefleet).")


@dataclass
class SweepSpec:
    name: str
    runs_dir: str
    base: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    naming: str = DEFAULT_NAMING
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    path: str = ""


# ---------------------------------------------------------------- YAML with line numbers
def load_yaml_lines(path: str) -> tuple[dict, dict]:
    """YAML mapping plus {dotted.key: line} so errors can point at the file line."""
    import yaml

    data, node = schema.read_yaml_mapping(
        path, "sweep spec", "a sweep spec is a mapping (name, base, grid, ...)", with_nodes=True
    )
    lines: dict[str, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return data, lines


def _where(spec_path: str, lines: dict, key: str) -> str:
    line = lines.get(key)
    return f"{spec_path}:{line}: " if line else f"{spec_path}: "


def _section(cls, section, name: str, spec_path: str, lines: dict):
    """A typed section (resources, slurm, eval) from its mapping; errors name `section.key` and its line."""
    if not isinstance(section, dict):
        raise TunefleetError(f"{_where(spec_path, lines, name)}'{name}' must be a mapping")
    values = {}
    for key, value in section.items():
        values[key] = schema.coerce(cls, key, value, _where(spec_path, lines, f"{name}.{key}"), f"{name}.{key}")
    return cls(**values)


def parse_spec(data: dict, spec_path: str = "<spec>", lines: dict | None = None) -> SweepSpec:
    """Validate a spec mapping; every error names the key and, when known, the file line."""
    lines = lines or {}
    for key in data:
        if key not in TOP_KEYS:
            raise TunefleetError(f"{_where(spec_path, lines, key)}unknown key '{key}'{nearest(key, TOP_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise TunefleetError(f"{_where(spec_path, lines, 'name')}'name' is required: letters, digits, _ . -")
    spec = SweepSpec(name=name, runs_dir=str(data.get("runs_dir") or f"runs/{name}"), path=spec_path)
    for section in ("base", "grid", "methods"):
        value = data.get(section) or {}
        if not isinstance(value, dict):
            raise TunefleetError(f"{_where(spec_path, lines, section)}'{section}' must be a mapping")
        setattr(spec, section, value)
    for key, value in spec.base.items():
        config.coerce(key, value, _where(spec_path, lines, f"base.{key}"))
    for key, values in spec.grid.items():
        where = _where(spec_path, lines, f"grid.{key}")
        if not isinstance(values, list) or not values:
            raise TunefleetError(f"{where}'grid.{key}' must be a non-empty list")
        for v in values:
            config.coerce(key, v, where)
    for method, overrides in spec.methods.items():
        where = _where(spec_path, lines, f"methods.{method}")
        config.coerce("method", method, where)
        if not isinstance(overrides, dict):
            raise TunefleetError(f"{where}'methods.{method}' must be a mapping of flags")
        for key, value in overrides.items():
            config.coerce(key, value, _where(spec_path, lines, f"methods.{method}.{key}"))
    spec.resources = _section(Resources, data.get("resources") or {}, "resources", spec_path, lines)
    spec.slurm = _section(SlurmSettings, data.get("slurm") or {}, "slurm", spec_path, lines)
    spec.eval = _section(EvalSettings, data.get("eval") or {}, "eval", spec_path, lines)
    spec.naming = data.get("naming") or DEFAULT_NAMING
    if not isinstance(spec.naming, str):
        raise TunefleetError(f"{_where(spec_path, lines, 'naming')}'naming' must be a string")
    return spec


def load_spec(path: str) -> SweepSpec:
    data, lines = load_yaml_lines(path)
    return parse_spec(data, path, lines)


# ---------------------------------------------------------------- expansion
def run_name(pattern: str, values: dict) -> str:
    defaults = schema.to_dict(TrainConfig())
    fields = {**defaults, **values, "model_short": model_short(values.get("model_name") or "model")}
    try:
        name = pattern.format(**fields)
    except (KeyError, IndexError) as exc:
        raise TunefleetError(
            f"naming pattern {pattern!r} uses unknown field {exc}; use train flags or model_short"
        ) from None
    return re.sub(r"[^\w.-]+", "-", name)


def expand(spec: SweepSpec) -> list[RunPlan]:
    """Cross the grid; apply base < method overrides < grid values; validate every run's config."""
    keys = list(spec.grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(spec.grid[k] for k in keys))] or [{}]
    runs, seen = [], {}
    for combo in combos:
        method = combo.get("method", spec.base.get("method"))
        values = {**spec.base, **spec.methods.get(method, {}), **combo}
        name = run_name(spec.naming, values)
        if name in seen:
            varying = [k for k in keys if combo[k] != seen[name][k]]
            raise TunefleetError(
                f"{spec.path}: naming {spec.naming!r} gives two runs the name '{name}'; add "
                + ", ".join("{" + k + "}" for k in varying)
                + " to 'naming'"
            )
        seen[name] = combo
        output_dir = join(spec.runs_dir, name)  # a URI stays one (a Path would make s3://b into s3:/b)
        values["output_dir"] = output_dir
        values.setdefault("run_name", name)  # trackers: named by run, grouped by sweep
        values.setdefault("tracking_group", spec.name)
        gpus = spec.resources.gpus_per_run
        if not isinstance(gpus, str) and gpus > 1:
            values.setdefault("num_processes", int(gpus))
        runs.append(RunPlan(name=name, config=config.from_dict(values, where=f"{spec.path}: run {name}: ")))
    return runs


def place_runs(runs: list[RunPlan], resources: Resources, local_gpu_memory: int | None = None) -> list[RunPlan]:
    """Each run with its placement: a share of a GPU, whole GPUs, or CPU (see launcher/placement.py)."""
    import dataclasses

    from tunefleet.trainers import memory

    gpu_memory = int(resources.gpu_memory_gb * memory.GIB) if resources.gpu_memory_gb else local_gpu_memory
    shapes: dict[str, memory.ModelShape | None] = {}
    placed = []
    for run in runs:
        shape = None
        if resources.gpus_per_run == "auto":
            if run.config.model_name not in shapes:
                shapes[run.config.model_name] = memory.shape_of(run.config.model_name, run.config.trust_remote_code)
            shape = shapes[run.config.model_name]
        placed.append(dataclasses.replace(run, placement=place(run.config, resources.gpus_per_run, gpu_memory, shape)))
    return placed


def data_checks(runs: list[RunPlan]) -> list[tuple[str, DatasetPart]]:
    """The distinct (method, dataset part) pairs a sweep reads: each is checked once before any run starts."""
    from tunefleet.trainers import data

    checks = []
    for run in runs:
        for part in [*data.train_parts(run.config), data.eval_part(run.config)]:
            if part is not None and (run.method, part) not in checks:
                checks.append((run.method, part))
    return checks


def validate_data(runs: list[RunPlan]) -> None:
    """Load each needed split once; its layout must fit the method and lose no text: fail before any run starts."""
    from tunefleet.trainers import data

    loaded = {}
    for method, part in data_checks(runs):
        key = (part.dataset, part.split, part.config, tuple(part.data_files or ()))
        if key not in loaded:
            loaded[key] = data.load_split(part.dataset, part.split, part.config, part.data_files)
        try:
            data.check(method, loaded[key], part.columns, part.ignore_columns, part.dataset, part.split)
        except TunefleetError as exc:
            raise TunefleetError(f"{method} on {part.dataset} split '{part.split}': {exc}") from None
