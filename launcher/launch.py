"""How one run is started: the command line (pure) and a free port per launch.

A run with one process is `python -m tunefleet.trainers.train ...`; with more it goes through
`accelerate launch --multi_gpu --num_processes N --main_process_port P -m tunefleet.launcher.warm --rank ...`, whose
ranks run `tunefleet.trainers.train`, forked warm where a warm process is advertised (launcher/warm.py)
(on CPU-only hosts with ACCELERATE_USE_CPU=true, so the processes join one gloo world instead of
silently running N copies of world size 1). Every launch gets its own free port: several runs on one node
never collide on 29500.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

from tunefleet.common.contract import LAUNCH_ENV, GangSeat
from tunefleet.common.errors import TunefleetError

if TYPE_CHECKING:
    from tunefleet.trainers.config import TrainConfig


# The shipped catalogue, as package data: found the same way from a checkout and from an installed wheel.
CATALOGUE = Path(str(resources.files("tunefleet.cluster_configs")))
CONFIG_DIR = CATALOGUE / "accelerate"
# `--accelerate_config auto` shards with ZeRO-3 when the base weights (compute dtype) would take more than
# this share of one device's memory: the rest is for activations, LoRA optimizer state and the batch.
ZERO3_SHARE = 0.5


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports. Every socket stays bound until all are chosen: ports taken one at a time may
    come back the same (the kernel hands a just-closed port out again), and a process given one port twice for two
    roles (Ray's GCS and its runtime-env agent, say) refuses to start."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def asks_for_config(name: str | None) -> TypeGuard[str]:
    """Whether --accelerate_config names a config (a catalogue name or a path) rather than leaving it to tunefleet."""
    return name not in (None, "", "auto")


def accelerate_config_path(name: str | None) -> Path | None:
    """`auto` -> None (plain --multi_gpu); a catalogue name (`zero2`) or a path -> that file."""
    if not asks_for_config(name):
        return None
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    return CONFIG_DIR / f"{name}.yaml"


@dataclass
class LaunchChoice:
    config: str | None  # accelerate config name/path, None for a single plain process
    reason: str


def choose_config(
    requested: str,
    num_processes: int,
    n_params: int | None,
    dtype_bytes: int,
    device_mem: int | None,
    share: float = ZERO3_SHARE,
    full: bool = False,
) -> LaunchChoice:
    """DDP, or ZeRO-3 when the weights would not leave room on one device (pure). `full`: full fine-tuning, where
    every weight also has a gradient and two Adam moments (in the weights' dtype): ZeRO-3 when they do not fit one
    device, with CPU offload when even sharded over the processes they would not."""
    if asks_for_config(requested):
        return LaunchChoice(requested, f"asked for with --accelerate_config {requested}")
    if num_processes == 1:
        return LaunchChoice(None, "one process: no distributed launch")
    if device_mem is None:
        return LaunchChoice("ddp", "no GPU: data parallel over gloo on CPU processes")
    if n_params is None:
        return LaunchChoice("ddp", "model size unknown (config not readable): plain data parallel")
    gib = 2**30
    limit = share * device_mem
    if full:
        states = n_params * dtype_bytes * 4  # weights, gradients, two Adam moments
        what = f"weights, gradients and Adam states {states / gib:.1f} GiB"
        if states / num_processes > limit:
            return LaunchChoice(
                "zero3_offload",
                f"{what}, {states / num_processes / gib:.1f} GiB a process even sharded over {num_processes}, "
                f"> {share:.0%} of one device's {device_mem / gib:.0f} GiB: ZeRO-3 with the optimizer and "
                "parameters offloaded to CPU memory",
            )
        if states > limit:
            return LaunchChoice(
                "zero3", f"{what} > {share:.0%} of one device's {device_mem / gib:.0f} GiB: shard them with ZeRO-3"
            )
        return LaunchChoice(
            "ddp", f"{what} <= {share:.0%} of one device's {device_mem / gib:.0f} GiB: every GPU holds a copy (DDP)"
        )
    weights = n_params * dtype_bytes
    if weights > limit:
        return LaunchChoice(
            "zero3",
            f"weights {weights / gib:.1f} GiB > {share:.0%} of one device's "
            f"{device_mem / gib:.0f} GiB: shard them with ZeRO-3",
        )
    return LaunchChoice(
        "ddp",
        f"weights {weights / gib:.2f} GiB <= {share:.0%} of one device's "
        f"{device_mem / gib:.0f} GiB: every GPU holds a copy (DDP)",
    )


def count_params(model_name: str, trust_remote_code: bool = False) -> int | None:
    """Parameter count from the model's config, built on the meta device (no weights loaded)."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from tunefleet.trainers.model import resolve

        config = AutoConfig.from_pretrained(resolve(model_name), trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def deepspeed_file(config: str | None) -> Path | None:
    """The DeepSpeed JSON an accelerate config points at, if any.

    A relative path in a catalogue config (`cluster_configs/deepspeed/zero2.json`) names the catalogue's own
    file; in the user's own YAML it is relative to the working folder, as accelerate reads it.
    """
    path = accelerate_config_path(config)
    if path is None or not path.exists():
        return None
    import yaml

    ds = (yaml.safe_load(path.read_text()) or {}).get("deepspeed_config", {}).get("deepspeed_config_file")
    if not ds:
        return None
    ds = Path(ds)
    if ds.is_absolute():
        return ds
    if path.parent == CONFIG_DIR and ds.parts[0] == CATALOGUE.name:
        return CATALOGUE.joinpath(*ds.parts[1:])
    return ds.resolve()


def check_deepspeed(ds: dict, cfg: TrainConfig, bf16: bool) -> list[str]:
    """Settings of a DeepSpeed JSON that contradict the run's flags, each saying which (pure)."""
    problems = []

    def fixed(value):
        return value is not None and value != "auto"

    pairs = [
        ("train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size, "--per_device_train_batch_size"),
        ("gradient_accumulation_steps", cfg.gradient_accumulation_steps, "--gradient_accumulation_steps"),
    ]
    for key, flag_value, flag in pairs:
        if fixed(ds.get(key)) and ds[key] != flag_value:
            problems.append(f"{key} is {ds[key]} in the DeepSpeed config but {flag} is {flag_value}")
    if fixed((ds.get("bf16") or {}).get("enabled")) and bool(ds["bf16"]["enabled"]) != bf16:
        problems.append(
            f"bf16.enabled is {ds['bf16']['enabled']} in the DeepSpeed config but the run computes in "
            f"{'bf16' if bf16 else 'fp32'} (--bf16)"
        )
    if (ds.get("fp16") or {}).get("enabled") is True:
        problems.append("fp16.enabled is true in the DeepSpeed config but tunefleet trains in bf16 or fp32")
    lr = ((ds.get("optimizer") or {}).get("params") or {}).get("lr")
    if lr is not None and fixed(lr) and float(lr) != cfg.lr:
        problems.append(f"optimizer lr is {lr} in the DeepSpeed config but --learning_rate is {cfg.lr}")
    stage = (ds.get("zero_optimization") or {}).get("stage")
    if stage == 3 and cfg.use_qlora and not bf16:
        problems.append(
            "ZeRO-3 with QLoRA needs bf16 compute (4-bit storage must equal the compute dtype to be "
            "sharded), which needs a bf16 GPU; use --accelerate_config zero2 or --use_qlora false"
        )
    return problems


def launch_command(
    train_argv: list[str],
    num_processes: int = 1,
    port: int | str | None = None,  # a number, or a placeholder in a printed plan
    accelerate_config: str | None = "auto",
    python: str = sys.executable,
    seat: GangSeat | None = None,
) -> list[str]:
    """The command that runs one training run (pure: no I/O). `num_processes`: the whole world; `seat`: this node's
    place in a multi-node run (its machine rank and the head every node meets at, torch's static rendezvous)."""
    if num_processes == 1 and accelerate_config_path(accelerate_config) is None:
        return [python, "-m", "tunefleet.trainers.train", *train_argv]
    cmd = [python, "-m", "accelerate.commands.launch"]
    config = accelerate_config_path(accelerate_config)
    cmd += ["--config_file", str(config)] if config else ["--multi_gpu"]
    ds = deepspeed_file(accelerate_config)
    if ds:  # absolute, so the launch works from any working directory
        cmd += ["--deepspeed_config_file", str(ds)]
    machines = ["--num_machines", "1"]
    if seat is not None:
        machines = [
            "--num_machines",
            str(seat.num_machines),
            "--machine_rank",
            str(seat.machine_rank),
            "--main_process_ip",
            seat.head,
        ]
        if ds:  # torchrun on each node, as for DDP (not DeepSpeed's pdsh launcher, which wants ssh to every node)
            machines += ["--deepspeed_multinode_launcher", "standard"]
    cmd += [
        "--num_processes",
        str(num_processes),
        *machines,
        "--main_process_port",
        str(seat.port if seat else port or 29500),
        "-m",
        "tunefleet.launcher.warm",  # each rank forked warm (launcher/warm.py: rank), or started cold when it cannot be
        "--rank",
        *train_argv,
    ]
    return cmd


def plan_launch(cfg: TrainConfig, env_extra: dict | None = None) -> tuple[LaunchChoice, dict]:
    """Choose and check the distributed set-up of one run before anything starts; env for its processes.

    `env_extra` is what a backend gives this run (CUDA_VISIBLE_DEVICES of its slot, say).
    """
    base = {**os.environ, **(env_extra or {})}
    world, here = cfg.world_size, cfg.node_processes
    if world == 1 and not asks_for_config(cfg.accelerate_config):
        # Nothing to choose or check, and torch is not imported here: the process that launches the run (a Ray
        # worker, a SLURM task) would spend seconds on it before the run's own, warm, process starts.
        return with_launch_record(choose_config("auto", 1, None, 0, None), launch_env(base, 1, False), 1)
    import torch

    from tunefleet.trainers.model import compute_dtype

    has_gpu = torch.cuda.is_available()
    devices = torch.cuda.device_count() if has_gpu else (os.cpu_count() or 1)
    if has_gpu and base.get("CUDA_VISIBLE_DEVICES"):
        devices = min(devices, len(base["CUDA_VISIBLE_DEVICES"].split(",")))
    if here > devices:
        what = "GPU(s) are visible" if has_gpu else "CPU cores exist (no GPU)"
        flag = "--processes_per_node" if cfg.num_nodes > 1 else "--num_processes"
        raise TunefleetError(
            f"{flag} {here} but only {devices} {what} on {socket.gethostname()}; lower {flag}"
            + (" or set CUDA_VISIBLE_DEVICES" if has_gpu else "")
        )
    dtype = compute_dtype(cfg.bf16)
    mem = torch.cuda.get_device_properties(0).total_memory if has_gpu else None
    # the model's size decides only between DDP and ZeRO-3 on GPUs: on CPU, not worth building it (seconds)
    n_params = count_params(cfg.model_name, cfg.trust_remote_code) if world > 1 and has_gpu else None
    choice = choose_config(cfg.accelerate_config, world, n_params, dtype.itemsize, mem, full=cfg.finetune == "full")
    if choice.config is not None:
        path = accelerate_config_path(choice.config)
        if path is None or not path.exists():
            names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise TunefleetError(f"accelerate config '{choice.config}' not found; use one of {names} or a .yaml path")
        ds = deepspeed_file(choice.config)
        if ds:
            problems = check_deepspeed(json.loads(ds.read_text()), cfg, dtype.itemsize == 2)
            if problems:
                raise TunefleetError(f"{ds.name}: " + "; ".join(problems))
    env = launch_env(base, world, has_gpu, deepspeed=deepspeed_file(choice.config) is not None)
    return with_launch_record(choice, env, world, cfg.num_nodes)


def with_launch_record(
    choice: LaunchChoice, env: dict, num_processes: int, num_nodes: int = 1
) -> tuple[LaunchChoice, dict]:
    """The choice, and `env` telling the run's processes what was chosen and why (run.json: launch)."""
    record = {"accelerate_config": choice.config, "reason": choice.reason, "num_processes": num_processes}
    if num_nodes > 1:
        record["num_nodes"] = num_nodes
    return choice, {**env, LAUNCH_ENV: json.dumps(record)}


def launch_env(base: dict, num_processes: int, has_gpu: bool, deepspeed: bool = False) -> dict:
    env = dict(base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not has_gpu and num_processes > 1 and not deepspeed:  # DeepSpeed brings its own CPU accelerator
        env["ACCELERATE_USE_CPU"] = "true"  # gloo world of N; without it each process is its own world of 1
    return env
