"""The evaluator's metrics, computed by a run at each of its evaluations during training.

A trainer's own eval metrics differ per method (DPO's loss scales with beta, KTO logs no pair accuracy, SFT none
of it), so a search or a dashboard cannot rank methods or betas by them. These two are defined as the evaluator
defines them (README "Evaluation"), on held-out splits of the run's dataset, for every method:

- `--eval_pairs SPLIT` logs `eval_preference_accuracy`: a pair is correct when the chosen reply's mean NLL per
  token is below the rejected one's, given the same prompt (the policy's own judgement, no reference model).
- `--eval_prompts SPLIT` logs `eval_heldout_reward`: greedy answers to the prompts, each scored by the sum of
  `--reward_funcs`, averaged.

Both use the split's first `--heldout_samples` rows, loaded and scored as the evaluator does: a run's last
preference accuracy equals `tunefleet eval`'s for it; its held-out reward is the evaluator's up to a greedy answer
that takes another token where batching rounds differently (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunefleet.common.errors import TunefleetError
from tunefleet.trainers import data, rewards, scoring

if TYPE_CHECKING:
    from tunefleet.trainers.config import TrainConfig


MAX_NEW_TOKENS = 48  # the evaluator's default (EvalSettings.max_new_tokens)
GENERATION_CHUNK = 256  # prompts per generate call: bounded memory, few calls


def first_rows(ds, n: int):
    return ds.select(range(min(n, len(ds))))


def load_pairs(dataset: str, split: str, n: int) -> list[tuple[list[dict], list[dict]]]:
    """The split's first n preference pairs as (prompt + chosen, prompt + rejected) conversations, any pair layout
    the data module reads."""
    rows = first_rows(data.load_split(dataset, split), n)
    pairs = data.prepare("dpo", rows, source=dataset, split=split, strict=False).dataset
    if "prompt" not in pairs.column_names or not isinstance(pairs[0]["prompt"], list):
        raise TunefleetError(
            f"dataset {dataset} split '{split}' must hold conversational chosen/rejected for preference accuracy "
            "(its layout is plain text)"
        )
    return [(p + c, p + r) for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])]


def load_prompts(dataset: str, split: str, n: int) -> tuple[list[list[dict]], list[dict]]:
    """The split's first n prompts (conversations to answer) and, per prompt, its other columns (what reward
    functions may read, e.g. a reference answer)."""
    rows = first_rows(data.load_split(dataset, split), n)
    prompts = data.prepare("grpo", rows, source=dataset, split=split, strict=False).dataset
    others = [c for c in prompts.column_names if c != "prompt"]
    return prompts["prompt"], prompts.select_columns(others).to_list()


def rewarded(
    scorers: list[Scorer], prompts: list[list[dict]], columns: list[dict], replies: list[str]
) -> list[dict[str, float]]:
    """Per answer, each reward's score (a reward that declines a sample scores 0, as in the evaluator)."""
    extra = {c: [row[c] for row in columns] for c in (columns[0] if columns else {})}
    completions = [[{"role": "assistant", "content": r}] for r in replies]
    scores = {name: f(prompts=prompts, completions=completions, **extra) for name, f in scorers}
    return [{name: float(values[i] or 0.0) for name, values in scores.items()} for i in range(len(replies))]


Scorer = tuple[str, Callable[..., list[float | None]]]  # a reward's name and its guarded function


def reward_scorers(specs: list[str], instead: str) -> list[Scorer]:
    """(name, guarded function) per reward. Reward models are refused (answers are scored by functions here), with
    `instead`: what to do about one."""
    loaded = rewards.load(list(specs))
    models = [spec for spec, f in zip(specs, loaded) if not callable(f)]
    if models:
        raise TunefleetError(
            f"held-out answers are scored by reward functions (built-in names or module:function); "
            f"{', '.join(models)} is a reward model: {instead}"
        )
    return [(spec, rewards.guarded(spec, f)) for spec, f in zip(specs, loaded)]


def greedy_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers to every prompt, GENERATION_CHUNK prompts per generate call."""
    replies = []
    for i in range(0, len(prompts), GENERATION_CHUNK):
        replies += scoring.generate(model, tokenizer, prompts[i : i + GENERATION_CHUNK], max_new_tokens)
    return replies


@dataclass
class HeldOut:
    """What a run scores at each evaluation (loaded once, before training)."""

    pairs: list[tuple[scoring.Sequence, scoring.Sequence]]
    prompts: list[list[dict]]
    prompt_columns: list[dict]
    scorers: list[Scorer]
    max_new_tokens: int
    batch_size: int

    def metrics(self, model, tokenizer) -> dict[str, float]:
        import torch

        was_training = model.training
        model.eval()
        out = {}
        try:
            with torch.no_grad():
                if self.pairs:
                    pad = tokenizer.pad_token_id or 0
                    scores = scoring.score_pairs(model, self.pairs, self.batch_size, pad)
                    correct = sum(scoring.chosen_preferred(*pair) for pair in scores)
                    out["eval_preference_accuracy"] = correct / len(scores)
                if self.prompts:
                    replies = greedy_answers(model, tokenizer, self.prompts, self.max_new_tokens)
                    each = rewarded(self.scorers, self.prompts, self.prompt_columns, replies)
                    out["eval_heldout_reward"] = sum(sum(r.values()) for r in each) / len(each)
        finally:
            model.train(was_training)
        return out


def held_out(cfg: TrainConfig, tokenizer) -> HeldOut | None:
    """The held-out pairs and prompts the run's flags ask for, tokenized as the evaluator does; None for none."""
    if not (cfg.eval_pairs or cfg.eval_prompts):
        return None
    dataset = cfg.dataset or (cfg.mixture or [])[0].dataset  # the config has one or the other
    pairs, prompts, columns, scorers = [], [], [], []
    if cfg.eval_pairs:
        conversations = load_pairs(dataset, cfg.eval_pairs, cfg.heldout_samples)
        pairs = [
            (
                scoring.encode_conversation(tokenizer, chosen),
                scoring.encode_conversation(tokenizer, rejected),
            )
            for chosen, rejected in conversations
        ]
    if cfg.eval_prompts:
        scorers = reward_scorers(cfg.reward_funcs, "give --reward_funcs functions for --eval_prompts")
        prompts, columns = load_prompts(dataset, cfg.eval_prompts, cfg.heldout_samples)
    return HeldOut(
        pairs, prompts, columns, scorers, cfg.max_completion_length or MAX_NEW_TOKENS, cfg.per_device_eval_batch_size
    )


def heldout_callback(heldout: HeldOut):
    """Adds the held-out metrics to each evaluation's log before any other callback sees it (progress.json, a
    search's scheduler, trackers) and to the trainer's log history (trainer_state.json).

    Every rank computes them (the same numbers): a model sharded across ranks (ZeRO-3) needs all ranks in its
    forward passes."""
    from transformers import TrainerCallback

    class HeldOutMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, model=None, processing_class=None, **kwargs):
            if not logs or "eval_runtime" not in logs or model is None:
                return
            metrics = heldout.metrics(model, processing_class)
            logs.update(metrics)
            if state.log_history and state.log_history[-1].get("eval_runtime") == logs["eval_runtime"]:
                state.log_history[-1].update(metrics)

    return HeldOutMetrics()
