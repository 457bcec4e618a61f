"""Benchmark tasks through lm-evaluation-harness, on the model a worker already holds.

lm-eval's own task definitions and metrics, its `HFLM` wrapped around the loaded base (with a run's adapter
applied, or merged in), so a worker loads the base once for every run instead of one lm-eval process per adapter.
Numbers land in evaluation_results.json as `benchmarks: {task: {metric: value, metric_stderr: value}}`.

The package ships `tiny_world` (tasks/tiny_world/: multiple choice on the tiny world, its data beside it), so the
offline default has a benchmark column. `include_path` adds a folder of the user's own task YAMLs.

    python -m tunefleet.eval.benchmarks --write-data   # regenerate tasks/tiny_world/tiny_world.jsonl
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Any

from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.common.schema import nearest

TASKS_DIR = Path(__file__).resolve().with_name("tasks")
EXTRA = "pip install 'tunefleet[bench]'"
OFFLINE_SIGNS = ("offline", "connection", "resolve", "couldn't reach", "max retries", "network", "timed out")


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TunefleetError(f"--tasks runs lm-evaluation-harness, which is not installed: {EXTRA}") from None


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None = None, with_lm_evals_own: bool = True):
    """lm-eval's task index over tunefleet's tasks (tiny_world), the user's `include_path` and, unless asked not
    to, lm-eval's own (indexing those takes seconds: once per process)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths: list[str | Path] = [TASKS_DIR, *([Path(include_path).expanduser()] if include_path else [])]
    return TaskManager(include_path=paths, include_defaults=with_lm_evals_own)


def manager_for(tasks: tuple[str, ...], include_path: str | None = None):
    """The smallest index that holds `tasks`: local tasks only when they are all local."""
    local = task_manager(include_path, with_lm_evals_own=False)
    return local if set(tasks) <= set(local.all_tasks) else task_manager(include_path)


def check_tasks(tasks: list[str], include_path: str | None = None) -> None:
    """Before any model loads, one line for: lm-eval missing, an unknown task (the nearest names), a task whose data
    cannot be reached. Loading each task's data here also puts it in the datasets cache the workers read."""
    require_lm_eval()
    if include_path and not Path(include_path).expanduser().is_dir():
        raise TunefleetError(f"--include_path {include_path} is not a folder of task YAMLs")
    manager = manager_for(tuple(tasks), include_path)
    known = manager.all_tasks
    for task in tasks:
        if task not in known:
            raise TunefleetError(
                f"unknown benchmark task '{task}'{nearest(task, known)} (lm_eval ls tasks lists them; your own "
                "task YAMLs: --include_path)"
            )
    from lm_eval.tasks import get_task_dict

    for task in tasks:
        with said_in_one_line(task):
            get_task_dict([task], manager)


def flat_numbers(result: dict) -> dict[str, float]:
    """lm-eval's `{"acc,none": 0.5, "acc_stderr,none": 0.06, "alias": ...}` -> `{"acc": 0.5, "acc_stderr": 0.06}`
    (a filter other than `none` stays in the name: `exact_match/strict-match`)."""
    out = {}
    for key, value in result.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or "," not in key:
            continue
        metric, _, applied = key.partition(",")
        out[metric if applied == "none" else f"{metric}/{applied}"] = float(value)
    return out


@contextlib.contextmanager
def said_in_one_line(task: str):
    """lm-eval's failures for a task as one line naming it; unreachable data says what runs offline."""
    try:
        yield
    except TunefleetError:
        raise
    except Exception as exc:
        text = first_line(exc)
        if any(sign in text.lower() for sign in OFFLINE_SIGNS):
            raise TunefleetError(
                f"benchmark task {task}: its data cannot be reached ({text}); without a network only local tasks "
                "run (tiny_world, or your own with --include_path and local data files)"
            ) from None
        raise TunefleetError(f"benchmark task {task}: {type(exc).__name__}: {text}") from None


class Benchmarks:
    """Runs lm-eval tasks on whatever model it is handed (one task index per worker, built once)."""

    def __init__(
        self,
        tasks: tuple[str, ...],
        num_fewshot: int | None,
        limit: int | None,
        include_path: str | None,
        batch_size: int,
    ):
        self.manager = manager_for(tasks, include_path)
        self.num_fewshot, self.limit, self.batch_size = num_fewshot, limit, batch_size

    def run(self, model, tokenizer, task: str) -> dict[str, float]:
        from lm_eval import evaluator
        from lm_eval.models import huggingface

        # Both are wrapped by lm-eval's decorators, which hide their signatures from the type checker.
        simple_evaluate: Any = evaluator.simple_evaluate
        HFLM: Any = huggingface.HFLM
        side = tokenizer.padding_side
        try:
            with said_in_one_line(task):
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
                out = simple_evaluate(
                    model=lm,
                    tasks=[task],
                    num_fewshot=self.num_fewshot,
                    limit=self.limit,
                    task_manager=self.manager,
                    log_samples=False,
                    verbosity="ERROR",
                )
        finally:
            tokenizer.padding_side = side
        if out is None or task not in out["results"]:
            raise TunefleetError(f"benchmark task {task}: lm-eval returned no result (is it a group of tasks?)")
        return flat_numbers(out["results"][task])


def write_data() -> None:
    from tunefleet.trainers.tiny import benchmark_rows

    with open(TASKS_DIR / "tiny_world" / "tiny_world.jsonl", "w") as fh:
        for row in benchmark_rows():
            fh.write(json.dumps(row, sort_keys=True) + "\n")


if __name__ == "__main__":
    if "--write-data" in sys.argv:
        write_data()
