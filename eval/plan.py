"""Pure core of the evaluator: split the work into shards, merge shard results exactly, compute metrics.

Work is (target × metric × sample range); a target is a run's adapter or the base model alone. Shards return
per-sample values (NLL sums and token counts, or generated text), never means, so merging is a
concatenation in sample order and every metric is computed once from the whole.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tunefleet.trainers.scoring import chosen_preferred

METRICS = ("ppl", "pref", "gen", "bench")
# Rough relative cost per sample: pairs score 2, generation ~8; a benchmark task (one sample) ~ a hundred answers.
COST = {"ppl": 1.0, "pref": 2.0, "gen": 8.0, "bench": 100.0}


@dataclass(frozen=True, order=True)
class Task:
    target: str
    metric: str
    start: int
    end: int

    @property
    def cost(self) -> float:
        return (self.end - self.start) * COST[self.metric]


def plan_shards(targets: list[str], sizes: dict[str, int], num_shards: int) -> list[list[Task]]:
    """Split every target's metrics into ranges and pack them into `num_shards` balanced shards.

    `sizes` maps metric -> samples. Ranges are cut so no piece is much larger than one shard's fair share;
    pieces go to the least loaded shard, largest first; tasks of one target stay together where possible.
    """
    num_shards = max(1, num_shards)
    whole = [Task(t, m, 0, sizes[m]) for t in targets for m in METRICS if sizes.get(m)]
    total = sum(task.cost for task in whole)
    if not whole:
        return []
    share = total / num_shards
    pieces = []
    for task in whole:
        parts = max(1, math.ceil(task.cost / share - 1e-9)) if num_shards > 1 else 1
        step = math.ceil((task.end - task.start) / parts)
        pieces += [
            Task(task.target, task.metric, s, min(s + step, task.end)) for s in range(task.start, task.end, step)
        ]
    shards: list[list[Task]] = [[] for _ in range(num_shards)]
    loads = [0.0] * num_shards
    for piece in sorted(pieces, key=lambda p: (-p.cost, p)):
        i = min(range(num_shards), key=lambda k: (loads[k], k))
        shards[i].append(piece)
        loads[i] += piece.cost
    return [sorted(s) for s in shards if s]


def merge(results: list[tuple[Task, list]]) -> dict[tuple[str, str], list]:
    """Concatenate shard values per (target, metric) in sample order; gaps or overlaps are an error."""
    grouped: dict[tuple[str, str], list[tuple[Task, list]]] = {}
    for task, values in results:
        if len(values) != task.end - task.start:
            raise ValueError(f"{task}: got {len(values)} values for {task.end - task.start} samples")
        grouped.setdefault((task.target, task.metric), []).append((task, values))
    merged = {}
    for key, parts in grouped.items():
        parts.sort(key=lambda p: p[0].start)
        expected = 0
        out: list = []
        for task, values in parts:
            if task.start != expected:
                raise ValueError(f"{key}: samples {expected}..{task.start} missing or duplicated")
            out += values
            expected = task.end
        merged[key] = out
    return merged


def perplexity_metrics(values: list | None) -> dict:
    """values: [nll_sum, tokens] per conversation -> test_loss (token-weighted) and perplexity."""
    if not values:
        return {"test_loss": None, "perplexity": None, "tokens_scored_ppl": 0}
    nll, tokens = sum(v[0] for v in values), sum(v[1] for v in values)
    loss = nll / tokens if tokens else None
    return {"test_loss": loss, "perplexity": math.exp(loss) if loss is not None else None, "tokens_scored_ppl": tokens}


def preference_metrics(values: list | None, base: list | None = None) -> dict:
    """values: [chosen_sum, chosen_tokens, rejected_sum, rejected_tokens] per pair (same for the base)."""
    keys = (
        "preference_accuracy",
        "preference_correct",
        "preference_total",
        "avg_chosen_loss",
        "avg_rejected_loss",
        "loss_margin",
        "reward_accuracy",
    )
    if not values:
        return dict.fromkeys(keys) | {"preference_total": 0}
    chosen = [v[0] / v[1] for v in values]
    rejected = [v[2] / v[3] for v in values]
    correct = sum(chosen_preferred(*v) for v in values)
    avg_c, avg_r = sum(chosen) / len(chosen), sum(rejected) / len(rejected)
    out = {
        "preference_accuracy": correct / len(values),
        "preference_correct": correct,
        "preference_total": len(values),
        "avg_chosen_loss": avg_c,
        "avg_rejected_loss": avg_r,
        "loss_margin": avg_r - avg_c,
        "reward_accuracy": None,
    }
    if base and len(base) == len(values):
        # implicit reward = log p_policy - log p_base = base NLL sum - policy NLL sum
        wins = sum((b[0] - v[0]) > (b[2] - v[2]) for v, b in zip(values, base))
        out["reward_accuracy"] = wins / len(values)
    return out


def reward_metrics(values: list | None, base: list | None = None, samples: int = 3) -> dict:
    """values: per held-out prompt {"prompt", "response", "rewards": {name: score}, "reward": sum} (same for the
    base) -> mean rewards, win rates against the base (strictly higher, same prompt) and the first samples."""
    keys = (
        "heldout_reward",
        "heldout_rewards",
        "win_rate_vs_base",
        "win_rates_vs_base",
        "rm_score",
        "rm_win_rate_vs_base",
    )
    if not values:
        return dict.fromkeys(keys) | {"prompts_rewarded": 0, "generation_samples": []}
    names = list(values[0]["rewards"])
    n = len(values)
    out = {
        "heldout_reward": sum(v["reward"] for v in values) / n,
        "heldout_rewards": {k: sum(v["rewards"][k] for v in values) / n for k in names},
        "win_rate_vs_base": None,
        "win_rates_vs_base": None,
        "rm_score": None,
        "rm_win_rate_vs_base": None,
        "prompts_rewarded": n,
        "generation_samples": [
            {"prompt": v["prompt"], "response": v["response"], "reward": v["reward"]} for v in values[:samples]
        ],
    }
    if base and len(base) == n:
        out["win_rate_vs_base"] = sum(v["reward"] > b["reward"] for v, b in zip(values, base)) / n
        out["win_rates_vs_base"] = {
            k: sum(v["rewards"][k] > b["rewards"][k] for v, b in zip(values, base)) / n for k in names
        }
    if values[0].get("rm") is not None:  # scored by a reward model (--reward_model)
        out["rm_score"] = sum(v["rm"] for v in values) / n
        out["rm_win_rate_vs_base"] = rm_win_rate(values, base) if base and len(base) == n else None
    return out


def rm_win_rate(values: list, base: list) -> float:
    """Share of prompts where the reward model scores an answer above `base`'s answer to the same prompt; a tie
    counts half (the convention of reward-model and judge win rates)."""
    wins = sum(1.0 if v["rm"] > b["rm"] else 0.5 if v["rm"] == b["rm"] else 0.0 for v, b in zip(values, base))
    return wins / len(values)


def win_rates(values: list, base: list) -> tuple[float, dict]:
    """Share of prompts where an answer scores strictly higher than `base`'s answer to the same prompt, in all and per
    reward (values and base: per prompt {"reward": sum, "rewards": {name: score}}, same prompts in the same order)."""
    n = len(values)
    names = list(values[0]["rewards"]) if values else []
    overall = sum(v["reward"] > b["reward"] for v, b in zip(values, base)) / n
    return overall, {k: sum(v["rewards"][k] > b["rewards"][k] for v, b in zip(values, base)) / n for k in names}


def task_dict(task: Task) -> dict:
    return asdict(task)
