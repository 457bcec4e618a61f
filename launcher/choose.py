"""The best run of a pipeline stage, for a stage that starts from it (`best: METRIC`): its finished runs evaluated
with the stage's eval settings, then ranked by the metric in its direction (ties: the first by name). The local and
Ray backends ask it from a thread of the sweep; on SLURM a job of its own asks it once the stage's arrays ended.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tunefleet.common.status import RunStatus
from tunefleet.eval.settings import EvalSettings
from tunefleet.launcher.execute import summarize


@dataclass
class Choice:
    """Which run of `stage` the runs of another stage start from (run None: none could be chosen, `why`)."""

    stage: str
    metric: str
    run: str | None
    value: float | None
    among: int
    why: str

    def record(self) -> dict:
        return dataclasses.asdict(self)


def best_run(
    stage: str,
    metric: str,
    members: dict[str, str],
    runs_dir: str,
    settings: EvalSettings,
    backend: str = "local",
    address: str | None = None,
) -> Choice:
    """`members`: run name -> output folder of every run of `stage`."""
    from tunefleet.common.terminal import calm
    from tunefleet.eval.evaluate import evaluate
    from tunefleet.eval.results import BETTER

    calm()  # the evaluator loads models in this process: no library bars
    finished = [name for name, out in members.items() if summarize(out).status is RunStatus.FINISHED]
    if not finished:
        return Choice(stage, metric, None, None, 0, f"none of the {len(members)} runs of stage {stage} finished")
    settings = dataclasses.replace(settings, backend=settings.backend or backend, runs=finished)
    scores = evaluate(runs_dir, settings, None, address, progress=False)
    scored = [
        (float(entry[metric]), name)
        for name in finished
        if not (entry := scores.get(name) or {}).get("error") and isinstance(entry.get(metric), (int, float))
    ]
    if not scored:
        why = f"none of the {len(finished)} finished runs of stage {stage} was scored on {metric}"
        return Choice(stage, metric, None, None, 0, why)
    sign = 1 if BETTER[metric] == "min" else -1
    value, name = min(scored, key=lambda s: (sign * s[0], s[1]))
    why = f"{name}: best {metric} ({value:.4g}) of {len(scored)} runs of stage {stage}"
    return Choice(stage, metric, name, value, len(scored), why)
