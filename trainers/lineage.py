"""A run's parent: what it started from (an earlier run's adapter or whole model, by their hashes), and whether that
parent was retrained since (its checkpoints would then continue a model that is gone)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunefleet.common.contract import (
    RUN_RECORD,
)
from tunefleet.common.jsonfile import read_json

if TYPE_CHECKING:
    from tunefleet.trainers.config import TrainConfig


def parent_lineage(cfg: TrainConfig) -> dict | None:
    """run.json's `lineage` when the run starts from a run folder: the parent, its base, its adapter's and the merged
    weights' hashes (what trainers.model recorded when it merged the parent)."""
    from tunefleet.trainers import model

    folder = model.run_folder(cfg.model_name)
    if folder is not None:
        return {
            "parent_name": folder.resolve().name,
            "root_model": model.root_model(cfg.model_name),
            **model.lineage(folder),
        }
    full = model.full_run_folder(cfg.model_name)
    if full is None:
        return None
    return {  # a full fine-tuning parent is its own model: its weights' hashes stand for it
        "parent_name": full.resolve().name,
        "root_model": model.root_model(cfg.model_name),
        "parent": str(full.resolve()),
        "base_model": (read_json(full / RUN_RECORD) or {}).get("base_model"),
        "weights_sha256": model.model_digests(full),
    }


def parent_changed(cfg: TrainConfig, record: dict) -> str | None:
    """Why this run's checkpoints no longer fit its parent (retrained or overwritten since), or None."""
    from tunefleet.trainers import model

    full = model.full_run_folder(cfg.model_name)
    weights_before = (record.get("lineage") or {}).get("weights_sha256")
    if full is not None and weights_before and model.model_digests(full) != weights_before:
        return (
            f"{cfg.output_dir} was trained from {cfg.model_name}, whose weights changed since (retrained), so this "
            "run's checkpoints continue a model that is gone: pass --overwrite to train it again from the new parent"
        )
    before = (record.get("lineage") or {}).get("adapter_sha256")
    folder = model.run_folder(cfg.model_name)
    if not before or folder is None or not (folder / "adapter_model.safetensors").is_file():
        return None
    now = model.file_digest(folder / "adapter_model.safetensors")
    if now == before:
        return None
    return (
        f"{cfg.output_dir} was trained from {cfg.model_name} when its adapter was {before}; it holds another one "
        f"now ({now}: retrained since), so this run's checkpoints continue a model that is gone: pass --overwrite to "
        "train it again from the new parent"
    )
