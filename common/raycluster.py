"""Connecting to Ray: an explicit address, RAY_ADDRESS, or a local Ray that we start and stop.

What a Ray of 2.60 listens on, and what guards it: its GCS, raylets and workers listen on all interfaces (Ray
binds them so that other nodes can join; `ray.init` even turns 127.0.0.1 into the host's address), and token
authentication, on by default, refuses any client without the cluster's token (`~/.ray/auth_token`). The local
Ray tunefleet starts has no dashboard; the clusters in cluster_configs/ bind theirs to 127.0.0.1 (reach it with
`ray dashboard`).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from tunefleet.common.errors import TunefleetError, first_line


def _reachable(address: str, timeout: float = 5.0) -> bool:
    if address in ("auto", "local"):
        return True
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        return True  # let Ray resolve it
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout):
            return True
    except OSError:
        return False


def token_available() -> bool:
    """Whether this client has a Ray token to present (environment, token path, or Ray's default file)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).is_file()


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect or start Ray. Returns True when this call started a local Ray (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address and not _reachable(address):
        raise TunefleetError(
            f"cannot reach the Ray cluster at {address}: nothing listens there "
            "(start it with `ray start --head` / `ray up`, or drop --address for a local Ray)"
        )
    if address and token_available():
        # Ray 2.60 clusters require their token; a client presents it only in token mode
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise TunefleetError(
            f"cannot connect to Ray at {address or 'a new local instance'}: {first_line(exc)}"
        ) from None
    return not address
