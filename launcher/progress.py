"""One live view of a sweep: runs queued / running / done / failed, with each running run's step and loss.

On a terminal it is a rich live table; elsewhere (logs, CI) one line per state change.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tunefleet.common.contract import PROGRESS_FILE
from tunefleet.common.jsonfile import utc_now
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import Store
from tunefleet.launcher.records import RunOutcome, RunPlan


class SweepView:
    def __init__(self, runs: list[RunPlan], live: bool | None = None):
        self.runs = {r.name: r for r in runs}
        self.state = dict.fromkeys(self.runs, RunStatus.QUEUED)
        self.attempts = dict.fromkeys(self.runs, 0)
        self.live_enabled = sys.stdout.isatty() if live is None else live
        self.live = None
        self.t0 = time.time()
        self.started_at = utc_now()  # launches at or after it belong to this sweep

    def __enter__(self):
        if self.live_enabled:
            from rich.live import Live

            self.live = Live(self._table(), refresh_per_second=2, transient=False)
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.update(self._table())
            self.live.stop()

    def set(self, name: str, state: RunStatus, note: str = "") -> None:
        if state is RunStatus.RUNNING:
            self.attempts[name] += 1
        self.state[name] = state
        if not self.live:
            counts = self.counts()
            print(
                f"[{time.time() - self.t0:6.1f}s] {name}: {state}{' ' + note if note else ''}   "
                + " ".join(f"{k} {n}" for k, n in counts.items()),
                flush=True,
            )
        self.refresh()

    def note(self, text: str) -> None:
        """A sweep-wide event (a node lost, ...): one line, above the live table on a terminal."""
        line = f"[{time.time() - self.t0:6.1f}s] {text}"
        if self.live:
            self.live.console.print(line)
        else:
            print(line, flush=True)

    def counts(self) -> dict[RunStatus, int]:
        """Runs per state; `blocked` (a pipeline's) and `stopped` (a search's) only once there is one."""
        counts = {s: sum(v is s for v in self.state.values()) for s in RunStatus}
        return {s: n for s, n in counts.items() if n or s not in (RunStatus.BLOCKED, RunStatus.STOPPED)}

    def refresh(self) -> None:
        if self.live:
            self.live.update(self._table())

    def _table(self):
        from rich.table import Table

        counts = self.counts()
        table = Table(title="sweep: " + "  ".join(f"{k} {n}" for k, n in counts.items()))
        for col in ("run", "state", "attempt", "step", "loss"):
            table.add_column(col)
        for name, run in self.runs.items():
            running = self.state[name] is RunStatus.RUNNING
            progress = (Store(run.output_dir).read_json(PROGRESS_FILE) or {}) if running else {}
            step = f"{progress.get('step', '')}/{progress.get('max_steps', '')}" if progress else ""
            loss = progress.get("loss")
            table.add_row(
                name,
                self.state[name],
                str(self.attempts[name] or ""),
                step,
                f"{loss:.4f}" if isinstance(loss, (int, float)) else "",
            )
        return table


def final_table(outcomes: list[RunOutcome]) -> str:
    """Plain text: run, status, steps, final loss, wall time, log path."""
    header = ("run", "status", "steps", "final loss", "wall s", "log")
    rows = []
    for o in outcomes:
        status = o.status + (
            f" (trained elsewhere: {o.elsewhere})"
            if o.elsewhere
            else " (skipped: finished before)"
            if o.skipped
            else ""
        )
        loss = o.final_loss
        rows.append(
            (
                o.name,
                status,
                str(o.steps or "-"),
                f"{loss:.4f}" if isinstance(loss, int | float) else "-",
                f"{o.wall_s:.1f}",
                o.log,
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    for o in outcomes:
        if o.nodes:
            lines.append(f"nodes {o.name}: {nodes_text(o.nodes)}")
        lines += [f"memory {o.name}: {step}" for step in o.memory_steps]
        if not o.ok and o.error:
            lines.append(f"{o.status} {o.name}: {o.error}")
    return "\n".join(lines)


def nodes_text(nodes: list[dict[str, Any]]) -> str:
    """A multi-node run's nodes in one line: `node0 (ranks 0-1), node1 (ranks 2-3)` (pure)."""

    def ranks(r: list[int]) -> str:
        return f"rank {r[0]}" if len(r) == 1 else f"ranks {r[0]}-{r[-1]}"

    return ", ".join(
        f"{n.get('host') or n.get('node_id') or '?'} ({ranks(n['ranks']) if n.get('ranks') else 'machine ' + str(n.get('machine_rank'))})"
        for n in nodes
    )
