"""Trackers, offline: a two-run sweep with `report_to: tensorboard,mlflow,wandb`, then `tunefleet eval`. Each
tracker holds both runs, named by run, grouped by the sweep and tagged with method/seed/model, with the training
loss and the evaluation's metrics in the same tracker run."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import yaml
from testkit import read_json, run_cli, tunefleet

from tunefleet.common import tracking
from tunefleet.common.errors import TunefleetError

RUNS = ("sft_tiny-qwen2_s1", "sft_tiny-qwen2_s2")


def wandb_records(path: Path):
    """The records of a W&B offline run file (`run-<id>.wandb`: a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record, MIDDLE/LAST continue
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_view(wandb_dir: Path, run_id: str) -> tuple[list, dict]:
    """(run records, every history key -> last value) over all offline folders of one W&B run id."""
    import json

    runs, history = [], {}
    for file in sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                runs.append(record.run)
            elif kind == "history":
                for item in record.history.item:
                    history[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return runs, history


@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_SILENT": "true",
        "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}",
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 keeps its file store behind this switch
    }
    (root / "wandb").mkdir()
    spec = {
        "name": "trk",
        "runs_dir": str(root / "runs"),
        "base": {
            "model_name": "tunefleet/tiny-qwen2",
            "dataset": "tunefleet/tiny-ultrafeedback",
            "method": "sft",
            "split": "train_sft",
            "max_steps": 4,
            "logging_steps": 2,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "use_qlora": False,
            "report_to": "tensorboard,mlflow,wandb",
        },
        "grid": {"seed": [1, 2]},
        "resources": {"cpus_per_run": 1},
        "eval": {"max_samples": 8, "max_generation_samples": 0, "max_new_tokens": 8},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    tunefleet("sweep", root / "spec.yaml", "--backend", "local", "--skip_data_check", env=env, timeout=900)
    tunefleet("eval", "--runs_dir", root / "runs", "--max_samples", 8, "--max_generation_samples", 0, env=env)
    return root, env


@pytest.mark.slow
def test_tensorboard_has_training_and_evaluation_scalars(tracked_sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = tracked_sweep
    for name in RUNS:
        record = read_json(root / "runs" / name / "run.json")
        assert record["tracking"]["tensorboard_dir"] == "tensorboard"
        events = EventAccumulator(str(root / "runs" / name / "tensorboard"))
        events.Reload()
        scalars = set(events.Tags()["scalars"])
        assert {"train/loss", "eval/test_loss", "eval/perplexity"} <= scalars, scalars
        assert events.Scalars("eval/test_loss")[-1].step == 4


def test_mlflow_experiment_is_the_sweep_with_one_named_tagged_run_each(tracked_sweep, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, env = tracked_sweep
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("trk")
    found = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(found) == set(RUNS)
    for name, run in found.items():
        seed = name[-1]
        assert run.data.tags["method"] == "sft" and run.data.tags["seed"] == seed
        assert run.data.tags["model"] == "tiny-qwen2" and run.data.tags["group"] == "trk"
        assert read_json(root / "runs" / name / "run.json")["tracking"]["mlflow_run_id"] == run.info.run_id
        assert {"loss", "eval/test_loss", "eval/perplexity"} <= set(run.data.metrics), run.data.metrics
        assert run.data.params["per_device_train_batch_size"] == "4"


def test_wandb_offline_runs_are_grouped_named_tagged_and_get_the_evaluation(tracked_sweep):
    root, _ = tracked_sweep
    for name in RUNS:
        record = read_json(root / "runs" / name / "run.json")["tracking"]
        runs, history = wandb_view(root / "wandb", record["wandb_id"])
        assert len(runs) == 2  # training, then the evaluation resuming the same run id
        for run in runs:
            assert run.run_id == record["wandb_id"] and run.project == "tunefleet"
        train = runs[0]
        assert train.display_name == name and train.run_group == "trk"
        assert set(train.tags) == {"method:sft", f"seed:{name[-1]}", "model:tiny-qwen2"}
        assert "train/loss" in history and "eval/test_loss" in history and "eval/perplexity" in history


def test_report_to_names_and_missing_packages_are_one_line_errors(monkeypatch, tmp_path, capsys):
    assert tracking.parse_report_to("none") == [] and tracking.parse_report_to(None) == []
    assert tracking.parse_report_to("wandb, tensorboard,wandb") == ["wandb", "tensorboard"]
    with pytest.raises(TunefleetError, match="trackers are tensorboard, mlflow, wandb"):
        tracking.parse_report_to("comet_ml")
    code, _, err = run_cli(capsys, "train", "--method", "sft", "--model_name", "tunefleet/tiny-qwen2",
                           "--dataset", "tunefleet/tiny-ultrafeedback", "--output_dir", tmp_path / "r",
                           "--report_to", "tensorbord")  # fmt: skip
    assert code == 2 and err.startswith("error: --report_to tensorbord: trackers are") and err.count("\n") == 1

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TunefleetError) as caught:
        tracking.check_installed(["tensorboard", "mlflow"])
    assert str(caught.value) == "--report_to mlflow needs the mlflow package: pip install 'tunefleet[mlflow]'"


def test_a_resumed_run_keeps_its_tracker_ids(tmp_path, monkeypatch):
    for key in (
        "WANDB_RUN_ID",
        "WANDB_RESUME",
        "WANDB_NAME",
        "WANDB_TAGS",
        "WANDB_RUN_GROUP",
        "TENSORBOARD_LOGGING_DIR",
    ):
        monkeypatch.setenv(key, "")  # restored after the test: start() sets them for this process
    monkeypatch.setenv("WANDB_PROJECT", "p")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    first = tracking.start(["wandb", "tensorboard"], "r", "g", {"method": "sft"}, str(tmp_path))
    again = tracking.start(["wandb", "tensorboard"], "r", "g", {"method": "sft"}, str(tmp_path), first.record())
    assert again.wandb_id == first.wandb_id and os.environ["WANDB_RUN_ID"] == first.wandb_id
    assert os.environ["WANDB_RUN_GROUP"] == "g" and os.environ["TENSORBOARD_LOGGING_DIR"].endswith("tensorboard")
    fresh = tracking.start(["wandb"], "r", "g", {}, str(tmp_path))
    assert fresh.wandb_id != first.wandb_id
