"""What a study's numbers support: a 95% interval over seeds for every metric of a method, and paired comparisons
of methods on the same held-out prompts (scipy does the intervals and tests, statsmodels the Holm correction).

- Over seeds: Student's t interval of the mean of a method's runs (`scipy.stats.t.interval`), with the seed
  count; one seed has no interval, and the report says so.
- Between two methods (or two runs): each method's seeds are matched in order (seed 1 with seed 1, ...), and a
  side with one row (the base model) is matched with every seed of the other. The units are then (seed pair,
  prompt), each with both sides' scores. The difference of the means gets a paired bootstrap interval
  (`scipy.stats.bootstrap`, percentile, prompts and seeds resampled together: BCa misplaces intervals of the
  mostly-zero differences that 0/1 scores give), and a two-sided p-value from a paired permutation test (`scipy.stats.permutation_test`, each unit's two scores swapped at random).
- The comparisons of one metric form one family: `p_holm` is the p-value after Holm's correction over it
  (`statsmodels.stats.multitest.multipletests`). A difference holds where p_holm < 0.05.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import combinations

import numpy as np

CONFIDENCE = 0.95
ALPHA = 0.05  # 1 - CONFIDENCE, written out (the subtraction prints as 0.050000000000000044)
RESAMPLES = 9999
RANDOM_SEED = 0  # the bootstrap and the permutations are drawn from a fixed seed: a report rebuilt is the same

# The per-prompt scores the evaluator keeps (results entries' `per_prompt`), what each compares, and which way is
# better; per-reward scores are kept too, as `reward:<name>` (higher is better).
PER_PROMPT = {
    "heldout_reward": "held-out reward of the greedy answer (sum of the rewards)",
    "win_vs_base": "1 where the answer's reward beats the base's answer to the same prompt, else 0",
    "win_vs_parent": "1 where the answer's reward beats the parent run's answer (a pipeline's later stage), else 0",
    "rm_score": "the reward model's score of the answer (--reward_model)",
    "preference_correct": "1 where the chosen reply has the lower loss, else 0 (held-out pairs)",
}


@dataclass(frozen=True)
class Interval:
    """A mean over `n` values and its 95% interval; low and high are None with fewer than two values."""

    mean: float
    low: float | None
    high: float | None
    n: int

    def record(self) -> dict:
        return {"mean": self.mean, "ci95": [self.low, self.high] if self.low is not None else None, "n": self.n}


def t_interval(values: list[float]) -> Interval:
    """Student's t interval of the mean (few seeds: t, not the normal approximation)."""
    from scipy import stats

    data = np.asarray(values, dtype=float)
    n, mean = len(data), float(np.mean(data)) if len(data) else math.nan
    if n < 2:
        return Interval(mean, None, None, n)
    sem = float(stats.sem(data))
    if sem == 0.0:
        return Interval(mean, mean, mean, n)
    low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), n)


@dataclass
class Comparison:
    """`a` minus `b` on one per-prompt metric, over matched (seed pair, prompt) units."""

    metric: str
    a: str
    b: str
    mean_a: float | None = None
    mean_b: float | None = None
    difference: float | None = None
    ci95: list[float] | None = None
    p_value: float | None = None
    p_holm: float | None = None
    units: int = 0
    prompts: int = 0
    seeds_a: int = 0
    seeds_b: int = 0
    note: str | None = None  # why an interval or a test is missing, or what it does not cover

    @property
    def holds(self) -> bool:
        """The difference is significant after the correction (the uncorrected p-value where there is none)."""
        p = self.p_holm if self.p_holm is not None else self.p_value
        return p is not None and p < ALPHA and self.difference not in (None, 0.0)

    def record(self) -> dict:
        return asdict(self) | {"significant": self.holds}


def matched(a_rows: list[list[float]], b_rows: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' scores as two aligned vectors over (seed pair, prompt) units. Seeds are matched in order; a
    side with one row is matched with every row of the other; extra seeds of the larger side are left out."""
    if len(a_rows) == 1 and len(b_rows) > 1:
        a_rows = a_rows * len(b_rows)
    if len(b_rows) == 1 and len(a_rows) > 1:
        b_rows = b_rows * len(a_rows)
    pairs = list(zip(a_rows, b_rows))
    return (
        np.concatenate([np.asarray(a, dtype=float) for a, _ in pairs]),
        np.concatenate([np.asarray(b, dtype=float) for _, b in pairs]),
    )


def mean_difference(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def compare(metric: str, a: str, a_rows: list[list[float]], b: str, b_rows: list[list[float]]) -> Comparison:
    """One paired comparison (its p_holm is set later, over its family). Rows: one list of per-prompt scores per
    seed, every list over the same prompts in the same order."""
    from scipy import stats

    out = Comparison(metric, a, b, seeds_a=len(a_rows), seeds_b=len(b_rows))
    if not a_rows or not b_rows:
        out.note = "no per-prompt scores on one side (evaluate again with --force)"
        return out
    prompts = {len(row) for row in a_rows + b_rows}
    if len(prompts) != 1:
        out.note = "the two sides were scored on different prompts"
        return out
    out.prompts = prompts.pop()
    x, y = matched(a_rows, b_rows)
    out.units = len(x)
    out.mean_a, out.mean_b = float(np.mean(x)), float(np.mean(y))
    out.difference = out.mean_a - out.mean_b
    if min(len(a_rows), len(b_rows)) == 1 and max(len(a_rows), len(b_rows)) == 1:
        out.note = "one seed on each side: the interval covers prompts only, not the spread between seeds"
    if out.units < 2:
        out.note = "one prompt: no interval and no test"
        return out
    if np.all(x == y):
        out.ci95, out.p_value = [0.0, 0.0], 1.0
        return out
    rng = np.random.default_rng(RANDOM_SEED)
    interval = None
    if len(np.unique(x - y)) > 1:  # a constant shift has a point interval (scipy warns on degenerate data)
        boot = stats.bootstrap(
            (x, y),
            mean_difference,
            paired=True,
            vectorized=True,
            confidence_level=CONFIDENCE,
            n_resamples=RESAMPLES,
            method="percentile",
            rng=rng,
        )
        interval = boot.confidence_interval
    low, high = (interval.low, interval.high) if interval is not None else (out.difference, out.difference)
    out.ci95 = [float(low), float(high)]
    test = stats.permutation_test(
        (x, y),
        mean_difference,
        permutation_type="samples",
        vectorized=True,
        n_resamples=RESAMPLES,
        alternative="two-sided",
        rng=rng,
    )
    out.p_value = float(test.pvalue)
    return out


def holm(comparisons: list[Comparison]) -> None:
    """Set p_holm on a family of comparisons (those without a p-value stay without)."""
    from statsmodels.stats.multitest import multipletests

    tested = [c for c in comparisons if c.p_value is not None]
    if not tested:
        return
    corrected = multipletests([c.p_value for c in tested], alpha=ALPHA, method="holm")[1]
    for comparison, p in zip(tested, np.asarray(corrected)):
        comparison.p_holm = float(p)


@dataclass
class Group:
    """The runs of one method (per stage in a pipeline), or one row (the base, a parent)."""

    label: str
    entries: list[dict] = field(default_factory=list)

    def rows(self, metric: str) -> list[list[float]]:
        """Per seed (in seed order), the per-prompt scores of `metric`."""
        ordered = sorted(self.entries, key=lambda e: (e.get("seed") is None, e.get("seed") or 0))
        found = [((e.get("per_prompt") or {}).get(metric)) for e in ordered]
        return [list(row) for row in found if row]


def group_label(entry: dict) -> str:
    """The label of a results entry's group: its method (stage/method in a pipeline); base and parent rows are
    their own groups, named `base` (or the base's name where a study has several) and `parent:<run>`."""
    method = entry.get("method") or "?"
    if method == "base":
        return "base"
    if method == "parent":
        return f"parent:{entry.get('model_name')}"
    return "/".join(filter(None, (entry.get("stage"), method)))


def groups(results: dict) -> dict[str, Group]:
    """The results' groups, in the results' order; rows with an error left out. A study of several bases (or
    data sets) keeps them apart: the label gains the base's name."""
    bases = {e.get("base_model") for e in results.values() if not e.get("error") and e.get("method") == "base"}
    out: dict[str, Group] = {}
    for name, entry in results.items():
        if entry.get("error"):
            continue
        label = group_label(entry | {"model_name": name})
        if len(bases) > 1 and not label.startswith("parent:"):
            label = f"{label} @{entry.get('base_model')}"
        out.setdefault(label, Group(label)).entries.append(entry)
    return out


def per_prompt_metrics(results: dict) -> list[str]:
    """The per-prompt metrics the results hold, in PER_PROMPT's order, then per reward."""
    kept = {key for e in results.values() for key in (e.get("per_prompt") or {})}
    return [m for m in PER_PROMPT if m in kept] + sorted(k for k in kept if k not in PER_PROMPT)


def comparisons(results: dict) -> list[Comparison]:
    """Every pair of groups on every per-prompt metric both have; Holm over each metric's family."""
    found = groups(results)
    out = []
    for metric in per_prompt_metrics(results):
        family = []
        for a, b in combinations(found.values(), 2):
            a_rows, b_rows = a.rows(metric), b.rows(metric)
            if a_rows and b_rows and len(a_rows[0]) == len(b_rows[0]):
                family.append(compare(metric, a.label, a_rows, b.label, b_rows))
        holm(family)
        out += family
    return out


def intervals(results: dict, metrics: list[str]) -> dict[str, dict[str, dict]]:
    """Per group, per metric: mean, ci95 over its runs (seeds) and their count."""
    out: dict[str, dict[str, dict]] = {}
    for label, group in groups(results).items():
        for metric in metrics:
            values = [e[metric] for e in group.entries if isinstance(e.get(metric), (int, float))]
            if values:
                out.setdefault(label, {})[metric] = t_interval(values).record()
    return out


def winner(found: list[Comparison], metric: str, better: str = "max") -> str | None:
    """The group whose difference from every other group on `metric` holds in its favour, if one does."""
    family = [c for c in found if c.metric == metric and c.difference is not None]
    labels = {c.a for c in family} | {c.b for c in family}
    for label in sorted(labels):
        mine = [c for c in family if label in (c.a, c.b)]
        if mine and all(ahead(c, label, better) for c in mine):
            return label
    return None


def ahead(c: Comparison, label: str, better: str) -> bool:
    """`label`'s side of `c` is the better one, and the difference holds."""
    sign = 1 if (c.a == label) == (better == "max") else -1
    return c.holds and sign * (c.difference or 0.0) > 0
