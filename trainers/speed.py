"""The training fast path: which speed options a run uses, chosen from the device and installed packages.

Each option is a flag (`--group_by_length false`, ...); left unset it is chosen here, and run.json records
every choice with its reason. Measured on CPU (bench/README.md): TRL's defaults turn gradient
checkpointing on (tunefleet: off unless asked), and length-grouped batches cut padding.
"""

from __future__ import annotations

import importlib.util

GROUPABLE = ("sft", "dpo", "orpo")  # KTO's KL term needs sequential batches; GRPO samples its own prompts


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def choose(cfg, has_gpu: bool, gpu_capability: tuple[int, int] | None = None, flash: bool | None = None,
           liger: bool | None = None) -> dict:
    """{option: {"on": value, "why": reason}} (pure when `flash`/`liger` are given)."""
    flash = _installed("flash_attn") if flash is None else flash
    liger = _installed("liger_kernel") if liger is None else liger
    out = {}

    def pick(name, value, auto_value, why):
        out[name] = {"on": value, "why": "set by flag"} if value is not None else {"on": auto_value, "why": why}

    pick("group_by_length", cfg.group_by_length, cfg.method in GROUPABLE,
         "less padding per batch" if cfg.method in GROUPABLE else
         {"kto": "KTO's KL estimate needs sequential batches", "grpo": "GRPO samples its own prompt groups"}
         .get(cfg.method, "not applicable"))
    pick("attn_implementation", cfg.attn_implementation, "flash_attention_2" if has_gpu and flash else "sdpa",
         "flash-attention installed on a GPU" if has_gpu and flash else "SDPA: best kernel available here")
    padding_free = cfg.method == "sft" and out["attn_implementation"]["on"].startswith("flash")
    pick("padding_free", cfg.padding_free, padding_free,
         "flash-attention keeps packed sequences apart" if padding_free else
         "needs flash-attention (SDPA builds a dense mask on CPU)" if cfg.method == "sft" else "SFT only")
    pick("use_liger_kernel", cfg.use_liger_kernel, has_gpu and liger,
         "liger-kernel installed on a GPU" if has_gpu and liger else "needs liger-kernel and a GPU")
    ampere = bool(gpu_capability and gpu_capability[0] >= 8)
    pick("tf32", cfg.tf32, ampere, "GPU has TF32 (Ampere or newer)" if ampere else "no TF32 hardware")
    out["gradient_checkpointing"] = {"on": cfg.gradient_checkpointing,
                                     "why": "asked for" if cfg.gradient_checkpointing else
                                     "off unless memory needs it (TRL's default is on: ~1.5x slower)"}
    return out


def detect(cfg) -> dict:
    import torch
    has_gpu = torch.cuda.is_available()
    return choose(cfg, has_gpu, torch.cuda.get_device_capability(0) if has_gpu else None)
