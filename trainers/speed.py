"""The training fast path: which speed options a run uses, chosen from the device and installed packages.

Each option is a flag (`--group_by_length false`, ...); left unset it is chosen here, and run.json records
every choice with its reason. Measured on CPU (bench/README.md): TRL's defaults turn gradient
checkpointing on (tunefleet: off unless asked), and length-grouped batches cut padding.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

GROUPABLE = ("sft", "dpo", "orpo")  # KTO's KL term needs sequential batches; GRPO samples its own prompts


@dataclass(frozen=True)
class Choice:
    on: bool | str  # the value used (attn_implementation: a kernel name)
    why: str


@dataclass(frozen=True)
class FastPath:
    """Every speed option of a run with its reason; run.json records `record()`."""

    group_by_length: Choice
    attn_implementation: Choice
    padding_free: Choice
    use_liger_kernel: Choice
    tf32: Choice
    gradient_checkpointing: Choice

    def record(self) -> dict:
        return dataclasses.asdict(self)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _pick(flag_value, auto_value, why: str) -> Choice:
    return Choice(flag_value, "set by flag") if flag_value is not None else Choice(auto_value, why)


def choose(
    cfg,
    has_gpu: bool,
    gpu_capability: tuple[int, int] | None = None,
    flash: bool | None = None,
    liger: bool | None = None,
) -> FastPath:
    """The fast path for this run on this device (pure when `flash`/`liger` are given)."""
    flash = installed("flash_attn") if flash is None else flash
    liger = installed("liger_kernel") if liger is None else liger
    groupable = cfg.method in GROUPABLE
    no_grouping = {"kto": "KTO's KL estimate needs sequential batches", "grpo": "GRPO samples its own prompt groups"}
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
        gradient_checkpointing=Choice(
            cfg.gradient_checkpointing,
            "asked for"
            if cfg.gradient_checkpointing
            else "off unless memory needs it (TRL's default is on: ~1.5x slower)",
        ),
    )


def detect(cfg) -> FastPath:
    import torch

    has_gpu = torch.cuda.is_available()
    return choose(cfg, has_gpu, torch.cuda.get_device_capability(0) if has_gpu else None)
