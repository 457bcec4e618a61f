"""One typed config for a run: CLI flags, `--config run.yaml` files and sweep overrides all land here.

Flag names and defaults are those of the original single-script tool, plus what TRL users expect.
Precedence: field default < method default (learning rate, beta) < YAML file < CLI flag.

    tunefleet train --config run.yaml --seed 3      # YAML gives defaults, the flag overrides
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tunefleet.common import schema, tracking
from tunefleet.common.errors import TunefleetError
from tunefleet.common.schema import nearest, option

METHODS = ("sft", "dpo", "orpo", "kto", "grpo", "rm")
# The original tool's per-method learning rates (tuned for ~0.5B models).
DEFAULT_LR = {"sft": 2e-4, "dpo": 5e-5, "orpo": 8e-6, "kto": 5e-5, "grpo": 5e-5, "rm": 1e-4}
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "kto": 0.1, "grpo": 0.0}


@dataclass
class DatasetPart:
    """One dataset of a mixture: `--mixture "tunefleet/tiny-ultrafeedback:train_prefs@200" "{dataset: ./pairs.jsonl,
    columns: {prompt: query}}"` on the command line, a mapping per part in YAML."""

    dataset: str = option(None, "Hub name, local folder or file.", required=True)  # required: see TrainConfig
    split: str = option("train", "Split of this part.")
    config: str | None = option(None, "Hub config (subset) name.")
    data_files: list[str] | None = option(None, "Files inside the dataset to read (hub or local).")
    columns: dict[str, str] | None = option(None, "Column mapping of this part (as --columns).")
    ignore_columns: list[str] | None = option(None, "Columns of this part left out on purpose.")
    samples: int | None = option(None, "Rows taken from this part (seeded sample).", at_least=1)
    weight: float | None = option(None, "Share of the weighted parts (relative; rows drawn without repeats).", above=0)

    @classmethod
    def parse(cls, text: str) -> DatasetPart:
        """`DATASET[:SPLIT][@SAMPLES|*WEIGHT]`, or a YAML flow mapping `{dataset: ..., split: ..., ...}`."""
        text = text.strip()
        if text.startswith("{"):
            import yaml

            try:
                mapping = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"not a YAML mapping: {text!r} ({getattr(exc, 'problem', exc)})") from None
            if not isinstance(mapping, dict):
                raise ValueError(f"not a YAML mapping: {text!r}")
            return schema.from_mapping(cls, cast(dict[str, Any], mapping))
        values: dict[str, Any] = {}
        for marker, key in (("@", "samples"), ("*", "weight")):
            if marker in text:
                text, _, amount = text.rpartition(marker)
                values[key] = amount
        name, _, split = text.partition(":")
        values["dataset"] = name
        if split:
            values["split"] = split
        return schema.from_mapping(cls, values)

    def to_text(self) -> str:
        import yaml

        return yaml.safe_dump(
            {k: v for k, v in schema.to_dict(self).items() if v is not None},
            default_flow_style=True,
            sort_keys=False,
            width=10**6,
        ).strip()


@dataclass
class TrainConfig:
    # --- the original tool's flags ---
    # method, model_name and output_dir are typed as what a TrainConfig holds once built: from_dict refuses one
    # without them (their None default only marks them required).
    method: str = option(None, "Training method.", choices=METHODS, required=True)
    model_name: str = option(None, "Base model: hub name, local folder, or tunefleet/tiny-qwen2.", required=True)
    dataset: str | None = option(
        None, "Dataset: hub name, local folder/JSON/JSONL/Parquet, or tunefleet/tiny-ultrafeedback (or --mixture)."
    )
    output_dir: str = option(None, "Where the run writes its adapter, state and checkpoints.", required=True)
    split: str = option("train", "Training split.")
    eval_split: str | None = option(None, "Evaluation split (none: no evaluation during training).")
    max_train_samples: int | None = option(None, "Seeded random sample of the training split.", at_least=1)
    max_eval_samples: int | None = option(None, "Seeded random sample of the evaluation split.", at_least=1)
    num_train_epochs: float = option(3.0, "Training epochs.", above=0)
    per_device_train_batch_size: int = option(4, "Batch size per device.", at_least=1)
    gradient_accumulation_steps: int = option(4, "Gradient accumulation steps.", at_least=1)
    learning_rate: float | None = option(
        None, "Learning rate (default by method: sft 2e-4, dpo 5e-5, orpo 8e-6, kto 5e-5, grpo 5e-5).", above=0
    )
    use_qlora: bool = option(True, "4-bit NF4 QLoRA (false: plain LoRA on full-precision weights).")
    lora_r: int = option(16, "LoRA rank.", at_least=1)
    lora_alpha: int = option(32, "LoRA alpha.", above=0)
    lora_dropout: float = option(0.05, "LoRA dropout, in [0, 1).", at_least=0, below=1)
    # --- data: layouts, mapping, mixtures ---
    dataset_config: str | None = option(None, "Hub dataset config (subset) name.")
    data_files: list[str] | None = option(None, "Files inside the dataset to read (hub repo or local folder).")
    columns: dict[str, str] | None = option(
        None, "Map your columns to tunefleet's names: prompt=query,system=sys_prompt,chosen=good,rejected=bad."
    )
    ignore_columns: list[str] | None = option(
        None, "Text columns to leave out on purpose (else unused text is an error)."
    )
    mixture: list[DatasetPart] | None = option(
        None, "Train on several datasets: DATASET[:SPLIT][@SAMPLES|*WEIGHT] or {dataset: ..., columns: ...} each."
    )
    # --- what TRL users expect ---
    seed: int = option(42, "Random seed (sampling, init, data order).")
    max_steps: int = option(-1, "Stop after this many optimizer steps (-1: run the epochs).")
    beta: float | None = option(
        None, "DPO/KTO beta, ORPO lambda, GRPO KL coefficient (default by method).", at_least=0
    )
    max_length: int = option(1024, "Max tokens of prompt + completion (SFT/DPO/ORPO/KTO).", at_least=1)
    max_completion_length: int | None = option(
        None, "Max generated tokens (GRPO; ORPO completion cap). GRPO default 64.", at_least=1
    )
    num_generations: int = option(4, "GRPO completions per prompt; must divide the generation batch.", at_least=2)
    reward_funcs: list[str] = option(
        ["length"],
        "Rewards: built-in names (length, friendly, answer), module:function, or a reward-model path (GRPO trains "
        "on them; --eval_prompts scores with them, functions only).",
    )
    loss_type: list[str] | None = option(
        None,
        "TRL's loss. DPO: sigmoid, ipo, hinge, sft, ... (several combine, weighted by --loss_weights); "
        "GRPO: grpo, dr_grpo, dapo, bnpo, ...; KTO: kto, apo_zero_unpaired. Default: TRL's.",
    )
    loss_weights: list[float] | None = option(None, "Weights of several DPO loss types (default: 1 each).")
    temperature: float | None = option(None, "GRPO sampling temperature (default: TRL's 1.0).", above=0)
    max_prompt_length: int | None = option(
        None, "GRPO: prompts longer than this many tokens (chat template applied) are dropped and counted.", at_least=1
    )
    reward_weights: list[float] | None = option(None, "GRPO: weight of each reward in --reward_funcs (default: 1).")
    scale_rewards: str | None = option(
        None, "GRPO advantage scaling: group (TRL's default), batch or none.", choices=("group", "batch", "none")
    )
    mask_truncated_completions: bool = option(
        False, "GRPO: completions cut at max_completion_length (no end of turn) teach nothing (TRL's option)."
    )
    use_vllm: bool = option(False, "GRPO: generate with vLLM in colocate mode (a GPU with vllm installed).")
    logging_steps: int = option(10, "Log every N steps.", at_least=1)
    save_steps: int = option(500, "Checkpoint every N steps (the last step is always saved).", at_least=1)
    save_total_limit: int | None = option(None, "Keep at most N checkpoints.", at_least=1)
    store_retry_s: float = option(
        600,
        "With output_dir in an object store: how long a checkpoint upload keeps retrying (with backoff) before the "
        "run stops, the checkpoint kept in node-local scratch for the rerun to upload and resume from.",
        above=0,
    )
    eval_steps: int | None = option(
        None, "Evaluate every N steps (default: logging_steps) when eval_split is set.", at_least=1
    )
    per_device_eval_batch_size: int = option(8, "Evaluation batch size per device.", at_least=1)
    eval_pairs: str | None = option(
        None,
        "Held-out preference pairs (a split of the dataset): each evaluation also logs eval_preference_accuracy, "
        "the evaluator's preference accuracy, for any method.",
    )
    eval_prompts: str | None = option(
        None,
        "Held-out prompts (a split of the dataset): each evaluation also logs eval_heldout_reward, the mean summed "
        "--reward_funcs of greedy answers (the evaluator's heldout_reward), for any method.",
    )
    heldout_samples: int = option(64, "Rows of --eval_pairs and --eval_prompts used (the first ones).", at_least=1)
    report_to: str = option(
        "none",
        "Trackers: none, or any of tensorboard, mlflow, wandb (comma separated; pip install 'tunefleet[NAME]').",
    )
    verbose: bool = option(False, "Show every library warning, progress bar and the trainer's raw log lines.")
    run_name: str | None = option(None, "The run's name in trackers (default: the output folder's name).")
    stage: str | None = option(None, "The stage of a pipeline spec this run belongs to (tunefleet sweep sets it).")
    tracking_group: str | None = option(
        None, "Group of runs in trackers: W&B group, MLflow experiment (a sweep sets its name)."
    )
    bf16: bool | None = option(None, "bf16 compute (default: on where the GPU supports it).")
    gradient_checkpointing: bool | None = option(
        None,
        "Trade compute for memory. Default: off when the run's estimated peak memory fits its device with 20%% to "
        "spare (~1.5x faster), else on.",
    )
    oom_recovery: bool = option(
        True,
        "After running out of memory, resume from the last checkpoint with gradient checkpointing on, then with "
        "half the batch and twice the accumulation (same effective batch), down to batch 1.",
    )
    assistant_only_loss: bool = option(
        False, "SFT: learn only the assistant replies, not the user turns (the chat template must mark them)."
    )
    group_by_length: bool | None = option(
        None,
        "Batch samples of similar length (less padding). Default: on for SFT, "
        "DPO and ORPO; KTO needs sequential order, GRPO samples its own.",
    )
    padding_free: bool | None = option(
        None,
        "SFT without padding (sequences kept apart by position ids). Default: on "
        "where flash-attention is installed on a GPU.",
    )
    attn_implementation: str | None = option(
        None,
        "Attention kernel: flash_attention_2, sdpa, eager. Default: "
        "flash-attention when installed on a GPU, else sdpa.",
    )
    use_liger_kernel: bool | None = option(
        None, "Liger fused kernels. Default: on when liger-kernel is installed and a GPU is present."
    )
    tf32: bool | None = option(None, "TF32 matmuls. Default: on for GPUs that have them (Ampere or newer).")
    trust_remote_code: bool = option(False, "Run code shipped with a hub model. Off unless you trust it.")
    overwrite: bool = option(False, "Retrain even if output_dir holds a finished run.")
    num_processes: int = option(1, "Processes (GPUs) for this run; >1 launches through accelerate launch.", at_least=1)
    accelerate_config: str = option("auto", "auto, a name in cluster_configs/accelerate, or a path.")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.method, 0.1)

    def resolved(self) -> dict[str, Any]:
        """Every field with method defaults filled in (what run.json records)."""
        d = dataclasses.asdict(self)
        d["learning_rate"] = self.lr
        d["beta"] = self.beta_value
        return d


FIELDS = schema.fields(TrainConfig)


def model_short(model_name: str) -> str:
    """A model's short name (`Qwen/Qwen2-0.5B-Instruct` -> `qwen2-0.5b-instruct`): run names, tracker tags."""
    return Path(str(model_name).rstrip("/")).name.lower()


def coerce(name: str, value: Any, where: str = "") -> Any:
    """Check and convert one value of a train setting; one-line error naming the key."""
    return schema.coerce(TrainConfig, name, value, where)


def from_dict(values: dict[str, Any], where: str = "", check_required: bool = True) -> TrainConfig:
    """Build a TrainConfig from plain values (YAML, sweep), checking every key and type."""
    clean = {k: coerce(k, v, where) for k, v in values.items()}
    cfg = TrainConfig(**clean)
    if check_required:
        needed = [n for n, f in FIELDS.items() if f.metadata.get("required") or (n == "dataset" and not cfg.mixture)]
        missing = [n for n in needed if getattr(cfg, n) is None]
        if missing:
            raise TunefleetError(f"{where}missing required setting(s): " + ", ".join(f"--{m}" for m in missing))
    validate(cfg, where)
    return cfg


def validate(cfg: TrainConfig, where: str = "") -> None:
    """What no single field can say alone (each field's own range is checked by `coerce`)."""
    tracking.parse_report_to(cfg.report_to)  # a misspelt tracker: one line before anything loads
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise TunefleetError(f"{where}'max_steps' must be -1 (use epochs) or at least 1")
    if cfg.method == "grpo" and not cfg.reward_funcs:
        raise TunefleetError(f"{where}GRPO needs at least one reward in --reward_funcs")
    if cfg.method in ("dpo", "orpo", "kto") and cfg.beta is not None and cfg.beta <= 0:
        raise TunefleetError(f"{where}'beta' must be greater than 0 for {cfg.method}, got {cfg.beta}")
    if cfg.reward_weights and len(cfg.reward_weights) != len(cfg.reward_funcs):
        raise TunefleetError(
            f"{where}--reward_weights has {len(cfg.reward_weights)} weights for {len(cfg.reward_funcs)} reward(s) "
            f"in --reward_funcs ({', '.join(cfg.reward_funcs)})"
        )
    if cfg.loss_weights and len(cfg.loss_weights) != len(cfg.loss_type or ["sigmoid"]):
        raise TunefleetError(f"{where}--loss_weights needs one weight per --loss_type")
    if cfg.loss_type and cfg.method in ("sft", "orpo", "rm"):
        raise TunefleetError(f"{where}--loss_type: {cfg.method} has one loss (DPO, KTO and GRPO take --loss_type)")
    if cfg.method in ("grpo", "kto") and cfg.loss_type and len(cfg.loss_type) > 1:
        raise TunefleetError(f"{where}{cfg.method} takes one --loss_type, got {', '.join(cfg.loss_type)}")
    grpo_only = [
        "temperature",
        "max_prompt_length",
        "reward_weights",
        "scale_rewards",
        "mask_truncated_completions",
        "use_vllm",
    ]
    given = [name for name in grpo_only if getattr(cfg, name) not in (None, False)]
    if cfg.method and cfg.method != "grpo" and given:
        raise TunefleetError(f"{where}{', '.join('--' + n for n in given)}: GRPO only, not {cfg.method}")
    heldout = [f"--{name}" for name in ("eval_pairs", "eval_prompts") if getattr(cfg, name)]
    if heldout and not cfg.eval_split:
        raise TunefleetError(
            f"{where}{' and '.join(heldout)} are scored at each evaluation during training: give --eval_split too"
        )
    if cfg.mixture and any(not part.dataset for part in cfg.mixture):
        raise TunefleetError(f"{where}every --mixture part needs a dataset")
    if cfg.mixture and (cfg.columns or cfg.ignore_columns or cfg.dataset_config or cfg.data_files):
        raise TunefleetError(f"{where}with --mixture, set columns, ignore_columns, config and data_files per part")
    if cfg.mixture and any(p.samples for p in cfg.mixture) and any(p.weight for p in cfg.mixture):
        raise TunefleetError(f"{where}a mixture takes either samples or weight per part, not both kinds")


def load_yaml(path: str) -> dict[str, Any]:
    return schema.read_yaml_mapping(path, "config file", "expected a mapping of flag names to values")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Flags for every field. Defaults are suppressed so we can tell what the user actually passed."""
    parser = parser or argparse.ArgumentParser(prog="tunefleet train", allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of flag values (CLI flags override it).")
    return schema.add_flags(parser, TrainConfig)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI argv -> TrainConfig (YAML first, then flags). Raises TunefleetError on bad input."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0]
        name = flag.lstrip("-").split("=")[0].replace("-", "_")
        raise TunefleetError(f"unknown flag {flag}{nearest(name, FIELDS)}")
    path = getattr(args, "config", None)
    merged: dict[str, Any] = {k: coerce(k, v, f"{path}: ") for k, v in (load_yaml(path) if path else {}).items()}
    merged.update({k: coerce(k, v) for k, v in vars(args).items() if k != "config"})
    return from_dict(merged)
