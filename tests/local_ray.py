"""A real `ray start --head` for tests, in its own temp dir, stopped by PID (never a bare `ray stop`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tunefleet.launcher.launch import free_port


def pids_under(temp_dir: str) -> set[int]:
    """Processes whose command line names our temp dir, plus all their descendants."""
    cmdlines, parents = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdlines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    ours = {pid for pid, cmd in cmdlines.items() if temp_dir in cmd and pid != os.getpid()}
    grew = True
    while grew:
        kids = {pid for pid, ppid in parents.items() if ppid in ours and pid not in ours}
        grew = bool(kids)
        ours |= kids
    return ours


class LocalRayHead:
    def __init__(self, num_cpus: int = 2):
        self.temp_dir = tempfile.mkdtemp(prefix="tfray", dir="/tmp")  # short: unix socket paths are limited
        self.port, self.dashboard_port = free_port(), free_port()
        self.num_cpus = num_cpus

    def start(self) -> LocalRayHead:
        ray = str(Path(sys.executable).parent / "ray")
        subprocess.run(
            [
                ray,
                "start",
                "--head",
                "--port",
                str(self.port),
                "--num-cpus",
                str(self.num_cpus),
                "--disable-usage-stats",
                "--temp-dir",
                self.temp_dir,
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        return self

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def stop(self) -> None:
        pids = pids_under(self.temp_dir)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10  # gcs_server/raylet may ignore SIGTERM for a while
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
