"""JSON files that readers never see half-written, and a reader that never unpickles anything."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path


def write_json_atomic(path: Path | str, data, durable: bool = True) -> None:
    """Write JSON to a temp file in the same folder, then rename: readers never see half a file.

    `durable` also fsyncs first (records that must survive a crash); progress files skip that per-step cost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # a full disk: no half file left beside the whole one
        raise OSError(exc.errno, exc.strerror, str(path)) from exc  # named by the file it was writing
    except BaseException:
        tmp.unlink(missing_ok=True)  # a kill: the same
        raise


def read_json(path: Path | str) -> dict | None:
    """A JSON object from a file, or None when missing or corrupt (files in run folders are never unpickled)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
