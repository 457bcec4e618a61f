"""`tunefleet eval` (the original unified_evaluation.py flags and more) and `tunefleet report`.

tunefleet eval --runs_dir runs
tunefleet eval --runs_dir runs/demo --backend ray --shards 4 --methods sft dpo
tunefleet report --runs_dir runs
"""

from __future__ import annotations

import argparse

from tunefleet.common import schema
from tunefleet.common.contract import HTML_REPORT
from tunefleet.common.errors import TunefleetError
from tunefleet.common.storage import Store
from tunefleet.common.terminal import calm
from tunefleet.eval.settings import EvalSettings


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunefleet eval", description="Score every run under --runs_dir.", allow_abbrev=False
    )
    p.add_argument("--runs_dir", default="runs", help="Folder searched (nested too) for runs (default: runs).")
    p.add_argument("--output", help="Results file (default: <runs_dir>/evaluation_results.json).")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray).")
    return schema.add_flags(p, EvalSettings)


def parse_eval_args(argv: list[str]) -> tuple[argparse.Namespace, EvalSettings]:
    """(where: runs_dir/output/address, what and how: the settings); bad values are one-line errors."""
    where = eval_parser().parse_args(argv)
    given = {k: v for k, v in vars(where).items() if k in schema.fields(EvalSettings)}
    return where, schema.from_mapping(EvalSettings, given)


def cmd_eval(argv: list[str]) -> int:
    from tunefleet.eval.evaluate import evaluate
    from tunefleet.eval.report import table
    from tunefleet.eval.results import results_path, split_location

    a, settings = parse_eval_args(argv)
    calm()
    Store(a.runs_dir).check()
    split_location(results_path(a.runs_dir, a.output))[0].check(write=True)
    merged = evaluate(a.runs_dir, settings, a.output, a.address)
    out = results_path(a.runs_dir, a.output)
    store, _ = split_location(out)
    print(table(merged))
    print(f"results: {out}\nreport:  {store.url('evaluation_report.md')}\nhtml:    {store.url(HTML_REPORT)}")
    failed = [n for n, e in merged.items() if e.get("error")]
    for name in failed:
        print(f"error in {name}: {merged[name]['error']}")
    return 1 if failed else 0


def cmd_report(argv: list[str]) -> int:
    from tunefleet.eval.report import table, write_report
    from tunefleet.eval.results import load_results, results_path, split_location

    p = argparse.ArgumentParser(prog="tunefleet report", description="Rebuild the report from the results JSON.")
    p.add_argument("--runs_dir", default="runs", help="Folder holding evaluation_results.json (default: runs).")
    p.add_argument("--output", help="Results file (default: <runs_dir>/evaluation_results.json).")
    p.add_argument("--gpu_hour_price", help="Price of one GPU-hour: the report shows each run's cost in money.")
    a = p.parse_args(argv)
    price = schema.from_mapping(EvalSettings, {"gpu_hour_price": a.gpu_hour_price}).gpu_hour_price
    path = results_path(a.runs_dir, a.output)
    store, name = split_location(path)
    Store(a.runs_dir).check()
    store.check(write=True)
    if not store.exists(name):
        raise TunefleetError(f"{path} not found: run `tunefleet eval --runs_dir {a.runs_dir}` first")
    report = write_report(path, a.runs_dir, price)
    print(table(load_results(path)))
    print(f"report: {store.url('evaluation_report.md')}\nhtml:   {report}")
    return 0


def cmd_compare(argv: list[str]) -> int:
    from tunefleet.eval import statistics as stats
    from tunefleet.eval.results import load_results, results_path, split_location

    p = argparse.ArgumentParser(
        prog="tunefleet compare",
        description="A minus B on one per-prompt metric of an evaluated study, over the same held-out prompts (seeds "
        "matched in order): the difference, its 95% paired bootstrap interval and a permutation test's p-value. "
        "A and B: a method (stage/method in a pipeline), base, or a run's name.",
        allow_abbrev=False,
    )
    p.add_argument("a", help="A method, base, or a run.")
    p.add_argument("b", help="A method, base, or a run.")
    p.add_argument("--runs_dir", default="runs", help="Folder holding evaluation_results.json (default: runs).")
    p.add_argument("--output", help="Results file (default: <runs_dir>/evaluation_results.json).")
    p.add_argument(
        "--metric",
        default="heldout_reward",
        help="Per-prompt metric: heldout_reward, win_vs_base, rm_score, preference_correct, reward:<name> "
        "(default: heldout_reward).",
    )
    a = p.parse_args(argv)
    path = results_path(a.runs_dir, a.output)
    store, name = split_location(path)
    if not store.exists(name):
        raise TunefleetError(f"{path} not found: run `tunefleet eval --runs_dir {a.runs_dir}` first")
    results = load_results(path)
    groups = stats.groups(results)
    runs = {run: stats.Group(run, [entry]) for run, entry in results.items() if not entry.get("error")}

    def side(label: str) -> stats.Group:
        found = groups.get(label) or runs.get(label)
        if found is None:
            raise TunefleetError(
                f"'{label}' is not a method or a run of {path}; methods: {', '.join(groups)}; "
                f"runs: {', '.join(r for r in runs if r not in groups)}"
            )
        return found

    first, second = side(a.a), side(a.b)
    metrics = stats.per_prompt_metrics(results)
    if a.metric not in metrics:
        raise TunefleetError(
            f"no per-prompt scores of '{a.metric}' in {path}; it has: {', '.join(metrics) or 'none (evaluate again)'}"
        )
    found = stats.compare(a.metric, first.label, first.rows(a.metric), second.label, second.rows(a.metric))
    print(comparison_text(found))
    return 0


def comparison_text(c) -> str:
    """One comparison in a few lines: what was compared, the difference and interval, the p-value, the verdict."""
    if c.difference is None:
        return f"{c.a} vs {c.b} on {c.metric}: not compared: {c.note}"
    lines = [
        f"{c.a} ({c.seeds_a} seed{'s' if c.seeds_a != 1 else ''}) vs {c.b} ({c.seeds_b} seed"
        f"{'s' if c.seeds_b != 1 else ''}) on {c.metric}, {c.prompts} prompts, {c.units} paired units",
        f"mean {c.mean_a:.4f} vs {c.mean_b:.4f}: difference {c.difference:+.4f}",
    ]
    if c.ci95 is not None:
        lines.append(f"95% paired bootstrap interval [{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}], p = {c.p_value:.4g}")
    verdict = "the difference holds (p < 0.05)" if c.holds else "the difference does not hold (p >= 0.05)"
    lines.append(verdict if c.p_value is not None else "no test")
    if c.note:
        lines.append(f"note: {c.note}")
    return "\n".join(lines)
