"""`evaluation_report.md` and PNG plots from `evaluation_results.json` (rebuilt by `tunefleet report`).

One table of all runs (base row included, best value per column in bold), per-method mean ± std across
seeds, generation samples side by side (prompt, the base's answer, each run's answer), and plots: training-loss
curves, GRPO reward curves, held-out reward, preference accuracy and perplexity by method.
"""

from __future__ import annotations

import math
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from tunefleet.common.contract import HTML_REPORT, MANIFEST_FILE, STATISTICS_FILE
from tunefleet.common.jsonfile import write_json_atomic
from tunefleet.common.storage import Store, scratch_dir
from tunefleet.eval import statistics as stats
from tunefleet.eval.results import BETTER, load_results, loss_curve, reward_curve, split_location
from tunefleet.trainers.cost import add_up

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
COST_FIELDS = (
    "wall_seconds",
    "train_seconds",
    "gpu_seconds",
    "tokens_trained",
    "tokens_per_second",
    "peak_rss_mb",
    "peak_gpu_mb",
    "energy_joules",
)
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


def markdown(results: dict, found: dict | None = None, gpu_hour_price: float | None = None) -> str:
    """The Markdown report; `found`: the study's statistics when already computed (study_statistics)."""
    found = found or study_statistics(results)
    summary = summary_metrics(results)
    rows = _ordered({name: entry | benchmark_keys(entry) for name, entry in results.items()})
    lines = run_table(results)
    lines += summary_lines(found)
    lines += [
        "",
        "## Per method (mean and 95% t interval over seeds)",
        "",
        "| method | runs | " + " | ".join(summary) + " |",
        "|---" * (len(summary) + 2) + "|",
    ]
    for label, numbers in found["intervals"].items():
        if label.startswith("parent:") or label == "base":
            continue
        runs = max((n["n"] for n in numbers.values()), default=0)
        lines.append(f"| {label} | {runs} | " + " | ".join(interval_text(numbers.get(key)) for key in summary) + " |")
    lines += comparison_lines(found)
    lines += cost_lines(cost_summary(results, gpu_hour_price))
    lines += samples_side_by_side(rows)
    lines += [
        "",
        "Plots: `loss_curves.png`, `reward_curves.png` (GRPO), `heldout_reward.png`, "
        "`preference_accuracy.png`, `perplexity.png`. Every comparison: `evaluation_statistics.json`; the whole "
        "report in a browser: `evaluation_report.html`.",
        "",
    ]
    return "\n".join(lines)


@dataclass
class RunRows:
    """What both reports' table of every run shows: the rows in order (benchmark numbers as keys of their own), the
    columns, and the best value of each column that has a direction."""

    rows: list[tuple[str, dict]]
    shown: list[tuple[str, str, str]]
    best: dict


def run_rows(results: dict) -> RunRows:
    flat = {name: entry | benchmark_keys(entry) for name, entry in results.items()}
    rows = _ordered(flat)
    shown = columns(flat)
    return RunRows(rows, shown, best_values(rows, shown))


def run_table(results: dict) -> list[str]:
    """The report's heading and its table of every run (benchmark numbers with their lm-eval stderr)."""
    table = run_rows(results)
    rows, shown, best = table.rows, table.shown, table.best
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
            stderr = benchmark_stderr(entry, key)
            text += f" ± {stderr:.3f}" if stderr is not None and entry.get(key) is not None else ""
            cells.append(f"**{text}**" if better and key in best and entry.get(key) == best[key] else text)
        label = f"{name} (error: {entry['error']})" if entry.get("error") else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def best_values(rows: list[tuple[str, dict]], shown: list[tuple[str, str, str]]) -> dict:
    """Per column with a direction (BETTER), its best value among the rows without an error."""
    best = {}
    for key, _, _ in shown:
        better = BETTER.get(key)
        values = [e[key] for _, e in rows if isinstance(e.get(key), (int, float)) and not e.get("error")]
        if better and values:
            best[key] = min(values) if better == "min" else max(values)
    return best


def benchmark_stderr(entry: dict, key: str) -> float | None:
    """lm-eval's standard error of a benchmark column (`<task> <metric>`) of an entry, where it gave one."""
    task, _, metric = key.partition(" ")
    value = ((entry.get("benchmarks") or {}).get(task) or {}).get(f"{metric}_stderr")
    return value if isinstance(value, (int, float)) and not math.isnan(value) else None


def summary_metrics(results: dict) -> list[str]:
    """The metrics each method's interval is given for: SUMMARY, then reward-model and benchmark columns."""
    with_benchmarks = {name: entry | benchmark_keys(entry) for name, entry in results.items()}
    benchmarks = {key for key, _, _ in benchmark_columns(with_benchmarks)}
    return SUMMARY + [key for key, _, _ in columns(with_benchmarks) if key.startswith("rm_") or key in benchmarks]


def study_statistics(results: dict) -> dict:
    """evaluation_statistics.json: per group (method, per stage) and metric the mean, its 95% interval over seeds
    and the seed count; every paired comparison with p_value and p_holm; per per-prompt metric the group whose
    lead holds over every other group (None where none does)."""
    ordered = dict(_ordered(results))
    flat = {name: entry | benchmark_keys(entry) for name, entry in ordered.items()}
    found = stats.comparisons(ordered)
    per_prompt = stats.per_prompt_metrics(ordered)
    return {
        "confidence": stats.CONFIDENCE,
        "intervals": stats.intervals(flat, summary_metrics(ordered)),
        "per_prompt_metrics": {m: stats.PER_PROMPT.get(m, "a reward's score of the answer") for m in per_prompt},
        "comparisons": [c.record() for c in found],
        "winners": {m: stats.winner(found, m) for m in per_prompt},
    }


def cost_summary(results: dict, gpu_hour_price: float | None = None) -> dict:
    """Each trained run's cost (run.json `cost`, carried into its results entry) and the study's total; money where
    a price of one GPU-hour is given. Energy is absent where no run measured it (no NVML), not zero."""
    runs = []
    for name, entry in _ordered(results):
        cost = entry.get("cost")
        if not isinstance(cost, dict):
            continue
        gpu_hours = (cost.get("gpu_seconds") or 0.0) / 3600
        runs.append(
            {"run": name, "method": entry.get("method")}
            | {k: cost.get(k) for k in COST_FIELDS}
            | {"gpu_hours": gpu_hours, "money": gpu_hours * gpu_hour_price if gpu_hour_price is not None else None}
        )
    total = {"runs": len(runs)} | add_up(runs)
    total["gpu_hours"] = total["gpu_seconds"] / 3600
    total["money"] = total["gpu_hours"] * gpu_hour_price if gpu_hour_price is not None else None
    return {"gpu_hour_price": gpu_hour_price, "runs": runs, "total": total}


def cost_lines(cost: dict) -> list[str]:
    if not cost["runs"]:
        return []
    total = cost["total"]
    lines = [
        "",
        "## Cost",
        "",
        f"{total['runs']} runs: {total['wall_seconds']:.0f} s, {total['gpu_hours']:.4f} GPU-hours, "
        f"{total['tokens_trained']:,} tokens trained"
        + (f", {total['energy_joules']:,.0f} J" if total["energy_joules"] is not None else "")
        + (f", {total['money']:.4f} at {cost['gpu_hour_price']} per GPU-hour" if total["money"] is not None else "")
        + ".",
        "",
        "| run | wall s | GPU-hours | tokens trained | tokens/s | peak MiB | energy J |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in cost["runs"]:
        peak = run.get("peak_gpu_mb") or run.get("peak_rss_mb")
        lines.append(
            f"| {run['run']} | {_fmt(run.get('wall_seconds'), '{:.1f}')} | {run['gpu_hours']:.4f} "
            f"| {_fmt(run.get('tokens_trained'), '{:,}')} | {_fmt(run.get('tokens_per_second'), '{:,.0f}')} "
            f"| {_fmt(peak, '{:,.0f}')} | {_fmt(run.get('energy_joules'), '{:,.0f}')} |"
        )
    return lines


def interval_text(numbers: dict | None, digits: int = 4) -> str:
    """`mean [low, high]`, or `mean (1 seed)` where one run gives no interval."""
    if not numbers:
        return "–"
    mean = f"{numbers['mean']:.{digits}f}"
    if numbers.get("ci95") is None:
        return f"{mean} ({numbers['n']} seed: no interval)"
    low, high = numbers["ci95"]
    return f"{mean} [{low:.{digits}f}, {high:.{digits}f}]"


def metric_title(metric: str) -> str:
    return f"reward {metric.split(':', 1)[1]}" if metric.startswith("reward:") else metric.replace("_", " ")


def winner_sentences(found: dict) -> list[str]:
    """Per per-prompt metric: the method whose lead over every other holds after Holm, or that none does."""
    out = []
    for metric, label in found["winners"].items():
        if label:
            out.append(f"{metric_title(metric)}: {label} leads every other method (Holm p < {stats.ALPHA}).")
        else:
            out.append(f"{metric_title(metric)}: no method's lead over all others holds (Holm p < {stats.ALPHA}).")
    return out


def summary_lines(found: dict) -> list[str]:
    sentences = winner_sentences(found)
    return ["", "## Summary", "", *(f"- {line}" for line in sentences)] if sentences else []


def comparison_lines(found: dict) -> list[str]:
    """The paired comparisons of the first per-prompt metric (all of them: evaluation_statistics.json)."""
    if not found["comparisons"]:
        return []
    metric = found["comparisons"][0]["metric"]
    lines = [
        "",
        f"## Paired comparisons: {metric_title(metric)} (A − B over the same prompts, seeds matched)",
        "",
        "| A | B | A − B | 95% bootstrap interval | p | p (Holm) | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in found["comparisons"]:
        if c["metric"] != metric:
            continue
        ci = f"[{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}]" if c["ci95"] else (c["note"] or "–")
        holds = "yes" if c["significant"] else "no"
        lines.append(
            f"| {c['a']} | {c['b']} | {_fmt(c['difference'], '{:+.4f}')} | {ci} | {_fmt(c['p_value'], '{:.4f}')} "
            f"| {_fmt(c['p_holm'], '{:.4f}')} | {holds} |"
        )
    return lines


def samples_by_prompt(rows: list[tuple[str, dict]]) -> list[tuple[str, list[tuple[str, dict]]]]:
    """Per sampled prompt (in order): its text, and each run's sample for it (the base's first), runs with an error
    left out."""
    with_samples = [(name, e) for name, e in rows if e.get("generation_samples") and not e.get("error")]
    out = []
    for i in range(max((len(e["generation_samples"]) for _, e in with_samples), default=0)):
        answers = [(name, e["generation_samples"][i]) for name, e in with_samples if len(e["generation_samples"]) > i]
        out.append((answers[0][1]["prompt"], answers))
    return out


def samples_side_by_side(rows: list[tuple[str, dict]]) -> list[str]:
    """For each sampled prompt: the base's answer and every run's answer to it, with its held-out reward."""
    prompts = samples_by_prompt(rows)
    if not prompts:
        return []
    funcs = next((e.get("reward_funcs") for _, e in rows if e.get("generation_samples") and e.get("reward_funcs")), [])
    rewards = ", ".join(funcs or [])
    lines = ["", f"## Generation samples (greedy; reward: {rewards or '–'})", ""]
    for i, (prompt, answers) in enumerate(prompts):
        lines += [f"**Prompt {i + 1}:** {_cell(prompt)}", "", "| run | answer | reward |", "|---|---|---|"]
        for name, sample in answers:
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


def write_report(results_file: str, runs_dir: str | None = None, gpu_hour_price: float | None = None) -> str:
    """Rebuild the reports (Markdown and HTML), the statistics and the plots beside the results file (uploaded when
    it lives in a store). Returns the HTML report's path or URI."""
    from tunefleet.eval import html_report

    results = load_results(results_file)
    store, _ = split_location(results_file)
    local = Path(store.root) if not store.remote else scratch_dir(store.root, "report")
    local.mkdir(parents=True, exist_ok=True)
    found = study_statistics(results)
    cost = cost_summary(results, gpu_hour_price)
    write_text(local / "evaluation_report.md", markdown(results, found, gpu_hour_price))
    write_json_atomic(local / STATISTICS_FILE, found | {"cost": cost})
    written = [local / "evaluation_report.md", local / STATISTICS_FILE, *plots(results, local, runs_dir)]
    table = run_rows(results)
    manifest = Store(runs_dir).read_json(MANIFEST_FILE) if runs_dir else None
    page = html_report.page(
        f"Evaluation report: {Path(str(runs_dir or store.root)).name}",
        winner_sentences(found),
        html_report.results_section(table.rows, table.shown, table.best, benchmark_stderr),
        html_report.interval_section(found, summary_metrics(results)),
        html_report.comparison_section(found),
        html_report.cost_section(cost),
        [path for path in written if path.suffix == ".png"],
        html_report.samples_section(samples_by_prompt(table.rows)),
        manifest,
    )
    write_text(local / HTML_REPORT, page)
    written.append(local / HTML_REPORT)
    if store.remote:
        for path in written:
            store.upload(path, path.name)
        shutil.rmtree(local, ignore_errors=True)
    return store.url(HTML_REPORT)


def write_text(path: Path, text: str) -> None:
    """A whole file or none: written beside, then renamed over."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def table(results: dict) -> str:
    """The report's first table, for printing at the end of `tunefleet eval` / `make demo`."""
    return "\n".join(run_table(results))
