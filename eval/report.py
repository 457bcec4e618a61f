"""`evaluation_report.md` and PNG plots from `evaluation_results.json` (rebuilt by `tunefleet report`).

One table of all runs (base row included, best value per column in bold), per-method mean ± std across
seeds, generation samples side by side (prompt, the base's answer, each run's answer), and plots: training-loss
curves, GRPO reward curves, held-out reward, preference accuracy and perplexity by method.
"""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path

from tunefleet.common.storage import scratch_dir
from tunefleet.eval.results import BETTER, load_results, loss_curve, reward_curve, split_location

# column, header, format; a column with a direction in BETTER has its best value in bold
COLUMNS = [
    ("method", "method", "{}"),
    ("seed", "seed", "{}"),
    ("total_steps", "steps", "{}"),
    ("final_train_loss", "final train loss", "{:.4f}"),  # losses of different methods do not compare
    ("test_loss", "test loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("preference_accuracy", "pref. acc.", "{:.3f}"),
    ("reward_accuracy", "reward acc.", "{:.3f}"),
    ("loss_margin", "loss margin", "{:.4f}"),
    ("heldout_reward", "held-out reward", "{:.3f}"),
    ("win_rate_vs_base", "win rate vs base", "{:.2f}"),
]
SUMMARY = [
    "test_loss",
    "perplexity",
    "preference_accuracy",
    "reward_accuracy",
    "loss_margin",
    "heldout_reward",
    "win_rate_vs_base",
]


def _fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return pattern.format(value)


def _ordered(results: dict) -> list[tuple[str, dict]]:
    """Base rows first; then stage by stage (stages whose runs start from the raw base first), each led by the
    parent rows its runs start from; within a stage by method and name."""
    later = {e.get("stage") for e in results.values() if e.get("method") == "parent"}

    def key(item):
        name, entry = item
        stage = entry.get("stage") or ""
        return (
            entry.get("method") != "base",
            stage in later,
            stage,
            entry.get("method") != "parent",
            entry.get("method") or "",
            name,
        )

    return sorted(results.items(), key=key)


def columns(results: dict) -> list[tuple[str, str, str]]:
    """The table's columns: the stage and the win rate against the parent only where a pipeline gives them."""
    out = list(COLUMNS)
    if any(e.get("stage") for e in results.values()):
        out.insert(1, ("stage", "stage", "{}"))
    if any(e.get("win_rate_vs_parent") is not None for e in results.values()):
        out.append(("win_rate_vs_parent", "win rate vs parent", "{:.2f}"))
    judged = [  # --reward_model
        ("rm_score", "RM score", "{:.3f}"),
        ("rm_win_rate_vs_base", "RM win vs base", "{:.2f}"),
        ("rm_win_rate_vs_parent", "RM win vs parent", "{:.2f}"),
    ]
    out += [column for column in judged if any(e.get(column[0]) is not None for e in results.values())]
    return out + benchmark_columns(results)


def benchmark_keys(entry: dict) -> dict[str, float]:
    """An entry's benchmark numbers as table keys: `<task> <metric>` (stderrs left to the results file)."""
    return {
        f"{task} {metric}": value
        for task, numbers in (entry.get("benchmarks") or {}).items()
        for metric, value in numbers.items()
        if not metric.endswith("_stderr")
    }


def benchmark_columns(results: dict) -> list[tuple[str, str, str]]:
    keys = sorted({key for entry in results.values() for key in benchmark_keys(entry)})
    return [(key, key, "{:.3f}") for key in keys]


def markdown(results: dict) -> str:
    results = {name: entry | benchmark_keys(entry) for name, entry in results.items()}
    rows = _ordered(results)
    shown = columns(results)
    benchmarks = {key for key, _, _ in benchmark_columns(results)}
    summary = SUMMARY + [key for key, _, _ in shown if key.startswith("rm_") or key in benchmarks]
    best = {}
    for key, _, _ in shown:
        better = BETTER.get(key)
        values = [e[key] for _, e in rows if isinstance(e.get(key), (int, float)) and not e.get("error")]
        if better and values:
            best[key] = min(values) if better == "min" else max(values)
    lines = [
        "# Evaluation report",
        "",
        f"{len(rows)} rows; **bold** = best in column. Definitions: README, section Evaluation.",
        "",
        "| run | " + " | ".join(h for _, h, _ in shown) + " |",
        "|---" * (len(shown) + 1) + "|",
    ]
    for name, entry in rows:
        cells = []
        for key, _, pattern in shown:
            better = BETTER.get(key)
            text = _fmt(entry.get(key), pattern)
            cells.append(f"**{text}**" if better and key in best and entry.get(key) == best[key] else text)
        label = f"{name} (error: {entry['error']})" if entry.get("error") else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "## Per method (mean ± std across seeds)",
        "",
        "| method | runs | " + " | ".join(summary) + " |",
        "|---" * (len(summary) + 2) + "|",
    ]
    by_method: dict[str, list[dict]] = {}
    for _, entry in rows:  # in a pipeline, per stage and method: DPO from SFT is not DPO from the raw base
        if not entry.get("error"):
            group = "/".join(filter(None, (entry.get("stage"), entry.get("method") or "?")))
            by_method.setdefault(group, []).append(entry)
    for method, entries in by_method.items():
        cells = []
        for key in summary:
            vals = [e[key] for e in entries if isinstance(e.get(key), (int, float))]
            if not vals:
                cells.append("–")
            else:
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.4f} ± {std:.4f}")
        lines.append(f"| {method} | {len(entries)} | " + " | ".join(cells) + " |")

    lines += samples_side_by_side(rows)
    lines += [
        "",
        "Plots: `loss_curves.png`, `reward_curves.png` (GRPO), `heldout_reward.png`, "
        "`preference_accuracy.png`, `perplexity.png`.",
        "",
    ]
    return "\n".join(lines)


def samples_side_by_side(rows: list[tuple[str, dict]]) -> list[str]:
    """For each sampled prompt: the base's answer and every run's answer to it, with its held-out reward."""
    with_samples = [(name, e) for name, e in rows if e.get("generation_samples") and not e.get("error")]
    if not with_samples:
        return []
    rewards = ", ".join(next((e.get("reward_funcs") for _, e in with_samples if e.get("reward_funcs")), []) or [])
    lines = ["", f"## Generation samples (greedy; reward: {rewards or '–'})", ""]
    count = max(len(e["generation_samples"]) for _, e in with_samples)
    for i in range(count):
        prompt = next(
            (e["generation_samples"][i]["prompt"] for _, e in with_samples if len(e["generation_samples"]) > i), ""
        )
        lines += [f"**Prompt {i + 1}:** {_cell(prompt)}", "", "| run | answer | reward |", "|---|---|---|"]
        for name, e in with_samples:
            if len(e["generation_samples"]) > i:
                sample = e["generation_samples"][i]
                lines.append(
                    f"| {name} | {_cell(sample['response']) or '(empty)'} | {_fmt(sample.get('reward'), '{:.2f}')} |"
                )
        lines.append("")
    return lines


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def plots(results: dict, out_dir: Path, runs_dir: str | None = None) -> list[Path]:
    # Figures through matplotlib's object API (no pyplot state, no GUI backend) with fixed margins: a layout
    # engine measures every text box, which took longer than drawing.
    from matplotlib.figure import Figure

    written = []

    def save(fig, name: str) -> None:
        written.append(out_dir / name)
        fig.savefig(written[-1], dpi=110)

    fig = Figure(figsize=(7, 4))
    fig.subplots_adjust(left=0.1, right=0.97, top=0.9, bottom=0.13)
    ax = fig.subplots()
    for name, entry in _ordered(results):
        path = entry.get("model_path")
        curve = loss_curve(path) if path and entry.get("method") != "base" else []
        if curve:
            ax.plot(*zip(*curve), label=name, linewidth=1)
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    if ax.lines:
        ax.legend(fontsize=6, ncol=2)
    save(fig, "loss_curves.png")

    fig = Figure(figsize=(7, 4))
    fig.subplots_adjust(left=0.1, right=0.97, top=0.9, bottom=0.13)
    ax = fig.subplots()
    for name, entry in _ordered(results):
        path = entry.get("model_path")
        curve = reward_curve(path) if path and entry.get("method") == "grpo" else []
        if curve:
            ax.plot(*zip(*curve), label=name, linewidth=1.2)
    ax.set(xlabel="step", ylabel="mean reward of the sampled answers", title="GRPO reward during training")
    if ax.lines:
        ax.legend(fontsize=7)
    save(fig, "reward_curves.png")

    for key, title in (
        ("heldout_reward", "Reward of greedy answers to held-out prompts"),
        ("preference_accuracy", "Preference accuracy (held out)"),
        ("perplexity", "Perplexity"),
    ):
        by_method: dict[str, list[float]] = {}
        for _, entry in _ordered(results):
            if isinstance(entry.get(key), (int, float)) and not entry.get("error"):
                by_method.setdefault(entry.get("method") or "?", []).append(entry[key])
        fig = Figure(figsize=(6, 3.5))
        fig.subplots_adjust(left=0.13, right=0.97, top=0.89, bottom=0.1)
        ax = fig.subplots()
        for i, vals in enumerate(by_method.values()):
            ax.bar(i, statistics.mean(vals), color="#9ecae1")
            ax.plot([i] * len(vals), vals, "o", color="#08519c", zorder=3, markersize=4)  # one dot per seed
        ax.set_xticks(range(len(by_method)), list(by_method))
        ax.set(title=title, ylabel=key)
        save(fig, f"{key}.png")
    return written


def write_report(results_file: str, runs_dir: str | None = None) -> str:
    """Rebuild the report and plots beside the results file (uploaded when it lives in a store)."""
    results = load_results(results_file)
    store, _ = split_location(results_file)
    local = Path(store.root) if not store.remote else scratch_dir(store.root, "report")
    local.mkdir(parents=True, exist_ok=True)
    out = local / "evaluation_report.md"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(markdown(results))
    tmp.replace(out)
    written = [out, *plots(results, local, runs_dir)]
    if store.remote:
        for path in written:
            store.upload(path, path.name)
        shutil.rmtree(local, ignore_errors=True)
    return store.url("evaluation_report.md")


def table(results: dict) -> str:
    """The report's first table, for printing at the end of `tunefleet eval` / `make demo`."""
    text = markdown(results)
    return text.split("\n## ")[0]
