"""The `tunefleet` command.

    tunefleet train --method dpo --model_name tunefleet/tiny-qwen2 --dataset tunefleet/tiny-ultrafeedback \
      --split train_prefs --output_dir runs/dpo_tiny --max_steps 20
    tunefleet check-data --method dpo --dataset HuggingFaceH4/ultrafeedback_binarized --split train_prefs
    tunefleet sweep sweeps/demo.yaml --backend ray --eval
    tunefleet eval --runs_dir runs
    tunefleet report --runs_dir runs
    tunefleet export --runs_dir runs --best win_rate_vs_base --output_dir exported/best
"""

from __future__ import annotations

import argparse
import errno
import json
import subprocess
import sys
from typing import TYPE_CHECKING

from tunefleet.common.errors import TunefleetError

if TYPE_CHECKING:
    from tunefleet.trainers.config import TrainConfig


COMMANDS = {
    "train": "Train one run (all flags of the original tool; --help lists them).",
    "check-data": "Check that a dataset split fits a method, show an example as the method sees it.",
    "sweep": "Run a sweep spec (methods x seeds x models) on local processes, Ray or SLURM.",
    "eval": "Score every run under --runs_dir into evaluation_results.json and a report.",
    "report": "Rebuild the reports (Markdown, HTML), statistics and plots from evaluation_results.json.",
    "compare": "Compare two methods (or runs) of an evaluated study on the same prompts: difference, interval, p.",
    "export": "Write a run's model merged into its base (or the best run's, by a metric) for serving.",
    "status": "Show the state of a sweep's runs (and its SLURM jobs).",
    "cancel": "Cancel a sweep's SLURM jobs.",
}


def cmd_train(argv: list[str]) -> int:
    from tunefleet.trainers.config import parse_args

    cfg = parse_args(argv)
    from tunefleet.common.storage import Store
    from tunefleet.common.terminal import calm

    calm(cfg.verbose)
    Store(cfg.output_dir).check(write=True)  # before minutes of loading, not after
    from tunefleet.trainers.train import hold_folder, let_go

    lock = hold_folder(cfg)  # one writer per run folder: refused in one line while another process writes it
    try:
        return train_held(cfg, argv)
    finally:
        let_go(lock)


def train_held(cfg: TrainConfig, argv: list[str]) -> int:
    """`tunefleet train` once the run folder is this process's to write: in this process, or its ranks launched."""
    from tunefleet.launcher.launch import plan_launch

    if cfg.num_nodes > 1:
        raise TunefleetError(
            f"--num_nodes {cfg.num_nodes}: tunefleet train runs on this machine; a run over several nodes is a sweep "
            "on a cluster: tunefleet sweep SPEC --backend ray (or slurm) with num_nodes in the spec"
        )
    choice, env = plan_launch(cfg)
    if choice.config is None:
        from tunefleet.trainers.train import run_to_exit

        code, record = run_to_exit(cfg)
        if record is not None:
            print(f"done: {cfg.output_dir} (status {record['status']}, step {record.get('global_step')})")
        return code
    return launch_processes(cfg, argv, choice.config, choice.reason, env)


def launch_processes(cfg: TrainConfig, argv: list[str], config: str, reason: str, env: dict) -> int:
    """`accelerate launch` the run; after running out of memory, again with the next smaller set-up."""
    from tunefleet.common.storage import Store
    from tunefleet.launcher import warm
    from tunefleet.launcher.launch import free_port, launch_command
    from tunefleet.trainers import recovery

    env = warm.with_advertised(env)  # the ranks fork from it (warm.rank)

    def launch(run_cfg: TrainConfig) -> tuple[int, bool]:
        flags = [] if run_cfg is cfg else smaller_flags(run_cfg)
        cmd = launch_command(
            [*argv, *flags, "--accelerate_config", config], run_cfg.num_processes, free_port(), config
        )
        print(f"launch: {config} ({reason})\n  {' '.join(cmd)}", flush=True)
        rc = subprocess.call(cmd, env=env)
        return rc, recovery.launch_ran_out_of_memory(Store(run_cfg.output_dir))

    return recovery.relaunch_smaller(cfg, launch, lambda line: print(line, flush=True))


def smaller_flags(cfg: TrainConfig) -> list[str]:
    """The flags that give a relaunch its smaller set-up (they come after the user's own, so they win)."""
    return [
        "--gradient_checkpointing",
        "true",
        "--per_device_train_batch_size",
        str(cfg.per_device_train_batch_size),
        "--gradient_accumulation_steps",
        str(cfg.gradient_accumulation_steps),
    ]


def cmd_check_data(argv: list[str]) -> int:
    from tunefleet.common import schema
    from tunefleet.trainers import data
    from tunefleet.trainers.config import METHODS, coerce

    p = argparse.ArgumentParser(prog="tunefleet check-data", description=COMMANDS["check-data"], allow_abbrev=False)
    p.add_argument("--method", required=True, help=f"One of {', '.join(METHODS)}.")
    p.add_argument("--dataset", required=True, help="Hub name, local path, or tunefleet/tiny-ultrafeedback.")
    p.add_argument("--split", default="train", help="Split to check (default: train).")
    p.add_argument("--dataset_config", help="Hub dataset config (subset) name.")
    p.add_argument("--data_files", nargs="+", help="Files inside the dataset to read.")
    p.add_argument("--columns", help="Column mapping, as for tunefleet train: prompt=query,chosen=good,...")
    p.add_argument("--ignore_columns", nargs="+", help="Text columns left out on purpose.")
    p.add_argument("--max_samples", type=int, default=None, help="Check a seeded sample of this many rows.")
    p.add_argument("--model_name", help="Also show the example rendered with this model's chat template.")
    args = p.parse_args(argv)
    method = coerce("method", args.method)
    columns = schema.parse_mapping(args.columns) if args.columns else None
    raw = data.load_split(args.dataset, args.split, args.dataset_config, args.data_files)
    raw = data.sample(raw, args.max_samples, 42, "--max_samples")
    print(f"dataset: {args.dataset}   split: {args.split}   rows: {len(raw)}")
    print(f"columns: {', '.join(raw.column_names)}")
    ignore = [name for value in args.ignore_columns or [] for name in value.split(",") if name]  # as train reads it
    prepared = data.prepare(method, raw, columns, ignore, args.dataset, args.split)
    print(f"layout for {method}: {prepared.layout}   uses: {', '.join(prepared.columns_used)}")
    if prepared.columns_not_used:
        print("  other columns: " + ", ".join(f"{c} ({why})" for c, why in prepared.columns_not_used.items()))
    dropped = sum(prepared.dropped.values())
    detail = ", ".join(f"{n} {reason}" for reason, n in prepared.dropped.items())
    print(f"rows for training: {prepared.rows}" + (f"; dropped {dropped}: {detail}" if dropped else "; none dropped"))
    example = prepared.dataset[0]
    print(f"example as {method} sees it:")
    print(json.dumps(example, indent=2, ensure_ascii=False))
    if args.model_name:
        from trl.data_utils import maybe_apply_chat_template

        from tunefleet.trainers.model import load_tokenizer

        rendered = maybe_apply_chat_template(example, load_tokenizer(args.model_name))
        print(f"rendered with the chat template of {args.model_name}:")
        for key, text in rendered.items():
            if isinstance(text, str):
                print(f"--- {key}\n{text}")
    return 1 if dropped else 0


def main(argv: list[str] | None = None) -> int:
    try:
        return dispatch(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        from tunefleet.common.terminal import closed_pipe

        return closed_pipe()


def dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tunefleet COMMAND [flags]   (tunefleet COMMAND --help for its flags)\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<11} {text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    handlers = {"train": cmd_train, "check-data": cmd_check_data}
    for name, module in (
        ("sweep", "tunefleet.launcher.sweep_cli"),
        ("eval", "tunefleet.eval.cli"),
        ("report", "tunefleet.eval.cli"),
        ("compare", "tunefleet.eval.cli"),
        ("export", "tunefleet.launcher.export"),
        ("status", "tunefleet.launcher.sweep_cli"),
        ("cancel", "tunefleet.launcher.sweep_cli"),
    ):
        if command == name:
            import importlib

            handlers[name] = getattr(importlib.import_module(module), f"cmd_{name}")
    if command not in handlers:
        from tunefleet.common.schema import nearest

        print(
            f"error: unknown command '{command}'{nearest(command, COMMANDS)}; commands: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    try:
        return handlers[command](rest)
    except TunefleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # results, reports, exports, a search's state: written whole or not at all, so nothing half is left behind
        print(
            f"error: the disk is full ({exc.strerror}) writing {exc.filename or 'a file'}: free some space and "
            f"run the same command again",
            file=sys.stderr,
        )
        return 75


if __name__ == "__main__":
    sys.exit(main())
