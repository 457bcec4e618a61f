"""How one run is started: the command line (pure) and a free port per launch.

A run with one process is `python -m trainers.train ...`; with more it goes through
`accelerate launch --multi_gpu --num_processes N --main_process_port P -m trainers.train ...`
(on CPU-only hosts with ACCELERATE_USE_CPU=true, so the processes join one gloo world instead of
silently running N copies of world size 1). Every launch gets its own free port: several runs on one node
never collide on 29500.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "cluster_configs" / "accelerate"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def accelerate_config_path(name: str) -> Path | None:
    """`auto` -> None (plain --multi_gpu); a catalogue name (`zero2`) or a path -> that file."""
    if name in (None, "", "auto"):
        return None
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    return CONFIG_DIR / f"{name}.yaml"


def launch_command(train_argv: list[str], num_processes: int = 1, port: int | None = None,
                   accelerate_config: str | None = "auto", python: str = sys.executable) -> list[str]:
    """The command that runs one training run (pure: no I/O)."""
    if num_processes == 1 and accelerate_config_path(accelerate_config) is None:
        return [python, "-m", "trainers.train", *train_argv]
    cmd = [python, "-m", "accelerate.commands.launch"]
    config = accelerate_config_path(accelerate_config)
    cmd += ["--config_file", str(config)] if config else ["--multi_gpu"]
    cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", str(port or 29500),
            "-m", "trainers.train", *train_argv]
    return cmd


def launch_env(base: dict, num_processes: int, has_gpu: bool) -> dict:
    env = dict(base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not has_gpu and num_processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"  # gloo world of N; without it each process is its own world of 1
    return env
