"""Tokenizer, base model (4-bit QLoRA or full precision) and LoRA config for every method.

QLoRA: NF4 + double quantization, compute (and 4-bit storage) dtype bf16 where the GPU supports it,
fp32 otherwise; `prepare_model_for_kbit_training`; LoRA on all linear layers. bitsandbytes 0.50 also
trains 4-bit on CPU, so this path is the same everywhere.

Why one module of this size: the base model, tokenizer, LoRA config, reward models and full-run folders share one
set of loading rules (dtype, 4-bit, trust_remote_code, run folders and hub ids).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tunefleet.common.contract import RUN_RECORD
from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.trainers.tiny import TINY_MODEL, ensure_model

if TYPE_CHECKING:
    from tunefleet.trainers.config import TrainConfig


def resolve(name: str) -> str:
    """Hub name or local folder -> what `from_pretrained` takes; the embedded name builds on first use; a run folder
    (an adapter) -> its adapter merged into its base (`merged_model`)."""
    if name == TINY_MODEL:
        return str(ensure_model())
    folder = run_folder(name)
    if folder is not None:
        return str(merged_model(folder))
    full = full_run_folder(name)
    if full is not None:
        check_finished_run(full)
        return str(full)  # the whole model is there: nothing to merge
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise TunefleetError(f"model path {name} holds no config.json: not a model folder")
        return str(path)
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise TunefleetError(f"model path {name} does not exist")
    return name


# ---------------------------------------------------------------- a run folder as a base model
MERGED = "merged"  # inside a run folder: its adapter merged into its base, for the runs that start from it
LINEAGE = "lineage.json"  # inside MERGED: what it was made from


def run_folder(name: str) -> Path | None:
    """`name` as a local folder holding an adapter (a tunefleet run, or any PEFT adapter folder), else None."""
    path = Path(str(name)).expanduser()
    return path if (path / "adapter_config.json").is_file() else None


def full_run_folder(name: str) -> Path | None:
    """`name` as the folder of a full fine-tuning run (its whole model at the top, run.json saying so), else None."""
    import json

    path = Path(str(name)).expanduser()
    record = path / RUN_RECORD
    if not record.is_file() or not (path / "config.json").is_file():
        return None
    try:
        config = json.loads(record.read_text()).get("config") or {}
    except ValueError:
        return None
    return path if config.get("finetune") == "full" else None


def check_finished_run(folder: Path) -> None:
    """A run folder used as a model must hold a whole model: a finished run."""
    import json

    status = json.loads((folder / RUN_RECORD).read_text()).get("status")
    if status != "finished":
        raise TunefleetError(
            f"{folder} is a run that is {status}, not finished: its model is partial; finish it first "
            "(rerun its command: it resumes from its latest checkpoint)"
        )


def model_digests(folder: Path) -> dict[str, str]:
    """The sha256 (16 hex digits) of each weights file of a model folder."""
    return {w.name: file_digest(w) for w in sorted(folder.glob("*.safetensors"))}


def file_digest(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def adapter_base(folder: Path) -> str:
    """The base an adapter was trained on: its run.json's, else its adapter_config.json's (found again where the
    study folder moved since, see `relocated`)."""
    import json

    record = json.loads((folder / RUN_RECORD).read_text()) if (folder / RUN_RECORD).is_file() else {}
    config = json.loads((folder / "adapter_config.json").read_text())
    base = record.get("base_model")
    if not base and config.get("base_model_name_or_path"):
        base = config["base_model_name_or_path"]
        if base.startswith(("./", "../")):  # a pipeline child's: its parent's merged model, relative to itself
            base = str((folder / base).resolve())
    if not base:
        raise TunefleetError(f"{folder}: neither run.json nor adapter_config.json names the base model")
    return relocated(base, folder, record)


def relocated(base: str, folder: Path, record: dict) -> str:
    """A run's recorded base where the study folder has moved since it trained (copied elsewhere, downloaded from
    a bucket): a parent run is recorded by the absolute path it had then, and is found again as the folder of the
    same name beside the run, or beside one of its enclosing folders (a search stage's runs sit one level down)."""
    if not base.startswith("/") or Path(base).exists():
        return base
    names = [n for n in ((record.get("lineage") or {}).get("parent_name"), Path(base).name) if n]
    if Path(base).name == MERGED:  # an adapter_config.json's base: the parent's merged model
        names.append(Path(base).parent.name)
    for enclosing in list(folder.resolve().parents)[:3]:
        for name in names:
            if (enclosing / name).is_dir():
                return str(enclosing / name / MERGED if Path(base).name == MERGED else enclosing / name)
    return base


def relative_parent(adapter_folder: Path, parent_model: str) -> str | None:
    """What a pipeline child's adapter_config.json names as its base: the parent's merged model relative to the
    child's folder (`../sft_s1/merged`), so that the study folder can move; None for a base that is not a run."""
    merged = Path(parent_model)
    if merged.name != MERGED or not (merged.parent / "adapter_config.json").is_file():
        return None
    return os.path.relpath(merged.resolve(), adapter_folder.resolve())


def root_model(name: str) -> str:
    """The model a chain of runs started from: `name` itself, or for a run folder (adapter or full) its base's root."""
    import json

    seen = set()
    while name not in seen:
        seen.add(name)
        if (folder := run_folder(name)) is not None:
            name = adapter_base(folder)
        elif (full := full_run_folder(name)) is not None:
            record = json.loads((full / RUN_RECORD).read_text())
            name = relocated(record.get("base_model") or name, full, record)
        else:
            break
    return name


def check_usable_adapter(folder: Path) -> None:
    """A run folder used as a model must hold a whole adapter: a finished run, or a plain adapter folder."""
    import json

    status = None
    if (folder / RUN_RECORD).is_file():
        status = json.loads((folder / RUN_RECORD).read_text()).get("status")
    if status is not None and status != "finished":
        raise TunefleetError(
            f"{folder} is a run that is {status}, not finished: its adapter is a partial model; finish it first "
            "(rerun its command: it resumes from its latest checkpoint)"
        )
    if not (folder / "adapter_model.safetensors").is_file():
        raise TunefleetError(f"{folder} holds no adapter_model.safetensors: no adapter to start from")


def lineage(folder: Path) -> dict:
    """The parent's side of a run that starts from `folder`: where it is, its base, its adapter's and its merged
    weights' hashes (what run.json records under `lineage`)."""
    import json

    target = merged_model(folder)
    return json.loads((target / LINEAGE).read_text())


def merged_model(folder: Path, trust_remote_code: bool = False) -> Path:
    """`folder`'s adapter merged into its base in full precision, kept in `folder/merged` and made once per adapter:
    made again when the adapter changed since (a run retrained or overwritten), never used stale. Runs that start
    from the same parent at once wait for one merge (a file lock)."""
    import fcntl
    import json
    import os
    import shutil

    check_usable_adapter(folder)
    digest = file_digest(folder / "adapter_model.safetensors")
    target = folder / MERGED

    def current() -> bool:
        made = target / LINEAGE
        return made.is_file() and json.loads(made.read_text()).get("adapter_sha256") == digest

    if current():
        return target
    with open(folder / ".merged.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if current():
            return target
        base = adapter_base(folder)
        partial = folder / f".merged.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            merge_adapter(folder, base, "auto", partial, trust_remote_code)
            save_tokenizer(folder, base, partial, trust_remote_code)
            weights = sorted(partial.glob("*.safetensors"))
            record = {
                "parent": str(folder.resolve()),
                "base_model": base,
                "adapter_sha256": digest,
                "weights_sha256": {w.name: file_digest(w) for w in weights},
            }
            (partial / LINEAGE).write_text(json.dumps(record, indent=2) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target


def reward_model_path(name: str, trust_remote_code: bool = False) -> str:
    """A reward model as `from_pretrained` takes it: a folder, a hub id, or a tunefleet `rm` run (its adapter and
    score head merged into its base). One line for what is no reward model (a sequence classifier with one label)."""
    from transformers import AutoConfig

    path = resolve(name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise TunefleetError(f"cannot load reward model {name}: {first_line(exc)}") from None
    kinds = config.architectures or []
    if not any(kind.endswith("ForSequenceClassification") for kind in kinds):
        what = "a causal LM" if any(k.endswith("ForCausalLM") for k in kinds) else f"a {' / '.join(kinds) or 'model'}"
        raise TunefleetError(
            f"{name} is {what}, not a reward model (a sequence classifier with one label): train one with "
            "--method rm and pass its run folder or export"
        )
    if config.num_labels != 1:
        raise TunefleetError(
            f"reward model {name} has {config.num_labels} labels; a reward model gives one score (num_labels 1)"
        )
    return path


def load_reward_model(name: str, trust_remote_code: bool = False, device=None):
    """(reward model in eval mode, its tokenizer) from anything `reward_model_path` takes."""
    from transformers import AutoModelForSequenceClassification

    path = reward_model_path(name, trust_remote_code)
    scorer = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    if scorer.config.pad_token_id is None:  # the score is read at each row's last real token
        scorer.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        scorer.to(device)
    return scorer.eval(), tokenizer


def is_reward_adapter(run_path: Path) -> bool:
    """The adapter of a reward model (`--method rm`: a sequence classifier's LoRA and score head)."""
    import json

    config = run_path / "adapter_config.json"
    return config.is_file() and json.loads(config.read_text()).get("task_type") == "SEQ_CLS"


def merge_adapter(run_path: Path, base: str, dtype: str, into: Path, trust_remote_code: bool) -> str:
    """Base in float32 + the adapter of `run_path`, merged, cast to `dtype` ("auto": the base's own dtype), saved
    as safetensors. A QLoRA run is merged into the base's original weights, never into 4-bit ones (4-bit weights
    cannot hold the sum; PEFT would round it back to NF4). A reward model's adapter (with its score head) gives a
    plain sequence classifier with one label. Returns the dtype saved."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    reward_model = is_reward_adapter(run_path)
    try:
        auto = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
        with quiet_new_head() if reward_model else contextlib.nullcontext():
            loaded = auto.from_pretrained(
                resolve(base),
                dtype=torch.float32,
                trust_remote_code=trust_remote_code,
                **({"num_labels": 1} if reward_model else {}),
            )
    except TunefleetError:
        raise
    except Exception as exc:
        raise TunefleetError(f"cannot load base model {base}: {first_line(exc)}") from None
    base_dtype = getattr(loaded.config, "dtype", None)
    target = dtype if dtype != "auto" else str(base_dtype or "float32").removeprefix("torch.")
    try:
        merged = PeftModel.from_pretrained(loaded, str(run_path)).merge_and_unload()
    except Exception as exc:
        raise TunefleetError(f"cannot apply the adapter of {run_path} to {base}: {first_line(exc)}") from None
    merged = merged.to(getattr(torch, target))
    merged.config.dtype = getattr(torch, target)
    if reward_model:  # the score is read at each row's last real token
        merged.config.pad_token_id = load_tokenizer(base, trust_remote_code).pad_token_id
    merged.save_pretrained(into)
    return target


def save_full_model(run_path: Path, dtype: str, into: Path, trust_remote_code: bool, reward_model: bool) -> str:
    """A full fine-tuning run's own model, copied (dtype auto: as trained) or converted to `dtype`, as safetensors.
    Returns the dtype saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    try:
        loaded = auto.from_pretrained(run_path, dtype="auto", trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise TunefleetError(f"cannot load the model of {run_path}: {first_line(exc)}") from None
    target = dtype if dtype != "auto" else str(loaded.dtype).removeprefix("torch.")
    loaded = loaded.to(getattr(torch, target))
    loaded.config.dtype = getattr(torch, target)
    loaded.save_pretrained(into)
    return target


def save_tokenizer(run_path: Path, base: str, into: Path, trust_remote_code: bool) -> None:
    """The run's tokenizer (its pad token and chat template as trained), else the base's."""
    from transformers import AutoTokenizer

    if (run_path / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(run_path, trust_remote_code=trust_remote_code)
    else:
        tokenizer = load_tokenizer(base, trust_remote_code)
    tokenizer.save_pretrained(into)


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_dtype(bf16: bool | None):
    import torch

    if bf16 is None:
        bf16 = has_gpu() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


def load_tokenizer(
    name: str, trust_remote_code: bool = False, revision: str | None = None, chat_template: str | None = None
):
    """The model's tokenizer; `chat_template` (Jinja text, or a file holding it) replaces the model's own, and is
    saved with the run's tokenizer, so its evaluation renders conversations the same way."""
    from transformers import AutoTokenizer

    try:
        kwargs = {"revision": revision} if revision else {}
        tok = AutoTokenizer.from_pretrained(resolve(name), trust_remote_code=trust_remote_code, **kwargs)
    except TunefleetError:
        raise
    except Exception as exc:
        raise TunefleetError(f"cannot load tokenizer for {name}: {first_line(exc)}") from None
    if chat_template:
        tok.chat_template = read_chat_template(chat_template)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def run_tokenizer(cfg: TrainConfig):
    """The tokenizer a run trains with: its model's (at `model_revision`), with the run's `chat_template`."""
    return load_tokenizer(cfg.model_name, cfg.trust_remote_code, cfg.trl_args.get("model_revision"), cfg.chat_template)


def read_chat_template(value: str) -> str:
    """A chat template given as Jinja text, or as the path of a file that holds it (`.jinja`, `.j2`, `.txt`)."""
    if "{" not in value:
        path = Path(value)
        if not path.is_file():
            raise TunefleetError(f"chat_template {value!r} is neither Jinja text nor a file")
        value = path.read_text()
    import jinja2

    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as exc:
        raise TunefleetError(f"chat_template is not valid Jinja (line {exc.lineno}: {exc.message})") from None
    return value


def weights_dtype(cfg: TrainConfig):
    """The dtype the base's weights load in: `dtype` when given (auto: the checkpoint's), else the compute dtype."""
    import torch

    if cfg.dtype is None:
        return compute_dtype(cfg.bf16)
    return "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)


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


def quantization_config(dtype, trl_args: dict | None = None, trl_form: bool = False):
    """4-bit NF4 (or 8-bit with TRL's `load_in_8bit`). TRL's ModelConfig fields choose the rest; tunefleet's form
    keeps double quantization on and the storage dtype equal to the compute dtype (what FSDP/ZeRO-3 need to shard
    4-bit weights), TRL's form takes TRL's defaults."""
    from transformers import BitsAndBytesConfig

    trl_args = trl_args or {}
    if trl_args.get("load_in_8bit"):
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = trl_args.get("bnb_4bit_quant_storage") or (None if trl_form else dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=trl_args.get("bnb_4bit_quant_type", "nf4"),
        bnb_4bit_use_double_quant=trl_args.get("use_bnb_nested_quant", not trl_form),
        bnb_4bit_compute_dtype=dtype,
        **({"bnb_4bit_quant_storage": storage} if storage else {}),
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


def load_model(cfg: TrainConfig, attn_implementation: str | None = None, reward_model: bool = False):
    """The run's base model, ready to train: quantized and prepared for adapters (finetune qlora), full precision
    (lora), or whole (full). `reward_model`: the base with a one-output score head (a sequence classifier, what
    TRL's RewardTrainer trains; the head starts random)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    RESIDENT_BEFORE_MODEL_MB.append(resident_mb())
    dtype = weights_dtype(cfg)
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.trl_args.get("model_revision"):
        kwargs["revision"] = cfg.trl_args["model_revision"]
    if reward_model:
        kwargs["num_labels"] = 1
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if cfg.use_qlora:
        compute = dtype if dtype != "auto" else compute_dtype(cfg.bf16)
        kwargs["quantization_config"] = quantization_config(compute, cfg.trl_args, cfg.config_form == "trl")
        if has_gpu() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}  # DeepSpeed places weights itself
    # Seeded before loading: a reward model's new score head is drawn here, before the trainer seeds itself, and
    # a run must rerun to the same losses (study.json's `sweep --from`).
    set_seed(cfg.seed)
    try:
        auto = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
        with quiet_new_head() if reward_model else contextlib.nullcontext():
            model = auto.from_pretrained(resolve(cfg.model_name), **kwargs)
    except TunefleetError:
        raise
    except Exception as exc:
        if cfg.use_qlora and _is_bnb_failure(exc):
            raise TunefleetError(
                f"quantized loading failed ({first_line(exc)}); install a bitsandbytes build for "
                "this device or rerun with --finetune lora"
            ) from None
        raise TunefleetError(f"cannot load model {cfg.model_name}: {first_line(exc)}") from None
    if cfg.trl_args.get("ignore_bias_buffers"):
        # TRL's ScriptArguments option, as its scripts apply it: DDP leaves boolean buffers (masks) out of syncing.
        ignored = [n for n, b in model.named_buffers() if str(b.dtype) == "torch.bool"]
        model._ddp_params_and_buffers_to_ignore = ignored  # pyright: ignore[reportArgumentType] - DDP reads this list
    if cfg.use_qlora:
        from peft import prepare_model_for_kbit_training

        # Checkpointing is the trainer's to turn on (`activation_checkpointing`), with the input gradients PEFT needs.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def lora_config(cfg: TrainConfig, reward_model: bool = False):
    """The run's LoRA adapters (None for full fine-tuning). tunefleet's form adapts all linear layers; TRL's form
    takes TRL's default (PEFT's per-architecture modules) unless `lora_target_modules` names them. A reward
    model's score head is trained in full (PEFT's SEQ_CLS task saves it)."""
    if not cfg.adapters:
        return None
    from peft import LoraConfig

    options = cfg.trl_args
    targets = options.get("lora_target_modules") or (None if cfg.config_form == "trl" else "all-linear")
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets[0]  # as TRL's ModelConfig does: one name may be "all-linear"
    extra = {"target_parameters": options["lora_target_parameters"]} if options.get("lora_target_parameters") else {}
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="SEQ_CLS" if reward_model else options.get("lora_task_type", "CAUSAL_LM"),
        bias="none",
        use_rslora=options.get("use_rslora", False),
        use_dora=options.get("use_dora", False),
        modules_to_save=options.get("lora_modules_to_save"),
        **extra,
    )


def score_head_in(model, dtype) -> None:
    """TRL's RewardTrainer casts a 4-bit model's trainable weights to bf16. LoRA layers cast their input to match;
    the score head (a plain linear layer, trained in full) does not, so it computes in the hidden states' dtype."""
    for name, param in model.named_parameters():
        if param.requires_grad and ".modules_to_save." in name:
            param.data = param.data.to(dtype)


@contextlib.contextmanager
def quiet_new_head():
    """transformers warns that a sequence classifier's score head is newly initialized: that is the point here."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def count_4bit_layers(model) -> int:
    """Linear layers stored in 4 bits (bitsandbytes Linear4bit), 0 on the plain-LoRA path."""
    return sum(type(m).__name__ == "Linear4bit" for m in model.modules())


def keep_4bit_training_layout(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for inference the first time it runs
    in eval mode without gradients (an evaluation during training), and the training steps after it fail on the
    repacked layout ("a view of a leaf Variable ... in-place operation"). A model that trains keeps its layout."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def _is_bnb_failure(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(k in text for k in ("bitsandbytes", "4bit", "4-bit", "quantiz", "cuda"))
