"""The training fast path: which speed options a run uses, chosen from the device and installed packages.

Each option is a flag (`--group_by_length false`, ...); left unset it is chosen here, and run.json records
every choice with its reason. Measured on CPU (bench/README.md): gradient checkpointing costs ~1.5x in time
(TRL turns it on for every run; tunefleet only when the run's estimated peak memory would not fit the device with
a margin), and length-grouped batches cut padding.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from tunefleet.trainers.config import TrainConfig


T = TypeVar("T")

GROUPABLE = ("sft", "dpo", "orpo")  # KTO's KL term needs sequential batches; GRPO samples its own prompts
MEMORY_MARGIN = 0.8  # gradient checkpointing stays off only when the estimated peak fits this share of the device
GIB = 2**30


@dataclass(frozen=True)
class Choice(Generic[T]):
    on: T  # the value used (attn_implementation: a kernel name)
    why: str


@dataclass(frozen=True)
class FastPath:
    """Every speed option of a run with its reason; run.json records `record()`."""

    group_by_length: Choice[bool]
    attn_implementation: Choice[str]
    padding_free: Choice[bool]
    use_liger_kernel: Choice[bool]
    tf32: Choice[bool]
    gradient_checkpointing: Choice[bool]

    def record(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MemoryFit:
    """The run's estimated peak without gradient checkpointing, and the memory its device has for it (bytes)."""

    peak: int | None  # None: the model's config could not be read
    available: int | None  # None: the device's memory could not be read
    device: str  # what `available` is, for the reason in run.json: "GPU 0", "free CPU memory", ...


def checkpointing_choice(flag: bool | None, fit: MemoryFit) -> Choice[bool]:
    """Off only when the estimate fits `MEMORY_MARGIN` of the device; on when it does not or cannot be known."""
    if flag is not None:
        return Choice(flag, "set by flag")
    if fit.peak is None or fit.available is None:
        unknown = "model size" if fit.peak is None else f"memory of {fit.device}"
        return Choice(True, f"{unknown} unknown: on, as TRL does")
    sizes = f"estimated peak {fit.peak / GIB:.2f} GiB, {fit.device} {fit.available / GIB:.1f} GiB"
    if fit.peak <= MEMORY_MARGIN * fit.available:
        return Choice(False, f"{sizes}: fits in {MEMORY_MARGIN:.0%}, off (~1.5x faster)")
    return Choice(True, f"{sizes}: over {MEMORY_MARGIN:.0%}, on")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _pick(flag_value: T | None, auto_value: T, why: str) -> Choice[T]:
    return Choice(flag_value, "set by flag") if flag_value is not None else Choice(auto_value, why)


def choose(
    cfg: TrainConfig,
    has_gpu: bool,
    gpu_capability: tuple[int, int] | None = None,
    flash: bool | None = None,
    liger: bool | None = None,
    memory: MemoryFit = MemoryFit(None, None, "the device"),
) -> FastPath:
    """The fast path for this run on this device (pure when `flash`/`liger` are given)."""
    flash = installed("flash_attn") if flash is None else flash
    liger = installed("liger_kernel") if liger is None else liger
    groupable = cfg.method in GROUPABLE
    no_grouping = {
        "kto": "KTO's KL estimate needs sequential batches",
        "grpo": "GRPO samples its own prompt groups",
        "rm": "the reward trainer batches its own pairs",
    }
    attention = _pick(
        cfg.attn_implementation,
        "flash_attention_2" if has_gpu and flash else "sdpa",
        "flash-attention installed on a GPU" if has_gpu and flash else "SDPA: best kernel available here",
    )
    padding_free = cfg.method == "sft" and attention.on.startswith("flash")
    ampere = bool(gpu_capability and gpu_capability[0] >= 8)
    return FastPath(
        group_by_length=_pick(
            cfg.group_by_length,
            groupable,
            "less padding per batch" if groupable else no_grouping.get(cfg.method, "not applicable"),
        ),
        attn_implementation=attention,
        padding_free=_pick(
            cfg.padding_free,
            padding_free,
            "flash-attention keeps packed sequences apart"
            if padding_free
            else "needs flash-attention (SDPA builds a dense mask on CPU)"
            if cfg.method == "sft"
            else "SFT only",
        ),
        use_liger_kernel=_pick(
            cfg.use_liger_kernel,
            has_gpu and liger,
            "liger-kernel installed on a GPU" if has_gpu and liger else "needs liger-kernel and a GPU",
        ),
        tf32=_pick(cfg.tf32, ampere, "GPU has TF32 (Ampere or newer)" if ampere else "no TF32 hardware"),
        gradient_checkpointing=checkpointing_choice(cfg.gradient_checkpointing, memory),
    )


def detect(cfg: TrainConfig) -> FastPath:
    import torch

    has_gpu = torch.cuda.is_available()
    return choose(cfg, has_gpu, torch.cuda.get_device_capability(0) if has_gpu else None, memory=memory_fit(cfg))


def memory_fit(cfg: TrainConfig) -> MemoryFit:
    """The run's estimated peak without checkpointing (trainers.memory) against what this process may use: its
    GPU (its share of one, when a sweep packs several runs on it), or on CPU the free memory split between the
    launch's processes."""
    import torch

    from tunefleet.trainers import memory
    from tunefleet.trainers.model import compute_dtype

    shape = memory.shape_of(cfg.model_name, cfg.trust_remote_code)
    has_gpu = torch.cuda.is_available()
    attention = cfg.attn_implementation or "sdpa"
    peak = None
    if shape is not None:
        peak = memory.estimate_run(
            cfg,
            shape,
            gradient_checkpointing=False,
            device="gpu" if has_gpu else "cpu",
            dtype_bytes=compute_dtype(cfg.bf16).itemsize,
            quadratic_attention=attention == "eager" or not has_gpu,  # SDPA's math path on CPU builds the scores
        ).total
    if has_gpu:
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        total = torch.cuda.get_device_properties(rank).total_memory
        share = memory.gpu_share()
        if share < 1:
            return MemoryFit(peak, int(total * share), f"{share:g} of GPU {rank}")
        return MemoryFit(peak, total, f"GPU {rank}")
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    free = available_cpu_memory()
    return MemoryFit(
        peak,
        free // processes if free else None,
        "free CPU memory" + (f" / {processes} processes" if processes > 1 else ""),
    )


def available_cpu_memory() -> int | None:
    """MemAvailable of /proc/meminfo, capped by this cgroup's memory limit (bytes; None where unreadable)."""
    from pathlib import Path

    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit.isdigit():
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free
