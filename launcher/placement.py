"""Where each run of a sweep goes: how much of a GPU it takes, and which GPU (all pure; backends carry it out).

`resources.gpus_per_run` is a number (0: CPU; 0.5: two runs share a GPU; 2: two whole GPUs) or `auto`: each run's
peak memory is estimated from its model's config and settings (`tunefleet.trainers.memory`) and as many runs
share a GPU as fit under `PACKING_MARGIN` of its memory. The local backend hands out GPU shares with
`Allocator`, Ray gets fractional `num_gpus`, SLURM runs a group of sharing runs in one array task
(`slurm_groups`). A packed run that runs out of memory is retried once with a whole GPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from tunefleet.common.errors import TunefleetError
from tunefleet.trainers import memory
from tunefleet.trainers.config import TrainConfig

PACKING_MARGIN = 0.8  # share of a GPU's memory that packed runs may fill (the rest: CUDA context, fragmentation)


@dataclass(frozen=True)
class Placement:
    gpus: float  # GPUs for the run: a share of one (< 1) or whole GPUs
    reason: str
    estimate_gb: float | None = None
    gpu_memory_gb: float | None = None
    cpus: int = 1  # CPU cores (the run's threads; Ray's num_cpus; SLURM's cpus-per-task)
    memory_gb: float | None = None  # host memory Ray and SLURM reserve for it

    @property
    def runs_per_gpu(self) -> int:
        return max(1, math.floor(1 / self.gpus + 1e-9)) if 0 < self.gpus < 1 else 1

    @property
    def shared(self) -> bool:
        return 0 < self.gpus < 1

    def alone(self) -> Placement:
        """The same run with a whole GPU to itself (the retry after an out-of-memory)."""
        return Placement(
            max(1.0, self.gpus),
            "retried alone: ran out of memory sharing a GPU",
            self.estimate_gb,
            self.gpu_memory_gb,
            self.cpus,
            self.memory_gb,
        )

    def record(self) -> dict[str, Any]:
        return asdict(self) | {"runs_per_gpu": self.runs_per_gpu}


def parse_gpus(value) -> float | str:
    """`resources.gpus_per_run`: `auto`, 0, a share of one GPU (0.5, 0.25, ...) or whole GPUs (1, 2, ...)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        gpus = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected auto or a number of GPUs, got {value!r}") from None
    if gpus < 0 or (gpus > 1 and not gpus.is_integer()):
        raise ValueError(f"expected auto, a share of one GPU (0 < x < 1) or whole GPUs, got {value!r}")
    return gpus


def place(cfg: TrainConfig, gpus_per_run, gpu_memory_bytes: int | None, shape: memory.ModelShape | None) -> Placement:
    """One run's placement (pure: the model shape and the GPU's memory are given)."""
    if gpus_per_run != "auto":
        return Placement(float(gpus_per_run), "resources.gpus_per_run in the spec")
    if gpu_memory_bytes is None:
        raise TunefleetError(
            "resources.gpus_per_run: auto needs the GPU's memory: set resources.gpu_memory_gb (the planning "
            "machine has no GPU to read it from)"
        )
    gpu_gb = round(gpu_memory_bytes / memory.GIB, 1)
    if shape is None:
        return Placement(
            1.0, f"model size of {cfg.model_name} unknown (config not readable): a whole GPU", None, gpu_gb
        )
    checkpointing = bool(cfg.gradient_checkpointing)
    peak = memory.estimate_run(cfg, shape, checkpointing).total
    if cfg.gradient_checkpointing is None and peak > PACKING_MARGIN * gpu_memory_bytes:
        checkpointing = True  # what the run itself will choose (trainers.speed): plan with its smaller peak
        peak = memory.estimate_run(cfg, shape, checkpointing).total
    per_gpu = memory.runs_per_gpu(peak, gpu_memory_bytes, PACKING_MARGIN)
    if per_gpu == 1:
        fits = peak <= PACKING_MARGIN * gpu_memory_bytes
        why = (
            ("fits one per GPU" + (" with gradient checkpointing" if checkpointing else ""))
            if fits
            else "more than one GPU's margin"
            + (" even with gradient checkpointing" if checkpointing else " (gradient checkpointing off by flag)")
            + ": lower the batch or shard the run (--num_processes)"
        )
        return Placement(1.0, f"estimated {peak / memory.GIB:.1f} GiB: {why}", round(peak / memory.GIB, 2), gpu_gb)
    return Placement(
        math.floor(10000 / per_gpu) / 10000,
        f"estimated {peak / memory.GIB:.1f} GiB: {per_gpu} runs fit in {PACKING_MARGIN:.0%} of {gpu_gb:g} GiB",
        round(peak / memory.GIB, 2),
        gpu_gb,
    )


class Allocator:
    """Shares of this machine's GPUs, handed to runs as they start (the local backend's scheduler)."""

    def __init__(self, gpu_ids: list[str], strategy: str = "pack"):
        self.free = dict.fromkeys(gpu_ids, 1.0)
        self.strategy = strategy

    def take(self, gpus: float) -> list[str] | None:
        """GPU ids for a run needing `gpus` (a share or whole GPUs), or None if it must wait."""
        if gpus <= 0:
            return []
        if gpus < 1:
            fitting = [g for g, f in self.free.items() if f >= gpus - 1e-9]
            if not fitting:
                return None
            # pack: fill the fullest GPU that still fits; spread: the emptiest
            key = (lambda g: self.free[g]) if self.strategy == "pack" else (lambda g: -self.free[g])
            chosen = [min(fitting, key=key)]
            self.free[chosen[0]] -= gpus
            return chosen
        whole = [g for g, f in self.free.items() if f >= 1 - 1e-9][: int(gpus)]
        if len(whole) < gpus:
            return None
        for g in whole:
            self.free[g] = 0.0
        return whole

    def give(self, ids: list[str], gpus: float) -> None:
        for g in ids:
            self.free[g] = min(1.0, self.free[g] + (gpus if gpus < 1 else 1.0))

    def can_ever_fit(self, gpus: float) -> bool:
        return gpus <= 0 or (gpus < 1 and bool(self.free)) or len(self.free) >= gpus


def slurm_groups(placements: list[Placement]) -> list[list[int]]:
    """Runs (by index) per SLURM array task: runs sharing a GPU go together while their shares fit in one GPU."""
    groups: list[list[int]] = []
    loads: list[float] = []
    for i, p in enumerate(placements):
        if p.shared:
            for g, load in enumerate(loads):
                if load + p.gpus <= 1 + 1e-9 and placements[groups[g][0]].shared:
                    groups[g].append(i)
                    loads[g] += p.gpus
                    break
            else:
                groups.append([i])
                loads.append(p.gpus)
        else:
            groups.append([i])
            loads.append(2.0)  # a whole-GPU run never takes a companion
    return groups
