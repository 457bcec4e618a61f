"""The evaluator's metric formulas, each computed once from the merged per-sample values of all shards: test loss
and perplexity, preference accuracy and margins, rewards and win rates against the base (or a run's parent).

Definitions in words: README, section Evaluation.
"""

from __future__ import annotations

import math

from tunefleet.trainers.scoring import chosen_preferred


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


def per_prompt(gen: list | None, base_gen: list | None = None, pref: list | None = None) -> dict[str, list[float]]:
    """The per-prompt scores paired comparisons use (eval/statistics.py): the held-out reward of each answer, in all
    and per reward (`reward:<name>`), the reward model's score, a win (1) or not (0) against the base's answer to
    the same prompt, and whether each held-out preference pair is ranked right (1) or not (0)."""
    out: dict[str, list[float]] = {}
    if gen:
        out["heldout_reward"] = [float(v["reward"]) for v in gen]
        for name in gen[0]["rewards"]:
            out[f"reward:{name}"] = [float(v["rewards"][name]) for v in gen]
        if gen[0].get("rm") is not None:
            out["rm_score"] = [float(v["rm"]) for v in gen]
        if base_gen and len(base_gen) == len(gen):
            out["win_vs_base"] = wins(gen, base_gen)
    if pref:
        out["preference_correct"] = [1.0 if chosen_preferred(*v) else 0.0 for v in pref]
    return out


def wins(values: list, base: list) -> list[float]:
    """1.0 where an answer's reward is strictly above `base`'s answer to the same prompt, else 0.0."""
    return [1.0 if v["reward"] > b["reward"] else 0.0 for v, b in zip(values, base)]
