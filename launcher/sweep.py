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
from pathlib import Path

from trainers import config
from trainers.errors import TunefleetError

TOP_KEYS = ("name", "runs_dir", "base", "grid", "methods", "resources", "naming", "slurm", "eval")
RESOURCE_KEYS = {"gpus_per_run": int, "cpus_per_run": int, "memory_gb": float, "max_parallel": int}
SLURM_KEYS = {"partition": str, "account": str, "qos": str, "time": str, "array_limit": int, "extra": list,
              "requeue": bool, "signal_seconds": int, "python": str}
EVAL_KEYS = {"max_samples": int, "max_generation_samples": int, "skip_perplexity": bool, "shards": int,
             "batch_size": int, "backend": str, "sft_split": str, "pref_split": str, "gpus_per_worker": float}
DEFAULT_NAMING = "{method}_{model_short}_s{seed}"


@dataclass
class Resources:
    gpus_per_run: int = 0
    cpus_per_run: int = 1
    memory_gb: float | None = None
    max_parallel: int | None = None


@dataclass
class RunPlan:
    name: str
    output_dir: str
    config: dict  # TrainConfig fields (validated), output_dir included

    @property
    def method(self) -> str:
        return self.config["method"]


@dataclass
class SweepSpec:
    name: str
    runs_dir: str
    base: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    naming: str = DEFAULT_NAMING
    slurm: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    path: str = ""


# ---------------------------------------------------------------- YAML with line numbers
def load_yaml_lines(path: str) -> tuple[dict, dict]:
    """YAML mapping plus {dotted.key: line} so errors can point at the file line."""
    import yaml

    data, node = config.parse_yaml_mapping(path, "sweep spec", "a sweep spec is a mapping (name, base, grid, ...)",
                                           with_nodes=True)
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


def _check_section(section: dict, allowed: dict, name: str, spec_path: str, lines: dict) -> dict:
    if not isinstance(section, dict):
        raise TunefleetError(f"{_where(spec_path, lines, name)}'{name}' must be a mapping")
    out = {}
    for key, value in section.items():
        where = _where(spec_path, lines, f"{name}.{key}")
        if key not in allowed:
            raise TunefleetError(f"{where}unknown key '{name}.{key}'{config.nearest(key, allowed)}")
        tp = allowed[key]
        if value is not None and not (isinstance(value, tp) or (tp is float and isinstance(value, int))) \
                or isinstance(value, bool) and tp is not bool:
            raise TunefleetError(f"{where}'{name}.{key}' must be {tp.__name__}, got {value!r}")
        out[key] = value
    return out


def parse_spec(data: dict, spec_path: str = "<spec>", lines: dict | None = None) -> SweepSpec:
    """Validate a spec mapping; every error names the key and, when known, the file line."""
    lines = lines or {}
    for key in data:
        if key not in TOP_KEYS:
            raise TunefleetError(f"{_where(spec_path, lines, key)}unknown key '{key}'{config.nearest(key, TOP_KEYS)}")
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
    spec.resources = Resources(**_check_section(data.get("resources") or {}, RESOURCE_KEYS, "resources", spec_path,
                                                lines))
    for key in ("gpus_per_run", "cpus_per_run", "max_parallel"):
        value = getattr(spec.resources, key)
        if value is not None and value < (0 if key == "gpus_per_run" else 1):
            raise TunefleetError(f"{_where(spec_path, lines, 'resources.' + key)}'resources.{key}' is out of range: {value}")
    spec.slurm = _check_section(data.get("slurm") or {}, SLURM_KEYS, "slurm", spec_path, lines)
    spec.eval = _check_section(data.get("eval") or {}, EVAL_KEYS, "eval", spec_path, lines)
    spec.naming = data.get("naming") or DEFAULT_NAMING
    if not isinstance(spec.naming, str):
        raise TunefleetError(f"{_where(spec_path, lines, 'naming')}'naming' must be a string")
    return spec


def load_spec(path: str) -> SweepSpec:
    data, lines = load_yaml_lines(path)
    return parse_spec(data, path, lines)


# ---------------------------------------------------------------- expansion
def model_short(model_name: str) -> str:
    return Path(str(model_name).rstrip("/")).name.lower()


def run_name(pattern: str, values: dict) -> str:
    import dataclasses
    defaults = dataclasses.asdict(config.TrainConfig())
    fields = {**defaults, **values, "model_short": model_short(values.get("model_name") or "model")}
    try:
        name = pattern.format(**fields)
    except (KeyError, IndexError) as exc:
        raise TunefleetError(f"naming pattern {pattern!r} uses unknown field {exc}; use train flags or model_short") from None
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
            raise TunefleetError(f"{spec.path}: naming {spec.naming!r} gives two runs the name '{name}'; add "
                                 + ", ".join("{" + k + "}" for k in varying) + " to 'naming'")
        seen[name] = combo
        output_dir = str(Path(spec.runs_dir) / name)
        values["output_dir"] = output_dir
        if spec.resources.gpus_per_run > 1:
            values.setdefault("num_processes", spec.resources.gpus_per_run)
        cfg = config.from_dict(values, where=f"{spec.path}: run {name}: ")
        runs.append(RunPlan(name=name, output_dir=output_dir, config=_plain(cfg)))
    return runs


def _plain(cfg) -> dict:
    import dataclasses
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}


def data_checks(runs: list[RunPlan]) -> list[tuple[str, str, str]]:
    """The distinct (method, dataset, split) triples a sweep needs: check each once before starting."""
    triples = []
    for run in runs:
        for split in (run.config.get("split"), run.config.get("eval_split")):
            t = (run.method, run.config["dataset"], split)
            if split and t not in triples:
                triples.append(t)
    return triples


def validate_data(runs: list[RunPlan]) -> None:
    """Load each needed split once and detect its format for the method: fail before any run starts."""
    from trainers import data
    loaded = {}
    for method, dataset, split in data_checks(runs):
        if (dataset, split) not in loaded:
            loaded[(dataset, split)] = data.load_split(dataset, split)
        ds = loaded[(dataset, split)]
        try:
            data.detect_format(method, ds)
        except TunefleetError as exc:
            raise TunefleetError(f"{method} on {dataset} split '{split}': {exc}") from None
