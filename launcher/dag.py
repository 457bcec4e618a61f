"""Which runs of a sweep may start now (pure: the backends carry it out).

A plain sweep's runs may all start at once. In a pipeline a run waits for its parent: it may start as soon as
that one run finished (no barrier at the stage: a child of the first SFT run trains while the second SFT run still
does); it is blocked when its parent failed or was blocked itself. A stage that takes the `best` run of an earlier
stage waits for all of that stage to end; then the backend evaluates it (`choices()`), picks the best and gives
it here (`choose`).

    dag = Dag(runs)
    start(dag.ready())                 # whatever may start now
    dag.ended("sft_s1", finished=True) # then ready() again, blocked(), choices()
"""

from __future__ import annotations

import dataclasses

from tunefleet.launcher.records import RunPlan


class Dag:
    def __init__(self, runs: list[RunPlan]):
        self.plans = {run.name: run for run in runs}
        self.waiting = [run.name for run in runs]  # not started, not blocked (in the spec's order)
        self.finished: set[str] = set()
        self.ended_badly: set[str] = set()  # failed, interrupted or blocked: their children never start
        self.running: set[str] = set()
        self.blocked_names: set[str] = set()

    def stage_runs(self, stage: str) -> list[str]:
        return [n for n, p in self.plans.items() if p.lineage is not None and p.lineage.stage == stage]

    def ready(self) -> list[RunPlan]:
        """The runs that may start now; they count as running until `ended`."""
        out = []
        for name in list(self.waiting):
            plan = self.plans[name]
            parent = plan.parent
            if plan.lineage is not None and plan.lineage.waits_for_choice:
                continue
            if parent is None or parent in self.finished:
                self.waiting.remove(name)
                self.running.add(name)
                out.append(plan)
        return out

    def ended(self, name: str, finished: bool) -> None:
        self.running.discard(name)
        (self.finished if finished else self.ended_badly).add(name)

    def blocked(self) -> list[tuple[RunPlan, str]]:
        """The runs that can no longer start, each with why (their parent did not finish); taken off the queue."""
        out = []
        for name in list(self.waiting):
            plan = self.plans[name]
            if plan.parent in self.ended_badly:
                why = "blocked" if plan.parent in self.blocked_names else "did not finish"
                out.append((plan, f"its parent {plan.parent} {why}"))
                self.waiting.remove(name)
                self.ended_badly.add(name)
                self.blocked_names.add(name)
        return out

    def choices(self) -> list[str]:
        """Stages waiting for the best run of their parent stage, now that all of that stage's runs have ended."""
        done = self.finished | self.ended_badly
        waiting = {
            (p.lineage.stage, p.lineage.parent_stage)
            for n in self.waiting
            if (p := self.plans[n]).lineage is not None and p.lineage.waits_for_choice and p.lineage.parent_stage
        }
        return sorted(stage for stage, parent in waiting if all(n in done for n in self.stage_runs(parent)))

    def choose(self, stage: str, best: RunPlan | None, why: str) -> list[tuple[RunPlan, str]]:
        """Give the runs of `stage` their parent, the best run of the stage it starts from (None: there is none:
        they are blocked). Returns the runs blocked by it, with why."""
        blocked = []
        for name in list(self.waiting):
            plan = self.plans[name]
            lineage = plan.lineage
            if lineage is None or not lineage.waits_for_choice or lineage.stage != stage:
                continue
            if best is None:
                self.waiting.remove(name)
                self.ended_badly.add(name)
                self.blocked_names.add(name)
                blocked.append((plan, f"no run of stage {lineage.parent_stage} to start from: {why}"))
                continue
            self.plans[name] = dataclasses.replace(
                plan,
                config=dataclasses.replace(plan.config, model_name=best.output_dir),
                lineage=dataclasses.replace(lineage, parent=best.name),
            )
        return blocked

    def plan(self, name: str) -> RunPlan:
        return self.plans[name]

    @property
    def pending(self) -> bool:
        """Runs are still waiting for a parent, a choice, or a slot."""
        return bool(self.waiting)
