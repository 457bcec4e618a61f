"""Ray for a sweep's runs or a search's trials: the cluster at an address, else a local Ray started (and stopped)
for them, whose workers fork every run from this machine's warm process."""

from __future__ import annotations

import contextlib
import os

from tunefleet.common.contract import WARM_SOCKET_ENV
from tunefleet.common.raycluster import ensure_ray
from tunefleet.launcher import warm


@contextlib.contextmanager
def ray_for_runs(address: str | None):
    """Ray for a sweep's runs or a search's trials: the cluster at `address` (or RAY_ADDRESS), else a local Ray
    started here, whose workers inherit the warm process's address and fork every run from it. What this started
    is shut down at the end; a Ray already connected is used as it is."""
    import ray

    local = not (address or os.environ.get("RAY_ADDRESS"))
    if local:
        advertised = warm.prestart()
        if advertised:
            os.environ[WARM_SOCKET_ENV] = advertised
    started = ensure_ray(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
        if local:
            os.environ.pop(WARM_SOCKET_ENV, None)
