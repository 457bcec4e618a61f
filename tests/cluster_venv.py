"""A cluster node's environment for tests: a fresh virtual environment set up by a cluster config's own
`setup_commands`, run as written in a home folder holding the synced checkout (`~/tunefleet`).

Downloading torch, TRL, DeepSpeed and Ray into every such venv would take many minutes, so the venv sees this
environment's packages through a `.pth` line to a folder of links: every installed distribution except tunefleet
and the packages its extras add (s3fs, gcsfs, lm-eval, Optuna). Those the setup commands must install themselves,
so a config that forgets an extra gives a node without it, as on a real cluster. pip sees the linked distributions
as installed (it reads sys.path), so `pip install "torch==2.13.0"` and the extras' own dependencies install nothing.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# tunefleet itself and what its extras add: each node's setup must bring them
NOT_SHARED = {"tunefleet", "s3fs", "gcsfs", "lm-eval", "optuna"}


def shared_packages(folder: Path) -> Path:
    """A folder of links to this environment's distributions, but NOT_SHARED (made once per folder)."""
    if folder.is_dir():
        return folder
    staging = folder.with_name(folder.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    site = Path(sysconfig.get_paths()["purelib"])
    for dist in importlib.metadata.distributions(path=[str(site)]):
        if canonicalize_name(dist.metadata["Name"]) in NOT_SHARED:
            continue
        for file in dist.files or []:
            top = file.parts[0]
            if top == ".." or top.endswith(".pth") or top.startswith("__editable__") or top == "__pycache__":
                continue
            link = staging / top
            if not link.exists() and (site / top).exists():
                link.symlink_to(site / top)
    staging.rename(folder)
    return folder


def checkout_copy(dest: Path) -> Path:
    """What `ray up` syncs: the checkout's files, less what .gitignore and .git hold (rsync_filter/exclude)."""
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in tracked.splitlines():
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@dataclass
class Node:
    """A node's home (with ~/tunefleet) and the venv its setup commands installed into."""

    home: Path
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def checkout(self) -> Path:
        return self.home / "tunefleet"

    def env(self, **extra: str) -> dict[str, str]:
        """A shell on the node: its home, its venv first on PATH, nothing of this test process's own imports."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "VIRTUAL_ENV", "TUNEFLEET_"))}
        env.update(
            HOME=str(self.home),
            PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
            VIRTUAL_ENV=str(self.venv),
            PYTHONPATH="",
            PIP_DISABLE_PIP_VERSION_CHECK="1",
        )
        env.update(extra)
        return env

    def run(self, command: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
        """`command` in bash on the node, from its home; fails the test with its output when it fails."""
        proc = subprocess.run(
            ["bash", "-c", command],
            cwd=self.home,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, (
            f"`{command}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
        return proc


def set_up_node(where: Path, setup_commands: list[str], shared: Path) -> Node:
    """A fresh venv and home under `where`, the checkout synced to ~/tunefleet, then `setup_commands` run as
    written (`python` / `python3` and `pip` are the venv's)."""
    home, venv = where / "home", where / "venv"
    checkout_copy(home / "tunefleet")
    node = Node(home, make_venv(venv, shared))
    for command in setup_commands:
        node.run(command)
    return node


def make_venv(venv: Path, shared: Path) -> Path:
    """A fresh venv that sees the `shared` packages (and has Ray's console script), with nothing else installed."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "shared_packages.pth").write_text(f"{shared}\n")
    # Console scripts of the shared distributions are not in the venv's bin: Ray's is needed on a node.
    ray = venv / "bin" / "ray"
    ray.write_text(f"#!{venv}/bin/python\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n")
    ray.chmod(0o755)
    return venv
