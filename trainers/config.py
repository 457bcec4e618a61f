"""One typed config for a run: CLI flags, `--config run.yaml` files and sweep overrides all land here.

Flag names and defaults are those of the original single-script tool, plus what TRL users expect.
Precedence: field default < method default (learning rate, beta) < YAML file < CLI flag.

    tunefleet train --config run.yaml --seed 3      # YAML gives defaults, the flag overrides
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from trainers.errors import TunefleetError

METHODS = ("sft", "dpo", "orpo", "kto", "grpo")
# The original tool's per-method learning rates (tuned for ~0.5B models).
DEFAULT_LR = {"sft": 2e-4, "dpo": 5e-5, "orpo": 8e-6, "kto": 5e-5, "grpo": 5e-5}
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "kto": 0.1, "grpo": 0.0}


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- the original tool's flags ---
    method: str | None = _f(None, "Training method.", choices=METHODS, required=True)
    model_name: str | None = _f(None, "Base model: hub name, local folder, or tunefleet/tiny-qwen2.", required=True)
    dataset: str | None = _f(None, "Dataset: hub name, local folder/JSON/JSONL/Parquet, or "
                                   "tunefleet/tiny-ultrafeedback.", required=True)
    output_dir: str | None = _f(None, "Where the run writes its adapter, state and checkpoints.", required=True)
    split: str = _f("train", "Training split.")
    eval_split: str | None = _f(None, "Evaluation split (none: no evaluation during training).")
    max_train_samples: int | None = _f(None, "Seeded random sample of the training split.")
    max_eval_samples: int | None = _f(None, "Seeded random sample of the evaluation split.")
    num_train_epochs: float = _f(3.0, "Training epochs.")
    per_device_train_batch_size: int = _f(4, "Batch size per device.")
    gradient_accumulation_steps: int = _f(4, "Gradient accumulation steps.")
    learning_rate: float | None = _f(None, "Learning rate (default by method: sft 2e-4, dpo 5e-5, orpo 8e-6, "
                                           "kto 5e-5, grpo 5e-5).")
    use_qlora: bool = _f(True, "4-bit NF4 QLoRA (false: plain LoRA on full-precision weights).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    # --- what TRL users expect ---
    seed: int = _f(42, "Random seed (sampling, init, data order).")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: run the epochs).")
    beta: float | None = _f(None, "DPO/KTO beta, ORPO lambda, GRPO KL coefficient (default by method).")
    max_length: int = _f(1024, "Max tokens of prompt + completion (SFT/DPO/ORPO/KTO).")
    max_completion_length: int | None = _f(None, "Max generated tokens (GRPO; ORPO completion cap). "
                                                 "GRPO default 64.")
    num_generations: int = _f(4, "GRPO completions per prompt; must divide the generation batch.")
    reward_funcs: list[str] = _f(("length",), "GRPO rewards: built-in names (length, friendly, "
                                              "answer), module:function, or a reward-model path.")
    logging_steps: int = _f(10, "Log every N steps.")
    save_steps: int = _f(500, "Checkpoint every N steps (the last step is always saved).")
    save_total_limit: int | None = _f(None, "Keep at most N checkpoints.")
    eval_steps: int | None = _f(None, "Evaluate every N steps (default: logging_steps) when eval_split is set.")
    per_device_eval_batch_size: int = _f(8, "Evaluation batch size per device.")
    report_to: str = _f("none", "Trackers: none, wandb, tensorboard, ... (comma separated).")
    bf16: bool | None = _f(None, "bf16 compute (default: on where the GPU supports it).")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory (worth it on large models).")
    group_by_length: bool | None = _f(None, "Batch samples of similar length (less padding). Default: on for SFT, "
                                            "DPO and ORPO; KTO needs sequential order, GRPO samples its own.")
    padding_free: bool | None = _f(None, "SFT without padding (sequences kept apart by position ids). Default: on "
                                         "where flash-attention is installed on a GPU.")
    attn_implementation: str | None = _f(None, "Attention kernel: flash_attention_2, sdpa, eager. Default: "
                                               "flash-attention when installed on a GPU, else sdpa.")
    use_liger_kernel: bool | None = _f(None, "Liger fused kernels. Default: on when liger-kernel is installed "
                                             "and a GPU is present.")
    tf32: bool | None = _f(None, "TF32 matmuls. Default: on for GPUs that have them (Ampere or newer).")
    trust_remote_code: bool = _f(False, "Run code shipped with a hub model. Off unless you trust it.")
    overwrite: bool = _f(False, "Retrain even if output_dir holds a finished run.")
    num_processes: int = _f(1, "Processes (GPUs) for this run; >1 launches through accelerate launch.")
    accelerate_config: str = _f("auto", "auto, a name in cluster_configs/accelerate, or a path.")

    def __post_init__(self):
        if isinstance(self.reward_funcs, tuple):
            self.reward_funcs = list(self.reward_funcs)

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.method, 0.1)

    def resolved(self) -> dict:
        """Every field with method defaults filled in (what run.json records)."""
        d = dataclasses.asdict(self)
        d["learning_rate"] = self.lr
        d["beta"] = self.beta_value
        return d


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _base_type(tp):
    """`int | None` -> int; `list[str]` -> list."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return typing.get_origin(tp) or tp


def _hints():
    return typing.get_type_hints(TrainConfig)


def parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def nearest(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def coerce(name: str, value, where: str = ""):
    """Check and convert one value to the field's type; one-line error naming the key."""
    if name not in FIELDS:
        raise TunefleetError(f"{where}unknown key '{name}'{nearest(name, FIELDS)}")
    if value is None:
        return None
    tp = _base_type(_hints()[name])
    try:
        if tp is bool:
            value = parse_bool(value)
        elif tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got {value!r}")
            value = int(value)
        elif tp is float:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            value = float(value)
        elif tp is list:
            value = [str(v) for v in value] if isinstance(value, (list, tuple)) else \
                [v.strip() for v in str(value).split(",") if v.strip()]
        else:
            if isinstance(value, (list, dict)):
                raise ValueError(f"expected a string, got {value!r}")
            value = str(value)
    except ValueError as exc:
        raise TunefleetError(f"{where}bad value for '{name}': {exc}") from None
    choices = FIELDS[name].metadata.get("choices")
    if choices and value not in choices:
        raise TunefleetError(f"{where}unknown {name} '{value}'{nearest(value, choices)}; "
                             f"choose one of: {', '.join(choices)}")
    return value


def from_dict(values: dict, where: str = "", check_required: bool = True) -> TrainConfig:
    """Build a TrainConfig from plain values (YAML, sweep), checking every key and type."""
    clean = {k: coerce(k, v, where) for k, v in values.items()}
    cfg = TrainConfig(**clean)
    if check_required:
        missing = [n for n, f in FIELDS.items() if f.metadata.get("required") and getattr(cfg, n) is None]
        if missing:
            raise TunefleetError(f"{where}missing required setting(s): " + ", ".join(f"--{m}" for m in missing))
    validate(cfg, where)
    return cfg


def validate(cfg: TrainConfig, where: str = "") -> None:
    positive = ["per_device_train_batch_size", "gradient_accumulation_steps", "lora_r", "logging_steps",
                "save_steps", "num_processes", "num_generations", "max_length", "per_device_eval_batch_size"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise TunefleetError(f"{where}'{name}' must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise TunefleetError(f"{where}'{name}' must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise TunefleetError(f"{where}'max_steps' must be -1 (use epochs) or at least 1")
    if cfg.method == "grpo" and not cfg.reward_funcs:
        raise TunefleetError(f"{where}GRPO needs at least one reward in --reward_funcs")


def parse_yaml_mapping(path: str, what: str, expected: str, with_nodes: bool = False):
    """Read a YAML mapping; one-line errors with the file line. `with_nodes`: also the composed node tree."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise TunefleetError(f"{what} {path} not found")
    text = p.read_text()
    try:
        data = yaml.safe_load(text) or {}
        node = yaml.compose(text, Loader=yaml.SafeLoader) if with_nodes else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise TunefleetError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise TunefleetError(f"{path}: {expected}")
    return (data, node) if with_nodes else data


def load_yaml(path: str) -> dict:
    return parse_yaml_mapping(path, "config file", "expected a mapping of flag names to values")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Flags for every field. Defaults are suppressed so we can tell what the user actually passed."""
    parser = parser or argparse.ArgumentParser(prog="tunefleet train", allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of flag values (CLI flags override it).")
    for name, f in FIELDS.items():
        tp = _base_type(_hints()[name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata["help"] + ("" if default in (None, ()) else f" (default: {default})")
        kw = {"default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            parser.add_argument(f"--{name}", nargs="?", const=True, type=parse_bool, metavar="true|false", **kw)
        elif tp is list:
            parser.add_argument(f"--{name}", nargs="+", **kw)
        else:
            parser.add_argument(f"--{name}", type=str, **kw)  # checked by coerce(), with a nearest-name hint
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI argv -> TrainConfig (YAML first, then flags). Raises TunefleetError on bad input."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0]
        name = flag.lstrip("-").split("=")[0].replace("-", "_")
        raise TunefleetError(f"unknown flag {flag}{nearest(name, FIELDS)}")
    path = getattr(args, "config", None)
    merged = {k: coerce(k, v, f"{path}: ") for k, v in (load_yaml(path) if path else {}).items()}
    merged.update({k: coerce(k, v) for k, v in vars(args).items() if k != "config"})
    return from_dict(merged)
