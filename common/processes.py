"""Whether a process of this host lives: the check a warm process's address and a run folder's lock both make."""

from __future__ import annotations

import os
from pathlib import Path


def process_lives(pid: int) -> bool:
    """The process exists and has not ended: a zombie (its parent has not reaped it yet) is gone too."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False  # ended between the two looks
