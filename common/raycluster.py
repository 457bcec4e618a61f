"""Connecting to Ray: an explicit address, RAY_ADDRESS, or a local Ray bound to loopback that we start and stop."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from tunefleet.common.errors import TunefleetError


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
    try:
        if address:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        else:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                logging_level="WARNING",
                log_to_driver=False,
                _node_ip_address="127.0.0.1",
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise TunefleetError(
            f"cannot connect to Ray at {address or 'a new local instance'}: {str(exc).strip().splitlines()[0]}"
        ) from None
    return not address
