"""A real `ray start --head` for tests, in its own temp dir, stopped by PID (never a bare `ray stop`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from testkit import Started, pids_in_tree, tunefleet

from tunefleet.launcher.launch import free_ports
from tunefleet.launcher.warm import process_lives

HELPERS = str(Path(__file__).parent / "helpers")  # reward functions the tests' runs import on every node


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
    def __init__(self, num_cpus: int = 2, ray: str | None = None, env: dict[str, str] | None = None):
        """`ray`: the `ray` command to start it with (default: this environment's); `env`: its processes' environment
        (default: this process's)."""
        self.temp_dir = tempfile.mkdtemp(prefix="tfray", dir="/tmp")  # short: unix socket paths are limited
        # all of this head's ports at once, so no two of them are the same
        self.port, self.dashboard_port, *self.agent_ports = free_ports(6)
        self.num_cpus = num_cpus
        self.ray = ray or str(Path(sys.executable).parent / "ray")
        self.env = env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LocalRayHead:
        proc = subprocess.run(
            [
                self.ray,
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
                # the job agent's ports: Ray's fixed defaults (52365, ...) may be another Ray's on this machine, and
                # an agent that cannot bind leaves the head with "No available agent to submit job"
                "--dashboard-agent-listen-port",
                str(self.agent_ports[0]),
                "--dashboard-agent-grpc-port",
                str(self.agent_ports[1]),
                "--runtime-env-agent-port",
                str(self.agent_ports[2]),
                "--metrics-export-port",
                str(self.agent_ports[3]),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
        )
        assert proc.returncode == 0, f"ray start --head failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        return self

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def sweep(self, spec: dict, path: Path, *extra: str, wait: bool = True):
        """`tunefleet sweep` of `spec` (written to `path`) on this Ray, with token auth: its CompletedProcess, or
        with wait=False the started process."""
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        args = ["sweep", path, "--backend", "ray", "--address", self.address, *extra]
        env = {"RAY_AUTH_MODE": "token"}
        return tunefleet(*args, env=env, check=False) if wait else Started(*args, env=env)

    def stop(self) -> None:
        """TERM, then KILL after a grace period, every process of this Ray; again for any that started meanwhile
        (a raylet may spawn a worker while it shuts down). Its temp dir (sessions, logs) goes once they have."""
        for _ in range(3):
            pids = pids_under(self.temp_dir)
            if not pids:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 10  # gcs_server/raylet may ignore SIGTERM for a while
            while time.time() < deadline and any(process_lives(p) for p in pids):
                time.sleep(0.2)
            for pid in pids:
                if process_lives(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.5)


class LocalRayCluster(LocalRayHead):
    """A head and more raylets joined with `ray start --address`, each with its own CPUs and fake GPUs, all under
    one temp dir (so `stop` ends exactly them); `kill_node` kills one node's raylet: a node loss."""

    def __init__(
        self,
        nodes: int = 2,
        num_cpus: int = 2,
        num_gpus: int = 1,
        hidden: dict[int, str] | None = None,
        own_processes: bool = False,
    ):
        """`hidden`: node index -> a folder that node cannot see (its raylet starts in a mount namespace of its own,
        an empty tmpfs over that folder): a machine that does not mount the cluster's shared filesystem.
        `own_processes`: every process of a run starts under its node's raylet, as on separate machines (the test
        session's warm process is not offered to the nodes), so `lose_node` takes all of them with it."""
        super().__init__(num_cpus)
        self.nodes, self.num_gpus, self.hidden = nodes, num_gpus, hidden or {}
        self.own_processes = own_processes
        # Notice a dead node in seconds, not the default ~30 (GCS health checks of the raylets)
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",  # the head turns token auth on; a joining node must use it too
            "PYTHONPATH": os.pathsep.join(p for p in (HELPERS, os.environ.get("PYTHONPATH")) if p),
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "1000",
        }
        if own_processes:
            self.env.pop("TUNEFLEET_WARM_SOCKET", None)

    def start(self) -> LocalRayCluster:
        ray = str(Path(sys.executable).parent / "ray")
        common = [
            "--num-cpus",
            str(self.num_cpus),
            "--num-gpus",
            str(self.num_gpus),
            "--temp-dir",
            self.temp_dir,
            "--node-ip-address",
            "127.0.0.1",
            "--disable-usage-stats",
        ]
        subprocess.run(
            [
                ray,
                "start",
                "--head",
                "--port",
                str(self.port),
                "--node-name",
                "node0",
                *common,
                "--include-dashboard",
                "false",
            ],
            check=True,
            capture_output=True,
            timeout=120,
            env=self.env,
        )
        for i in range(1, self.nodes):
            hide = (
                ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -t tmpfs hidden "$0" && exec "$@"']
                + [self.hidden[i]]
                if i in self.hidden
                else []
            )
            subprocess.run(
                [*hide, ray, "start", "--address", self.address, "--node-name", f"node{i}", *common],
                check=True,
                capture_output=True,
                timeout=120,
                env=self.env,
            )
        return self

    def raylet_pid(self, node_id: str) -> int:
        for pid in pids_under(self.temp_dir):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"/raylet") and f"--node_id={node_id}".encode() in cmd:
                return pid
        raise LookupError(f"no raylet of node {node_id}")

    def kill_node(self, node_id: str) -> None:
        """SIGKILL a node's raylet: for the cluster, the node is lost."""
        os.kill(self.raylet_pid(node_id), signal.SIGKILL)

    def lose_node(self, node_id: str) -> None:
        """A machine gone: SIGKILL its raylet and every process under it (its workers and what they started)."""
        raylet = self.raylet_pid(node_id)
        for pid in sorted(pids_in_tree(raylet) - {raylet}) + [raylet]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def can_hide_folders() -> bool:
    """Whether this machine lets a process mount in a namespace of its own (root, or CAP_SYS_ADMIN)."""
    try:
        probe = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs hidden /mnt"],
            capture_output=True,
        )
    except OSError:  # no unshare
        return False
    return probe.returncode == 0
