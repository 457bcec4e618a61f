"""`study.json`: what a sweep ran with, so that it can be run again the same way.

It holds the spec as run (its mapping, with the command line's overrides), the package versions, tunefleet's
commit and whether the checkout had changes, each dataset split's fingerprint (its rows, hashed), each model's
revision (the hub snapshot's commit, or a hash of a local folder's config and weight files), and the hardware.

`tunefleet sweep --from study.json` runs the same spec again after checking that this machine has the same
versions, code, data and models: every difference is named in one line, and `--allow_drift` goes on and records
them (the new study.json's `drift`). The hardware may differ (it is recorded, not checked).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunefleet.common.contract import MANIFEST_FILE
from tunefleet.common.errors import TunefleetError
from tunefleet.common.jsonfile import utc_now
from tunefleet.common.storage import Store, is_uri, scratch_dir
from tunefleet.launcher.records import RunPlan
from tunefleet.trainers.run_record import VERSIONED, git_commit, versions

SPEC_COPY = "study-spec.yaml"  # a rerun's spec, written from the manifest into its runs folder
STUDY_PACKAGES = ("ray", "scipy", "statsmodels", "lm-eval", "optuna", "tunefleet")


def package_versions() -> dict[str, str | None]:
    """The training stack's versions (as run.json records them) and the study's own tools."""
    return versions(VERSIONED + STUDY_PACKAGES)


def code_state() -> dict[str, Any]:
    """tunefleet's commit and whether its checkout had uncommitted changes (None where it is not a checkout)."""
    commit = git_commit()
    dirty = None
    if commit:
        top = Path(__file__).resolve().parent.parent
        try:
            changed = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=top,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            dirty = bool(changed.strip())
        except (OSError, subprocess.SubprocessError):
            dirty = None
    return {"commit": commit, "dirty": dirty}


def rows_fingerprint(ds) -> str:
    """A hash of a split's rows, in order (each row as sorted JSON)."""
    digest = hashlib.sha256()
    for row in ds:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def data_fingerprints(runs: list[RunPlan], loaded: dict[tuple, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per dataset split the runs read: its row count and the hash of its rows. `loaded`: splits the sweep's data
    check already loaded (`sweep.validate_data`), by `split_key`; the others are loaded here."""
    from tunefleet.launcher.sweep import data_checks, split_key
    from tunefleet.trainers import data

    out: dict[str, dict[str, Any]] = {}
    for _, part in data_checks(runs):
        key = f"{part.dataset}:{part.split}" + (f":{part.config}" if part.config else "")
        if part.data_files:
            key += ":" + ",".join(part.data_files)
        if key not in out:
            ds = (loaded or {}).get(split_key(part))
            if ds is None:
                ds = data.load_split(part.dataset, part.split, part.config, part.data_files)
            out[key] = {"rows": len(ds), "sha256": rows_fingerprint(ds)}
    return out


def model_revision(name: str) -> dict[str, Any]:
    """A hub model's snapshot commit (from the local cache), or a local folder's hash of its config and weights."""
    from tunefleet.trainers.model import full_run_folder, resolve, run_folder

    if run_folder(name) is not None or full_run_folder(name) is not None:
        return {"kind": "run", "path": name}  # a run of this study (or another's): its own records say more
    try:
        where = resolve(name)
    except TunefleetError as exc:
        return {"kind": "missing", "error": str(exc)}
    folder = Path(where)
    if folder.is_dir():
        digest = hashlib.sha256()
        for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes() if path.suffix == ".json" else str(path.stat().st_size).encode())
        revision = folder.name if folder.parent.name == "snapshots" else None  # a hub cache's snapshot commit
        return {"kind": "folder", "sha256": digest.hexdigest()[:16]} | ({"revision": revision} if revision else {})
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:
        cached = None
    if isinstance(cached, str):
        return {"kind": "hub", "revision": Path(cached).parent.name}
    return {"kind": "hub", "revision": None}


def model_revisions(runs: list[RunPlan]) -> dict[str, dict[str, Any]]:
    names = sorted({run.config.model_name for run in runs if not run.parent})
    return {name: model_revision(name) for name in names}


def hardware() -> dict[str, Any]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "host": platform.node(),
        "machine": platform.machine(),
        "system": platform.platform(),
        "cpus": os.cpu_count(),
        "gpus": gpus,
        "cuda": torch.version.cuda if gpus else None,
    }


@dataclass
class Manifest:
    """study.json's content (see the module's docstring)."""

    spec: dict
    versions: dict
    code: dict
    data: dict
    models: dict
    hardware: dict
    written_at: str = ""
    command: dict | None = None
    drift: list[str] | None = None  # what differed from the manifest a rerun started from (--allow_drift)
    rerun_of: str | None = None

    def record(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def spec_as_run(spec_path: str, runs_dir: str, max_parallel: int | None) -> dict:
    """The spec's mapping, with the command line's overrides written into it."""
    from tunefleet.launcher.sweep import load_yaml_lines

    loaded, _ = load_yaml_lines(spec_path)
    data: dict[str, Any] = {**loaded, "runs_dir": runs_dir}
    if max_parallel:
        resources: dict[str, Any] = {**(loaded.get("resources") or {}), "max_parallel": max_parallel}
        data["resources"] = resources
    return data


def build(spec_data: dict, runs: list[RunPlan], command: dict, loaded: dict[tuple, Any] | None = None) -> Manifest:
    return Manifest(
        spec=spec_data,
        versions=package_versions(),
        code=code_state(),
        data=data_fingerprints(runs, loaded),
        models=model_revisions(runs),
        hardware=hardware(),
        written_at=utc_now(),
        command=command,
    )


def write(runs_dir: str, manifest: Manifest) -> None:
    Store(runs_dir).write_json(MANIFEST_FILE, manifest.record())


def read(path: str) -> dict:
    """A study.json, or one line saying why it cannot be read."""
    file = Path(path)
    if not file.is_file():
        raise TunefleetError(f"{path} not found: give the study.json a sweep wrote into its runs folder")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise TunefleetError(f"{path} is not a readable study.json: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("spec"), dict):
        raise TunefleetError(f"{path} is not a study.json (no 'spec' mapping): give the one a sweep wrote")
    return data


def drift(recorded: dict, current: Manifest) -> list[str]:
    """Every way this machine differs from a manifest: versions, code, data and models (not the hardware)."""
    found = []
    for name, was in (recorded.get("versions") or {}).items():
        now = current.versions.get(name)
        if was != now:
            found.append(f"{name} {was} in the study, {now} here")
    code = recorded.get("code") or {}
    if code.get("commit") and code.get("commit") != current.code.get("commit"):
        found.append(
            f"tunefleet commit {code['commit'][:12]} in the study, {str(current.code.get('commit'))[:12]} here"
        )
    for key, was in (recorded.get("data") or {}).items():
        now = current.data.get(key)
        if now is None:
            found.append(f"data {key} is not read by this spec here")
        elif now != was:
            found.append(
                f"data {key}: {was.get('rows')} rows {was.get('sha256')} here {now['rows']} rows {now['sha256']}"
            )
    for name, was in (recorded.get("models") or {}).items():
        now = current.models.get(name)
        if was.get("kind") != "run" and now != was:
            found.append(f"model {name}: {describe(was)} in the study, {describe(now)} here")
    return found


def unverifiable(recorded: dict) -> list[str]:
    """What a rerun cannot check: code that was not committed when the study ran."""
    if (recorded.get("code") or {}).get("dirty"):
        return ["the study ran from a checkout with uncommitted changes: its code cannot be checked"]
    return []


def describe(revision: dict | None) -> str:
    if not revision:
        return "absent"
    return str(revision.get("revision") or revision.get("sha256") or revision.get("error") or revision.get("kind"))


def rerun_spec(path: str, runs_dir: str | None) -> str:
    """`--from study.json`: the spec it holds, written into the rerun's runs folder (SPEC_COPY, node-local scratch
    for a folder in a store); its path. The checks against this machine come once the runs are planned."""
    import yaml

    data = dict(read(path)["spec"])
    if runs_dir:
        data["runs_dir"] = runs_dir
    target = str(data.get("runs_dir") or f"runs/{data.get('name')}")
    folder = scratch_dir(target, "spec") if is_uri(target) else Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    spec_file = folder / SPEC_COPY
    spec_file.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(spec_file)


def check_drift(recorded: dict, current: Manifest, source: str, allow_drift: bool) -> list[str]:
    """The differences between a manifest and this machine: one line naming each, unless `allow_drift`."""
    found = drift(recorded, current)
    if found and not allow_drift:
        raise TunefleetError(
            f"{source} does not match this machine: {'; '.join(found)} (--allow_drift to run anyway and record it)"
        )
    return found
