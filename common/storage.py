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
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tunefleet.common.contract import SCRATCH_ENV
from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.common.jsonfile import read_json, write_json_atomic

URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # tunefleet's extra that brings each driver
CHECK_SECONDS = 25.0  # the store's first answer, or one line saying why there is none, within this
CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role",
    "s3a": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or gcloud auth application-default login",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS or gcloud auth application-default login",
}


def is_uri(path) -> bool:
    return bool(URI.match(str(path)))


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI (a Path would turn `s3://b` into `s3:/b`)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(str(p).strip("/") for p in parts if p)])
    return str(Path(base).joinpath(*parts))


def scratch_dir(uri: str, purpose: str = "run") -> Path:
    """This node's working folder for a run kept in a store (one per URI and purpose)."""
    root = Path(os.environ.get(SCRATCH_ENV) or Path(tempfile.gettempdir()) / "tunefleet-scratch")
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


class StoreUnavailable(TunefleetError):
    """The store did not answer, or refused: unreachable endpoint, no such bucket, credentials refused, timed out."""


def why_store_failed(exc: BaseException, scheme: str = "s3", seconds: float | None = None, bucket: str = "") -> str:
    """What went wrong talking to a store, as a phrase a user can act on (the exception chain classified)."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    names = {type(e).__name__ for e in chain}
    detail = next((first_line(e) for e in chain if str(e).strip()), type(exc).__name__)
    endpoint = next((_endpoint(e) for e in chain if _endpoint(e)), None)
    where = f"endpoint {endpoint}" if endpoint else "the store's endpoint"
    if names & {"FSTimeoutError", "TimeoutError", "ConnectTimeoutError", "ReadTimeoutError", "ServerTimeoutError"}:
        after = f" within {seconds:.0f} s" if seconds else ""
        return f"{where} did not answer{after}; check that it is up and reachable from this machine"
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}:
        return f"no credentials found ({detail}); set {CREDENTIALS.get(scheme, 'credentials for the store')}"
    if any(isinstance(e, PermissionError) for e in chain) or names & {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return (
            f"the store refused the credentials ({detail}); check {CREDENTIALS.get(scheme, 'the credentials')} "
            "and the bucket's permissions"
        )
    if any(isinstance(e, FileNotFoundError) for e in chain):
        return f"no such bucket{f' {bucket!r}' if bucket else ''} ({detail}): create it, or fix the URI"
    if names & {"EndpointConnectionError", "ClientConnectorError", "ConnectionRefusedError", "ClientOSError"} or any(
        isinstance(e, ConnectionError | OSError) and getattr(e, "errno", None) for e in chain
    ):
        hint = "AWS_ENDPOINT_URL and the network" if scheme in ("s3", "s3a") else "the endpoint and the network"
        return f"{where} is unreachable ({first_line(chain[-1])}); check {hint}"
    return detail


def _endpoint(exc: BaseException) -> str | None:
    url = (getattr(exc, "kwargs", None) or {}).get("endpoint_url") if hasattr(exc, "kwargs") else None
    if not isinstance(url, str):
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else url


class Store:
    """One folder, local or in an object store."""

    def __init__(self, root: str, timeout_s: float | None = None):
        """`timeout_s`: each remote operation is given up after this long (None: the client's own retries)."""
        self.root = str(root).rstrip("/") if is_uri(root) else str(root)
        self.remote = is_uri(root)
        self.timeout_s = timeout_s
        if self.remote:
            self.fs, self.path = _filesystem(self.root)

    def _call(self, what: str, operation, *args, **kwargs):
        """One remote operation; a missing object stays FileNotFoundError, any other failure (the client's own
        exceptions included, which are not all OSErrors) is one StoreUnavailable line: `cannot <what>: <why>`."""
        try:
            if self.timeout_s is None:
                return operation(*args, **kwargs)
            return _within(self.fs, operation, *args, deadline=time.monotonic() + self.timeout_s, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:
            why = why_store_failed(exc, self.root.split("://", 1)[0].lower(), self.timeout_s)
            raise StoreUnavailable(f"cannot {what}: {why}") from exc

    def check(self, write: bool = False) -> None:
        """Ask the store once, before any work: its bucket exists and takes these credentials, and (`write`) an
        object can be written there. Otherwise one line naming the URI and the cause, within CHECK_SECONDS, not
        after the minutes of retries a client spends by default. A local folder needs no check."""
        if not self.remote:
            return
        fs, path = _filesystem(self.root, quick=True)
        bucket = path.split("/", 1)[0]
        deadline = time.monotonic() + CHECK_SECONDS
        probe = f"{path.rstrip('/')}/.tunefleet-write-check-{uuid.uuid4().hex[:12]}"
        try:
            _within(fs, fs.info, bucket, deadline=deadline)
            if write:
                _within(fs, fs.pipe_file, probe, b"tunefleet", deadline=deadline)
                _within(fs, fs.rm_file, probe, deadline=deadline)
        except Exception as exc:
            scheme = self.root.split("://", 1)[0].lower()
            why = why_store_failed(exc, scheme, CHECK_SECONDS, bucket)
            raise StoreUnavailable(f"cannot use {self.root}: {why}") from None

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def for_ray(self) -> tuple[str, object | None]:
        """(path, filesystem) as Ray's RunConfig takes them: this store's own fsspec client wrapped for pyarrow
        (the same endpoint and credentials), or an absolute local path and None."""
        if not self.remote:
            return str(Path(self.root).resolve()), None
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return self.path, PyFileSystem(FSSpecHandler(self.fs))

    def child(self, *parts: str) -> Store:
        return Store(join(self.root, *parts), self.timeout_s)

    def url(self, name: str = "") -> str:
        return join(self.root, name) if name else self.root

    def _remote(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name.strip('/')}" if name else self.path

    def _local(self, name: str) -> Path:
        return Path(self.root) / name if name else Path(self.root)

    # ---------------------------------------------------------------- records
    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON object, or None when missing or unreadable (never unpickles anything)."""
        if not self.remote:
            return read_json(self._local(name))
        try:
            data = json.loads(self._call(f"read {self.url(name)}", self.fs.cat_file, self._remote(name)))
            return data if isinstance(data, dict) else None
        except (FileNotFoundError, ValueError):
            return None

    def write_json(self, name: str, data: Any, durable: bool = True) -> None:
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
        # one PUT: the object appears whole or not at all
        self._call(f"write {self.url(name)}", self.fs.pipe_file, self._remote(name), data)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist (False when it does): O_EXCL on a filesystem (NFS honours it), a
        conditional put (If-None-Match) in an object store."""
        if not self.remote:
            path = self._local(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        try:
            self._call(f"write {self.url(name)}", self.fs.pipe_file, self._remote(name), data, mode="create")
        except StoreUnavailable as exc:
            cause = f"{exc} {exc.__cause__!r}"
            if "PreconditionFailed" in cause or "412" in cause or "FileExistsError" in cause:
                return False
            raise
        except FileExistsError:
            return False
        return True

    def read_bytes(self, name: str) -> bytes | None:
        try:
            if not self.remote:
                return self._local(name).read_bytes()
            return self._call(f"read {self.url(name)}", self.fs.cat_file, self._remote(name))
        except FileNotFoundError:
            return None

    def exists(self, name: str = "") -> bool:
        if not self.remote:
            return self._local(name).exists()
        self.fs.invalidate_cache()  # other processes and nodes write here too
        return self._call(f"reach {self.url(name)}", self.fs.exists, self._remote(name))

    def listdir(self, name: str = "") -> list[str]:
        """Names of the entries directly in a folder (none when it does not exist)."""
        if not self.remote:
            folder = self._local(name)
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        try:
            self.fs.invalidate_cache()
            listed = self._call(f"list {self.url(name)}", self.fs.ls, self._remote(name), detail=False)
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listed)
        except FileNotFoundError:
            return []

    def find(self, filename: str) -> list[str]:
        """Paths (relative to the root) of every file called `filename` below the root."""
        if not self.remote:
            return sorted(p.relative_to(self.root).as_posix() for p in Path(self.root).rglob(filename))
        try:
            self.fs.invalidate_cache()
            found = self._call(f"list {self.root}", self.fs.find, self.path)
        except FileNotFoundError:
            return []
        prefix = self.path.rstrip("/") + "/"
        return sorted(p[len(prefix) :] for p in found if p.rsplit("/", 1)[-1] == filename and p.startswith(prefix))

    # ---------------------------------------------------------------- folders
    def upload(self, local: Path, name: str, skip: tuple[str, ...] = ()) -> None:
        """Copy a local file or folder into the store (a no-op where the store is that very folder); files named
        in `skip` stay behind."""
        if not self.remote:
            target = self._local(name)
            if target.resolve() == Path(local).resolve():
                return
            if Path(local).is_dir():
                shutil.copytree(local, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*skip))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local, target)
            return
        what = f"upload to {self.url(name)}"
        if Path(local).is_dir():
            files = [p for p in sorted(Path(local).rglob("*")) if p.is_file() and p.name not in skip]
            targets = [self._remote(f"{name}/{p.relative_to(local).as_posix()}") for p in files]
            self._call(what, self.fs.put, [str(p) for p in files], targets)
        else:
            self._call(what, self.fs.put_file, str(local), self._remote(name))

    def download(self, name: str, local: Path) -> None:
        if not self.remote:
            shutil.copytree(self._local(name), local, dirs_exist_ok=True)
            return
        source, target = self._remote(name).rstrip("/") + "/", str(local).rstrip("/") + "/"
        self._call(f"download {self.url(name)}", self.fs.get, source, target, recursive=True)

    def remove(self, name: str = "") -> None:
        if not self.remote:
            target = self._local(name)
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            return
        try:
            if self._call(f"reach {self.url(name)}", self.fs.exists, self._remote(name)):
                self._call(f"remove {self.url(name)}", self.fs.rm, self._remote(name), recursive=True)
        except FileNotFoundError:
            pass


def _within(fs, operation, *args, deadline: float, **kwargs):
    """`operation(*args)` given up at `deadline` (fsspec's async filesystems cancel it; others run to the end)."""
    from fsspec.asyn import AsyncFileSystem

    if isinstance(fs, AsyncFileSystem):
        kwargs["timeout"] = max(0.5, deadline - time.monotonic())
    return operation(*args, **kwargs)


def driver_module(scheme: str) -> str | None:
    """The package fsspec loads for `scheme://` (s3 -> s3fs), where fsspec knows one outside itself."""
    from fsspec.registry import known_implementations

    known = known_implementations.get(scheme)
    module = known["class"].split(".", 1)[0] if known else None
    return module if module != "fsspec" else None


def missing_driver(scheme: str) -> str | None:
    """The driver package of `scheme://` when it is not installed, else None."""
    import importlib.util

    module = driver_module(scheme)
    return module if module and importlib.util.find_spec(module) is None else None


def install_hint(scheme: str) -> str:
    """How to install the driver of `scheme://`: tunefleet's extra for it, else its own package."""
    extra, module = EXTRAS.get(scheme), driver_module(scheme)
    if extra:
        return f"pip install 'tunefleet[{extra}]'"
    return f"pip install {module}" if module else "install the fsspec driver for it"


def _filesystem(uri: str, quick: bool = False):
    """The fsspec filesystem of a URI; a missing driver package is one line naming the extra to install.

    `quick`: a client of its own that tries each request once with short timeouts (for `Store.check`), where the
    default S3 client retries a refused connection for minutes."""
    import fsspec

    scheme = uri.split("://", 1)[0].lower()
    options = {}
    if quick:
        options["skip_instance_cache"] = True
        if scheme in ("s3", "s3a"):
            options["config_kwargs"] = {
                "connect_timeout": 5,
                "read_timeout": 10,
                "retries": {"max_attempts": 1, "mode": "standard"},
            }
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as exc:
        raise TunefleetError(f"cannot use {uri}: {first_line(exc)} ({install_hint(scheme)})") from None
    if quick and hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own retry loop, around botocore's
    fs.invalidate_cache()
    return fs, path
