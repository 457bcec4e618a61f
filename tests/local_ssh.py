"""A second host on this machine for tests: an SSH server on 127.0.0.1:22 (the port `ray up` reaches a host on)
whose sessions live in a PID namespace of their own, with a home folder of their own.

Inside, `ps` and `ray stop` see only what this host's sessions started, as on another machine: `ray stop` there
cannot end a Ray of this test session or of anyone else here. Stopping the host kills the namespace's first process
(the SSH server), and with it, by the kernel's rule, every process of the namespace.

It needs root (the server logs in as this user, and making a PID namespace needs the privilege), `sshd` and `rsync`
(`make sshd` installs both with apt-get) and a free port 22; `unavailable()` says which is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from testkit import pids_in_tree

SSHD = "/usr/sbin/sshd"
PORT = 22  # Ray's SSH command runner has no port setting: a host is reached on 22


class LocalSSHHost:
    def __init__(self, folder: Path, user_env: dict[str, str] | None = None):
        """`folder`: the host's keys, configuration and home (`folder/home`); `user_env`: variables every session
        of the host has, as a machine's own settings would give them."""
        self.folder = folder
        self.home = folder / "home"
        self.key = folder / "client_key"
        self.user_env = user_env or {}
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def unavailable() -> str | None:
        """Why no such host can start here, or None."""
        if os.geteuid() != 0:
            return "an SSH host in a PID namespace of its own needs root"
        missing = [tool for tool in (SSHD, "ssh", "rsync", "unshare", "ssh-keygen") if not shutil.which(tool)]
        if missing:
            return f"no {', '.join(missing)} here (make sshd installs openssh-server and rsync)"
        probe = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode != 0:  # a container without the privilege to make namespaces
            return f"cannot make a PID namespace here: {probe.stderr.strip()[:200]}"
        with socket.socket() as client:
            if client.connect_ex(("127.0.0.1", PORT)) == 0:
                return f"127.0.0.1:{PORT} is already taken by another server"
        return None

    def start(self) -> LocalSSHHost:
        self.home.mkdir(parents=True, exist_ok=True)
        for key in (self.folder / "host_key", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        shutil.copy(self.key.with_suffix(".pub"), self.folder / "authorized_keys")
        settings = [
            f"ListenAddress 127.0.0.1:{PORT}",
            f"HostKey {self.folder / 'host_key'}",
            f"AuthorizedKeysFile {self.folder / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            f"PidFile {self.folder / 'sshd.pid'}",
            # sshd's SetEnv comes after the login's own variables, so HOME is this host's home, not the user's
            "SetEnv " + " ".join(f"{k}={v}" for k, v in {"HOME": str(self.home), **self.user_env}.items()),
            # sshd starts a session in the user's own home folder; this host's user lives in self.home
            'ForceCommand cd "$HOME" && eval "$SSH_ORIGINAL_COMMAND"',
        ]
        (self.folder / "sshd_config").write_text("\n".join(settings) + "\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", SSHD, "-D", "-e", "-f", str(self.folder / "sshd_config")],
            stdout=(self.folder / "sshd.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd ended at its start: {(self.folder / 'sshd.log').read_text()[-2000:]}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", PORT)) == 0:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("sshd did not listen on 127.0.0.1:22 in 30 s")

    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`command` in a session on the host."""
        return subprocess.run(
            ["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "root@127.0.0.1", command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )  # fmt: skip

    def namespace_pids(self) -> set[int]:
        """This host's processes, as this machine numbers them: the server and everything under it (a process
        orphaned in the namespace is adopted by the server, its first process)."""
        return pids_in_tree(self.proc.pid) - {self.proc.pid} if self.proc is not None else set()

    def commands(self) -> list[bytes]:
        """The command lines of the host's live processes (an ended one that is not yet reaped has none)."""
        found = []
        for pid in self.namespace_pids():
            try:
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:
                continue
        return [c for c in found if c]

    def stop(self) -> None:
        """End the namespace's first process; the kernel ends every other process of the namespace with it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            first = int(Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()[0])
            os.kill(first, signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
