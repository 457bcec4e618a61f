"""Pure core of the evaluator: split the work into shards and merge shard results exactly (the metrics computed
from them: eval/metrics.py).

Work is (target × metric × sample range); a target is a run's adapter or the base model alone. Shards return
per-sample values (NLL sums and token counts, or generated text), never means, so merging is a
concatenation in sample order and every metric is computed once from the whole.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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


def task_dict(task: Task) -> dict:
    return asdict(task)
