"""Run discovery, training metrics from trainer_state.json, and the results file (atomic, merged).

Only JSON and safetensors are read from run folders; `training_args.bin` and other pickles never are.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tunefleet.common.errors import TunefleetError
from tunefleet.common.jsonfile import read_json, write_json_atomic
from tunefleet.trainers.config import METHODS

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


@dataclass
class RunInfo:
    name: str
    path: Path
    method: str | None
    seed: int | None
    base_model: str | None
    dataset: str | None
    record: dict = field(default_factory=dict)

    def fingerprint(self, settings: dict) -> str:
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            p = self.path / f
            if p.exists():
                h.update(p.read_bytes())
        return h.hexdigest()[:16]


def discover(runs_dir: str, methods: list[str] | None = None) -> list[RunInfo]:
    """Every folder under `runs_dir` (nested too) with an adapter at its top, checkpoints excluded."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise TunefleetError(f"runs_dir {runs_dir} does not exist")
    runs = []
    for cfg in sorted(root.rglob("adapter_config.json")):
        path = cfg.parent
        if any(part.startswith("checkpoint-") for part in path.relative_to(root).parts):
            continue
        record = read_json(path / "run.json") or {}
        method = record.get("method") or _method_from_name(path.name)
        if methods and method not in methods:
            continue
        base = record.get("base_model") or (read_json(cfg) or {}).get("base_model_name_or_path")
        runs.append(
            RunInfo(
                name=path.relative_to(root).as_posix(),
                path=path,
                method=method,
                seed=record.get("seed"),
                base_model=base,
                dataset=record.get("dataset"),
                record=record,
            )
        )
    return runs


def _method_from_name(name: str) -> str | None:
    prefix = name.split("_")[0].lower()
    return prefix if prefix in METHODS else None


def training_metrics(run_dir: Path) -> dict:
    """The original tool's training keys from trainer_state.json; all None when missing or corrupt."""
    state = read_json(Path(run_dir) / "trainer_state.json") or {}
    history = state.get("log_history") if isinstance(state.get("log_history"), list) else []
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


def reward_curve(run_dir: Path) -> list[tuple[int, float]]:
    """GRPO's mean reward per logged step, from trainer_state.json."""
    state = read_json(Path(run_dir) / "trainer_state.json") or {}
    return [(e["step"], e["reward"]) for e in state.get("log_history", []) if isinstance(e, dict) and "reward" in e]


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    state = read_json(Path(run_dir) / "trainer_state.json") or {}
    return [
        (e["step"], e["loss"])
        for e in state.get("log_history", [])
        if isinstance(e, dict) and "loss" in e and "step" in e
    ]


def empty_entry(name: str, path: str) -> dict:
    return dict.fromkeys(RESULT_KEYS) | {"model_name": name, "model_path": path, "generation_samples": []}


def load_results(path: Path) -> dict:
    return read_json(path) or {}


def save_results(path: Path, updates: dict) -> dict:
    """Merge `updates` into the file's entries (others kept) and write atomically."""
    merged = load_results(path)
    merged.update(updates)
    write_json_atomic(path, merged)
    return merged
