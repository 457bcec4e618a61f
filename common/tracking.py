"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, through the trainers' `--report_to`.

Training logs through transformers' own callbacks; this module names and groups the runs for them (run name, the
sweep's name as group or experiment, method/seed/model as tags), fixes each tracker's run id before training so a
resumed run continues the same tracker run, records the ids in run.json (`tracking`), and lets `tunefleet eval`
log its metrics into those same runs afterwards.

    W&B: project WANDB_PROJECT (default tunefleet), group = the sweep, WANDB_MODE=offline works without a login.
    MLflow: MLFLOW_TRACKING_URI (default ./mlruns), experiment MLFLOW_EXPERIMENT_NAME or the sweep's name.
    TensorBoard: event files in <run>/tensorboard (eval scalars land there too).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import asdict, dataclass, field

from tunefleet.common.errors import TunefleetError, first_line

TRACKERS = ("tensorboard", "mlflow", "wandb")  # each also the name of its package's module and of its extra
DEFAULT_PROJECT = "tunefleet"
TENSORBOARD_DIR = "tensorboard"  # inside the run's folder


def parse_report_to(value: str | None) -> list[str]:
    """`--report_to` -> the trackers asked for (none: []); an unknown name is a one-line error."""
    names = [n.strip() for n in (value or "none").split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or "none" in names:
        raise TunefleetError(f"--report_to {value}: trackers are {', '.join(TRACKERS)} (comma separated), or none")
    return list(dict.fromkeys(names))


def check_installed(trackers: list[str]) -> None:
    for name in trackers:
        if importlib.util.find_spec(name) is None:
            raise TunefleetError(f"--report_to {name} needs the {name} package: pip install 'tunefleet[{name}]'")


@dataclass
class Tracking:
    """Where a run logs: recorded in run.json as `tracking`, read back by a resumed run and by `tunefleet eval`."""

    trackers: list[str]
    name: str
    group: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    tensorboard_dir: str | None = None  # relative to the run's folder
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str | None = None
    mlflow_run_id: str | None = None
    wandb_project: str | None = None
    wandb_id: str | None = None
    wandb_dir: str | None = None

    def record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, data: dict | None) -> Tracking | None:
        if not isinstance(data, dict) or not data.get("trackers"):
            return None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def start(
    trackers: list[str],
    name: str,
    group: str | None,
    tags: dict[str, str],
    run_folder: str,
    previous: dict | None = None,
) -> Tracking:
    """Name, group and tag the run for each tracker through the environment transformers' callbacks read, with run
    ids fixed now (those of `previous` on a resume). Call in the training process before the trainer exists."""
    before = Tracking.from_record(previous)
    tracking = Tracking(trackers, name, group, tags)
    if "tensorboard" in trackers:
        tracking.tensorboard_dir = TENSORBOARD_DIR
        os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(run_folder, TENSORBOARD_DIR)
    if "wandb" in trackers:
        tracking.wandb_project = os.environ.setdefault("WANDB_PROJECT", DEFAULT_PROJECT)
        tracking.wandb_id = (before and before.wandb_id) or new_wandb_id()
        tracking.wandb_dir = os.environ.get("WANDB_DIR")
        os.environ.update(
            WANDB_RUN_ID=tracking.wandb_id,
            WANDB_RESUME="allow",
            WANDB_NAME=name,
            WANDB_TAGS=",".join(f"{k}:{v}" for k, v in tags.items()),
        )
        if group:
            os.environ["WANDB_RUN_GROUP"] = group
    if "mlflow" in trackers:
        start_mlflow(tracking, before)
    return tracking


def new_wandb_id() -> str:
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def start_mlflow(tracking: Tracking, before: Tracking | None) -> None:
    """Create (or keep) the MLflow run; transformers' MLflowCallback then resumes it through MLFLOW_RUN_ID, in the
    experiment given by id (a name could match two experiments that runs starting at once both created)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI, else MLflow's default store
    experiment = os.environ.pop("MLFLOW_EXPERIMENT_NAME", None) or tracking.group or DEFAULT_PROJECT
    try:
        client = MlflowClient(uri)
        if before and before.mlflow_run_id and before.mlflow_tracking_uri == uri:
            run = client.get_run(before.mlflow_run_id)  # still there
        else:
            run = client.create_run(
                shared_experiment(client, experiment),
                run_name=tracking.name,
                tags={**tracking.tags, **({"group": tracking.group} if tracking.group else {})},
            )
    except Exception as exc:
        raise TunefleetError(f"MLflow at {uri}: {first_line(exc)}") from None
    tracking.mlflow_tracking_uri, tracking.mlflow_experiment, tracking.mlflow_run_id = uri, experiment, run.info.run_id
    os.environ.update(
        MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_ID=run.info.experiment_id, MLFLOW_RUN_ID=run.info.run_id
    )
    os.environ["MLFLOW_TAGS"] = json.dumps(tracking.tags)


def shared_experiment(client, name: str) -> str:
    """The id of the experiment called `name`, created when missing. A sweep's runs start at once: a database
    store refuses a second experiment of one name, but a file store can end up with two. Then every run takes
    the first created and the others are deleted, so the sweep stays one experiment."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        created = client.create_experiment(name)
    except Exception:  # another run created it first
        return client.get_experiment_by_name(name).experiment_id
    same = client.search_experiments(filter_string=f"name = '{name}'")
    first = min(same, key=lambda e: (e.creation_time or 0, e.experiment_id)).experiment_id if same else created
    if first != created:
        client.delete_experiment(created)
    return first


def log_evaluation(tracking: Tracking, run_folder: str, metrics: dict[str, float], step: int) -> list[str]:
    """Log `eval/<metric>` values into the run's tracker runs (after training); returns what failed, one line each."""
    failed = []
    for name in tracking.trackers:
        try:
            if name == "tensorboard" and tracking.tensorboard_dir:
                write_scalars(run_folder, tracking.tensorboard_dir, metrics, step)
            elif name == "mlflow" and tracking.mlflow_run_id:
                from mlflow.entities import Metric
                from mlflow.tracking import MlflowClient

                now = int(time.time() * 1000)
                MlflowClient(tracking.mlflow_tracking_uri).log_batch(
                    tracking.mlflow_run_id, metrics=[Metric(f"eval/{k}", v, now, step) for k, v in metrics.items()]
                )
            elif name == "wandb" and tracking.wandb_id:
                import wandb

                run = wandb.init(
                    project=tracking.wandb_project,
                    id=tracking.wandb_id,
                    resume="allow",
                    dir=tracking.wandb_dir,
                    reinit="finish_previous",
                )
                run.log({f"eval/{k}": v for k, v in metrics.items()})
                run.summary.update({f"eval/{k}": v for k, v in metrics.items()})
                run.finish()
        except Exception as exc:  # a tracker that is down must not lose the evaluation itself
            failed.append(f"{name}: {first_line(exc)}")
    return failed


def write_scalars(run_folder: str, tensorboard_dir: str, metrics: dict[str, float], step: int) -> None:
    """TensorBoard scalars `eval/<metric>` in the run's event folder (a run in a store: written, then uploaded)."""
    import tempfile
    from pathlib import Path

    from torch.utils.tensorboard import SummaryWriter

    from tunefleet.common.storage import Store, is_uri

    with tempfile.TemporaryDirectory() as scratch:
        logdir = Path(scratch) if is_uri(run_folder) else Path(run_folder) / tensorboard_dir
        with SummaryWriter(log_dir=str(logdir)) as writer:
            for key, value in metrics.items():
                writer.add_scalar(f"eval/{key}", value, step)
        if is_uri(run_folder):
            Store(run_folder).upload(logdir, tensorboard_dir)
