"""What an evaluation scores and how: defined once, here.

The `tunefleet eval` flags, the `eval:` section of a sweep spec and the SLURM evaluation job's command line are
all derived from `EvalSettings` (see `tunefleet.common.schema`), so a setting cannot mean one thing in one
place and another elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunefleet.common.schema import option
from tunefleet.trainers.config import METHODS

BACKENDS = ("local", "ray")


@dataclass
class EvalSettings:
    methods: list[str] | None = option(None, "Only these methods.", choices=METHODS)
    runs: list[str] | None = option(None, "Only these runs (their names; a pipeline evaluates a stage's runs).")
    max_samples: int = option(100, "Samples per metric.", at_least=1)
    max_generation_samples: int = option(3, "Generation samples per run.", at_least=0)
    skip_perplexity: bool = option(False, "Skip test loss / perplexity.")
    base_model: str | None = option(None, "Base model for every run (default: the one in each run.json).")
    dataset: str | None = option(None, "Test dataset (default: each run's dataset).")
    sft_split: str = option("test_sft", "Conversations for test loss.")
    pref_split: str = option("test_prefs", "Pairs for preference accuracy.")
    gen_split: str = option(
        "test_gen", "Held-out prompts: greedy answers for heldout_reward, win_rate_vs_base and the samples."
    )
    heldout_prompts: int | None = option(
        None,
        "Held-out prompts answered per run for heldout_reward and win_rate_vs_base (default: max_samples); "
        "the first max_generation_samples answers are the report's samples.",
        at_least=1,
    )
    reward_funcs: list[str] | None = option(
        None, "Rewards for heldout_reward and win_rate_vs_base (default: the GRPO runs' rewards, else length)."
    )
    reward_model: str | None = option(
        None,
        "A reward model scoring every greedy answer (a sequence classifier with one label: a folder, a hub id or a "
        "tunefleet rm run): rm_score, rm_win_rate_vs_base and, for runs that start from a parent, "
        "rm_win_rate_vs_parent (ties count half).",
    )
    reward_model_gpus: float = option(
        0.25,
        "Ray on GPUs: the GPU share each worker asks for its reward model, on top of gpus_per_worker (the reward "
        "model is loaded beside the base).",
        at_least=0,
        at_most=1,
    )
    max_new_tokens: int = option(48, "Longest generated answer, in tokens.", at_least=1)
    tasks: list[str] | None = option(
        None,
        "Benchmark tasks through lm-evaluation-harness (pip install 'tunefleet[bench]'): lm-eval's task names "
        "(arc_easy, mmlu, ...) or tiny_world (shipped, offline); each worker loads the base once for every run.",
    )
    num_fewshot: int | None = option(None, "Benchmark few-shot examples (default: each task's own).", at_least=0)
    limit: int | None = option(None, "Questions per benchmark task (default: all).", at_least=1)
    include_path: str | None = option(
        None, "A folder of your own lm-eval task YAMLs, beside lm-eval's and tiny_world."
    )
    backend: str | None = option(
        None, "Where to score: local or ray (default: local; after a sweep, the sweep's backend).", choices=BACKENDS
    )
    shards: int = option(1, "Shards (Ray workers); 1 and N shards give the same numbers.", at_least=1)
    batch_size: int = option(32, "Sequences per forward pass.", at_least=1)
    gpus_per_worker: float = option(
        1.0, "Ray on GPUs: GPU share per worker; 0.25 puts 4 workers of a small model on a GPU.", above=0, at_most=1
    )
    gpu_hour_price: float | None = option(
        None, "Price of one GPU-hour: the report turns each run's and the study's GPU-hours into money.", at_least=0
    )
    force: bool = option(False, "Re-score runs whose adapter has not changed.")
    trust_remote_code: bool = option(False, "Allow code shipped with the base model.")

    def benchmark_tasks(self) -> list[str]:
        """`tasks` as lm-eval's own CLI takes them too: comma separated (`--tasks arc_easy,mmlu`) or one by one."""
        return [task.strip() for item in self.tasks or [] for task in item.split(",") if task.strip()]

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that change the numbers (a run scored under other ones is scored again)."""
        return {
            k: getattr(self, k)
            for k in (
                "max_samples",
                "max_generation_samples",
                "skip_perplexity",
                "sft_split",
                "pref_split",
                "gen_split",
                "heldout_prompts",
                "max_new_tokens",
                "reward_model",
                "tasks",
                "num_fewshot",
                "limit",
                "include_path",
            )
        }


@dataclass(frozen=True)
class EvalData:
    """The test data one group of runs is scored on (what every worker loads)."""

    dataset: str
    sft_split: str | None  # None: no perplexity
    pref_split: str | None
    max_samples: int
    max_generation_samples: int
    gen_split: str | None = None  # held-out prompts (falls back to the SFT split's prompts when absent)
    reward_funcs: tuple[str, ...] = ("length",)
    max_new_tokens: int = 48
    heldout_prompts: int | None = None  # None: max_samples
    reward_model: str | None = None  # what from_pretrained loads (a run folder already merged)
    tasks: tuple[str, ...] = ()  # lm-eval benchmark tasks
    num_fewshot: int | None = None
    limit: int | None = None
    include_path: str | None = None
    chat_template: str | None = None  # the runs' own template (their `chat_template`), else the base model's

    @property
    def heldout(self) -> int:
        return self.heldout_prompts or self.max_samples
