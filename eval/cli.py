"""`tunefleet eval` (the original unified_evaluation.py flags and more) and `tunefleet report`.

tunefleet eval --runs_dir runs
tunefleet eval --runs_dir runs/demo --backend ray --shards 4 --methods sft dpo
tunefleet report --runs_dir runs
"""

from __future__ import annotations

import argparse

from tunefleet.common import schema
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
    print(f"results: {out}\nreport:  {store.url('evaluation_report.md')}")
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
    a = p.parse_args(argv)
    path = results_path(a.runs_dir, a.output)
    store, name = split_location(path)
    Store(a.runs_dir).check()
    store.check(write=True)
    if not store.exists(name):
        raise TunefleetError(f"{path} not found: run `tunefleet eval --runs_dir {a.runs_dir}` first")
    report = write_report(path, a.runs_dir)
    print(table(load_results(path)))
    print(f"report: {report}")
    return 0
