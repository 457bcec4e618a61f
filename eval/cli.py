"""`tunefleet eval` (the original unified_evaluation.py flags and more) and `tunefleet report`.

    tunefleet eval --runs_dir runs
    tunefleet eval --runs_dir runs/demo --backend ray --shards 4 --methods sft dpo
    tunefleet report --runs_dir runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainers.config import METHODS
from trainers.errors import TunefleetError


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunefleet eval", description="Score every run under --runs_dir.")
    p.add_argument("--runs_dir", default="runs", help="Folder searched (nested too) for runs (default: runs).")
    p.add_argument("--methods", nargs="+", help=f"Only these methods ({', '.join(METHODS)}).")
    p.add_argument("--max_samples", type=int, default=100, help="Samples per metric (default: 100).")
    p.add_argument("--max_generation_samples", type=int, default=3, help="Generation samples per run (default: 3).")
    p.add_argument("--skip_perplexity", action="store_true", help="Skip test loss / perplexity.")
    p.add_argument("--base_model", help="Base model for every run (default: the one in each run.json).")
    p.add_argument("--dataset", help="Test dataset (default: each run's dataset).")
    p.add_argument("--sft_split", default="test_sft", help="Conversations for test loss (default: test_sft).")
    p.add_argument("--pref_split", default="test_prefs", help="Pairs for preference accuracy (default: test_prefs).")
    p.add_argument("--output", help="Results file (default: <runs_dir>/evaluation_results.json).")
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="Where to score (default: local).")
    p.add_argument("--shards", type=int, default=1, help="Shards / Ray workers (default: 1).")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray).")
    p.add_argument("--batch_size", type=int, default=16, help="Sequences per forward pass (default: 16).")
    p.add_argument("--gpus_per_worker", type=float, default=1.0,
                   help="Ray backend on GPUs: GPU share per worker; 0.25 puts 4 workers of a small model on a GPU.")
    p.add_argument("--force", action="store_true", help="Re-score runs whose adapter has not changed.")
    p.add_argument("--trust_remote_code", action="store_true", help="Allow code shipped with the base model.")
    return p


def cmd_eval(argv: list[str]) -> int:
    from eval.evaluate import EvalSettings, evaluate
    from eval.report import table

    a = eval_parser().parse_args(argv)
    for m in a.methods or []:
        if m not in METHODS:
            raise TunefleetError(f"unknown method '{m}' in --methods; choose from {', '.join(METHODS)}")
    if a.max_samples < 1 or a.shards < 1 or a.batch_size < 1:
        raise TunefleetError("--max_samples, --shards and --batch_size must be at least 1")
    if not 0 < a.gpus_per_worker <= 1:
        raise TunefleetError("--gpus_per_worker must be in (0, 1]")
    settings = EvalSettings(max_samples=a.max_samples, max_generation_samples=a.max_generation_samples,
                            skip_perplexity=a.skip_perplexity, base_model=a.base_model, dataset=a.dataset,
                            sft_split=a.sft_split, pref_split=a.pref_split, batch_size=a.batch_size,
                            trust_remote_code=a.trust_remote_code, gpus_per_worker=a.gpus_per_worker)
    merged = evaluate(a.runs_dir, a.methods, settings, a.output, a.backend, a.shards, a.force, a.address)
    out = Path(a.output or Path(a.runs_dir) / "evaluation_results.json")
    print(table(merged))
    print(f"results: {out}\nreport:  {out.parent / 'evaluation_report.md'}")
    failed = [n for n, e in merged.items() if e.get("error")]
    for name in failed:
        print(f"error in {name}: {merged[name]['error']}")
    return 1 if failed else 0


def cmd_report(argv: list[str]) -> int:
    from eval.report import table, write_report
    from eval.results import load_results

    p = argparse.ArgumentParser(prog="tunefleet report", description="Rebuild the report from the results JSON.")
    p.add_argument("--runs_dir", default="runs", help="Folder holding evaluation_results.json (default: runs).")
    p.add_argument("--output", help="Results file (default: <runs_dir>/evaluation_results.json).")
    a = p.parse_args(argv)
    path = Path(a.output or Path(a.runs_dir) / "evaluation_results.json")
    if not path.is_file():
        raise TunefleetError(f"{path} not found: run `tunefleet eval --runs_dir {a.runs_dir}` first")
    report = write_report(path, a.runs_dir)
    print(table(load_results(path)))
    print(f"report: {report}")
    return 0
