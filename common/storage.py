"""Where runs live: a local or shared folder, or an object store (`s3://`, `gs://`, any fsspec filesystem).

A `Store` is one folder in either place, with what tunefleet needs of it: JSON records written atomically (a
temp file renamed locally; one PUT in an object store, where an object appears whole or not at all), files, and
whole folders up and down. Credentials come from each store's own environment and config files (for S3:
`AWS_*` variables, `~/.aws/`, instance roles; for GCS: `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's files); tunefleet
never reads, prints or records them.

With a URI, a run trains in node-local scratch (`$TUNEFLEET_SCRATCH`, else the system temp folder) and the store
holds everything that must outlive the node: run.json, progress, checkpoints (each complete only once its marker
is written, last), the final adapter, logs, sweep.json and the evaluation results.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.common.jsonfile import read_json, write_json_atomic

URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}


def is_uri(path) -> bool:
    return bool(URI.match(str(path)))


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI (a Path would turn `s3://b` into `s3:/b`)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(str(p).strip("/") for p in parts if p)])
    return str(Path(base).joinpath(*parts))


def scratch_dir(uri: str, purpose: str = "run") -> Path:
    """This node's working folder for a run kept in a store (one per URI and purpose)."""
    root = Path(os.environ.get("TUNEFLEET_SCRATCH") or Path(tempfile.gettempdir()) / "tunefleet-scratch")
    digest = hashlib.sha256(f"{uri}|{purpose}".encode()).hexdigest()[:16]
    return root / f"{purpose}-{digest}"


def refuse_ray_job_temp(path: str, what: str) -> None:
    """A relative path inside a Ray job's working dir lands in Ray's temp folder, which Ray deletes: refuse it."""
    if is_uri(path) or Path(path).is_absolute():
        return
    cwd = Path.cwd().parts
    if "runtime_resources" in cwd and any(p.startswith(("working_dir_files", "_ray_pkg_")) for p in cwd):
        raise TunefleetError(
            f"{what} '{path}' is relative, and this command runs in a Ray job's temporary working dir ({Path.cwd()}), "
            "which Ray deletes: use an absolute path on shared storage or a URI such as s3://bucket/runs"
        )


class Store:
    """One folder, local or in an object store."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/") if is_uri(root) else str(root)
        self.remote = is_uri(root)
        if self.remote:
            self.fs, self.path = _filesystem(self.root)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def child(self, *parts: str) -> Store:
        return Store(join(self.root, *parts))

    def url(self, name: str = "") -> str:
        return join(self.root, name) if name else self.root

    def _remote(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name.strip('/')}" if name else self.path

    def _local(self, name: str) -> Path:
        return Path(self.root) / name if name else Path(self.root)

    # ---------------------------------------------------------------- records
    def read_json(self, name: str) -> dict | None:
        """A JSON object, or None when missing or unreadable (never unpickles anything)."""
        if not self.remote:
            return read_json(self._local(name))
        try:
            data = json.loads(self.fs.cat_file(self._remote(name)))
            return data if isinstance(data, dict) else None
        except (FileNotFoundError, ValueError):
            return None
        except OSError as exc:
            raise TunefleetError(f"cannot read {self.url(name)}: {first_line(exc)}") from None

    def write_json(self, name: str, data, durable: bool = True) -> None:
        if not self.remote:
            write_json_atomic(self._local(name), data, durable)
            return
        self.write_bytes(name, json.dumps(data, indent=2, default=str).encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        if not self.remote:
            path = self._local(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        try:
            self.fs.pipe_file(self._remote(name), data)  # one PUT: the object appears whole or not at all
        except OSError as exc:
            raise TunefleetError(f"cannot write {self.url(name)}: {first_line(exc)}") from None

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self._local(name).read_bytes() if not self.remote else self.fs.cat_file(self._remote(name))
        except FileNotFoundError:
            return None

    def exists(self, name: str = "") -> bool:
        if not self.remote:
            return self._local(name).exists()
        self.fs.invalidate_cache()  # other processes and nodes write here too
        return self.fs.exists(self._remote(name))

    def listdir(self, name: str = "") -> list[str]:
        """Names of the entries directly in a folder (none when it does not exist)."""
        if not self.remote:
            folder = self._local(name)
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        try:
            self.fs.invalidate_cache()
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._remote(name), detail=False))
        except FileNotFoundError:
            return []

    def find(self, filename: str) -> list[str]:
        """Paths (relative to the root) of every file called `filename` below the root."""
        if not self.remote:
            return sorted(p.relative_to(self.root).as_posix() for p in Path(self.root).rglob(filename))
        try:
            self.fs.invalidate_cache()
            found = self.fs.find(self.path)
        except FileNotFoundError:
            return []
        prefix = self.path.rstrip("/") + "/"
        return sorted(p[len(prefix) :] for p in found if p.rsplit("/", 1)[-1] == filename and p.startswith(prefix))

    # ---------------------------------------------------------------- folders
    def upload(self, local: Path, name: str) -> None:
        """Copy a local file or folder into the store (a no-op where the store is that very folder)."""
        if not self.remote:
            target = self._local(name)
            if target.resolve() == Path(local).resolve():
                return
            if Path(local).is_dir():
                shutil.copytree(local, target, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local, target)
            return
        try:
            if Path(local).is_dir():
                files = [p for p in sorted(Path(local).rglob("*")) if p.is_file()]
                self.fs.put(
                    [str(p) for p in files], [self._remote(f"{name}/{p.relative_to(local).as_posix()}") for p in files]
                )
            else:
                self.fs.put_file(str(local), self._remote(name))
        except OSError as exc:
            raise TunefleetError(f"cannot upload to {self.url(name)}: {first_line(exc)}") from None

    def download(self, name: str, local: Path) -> None:
        if not self.remote:
            shutil.copytree(self._local(name), local, dirs_exist_ok=True)
            return
        try:
            self.fs.get(self._remote(name).rstrip("/") + "/", str(local).rstrip("/") + "/", recursive=True)
        except OSError as exc:
            raise TunefleetError(f"cannot download {self.url(name)}: {first_line(exc)}") from None

    def remove(self, name: str = "") -> None:
        if not self.remote:
            target = self._local(name)
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            return
        try:
            if self.fs.exists(self._remote(name)):
                self.fs.rm(self._remote(name), recursive=True)
        except FileNotFoundError:
            pass


def _filesystem(uri: str):
    """The fsspec filesystem of a URI; a missing driver package is one line naming the extra to install."""
    import fsspec

    scheme = uri.split("://", 1)[0].lower()
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        extra = EXTRAS.get(scheme)
        hint = f"pip install 'tunefleet[{extra}]'" if extra else "install the fsspec driver for it"
        raise TunefleetError(f"cannot use {uri}: {first_line(exc)} ({hint})") from None
    fs.invalidate_cache()
    return fs, path
