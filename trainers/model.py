"""Tokenizer, base model (4-bit QLoRA or full precision) and LoRA config for every method.

QLoRA: NF4 + double quantization, compute (and 4-bit storage) dtype bf16 where the GPU supports it,
fp32 otherwise; `prepare_model_for_kbit_training`; LoRA on all linear layers. bitsandbytes 0.50 also
trains 4-bit on CPU, so this path is the same everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.trainers.tiny import TINY_MODEL, ensure_model


def resolve(name: str) -> str:
    """Hub name or local folder -> what `from_pretrained` takes; the embedded name builds on first use."""
    if name == TINY_MODEL:
        return str(ensure_model())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise TunefleetError(f"model path {name} holds no config.json: not a model folder")
        return str(path)
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise TunefleetError(f"model path {name} does not exist")
    return name


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_dtype(bf16: bool | None):
    import torch

    if bf16 is None:
        bf16 = has_gpu() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve(name), trust_remote_code=trust_remote_code)
    except TunefleetError:
        raise
    except Exception as exc:
        raise TunefleetError(f"cannot load tokenizer for {name}: {first_line(exc)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_vllm() -> None:
    """--use_vllm runs vLLM inside the training process (TRL's colocate mode): it needs a CUDA GPU and vllm."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise TunefleetError(
            "--use_vllm needs a CUDA GPU (vLLM generates on the GPU); this machine has none: "
            "drop --use_vllm to generate with transformers"
        )
    if importlib.util.find_spec("vllm") is None:
        raise TunefleetError(
            "--use_vllm needs the vllm package (pip install vllm, matching your torch and CUDA); "
            "or drop --use_vllm to generate with transformers"
        )


def check_assistant_masks(tokenizer, name: str, dataset) -> None:
    """--assistant_only_loss needs conversations and a chat template that marks the assistant replies."""
    if "messages" not in dataset.column_names:
        raise TunefleetError(
            "--assistant_only_loss works on conversations; this dataset's layout gives "
            f"{', '.join(dataset.column_names)} (prompt-completion data already learns the completion only)"
        )
    if "{% generation %}" not in (tokenizer.chat_template or "").replace("{%- generation %}", "{% generation %}"):
        raise TunefleetError(
            f"--assistant_only_loss: the chat template of {name} does not mark assistant replies with "
            "{% generation %} ... {% endgeneration %}; use a template that does (pass --assistant_only_loss false)"
        )


def quantization_config(dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # equal to the compute dtype: what FSDP/ZeRO-3 need to shard 4-bit weights
    )


def resident_mb() -> float:
    """This process's resident memory now (MiB; Linux)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return 0.0


# Resident memory just before the model loads (imports, data, tokenizer): run.json subtracts it from the peak,
# so `bench/memory_estimate.py` compares the estimate with what training itself took on CPU.
RESIDENT_BEFORE_MODEL_MB: list[float] = []


def load_model(
    name: str,
    use_qlora: bool,
    bf16: bool | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Base model ready for LoRA training (4-bit prepared when `use_qlora`)."""
    from transformers import AutoModelForCausalLM

    RESIDENT_BEFORE_MODEL_MB.append(resident_mb())
    dtype = compute_dtype(bf16)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if use_qlora:
        kwargs["quantization_config"] = quantization_config(dtype)
        if has_gpu() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}  # DeepSpeed places weights itself
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve(name), **kwargs)
    except TunefleetError:
        raise
    except Exception as exc:
        if use_qlora and _is_bnb_failure(exc):
            raise TunefleetError(
                f"4-bit loading failed ({first_line(exc)}); install a bitsandbytes build for "
                "this device or rerun with --use_qlora false"
            ) from None
        raise TunefleetError(f"cannot load model {name}: {first_line(exc)}") from None
    if use_qlora:
        from peft import prepare_model_for_kbit_training

        # Checkpointing is the trainer's to turn on (`activation_checkpointing`), with the input gradients PEFT needs.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def lora_config(r: int, alpha: int, dropout: float):
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM", bias="none"
    )


def count_4bit_layers(model) -> int:
    """Linear layers stored in 4 bits (bitsandbytes Linear4bit), 0 on the plain-LoRA path."""
    return sum(type(m).__name__ == "Linear4bit" for m in model.modules())


def _is_bnb_failure(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(k in text for k in ("bitsandbytes", "4bit", "4-bit", "quantiz", "cuda"))
