"""`search:` in a sweep spec: each method's hyperparameters searched on Ray Tune, then its best confirmed over seeds.

    search:
      metric: eval_loss            # what the runs' evaluation during training logs (each method needs eval_split);
                                   # or one per method: {dpo: eval_rewards/accuracies, kto: eval_loss}; or the
                                   # evaluator's, for any method: eval_preference_accuracy (runs need eval_pairs),
                                   # eval_heldout_reward (eval_prompts)
      mode: min                    # default: min for a loss, max otherwise
      num_samples: 8               # trials per method
      searcher: random             # random | optuna (TPE, `pip install 'tunefleet[optuna]'`) | grid
      scheduler: asha              # asha (stops weak trials early) | fifo (every trial to its end)
      grace_period: 10             # ASHA: steps every trial trains before it may be stopped
      reduction_factor: 2          # ASHA: one in this many goes on at each rung
      max_t: 40                    # ASHA: the last rung, in training steps (default: the runs' max_steps)
      max_concurrent: 4            # trials at once (default: as many as the cluster holds)
      space:                       # per method, any train flag
        dpo: {learning_rate: {loguniform: [1.0e-4, 1.0e-2]}, beta: {uniform: [0.05, 0.5]}}
        kto: {learning_rate: {loguniform: [1.0e-4, 1.0e-2]}, beta: {choice: [0.1, 0.3]}}
    confirm: {seed: [1, 2]}        # the best configuration of each method, rerun per value and evaluated

A space value is one of `loguniform: [low, high]`, `uniform: [low, high]` (a float flag), `randint: [low, high]`
(an integer flag, both ends included), `choice: [...]` or `grid: [...]` (any flag; grid tries every value, once
per sample). The search's runs take the spec's base < methods[<method>] < the sampled values. This module is
pure (no Ray): it parses and checks; launcher/tune_search.py runs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from tunefleet.common import schema
from tunefleet.common.errors import TunefleetError
from tunefleet.common.schema import nearest, option
from tunefleet.trainers import config
from tunefleet.trainers.config import TrainConfig

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
SEARCH_KEYS = (
    "metric",
    "mode",
    "num_samples",
    "searcher",
    "scheduler",
    "grace_period",
    "reduction_factor",
    "max_t",
    "max_concurrent",
    "space",
)
# What each trainer logs when it evaluates on its eval split during training (TRL 1.16; read from its runs).
METRICS = {
    "sft": ("eval_loss", "eval_mean_token_accuracy"),
    "dpo": ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"),
    "orpo": ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_nll_loss"),
    "kto": ("eval_loss", "eval_rewards/margins", "eval_kl"),
    "grpo": ("eval_reward",),
    "rm": ("eval_loss", "eval_accuracy", "eval_margin"),
}
# The evaluator's metrics, which a run of any method logs at each evaluation given the held-out split its flag names
# (trainers/heldout.py): what ranks trials whose trainers' own metrics mean different things.
HELDOUT_METRICS = {"eval_preference_accuracy": "eval_pairs", "eval_heldout_reward": "eval_prompts"}
NOT_SEARCHED = ("method", "output_dir", "run_name", "stage", "config")  # what a search cannot vary


@dataclass
class Distribution:
    """One searched flag: `kind` over `values` ([low, high] for the ranges, the candidates for choice and grid)."""

    flag: str
    kind: str
    values: list[Any]

    def sampler(self) -> Any:
        """The Ray Tune sampling function for it."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper end is exclusive
        if self.kind == "choice":
            return tune.choice(self.values)
        return tune.grid_search(self.values)

    def describe(self) -> str:
        if self.kind in ("choice", "grid"):
            return f"{self.flag} {self.kind} {self.values}"
        return f"{self.flag} {self.kind} [{self.values[0]:g}, {self.values[1]:g}]"


@dataclass
class SearchSettings:
    metric: str = "eval_loss"  # what trials are compared by (a metric of the runs' evaluation during training)
    mode: str | None = option(None, "min or max (default: min for a loss, else max).", choices=("min", "max"))
    num_samples: int = option(8, "Trials per method (with grid values: samples of each grid point).", at_least=1)
    searcher: str = option("random", "random, optuna (TPE) or grid.", choices=("random", "optuna", "grid"))
    scheduler: str = option("asha", "asha (stops weak trials early) or fifo.", choices=("asha", "fifo"))
    grace_period: int = option(1, "ASHA: training steps before a trial may be stopped.", at_least=1)
    reduction_factor: int = option(2, "ASHA: one in this many trials goes on at each rung.", at_least=2)
    max_t: int | None = option(None, "ASHA: the last rung in training steps (default: max_steps).", at_least=1)
    max_concurrent: int | None = option(None, "Trials at once (default: as many as fit).", at_least=1)
    metrics: dict[str, str] = field(default_factory=dict)  # per method, where `metric:` is a mapping
    space: dict[str, dict[str, Distribution]] = field(default_factory=dict)  # method -> flag -> its distribution
    confirm: dict[str, list[Any]] = field(default_factory=dict)  # the confirmation grid: {seed: [1, 2]}

    def metric_for(self, method: str) -> str:
        return self.metrics.get(method, self.metric)

    def direction(self, method: str) -> str:
        """`mode`, else min for a loss (or KL) and max for the rest."""
        if self.mode:
            return self.mode
        metric = self.metric_for(method)
        return "min" if "loss" in metric or metric.endswith("_kl") else "max"

    @property
    def methods(self) -> list[str]:
        return list(self.space)


def reported_name(metric: str) -> str:
    """The metric's name in Tune's results (Tune reads `/` in a name as a nested key)."""
    return metric.replace("/", "_")


def parse_search(raw: Any, confirm: Any, where_of, spec: Any) -> SearchSettings:
    """`search:` (and `confirm:`) of a spec, checked against the spec's base and per-method flags.

    `where_of(key)` gives "file:line: " for a dotted key; `spec` is the SweepSpec (base, methods, grid)."""
    if not isinstance(raw, dict):
        raise TunefleetError(f"{where_of('search')}'search' must be a mapping (space, metric, num_samples, ...)")
    for key in raw:
        if key not in SEARCH_KEYS:
            raise TunefleetError(
                f"{where_of(f'search.{key}')}unknown key 'search.{key}'{nearest(key, SEARCH_KEYS)}; "
                f"use {', '.join(SEARCH_KEYS)}"
            )
    values = {
        k: schema.coerce(SearchSettings, k, v, where_of(f"search.{k}"), f"search.{k}")
        for k, v in raw.items()
        if k not in ("space", "metric")
    }
    settings = SearchSettings(**values)
    metric = raw.get("metric", settings.metric)
    if isinstance(metric, dict):
        settings.metrics = {str(m): str(v) for m, v in metric.items()}
    elif isinstance(metric, str):
        settings.metric = metric
    else:
        raise TunefleetError(
            f"{where_of('search.metric')}search.metric is a metric name, or one per method: {{dpo: eval_loss}}"
        )
    if spec.grid:
        raise TunefleetError(
            f"{where_of('grid')}a search spec's methods are the keys of search.space, and its seeds come from "
            "'confirm': drop 'grid'"
        )
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise TunefleetError(
            f"{where_of('search.space')}search.space is required: per method, the flags to search, e.g. "
            "{dpo: {learning_rate: {loguniform: [1.0e-4, 1.0e-2]}}}"
        )
    for method, flags in space.items():
        at = f"search.space.{method}"
        config.coerce("method", method, where_of(at))
        if not isinstance(flags, dict) or not flags:
            raise TunefleetError(f"{where_of(at)}'{at}' must map train flags to distributions")
        settings.space[method] = {
            flag: parse_distribution(flag, dist, f"{at}.{flag}", where_of) for flag, dist in flags.items()
        }
    unknown = [m for m in settings.metrics if m not in settings.space]
    if unknown:
        raise TunefleetError(
            f"{where_of('search.metric')}search.metric names {unknown[0]}, which search.space does not"
        )
    check_search(settings, spec, where_of)
    settings.confirm = parse_confirm(confirm, where_of)
    return settings


def parse_distribution(flag: str, dist: Any, label: str, where_of) -> Distribution:
    where = where_of(label)
    config.coerce(flag, None, where)  # a train flag, or the nearest name
    if flag in NOT_SEARCHED:
        raise TunefleetError(f"{where}'{flag}' cannot be searched")
    if not isinstance(dist, dict) or len(dist) != 1:
        raise TunefleetError(
            f"{where}'{label}' must be one distribution: {{loguniform: [low, high]}}, uniform, randint, choice or grid"
        )
    ((kind, values),) = dist.items()
    if kind not in KINDS:
        raise TunefleetError(
            f"{where}unknown distribution '{kind}'{nearest(str(kind), KINDS)}; use {', '.join(KINDS)}"
        )
    if not isinstance(values, list) or not values:
        raise TunefleetError(f"{where}'{label}.{kind}' takes a list")
    flag_type = config.value_type(flag)
    if kind in ("loguniform", "uniform", "randint"):
        wanted = int if kind == "randint" else float
        if flag_type is not wanted:
            what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
                flag_type, "not a number"
            )
            hint = "use randint" if flag_type is int else "use choice or grid"
            raise TunefleetError(f"{where}{kind} needs a {wanted.__name__} flag, but '{flag}' is {what}: {hint}")
        if len(values) != 2:
            raise TunefleetError(f"{where}{kind} takes [low, high]")
        low, high = (config.coerce(flag, v, where) for v in values)
        if not low < high:
            raise TunefleetError(f"{where}{kind}: low {low} must be below high {high}")
        if kind == "loguniform" and low <= 0:
            raise TunefleetError(f"{where}loguniform needs low > 0 (got {low})")
        values = [low, high]
    else:
        values = [config.coerce(flag, v, where) for v in values]
    return Distribution(flag, kind, values)


def check_search(settings: SearchSettings, spec: Any, where_of) -> None:
    """What a search asks of its runs, each named: a metric their evaluation gives, an eval split to give it,
    steps for ASHA's rungs, a searcher that takes the space."""
    for method, flags in settings.space.items():
        values = {**spec.base, **spec.methods.get(method, {})}
        known, metric = METRICS[method] + tuple(HELDOUT_METRICS), settings.metric_for(method)
        if metric not in known:
            raise TunefleetError(
                f"{where_of('search.metric')}{method} runs cannot report {metric}{nearest(metric, known)}: "
                f"its evaluation during training logs {', '.join(known)}"
            )
        flag = HELDOUT_METRICS.get(metric)
        if flag and not values.get(flag):
            split = "test_prefs" if flag == "eval_pairs" else "test_gen"
            raise TunefleetError(
                f"{where_of('search.metric')}{metric} is scored on held-out rows at each evaluation: give {method} "
                f"{flag} (base or methods.{method}: {flag}: {split})"
            )
        if not values.get("eval_split"):
            raise TunefleetError(
                f"{where_of(f'search.space.{method}')}{metric} comes from the runs' evaluation during "
                f"training: give {method} an eval_split (base or methods.{method}: eval_split: test_...)"
            )
        max_steps = int(values.get("max_steps") or schema.default_of(schema.fields(TrainConfig)["max_steps"]))
        if max_steps <= 0:
            raise TunefleetError(f"{where_of('search')}a search needs max_steps for {method} (ASHA counts steps)")
        if settings.max_t is not None and settings.max_t > max_steps:
            raise TunefleetError(
                f"{where_of('search.max_t')}search.max_t {settings.max_t} is beyond {method}'s max_steps {max_steps}"
            )
        if settings.scheduler == "asha" and settings.grace_period >= (settings.max_t or max_steps):
            raise TunefleetError(
                f"{where_of('search.grace_period')}search.grace_period {settings.grace_period} must be below max_t "
                f"({settings.max_t or max_steps} for {method}): no trial could be stopped early"
            )
        grid = [d for d in flags.values() if d.kind == "grid"]
        if grid and settings.searcher == "optuna":
            raise TunefleetError(
                f"{where_of(f'search.space.{method}.{grid[0].flag}')}grid values need searcher random or grid; optuna "
                "samples its own points: use choice"
            )
        ranged = [d for d in flags.values() if d.kind not in ("grid", "choice")]
        if settings.searcher == "grid" and ranged:
            raise TunefleetError(
                f"{where_of(f'search.space.{method}.{ranged[0].flag}')}searcher grid tries listed values: "
                f"{ranged[0].flag} is {ranged[0].kind}; use grid (or searcher random)"
            )
    if settings.searcher == "optuna":
        try:
            importlib.import_module("optuna")
        except ImportError:
            raise TunefleetError(
                f"{where_of('search.searcher')}searcher optuna needs Optuna: pip install 'tunefleet[optuna]'"
            ) from None


def parse_confirm(raw: Any, where_of) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise TunefleetError(f"{where_of('confirm')}'confirm' maps flags to lists, e.g. {{seed: [1, 2, 3]}}")
    out = {}
    for flag, values in raw.items():
        where = where_of(f"confirm.{flag}")
        if not isinstance(values, list) or not values:
            raise TunefleetError(f"{where}'confirm.{flag}' must be a non-empty list")
        out[flag] = [config.coerce(flag, v, where) for v in values]
    return out
