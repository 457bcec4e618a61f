"""Run discovery, training metrics from trainer_state.json, and the results file (atomic, merged).

Only JSON and safetensors are read from run folders; `training_args.bin` and other pickles never are. The runs
folder may be a store (`s3://...`): each run's adapter and records are fetched into node-local scratch to be
scored, and the results file is written back in one atomic PUT.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tunefleet.common.contract import RESULTS_FILE, RUN_RECORD
from tunefleet.common.errors import TunefleetError
from tunefleet.common.storage import Store, join, scratch_dir
from tunefleet.trainers.config import METHODS
from tunefleet.trainers.model import relocated

FETCHED = ("adapter_config.json", "adapter_model.safetensors", RUN_RECORD, "trainer_state.json")
# A full fine-tuning run is scored as a model of its own: its weights, config and tokenizer.
FULL_FETCHED = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    RUN_RECORD,
    "trainer_state.json",
)

RESULT_KEYS = (
    "model_name",
    "model_path",
    "initial_train_loss",
    "final_train_loss",
    "best_eval_loss",
    "final_eval_loss",
    "total_steps",
    "training_time_seconds",
    "training_time_hours",
    "perplexity",
    "test_loss",
    "preference_accuracy",
    "preference_correct",
    "preference_total",
    "avg_chosen_loss",
    "avg_rejected_loss",
    "loss_margin",
    "generation_samples",
)

# Which way each metric that compares runs is better: "min" or "max" (the report's bold, `tunefleet export --best`).
# final_train_loss is not here: losses of different methods do not compare.
BETTER = {
    "test_loss": "min",
    "perplexity": "min",
    "best_eval_loss": "min",
    "final_eval_loss": "min",
    "preference_accuracy": "max",
    "reward_accuracy": "max",
    "loss_margin": "max",
    "heldout_reward": "max",
    "win_rate_vs_base": "max",
    "win_rate_vs_parent": "max",
    "rm_score": "max",
    "rm_win_rate_vs_base": "max",
    "rm_win_rate_vs_parent": "max",
}


@dataclass
class RunInfo:
    name: str
    path: Path  # a local folder with the adapter (the run itself, or its copy fetched from a store)
    location: str  # where the run lives: its folder or its URI
    method: str | None
    seed: int | None
    base_model: str | None
    dataset: str | None
    record: dict = field(default_factory=dict)
    full: bool = False  # a full fine-tuning run: scored as a model of its own, not as an adapter on its base

    def fingerprint(self, settings: dict) -> str:
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            p = self.path / f
            if p.exists():
                h.update(p.read_bytes())
        if self.full:  # gigabytes: their names, sizes and write times stand for them (a retrained run changes them)
            h.update(
                repr(
                    sorted((w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in self.path.glob("*.safetensors"))
                ).encode()
            )
        return h.hexdigest()[:16]


def discover(runs_dir: str, methods: list[str] | None = None) -> list[RunInfo]:
    """Every folder under `runs_dir` (nested too) with an adapter at its top, or the whole model of a full
    fine-tuning run; checkpoints excluded."""
    store = Store(runs_dir)
    if not store.exists():
        raise TunefleetError(f"runs_dir {runs_dir} does not exist")
    runs = []

    def folder_of(found: str) -> str:
        return found.rsplit("/", 1)[0] if "/" in found else ""

    with_adapter = {folder_of(f) for f in store.find("adapter_config.json")}
    for name in sorted(with_adapter | {folder_of(f) for f in store.find(RUN_RECORD)}):
        if not name or any(part.startswith("checkpoint-") for part in name.split("/")):
            continue
        run = store.child(name)
        record = run.read_json(RUN_RECORD) or {}
        full = name not in with_adapter and (record.get("config") or {}).get("finetune") == "full"
        if name not in with_adapter and not (full and run.exists("config.json")):
            continue  # a run.json without a model yet (running, failed, a merged parent's folder)
        method = record.get("method") or _method_from_name(name.rsplit("/", 1)[-1])
        if methods and method not in methods:
            continue
        local = scratch_dir(runs_dir, "eval") / name
        path = Path(run.url()) if not store.remote else fetch(run, local, full_files(run) if full else FETCHED)
        base = record.get("base_model") or (run.read_json("adapter_config.json") or {}).get("base_model_name_or_path")
        if base and not store.remote:  # a parent run recorded where the study folder was when it trained
            base = relocated(base, Path(run.url()), record)
        info = RunInfo(name, path, run.url(), method, record.get("seed"), base, record.get("dataset"), record, full)
        runs.append(info)
    return runs


def full_files(run: Store) -> tuple[str, ...]:
    """The files a full fine-tuning run's model is made of (a sharded one lists its shards in its index)."""
    shards = (run.read_json("model.safetensors.index.json") or {}).get("weight_map", {}).values()
    return (*FULL_FETCHED, *sorted(set(shards)))


def drop_fetched(runs_dir: str) -> None:
    """Remove this node's copies of a store's runs (once they are scored)."""
    if Store(runs_dir).remote:
        shutil.rmtree(scratch_dir(runs_dir, "eval"), ignore_errors=True)


def fetch(run: Store, local: Path, names: tuple[str, ...] = FETCHED) -> Path:
    """Files of a run kept in a store (by default those the evaluator reads), copied into `local`."""
    local.mkdir(parents=True, exist_ok=True)
    for name in names:
        data = run.read_bytes(name)
        if data is not None:
            (local / name).write_bytes(data)
    return local


def _method_from_name(name: str) -> str | None:
    prefix = name.split("_")[0].lower()
    return prefix if prefix in METHODS else None


def training_metrics(run_dir: str | Path) -> dict:
    """The original tool's training keys from trainer_state.json; all None when missing or corrupt."""
    state = Store(str(run_dir)).read_json("trainer_state.json") or {}
    history = state["log_history"] if isinstance(state.get("log_history"), list) else []
    losses = [e["loss"] for e in history if isinstance(e, dict) and isinstance(e.get("loss"), (int, float))]
    evals = [e["eval_loss"] for e in history if isinstance(e, dict) and isinstance(e.get("eval_loss"), (int, float))]
    runtime = next(
        (e["train_runtime"] for e in reversed(history) if isinstance(e, dict) and "train_runtime" in e), None
    )
    return {
        "initial_train_loss": losses[0] if losses else None,
        "final_train_loss": losses[-1] if losses else None,
        "best_eval_loss": min(evals) if evals else None,
        "final_eval_loss": evals[-1] if evals else None,
        "total_steps": state.get("global_step"),
        "training_time_seconds": runtime,
        "training_time_hours": runtime / 3600 if runtime is not None else None,
    }


def grpo_rewards(runs: list[RunInfo]) -> list[str]:
    """The reward functions the GRPO runs trained with (first seen first): what held-out answers are scored by."""
    found: list[str] = []
    for run in runs:
        if run.method == "grpo":
            for spec in run.record.get("reward_funcs") or (run.record.get("config") or {}).get("reward_funcs") or []:
                if spec not in found:
                    found.append(spec)
    return found


def reward_curve(run_dir: str) -> list[tuple[int, float]]:
    """GRPO's mean reward per logged step, from trainer_state.json (a run's folder or URI)."""
    state = Store(run_dir).read_json("trainer_state.json") or {}
    return [(e["step"], e["reward"]) for e in state.get("log_history", []) if isinstance(e, dict) and "reward" in e]


def loss_curve(run_dir: str) -> list[tuple[int, float]]:
    state = Store(run_dir).read_json("trainer_state.json") or {}
    return [
        (e["step"], e["loss"])
        for e in state.get("log_history", [])
        if isinstance(e, dict) and "loss" in e and "step" in e
    ]


def empty_entry(name: str, path: str) -> dict:
    lineage = {"stage": None, "parent": None, "win_rate_vs_parent": None, "win_rates_vs_parent": None}
    lineage |= {"rm_score": None, "rm_win_rate_vs_base": None, "rm_win_rate_vs_parent": None}  # --reward_model
    lineage["benchmarks"] = None  # --tasks: {task: {metric: value, metric_stderr: value}}
    return dict.fromkeys(RESULT_KEYS) | lineage | {"model_name": name, "model_path": path, "generation_samples": []}


def results_path(runs_dir: str, output: str | None = None) -> str:
    return str(output) if output else join(runs_dir, RESULTS_FILE)


def split_location(path: str) -> tuple[Store, str]:
    """(the folder's store, the file name) of a file's path or URI."""
    folder, _, name = str(path).rstrip("/").rpartition("/")
    return Store(folder or "."), name


def load_results(path: str) -> dict:
    store, name = split_location(path)
    return store.read_json(name) or {}


def save_results(path: str, updates: dict) -> dict:
    """Merge `updates` into the file's entries (others kept) and write atomically."""
    merged = load_results(path)
    merged.update(updates)
    store, name = split_location(path)
    store.write_json(name, merged)
    return merged
