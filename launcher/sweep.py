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

A pipeline spec holds named `stages:` instead of one grid; each takes every key above (but name, runs_dir, slurm)
over the spec's, and may start from the runs of an earlier stage:

    stages:
      sft: {grid: {seed: [1, 2]}, base: {method: sft, split: train_sft}}
      aligned:                      # each SFT run is the base model of one run per method
        from: sft
        match: [seed]               # (the default) a child takes its parent's seed; a grid over seed pairs by value
        grid: {method: [dpo, kto]}
      tuned:
        from: sft
        best: test_loss             # the parent is the best SFT run by test loss, once that stage is evaluated
        grid: {method: [dpo], seed: [1, 2]}

`search:` and `confirm:` (a hyperparameter search per method, launcher/search_settings.py) replace the grid of a plain spec
or of a stage; a search stage starts from one model (the spec's, or its `from` stage's `best` run).

Why one module of this size: reading a spec's YAML with line numbers, validating it and expanding it into runs
(stages, lineage, naming) share the spec's types and the file-and-line of every error.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunefleet.common import schema
from tunefleet.common.contract import RUN_RECORD
from tunefleet.common.errors import TunefleetError
from tunefleet.common.schema import nearest, option
from tunefleet.common.storage import join
from tunefleet.eval.settings import EvalSettings
from tunefleet.launcher.placement import parse_gpus, place
from tunefleet.launcher.records import RunPlan
from tunefleet.launcher.search_settings import SearchSettings, parse_search
from tunefleet.trainers import config
from tunefleet.trainers.config import DatasetPart, TrainConfig, model_short

TOP_KEYS = (
    "name",
    "runs_dir",
    "base",
    "grid",
    "methods",
    "resources",
    "naming",
    "slurm",
    "eval",
    "stages",
    "search",
    "confirm",
)
STAGE_KEYS = ("from", "match", "best", "base", "grid", "methods", "resources", "naming", "eval", "search", "confirm")
SWEEP_WIDE = ("strategy", "max_parallel")  # resources of the whole sweep, not of one stage
DEFAULT_NAMING = "{method}_{model_short}_s{seed}"
CHILD_NAMING = "{parent}-{method}"  # a run of a stage that starts from a run of an earlier one, matched
BEST_CHILD_NAMING = "{method}_{model_short}_s{seed}_from_best_{parent_stage}"
# What the evaluator needs to give each metric `best:` may choose by (eval.results.BETTER has their directions).
METRIC_NEEDS = {
    "test_loss": "sft_split",
    "perplexity": "sft_split",
    "preference_accuracy": "pref_split",
    "reward_accuracy": "pref_split",
    "loss_margin": "pref_split",
    "heldout_reward": "gen_split",
    "win_rate_vs_base": "gen_split",
    "best_eval_loss": "eval_split",
    "final_eval_loss": "eval_split",
}


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
    multinode: str = option(
        "nodes",
        "How a run with num_nodes > 1 asks for its nodes: nodes (--nodes=N --ntasks-per-node=1, one launcher per "
        "node) or tasks (--ntasks=N wherever SLURM puts them: each task stands for a node, as on a one-node test "
        "cluster).",
        choices=("nodes", "tasks"),
    )


@dataclass
class Stage:
    """One stage of a pipeline spec: its own grid, methods, resources, eval and naming over the spec's, and where
    its runs start: the spec's model, or a run of an earlier stage (`from`), matched by the values in `match` (each
    parent's runs get the stage's grid; a grid key in `match` pairs a child with the parent of the same value) or
    the `best` run of that stage by a metric, once it is evaluated."""

    name: str
    base: dict = field(default_factory=dict)  # the spec's base with the stage's on top
    grid: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)  # per method: the spec's overrides with the stage's on top
    resources: Resources = field(default_factory=Resources)
    naming: str | None = None  # None: the default for where the stage starts
    eval: EvalSettings = field(default_factory=EvalSettings)
    parent: str | None = None  # `from`: the stage whose runs this one starts from
    match: list[str] = field(default_factory=lambda: ["seed"])
    best: str | None = None
    sets_model: str | None = None  # a model_name the stage's own base gives (checked against its parents')
    search: SearchSettings | None = None  # a search stage: its runs are the search's trials and confirm runs


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
    stages: list[Stage] = field(default_factory=list)  # empty: a plain sweep (one grid)
    search: SearchSettings | None = None  # a hyperparameter search per method (launcher/search_settings.py)
    starts_from: str | None = None  # a search stage's parent run: its runs train from it, named by base's model


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
    spec.base = with_recipe_path(spec.base, spec_path)
    spec.methods = {m: with_recipe_path(v, spec_path) for m, v in spec.methods.items()}
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
    if "stages" in data:
        spec.stages = parse_stages(data, spec, spec_path, lines)
    if "search" in data:
        if spec.stages:
            raise TunefleetError(
                f"{_where(spec_path, lines, 'search')}a spec with stages searches inside a stage: move 'search' "
                "(and 'confirm') into the stage it belongs to"
            )
        spec.search = parse_search(data["search"], data.get("confirm"), lambda k: _where(spec_path, lines, k), spec)
    elif "confirm" in data:
        raise TunefleetError(
            f"{_where(spec_path, lines, 'confirm')}'confirm' reruns the best of a search: add 'search'"
        )
    return spec


def with_recipe_path(values: Any, spec_path: str) -> Any:
    """A `recipe:` named relative to the spec is read from the spec's folder (where it was written beside it)."""
    if not isinstance(values, dict) or not isinstance(values.get("recipe"), str):
        return values
    beside = Path(spec_path).parent / values["recipe"]
    if not Path(values["recipe"]).is_absolute() and beside.is_file():
        return {**values, "recipe": str(beside.resolve())}
    return values


def _checked_flags(values, name: str, spec_path: str, lines: dict) -> dict:
    where = _where(spec_path, lines, name)
    values = with_recipe_path(values, spec_path)
    if not isinstance(values, dict):
        raise TunefleetError(f"{where}'{name}' must be a mapping of flags")
    for key, value in values.items():
        config.coerce(key, value, _where(spec_path, lines, f"{name}.{key}"))
    return values


def parse_stages(data: dict, spec: SweepSpec, spec_path: str, lines: dict) -> list[Stage]:
    """The `stages:` mapping, in order; each stage's settings over the spec's (every error names key and line)."""
    stages_data = data["stages"]
    if not isinstance(stages_data, dict) or not stages_data:
        raise TunefleetError(f"{_where(spec_path, lines, 'stages')}'stages' must be a mapping of named stages")
    if data.get("grid"):
        raise TunefleetError(
            f"{_where(spec_path, lines, 'grid')}a spec with stages gives each stage its own grid: move 'grid' into them"
        )
    stages: list[Stage] = []
    for name, raw in stages_data.items():
        key = f"stages.{name}"
        where = _where(spec_path, lines, key)
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise TunefleetError(f"{where}stage names are letters, digits, _ . -: {name!r}")
        if not isinstance(raw, dict):
            raise TunefleetError(f"{where}'{key}' must be a mapping (from, grid, methods, ...)")
        for k in raw:
            if k not in STAGE_KEYS:
                raise TunefleetError(
                    f"{_where(spec_path, lines, f'{key}.{k}')}unknown key '{k}' in a stage{nearest(k, STAGE_KEYS)}"
                )
        stage = Stage(name=name, naming=raw.get("naming"))
        own_base = _checked_flags(raw.get("base") or {}, f"{key}.base", spec_path, lines)
        stage.base = {**spec.base, **own_base}
        stage.sets_model = own_base.get("model_name")
        grid = raw.get("grid") or {}
        if not isinstance(grid, dict):
            raise TunefleetError(f"{_where(spec_path, lines, f'{key}.grid')}'{key}.grid' must be a mapping")
        for k, values in grid.items():
            at = _where(spec_path, lines, f"{key}.grid.{k}")
            if not isinstance(values, list) or not values:
                raise TunefleetError(f"{at}'{key}.grid.{k}' must be a non-empty list")
            for v in values:
                config.coerce(k, v, at)
        stage.grid = grid
        methods = raw.get("methods") or {}
        if not isinstance(methods, dict):
            raise TunefleetError(f"{_where(spec_path, lines, f'{key}.methods')}'{key}.methods' must be a mapping")
        stage.methods = dict(spec.methods)
        for method, overrides in methods.items():
            config.coerce("method", method, _where(spec_path, lines, f"{key}.methods.{method}"))
            overrides = _checked_flags(overrides, f"{key}.methods.{method}", spec_path, lines)
            stage.methods[method] = {**spec.methods.get(method, {}), **overrides}
        resources = raw.get("resources") or {}
        for k in SWEEP_WIDE:
            if k in (resources if isinstance(resources, dict) else {}):
                raise TunefleetError(
                    f"{_where(spec_path, lines, f'{key}.resources.{k}')}resources.{k} is the whole sweep's: set it "
                    "in the spec's top-level resources"
                )
        stage.resources = _section(
            Resources, {**(data.get("resources") or {}), **resources}, f"{key}.resources", spec_path, lines
        )
        stage.eval = _section(
            EvalSettings, {**(data.get("eval") or {}), **(raw.get("eval") or {})}, f"{key}.eval", spec_path, lines
        )
        if stage.naming is not None and not isinstance(stage.naming, str):
            raise TunefleetError(f"{_where(spec_path, lines, f'{key}.naming')}'{key}.naming' must be a string")
        stage.parent = raw.get("from")
        known = [s.name for s in stages]
        if stage.parent is not None:
            at = _where(spec_path, lines, f"{key}.from")
            if stage.parent == name:
                raise TunefleetError(f"{at}stage '{name}' starts from itself: a cycle")
            if stage.parent not in stages_data:
                raise TunefleetError(
                    f"{at}stage '{name}' starts from '{stage.parent}', which is no stage{nearest(str(stage.parent), stages_data)}"
                )
            if stage.parent not in known:
                raise TunefleetError(
                    f"{at}stage '{name}' starts from '{stage.parent}', which comes after it: stages run from a "
                    "stage listed earlier (put it first; a stage cannot start from a later one: that would be a cycle)"
                )
        if "best" in raw and "match" in raw:
            raise TunefleetError(f"{where}a stage takes its parent by 'match' or by 'best', not both")
        if ("best" in raw or "match" in raw) and stage.parent is None:
            raise TunefleetError(f"{where}'best' and 'match' choose a parent among a stage's runs: add 'from: STAGE'")
        if "match" in raw:
            match = raw["match"]
            if isinstance(match, str):
                match = [match]
            for k in match or []:
                config.coerce(k, None, _where(spec_path, lines, f"{key}.match"))  # a train flag (nearest name)
            stage.match = list(match or [])
        if "best" in raw:
            stage.best = str(raw["best"])
            if stage.best not in METRIC_NEEDS:
                raise TunefleetError(
                    f"{_where(spec_path, lines, f'{key}.best')}best: '{stage.best}' is no metric runs are chosen by"
                    f"{nearest(stage.best, METRIC_NEEDS)}; use one of {', '.join(METRIC_NEEDS)}"
                )
        if "search" in raw:
            parse_stage_search(stage, raw, stages, spec_path, lines)
        elif "confirm" in raw:
            raise TunefleetError(
                f"{_where(spec_path, lines, f'{key}.confirm')}'confirm' reruns the best of a search: add 'search'"
            )
        if stage.parent is not None and any(s.name == stage.parent and s.search for s in stages):
            raise TunefleetError(
                f"{_where(spec_path, lines, f'{key}.from')}stage '{name}' starts from the search stage "
                f"'{stage.parent}': a search stage ends a pipeline (its runs are known only once it has searched)"
            )
        stages.append(stage)
    return stages


def parse_stage_search(stage: Stage, raw: dict, earlier: list[Stage], spec_path: str, lines: dict) -> None:
    """A stage's `search:`: over the stage's base and methods, from one model (the spec's, or the best run of the
    stage it starts from)."""
    key = f"stages.{stage.name}"
    if stage.parent is not None and stage.best is None:
        raise TunefleetError(
            f"{_where(spec_path, lines, f'{key}.search')}a search starts from one model: give stage '{stage.name}' "
            f"'best: METRIC' to search from the best run of '{stage.parent}' (or drop 'from')"
        )
    stage.search = parse_search(
        raw["search"], raw.get("confirm"), lambda k: _where(spec_path, lines, f"{key}.{k}"), stage
    )


def load_spec(path: str) -> SweepSpec:
    data, lines = load_yaml_lines(path)
    return parse_spec(data, path, lines)


# ---------------------------------------------------------------- expansion
def run_name(pattern: str, values: dict, extra: dict | None = None) -> str:
    """The run's name from `pattern` over its settings, model_short and, in a pipeline, stage, parent, parent_stage."""
    defaults = schema.to_dict(TrainConfig())
    fields = {**defaults, **values, "model_short": model_short(values.get("model_name") or "model"), **(extra or {})}
    try:
        name = pattern.format(**fields)
    except (KeyError, IndexError) as exc:
        raise TunefleetError(
            f"naming pattern {pattern!r} uses unknown field {exc}; use train flags, model_short"
            + (", stage, parent or parent_stage" if extra else "")
        ) from None
    return re.sub(r"[^\w.-]+", "-", name)


def grid_combos(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]


def expand(spec: SweepSpec) -> list[RunPlan]:
    """Every run of the spec: cross each grid; apply base < method overrides < grid values; validate every config.
    In a pipeline, a stage's runs follow the runs of the stage they start from (see Stage)."""
    if not spec.stages:
        plain = Stage("", spec.base, spec.grid, spec.methods, spec.resources, spec.naming, spec.eval)
        return [run for run, _ in _expand_stage(spec, plain, [], lineage=False)]
    runs: list[RunPlan] = []
    by_stage: dict[str, list[RunPlan]] = {}
    for stage in spec.stages:
        if stage.search is not None:
            continue  # its runs come from its search (launcher/tune_search.py), once its parent is chosen
        parents = by_stage.get(stage.parent or "", [])
        if stage.parent is not None:
            check_stage_against_parents(spec, stage, parents)
        planned = [run for run, _ in _expand_stage(spec, stage, parents, lineage=True)]
        by_stage[stage.name] = planned
        runs += planned
    seen: dict[str, str] = {}
    for run in runs:
        stage_name = run.lineage.stage if run.lineage else ""
        if run.name in seen:
            raise TunefleetError(
                f"{spec.path}: stages '{seen[run.name]}' and '{stage_name}' both name a run '{run.name}': give one "
                "of them a 'naming' with {stage}"
            )
        seen[run.name] = stage_name
    return runs


def expand_confirm(spec: SweepSpec, grid: dict, best: dict[str, dict]) -> list[RunPlan]:
    """A search's confirmation runs: each method's best sampled values over its base, crossed with `grid`
    (`confirm: {seed: [1, 2]}`), named by the spec's naming."""
    runs = []
    for method, values in best.items():
        base = {**spec.base, **spec.methods.get(method, {}), "method": method, **values}
        stage = Stage("", base, grid, {}, spec.resources, spec.naming, spec.eval)
        for run, _ in _expand_stage(spec, stage, [], lineage=False):
            if spec.starts_from:  # named after the spec's model, trained from the parent run
                run.config = config.from_dict({**schema.to_dict(run.config), "model_name": spec.starts_from})
            runs.append(run)
    return runs


def check_stage_against_parents(spec: SweepSpec, stage: Stage, parents: list[RunPlan]) -> None:
    """What a stage asks of its parents: the same base model, and a `best` metric their evaluation gives."""
    roots = {run.lineage.root_model for run in parents if run.lineage}
    if stage.sets_model and roots and stage.sets_model not in roots:
        raise TunefleetError(
            f"{spec.path}: stage '{stage.name}' sets model_name {stage.sets_model}, but it starts from stage "
            f"'{stage.parent}', whose runs were trained on {', '.join(sorted(roots))}"
        )
    if stage.best is None:
        return
    parent = next(s for s in spec.stages if s.name == stage.parent)
    need = METRIC_NEEDS[stage.best]
    if need == "eval_split":
        missing = [run.name for run in parents if not run.config.eval_split]
        if missing:
            raise TunefleetError(
                f"{spec.path}: stage '{stage.name}' takes the best of '{parent.name}' by {stage.best}, which needs "
                f"an eval_split in that stage's runs ({', '.join(missing[:3])} have none)"
            )
    elif not getattr(parent.eval, need) or (need == "sft_split" and parent.eval.skip_perplexity):
        raise TunefleetError(
            f"{spec.path}: stage '{stage.name}' takes the best of '{parent.name}' by {stage.best}, which stage "
            f"'{parent.name}' cannot produce: its eval gives no {need.replace('_', ' ')}"
            + (" (skip_perplexity)" if need == "sft_split" and parent.eval.skip_perplexity else "")
        )


def _expand_stage(spec: SweepSpec, stage: Stage, parents: list[RunPlan], lineage: bool):
    """(run, combo) of one stage, each with its settings, name and lineage."""
    from tunefleet.launcher.records import Lineage

    out = []
    seen: dict[str, dict] = {}
    combos = grid_combos(stage.grid)
    matched = stage.parent is not None and stage.best is None
    for parent in parents if matched else [None]:
        for combo in combos:
            method = combo.get("method", stage.base.get("method"))
            values = {**stage.base, **stage.methods.get(method, {})}
            extra: dict = {"stage": stage.name}
            if parent is not None:
                if any(k in combo and combo[k] != getattr(parent.config, k) for k in stage.match):
                    continue  # a grid value that the match pairs with another parent
                values |= {k: getattr(parent.config, k) for k in stage.match if k not in combo}
                extra |= {"parent": parent.name, "parent_stage": stage.parent}
            elif stage.best:
                extra |= {"parent": f"best-{stage.parent}", "parent_stage": stage.parent}
            values |= combo
            root = str(
                values.get("model_name") or (values.get("recipe") and config.recipe_model(values["recipe"])) or "model"
            )
            if parent is not None:
                root = parent.lineage.root_model if parent.lineage else parent.config.model_name
            pattern = stage.naming or (CHILD_NAMING if parent else BEST_CHILD_NAMING if stage.best else spec.naming)
            name = run_name(pattern, {**values, "model_name": root}, extra if lineage else None)
            if name in seen:
                varying = [k for k in combo if combo[k] != seen[name].get(k)]
                raise TunefleetError(
                    f"{spec.path}: naming {pattern!r} gives two runs the name '{name}'; add "
                    + ", ".join("{" + k + "}" for k in varying or ["seed"])
                    + " to "
                    + (f"stages.{stage.name}.naming" if stage.name else "'naming'")
                )
            seen[name] = combo
            values["output_dir"] = join(spec.runs_dir, name)  # a URI stays one (a Path would make s3://b into s3:/b)
            values.setdefault("run_name", name)  # trackers: named by run, grouped by sweep
            values.setdefault("tracking_group", spec.name)
            if parent is not None:
                values["model_name"] = parent.output_dir  # the parent run folder is this run's base model
            if lineage:
                values["stage"] = stage.name
            gpus = stage.resources.gpus_per_run
            if not isinstance(gpus, str) and int(values.get("num_nodes") or 1) > 1:
                # a multi-node run's resources are each node's: one process per whole GPU of it
                values.setdefault("processes_per_node", max(1, int(gpus)))
            elif not isinstance(gpus, str) and gpus > 1:
                values.setdefault("num_processes", int(gpus))
            where = f"{spec.path}: run {name}: "
            run = RunPlan(name=name, config=config.from_dict(values, where=where))
            if lineage:
                run.lineage = Lineage(
                    stage.name,
                    root,
                    parent.name if parent else None,
                    stage.parent,
                    stage.best,
                )
            out.append((run, combo))
    return out


def stage_of(spec: SweepSpec, run: RunPlan) -> Stage | None:
    name = run.lineage.stage if run.lineage else None
    return next((s for s in spec.stages if s.name == name), None)


def place_runs(runs: list[RunPlan], spec: SweepSpec, local_gpu_memory: int | None = None) -> list[RunPlan]:
    """Each run with its placement: a share of a GPU, whole GPUs, or CPU, and its CPUs and memory, by its stage's
    resources (see launcher/placement.py)."""
    import dataclasses

    from tunefleet.trainers import memory

    shapes: dict[str, memory.ModelShape | None] = {}
    placed = []
    for run in runs:
        stage = stage_of(spec, run)
        resources = stage.resources if stage else spec.resources
        gpu_memory = int(resources.gpu_memory_gb * memory.GIB) if resources.gpu_memory_gb else local_gpu_memory
        shape = None
        if resources.gpus_per_run == "auto":
            model = run.lineage.root_model if run.lineage else run.config.model_name  # a parent has its architecture
            if model not in shapes:
                shapes[model] = memory.shape_of(model, run.config.trust_remote_code)
            shape = shapes[model]
        where = place(run.config, resources.gpus_per_run, gpu_memory, shape)
        where = dataclasses.replace(where, cpus=resources.cpus_per_run, memory_gb=resources.memory_gb)
        placed.append(dataclasses.replace(run, placement=where))
    return placed


def check_existing_runs(runs: list[RunPlan]) -> None:
    """A run folder already there (a rerun) must hold a run of the model the spec now gives it: a parent trained on
    another base than the spec says is refused, not silently built on."""
    from pathlib import Path

    from tunefleet.common.storage import Store, is_uri
    from tunefleet.trainers.model import relocated

    def same(a: str, b: str) -> bool:
        return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())

    for run in runs:
        record = Store(run.output_dir).read_json(RUN_RECORD) or {}
        recorded = record.get("base_model")
        if recorded and not is_uri(run.output_dir):  # the study folder may have moved since
            recorded = relocated(recorded, Path(run.output_dir), record)
        if recorded and not same(recorded, run.config.model_name) and not (run.lineage and run.lineage.best):
            raise TunefleetError(
                f"{run.output_dir} holds a run of {run.name} trained on {recorded}, but the spec now starts it from "
                f"{run.config.model_name}: move that folder away or give the spec another runs_dir"
            )


def data_checks(runs: list[RunPlan]) -> list[tuple[str, DatasetPart]]:
    """The distinct (method, dataset part) pairs a sweep reads: each is checked once before any run starts."""
    from tunefleet.trainers import data

    checks = []
    for run in runs:
        for part in [*data.train_parts(run.config), data.eval_part(run.config)]:
            if part is not None and (run.method, part) not in checks:
                checks.append((run.method, part))
    return checks


def split_key(part: DatasetPart) -> tuple:
    """What identifies one loaded split: its dataset, split, config and files."""
    return (part.dataset, part.split, part.config, tuple(part.data_files or ()))


def validate_data(runs: list[RunPlan]) -> dict[tuple, Any]:
    """Load each needed split once; its layout must fit the method and lose no text: fail before any run starts.
    Returns the loaded splits by `split_key` (study.json hashes their rows)."""
    from tunefleet.trainers import data

    loaded = {}
    for method, part in data_checks(runs):
        key = split_key(part)
        if key not in loaded:
            loaded[key] = data.load_split(part.dataset, part.split, part.config, part.data_files)
        try:
            data.check(method, loaded[key], part.columns, part.ignore_columns, part.dataset, part.split)
        except TunefleetError as exc:
            raise TunefleetError(f"{method} on {part.dataset} split '{part.split}': {exc}") from None
    return loaded
