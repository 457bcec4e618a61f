"""One typed config for a run: CLI flags, `--config run.yaml` files and sweep overrides all land here.

Flag names and defaults are those of the original single-script tool, plus what TRL users expect.
Precedence: field default < method default (learning rate, beta) < YAML file < CLI flag.

    tunefleet train --config run.yaml --seed 3      # YAML gives defaults, the flag overrides

Why one module of this size: TrainConfig's fields are the one schema of flags, YAML and specs; reading TRL's form
and coercing values belong beside them.
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
from tunefleet.trainers import recipe_file, trl_fields

METHODS = ("sft", "dpo", "orpo", "kto", "grpo", "rm")
# The original tool's per-method learning rates (tuned for ~0.5B models).
DEFAULT_LR = {"sft": 2e-4, "dpo": 5e-5, "orpo": 8e-6, "kto": 5e-5, "grpo": 5e-5, "rm": 1e-4}
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "kto": 0.1, "grpo": 0.0}


def trl_fields_mapping(value: Any) -> dict[str, Any]:
    """`trl_args` as a run record holds it: every key a TRL field, every value of its type."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of TRL options, got {value!r}")
    mapping = cast(dict[str, Any], value)
    return {str(k): trl_fields.coerce(str(k), v, "trl_args: ") for k, v in mapping.items()}


def trackers_text(value: Any) -> str:
    """`report_to` as TRL's list (`[tensorboard, wandb]`) or tunefleet's comma-separated text -> the text."""
    if isinstance(value, list | tuple):
        return ",".join(str(x) for x in cast(list[Any], value))
    return str(value)


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
    weight: float | None = option(
        None, "Share of the weighted parts (relative; rows drawn without repeats; TRL's `fraction`).", above=0
    )
    portion: float | None = option(
        None,
        "Share of this part's own rows taken, in (0, 1] (a seeded sample; the alignment-handbook's `weight`).",
        above=0,
        at_most=1,
    )
    select_columns: list[str] | None = option(
        None, "Read only these columns of this part; the others are left out on purpose (TRL's `columns`)."
    )

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
    finetune: str = option("qlora", recipe_file.FINETUNE_HELP + ".", choices=("qlora", "lora", "full"))
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
    test_split_size: float | None = option(
        None,
        "Hold out this share of the training rows as the evaluation set (the alignment-handbook's "
        "dataset_mixture.test_split_size; evaluated each eval_steps).",
        above=0,
        below=1,
    )
    mixture_seed: int | None = option(None, "Seed of the mixture's sampling and shuffle (default: --seed).")
    # --- what TRL users expect ---
    dtype: str | None = option(
        None,
        "dtype the base model's weights load in: auto (the checkpoint's), bfloat16, float16, float32. Default: "
        "bf16 where the GPU has it, else float32.",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    chat_template: str | None = option(
        None,
        "Jinja chat template (the text, or a .jinja file) the run trains with; saved with the run's tokenizer and "
        "used by its evaluation.",
    )
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
        "Trackers: none, or any of tensorboard, mlflow, wandb (comma separated or a list; pip install "
        "'tunefleet[NAME]').",
        parse=trackers_text,
        nargs="+",
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
    num_nodes: int = option(
        1,
        "Nodes this run spans (--backend ray or slurm): one gang, all its nodes reserved together, each node's "
        "processes started by accelerate launch; runs_dir must be a folder every node sees, or a bucket.",
        at_least=1,
    )
    processes_per_node: int | None = option(
        None,
        "Processes on each node of a multi-node run. Default: one per GPU of the node's share "
        "(resources.gpus_per_run), one on CPU.",
        at_least=1,
    )
    rendezvous_timeout: int = option(
        600,
        "Seconds a multi-node run's processes have to meet (the torch rendezvous) before the run ends, naming the "
        "nodes that did not join.",
        at_least=1,
    )
    accelerate_config: str = option("auto", "auto, a name in cluster_configs/accelerate, or a path.")
    recipe: str | None = option(
        None,
        "A recipe file (TRL's, the alignment-handbook's or tunefleet's form) the run starts from: every other setting "
        "given overrides the recipe's; run.json records its path and sha256.",
    )
    recipe_sha256: str | None = option(None, "The recipe file's sha256 when the run was planned.", internal=True)
    # --- TRL's own options: every other field of the method's TRL config, of ModelConfig and ScriptArguments
    trl_args: dict[str, Any] = option(
        {},
        "TRL options with no tunefleet setting of their own (lr_scheduler_type, warmup_steps, optim, "
        "lora_target_modules, ...), checked against TRL's dataclasses: give each as its own key or --flag.",
        parse=trl_fields_mapping,
        internal=True,
    )
    config_form: str = option(
        "tunefleet", "How the settings were written: tunefleet's form or TRL's (model_name_or_path).", internal=True
    )
    config_notes: list[str] = option([], "What was translated from TRL's or older names.", internal=True)

    @property
    def use_qlora(self) -> bool:
        """LoRA on a quantized base (the original tool's flag, kept as a name for finetune: qlora)."""
        return self.finetune == "qlora"

    @property
    def adapters(self) -> bool:
        """Only LoRA adapters train (qlora, lora); false for full fine-tuning."""
        return self.finetune != "full"

    @property
    def evaluates(self) -> bool:
        """Evaluated during training: on a split of its own, or on rows held out of the training data."""
        return self.eval_split is not None or self.test_split_size is not None

    @property
    def node_processes(self) -> int:
        """Processes on each node this run spans (one node: num_processes)."""
        return (self.processes_per_node or 1) if self.num_nodes > 1 else self.num_processes

    @property
    def world_size(self) -> int:
        """Processes over every node of the run."""
        return self.num_nodes * self.node_processes

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


# Keys that describe datasets in TRL's or the alignment-handbook's form (read by recipe_file).
DATASET_FORMS = ("dataset_mixture", "datasets", "dataset_mixer", "dataset_splits", "dataset_test_split")
# TRL fields tunefleet sets itself (the run's folder, its name in trackers): a TRL default never replaces them.
NOT_FROM_TRL_DEFAULTS = ("output_dir", "run_name")


def coerce(name: str, value: Any, where: str = "") -> Any:
    """Check and convert one value of a train setting (tunefleet's own, TRL's name for one, an older key, or a field of
    TRL's configs); one-line error naming the key, with the nearest known name for a typo."""
    if name in FIELDS and not FIELDS[name].metadata.get("internal"):
        return schema.coerce(TrainConfig, name, value, where)
    if name in recipe_file.TRL_NAMES:
        return schema.coerce(TrainConfig, recipe_file.TRL_NAMES[name], value, where, label=name)
    if name in recipe_file.RENAMED:
        return coerce(recipe_file.RENAMED[name][0], value, where)
    if name in recipe_file.REFUSED or name in recipe_file.ADAPTER_KEYS or name in DATASET_FORMS:
        recipe_file.read({name: value}, where)  # refuses, or checks the shape of, what it reads
        return value
    if name in FIELDS:  # trl_args, config_form, ...: written by tunefleet into run records
        return schema.coerce(TrainConfig, name, value, where)
    if trl_fields.lookup(name) is not None:
        return trl_fields.coerce(name, value, where)
    raise TunefleetError(f"{where}unknown key '{name}'{nearest(name, known_names())}")


def value_type(name: str) -> Any:
    """The Python type a setting holds (int, float, bool, str, list, ...): a search's distributions ask it."""
    name = recipe_file.TRL_NAMES.get(name) or recipe_file.RENAMED.get(name, (name,))[0]
    if name in FIELDS:
        return schema.kind(TrainConfig, name)[0]
    f = trl_fields.lookup(name)
    if f is None:
        return object
    scalar = {"int": int, "float": float, "bool": bool, "str": str, "choice": str, "list": list, "dict": dict}
    return scalar.get(f.forms[0], object)


def known_names() -> list[str]:
    """Every key a run takes: tunefleet's settings, TRL's names for them, older keys, and TRL's fields."""
    own = [n for n, f in FIELDS.items() if not f.metadata.get("internal")]
    aliases = [*recipe_file.TRL_NAMES, *recipe_file.RENAMED, *recipe_file.ADAPTER_KEYS, *DATASET_FORMS]
    return [*own, *aliases, *trl_fields.names()]


def from_dict(values: dict[str, Any], where: str = "", check_required: bool = True) -> TrainConfig:
    """Build a TrainConfig from plain values (YAML, sweep, a run record), checking every key and type. Keys may be
    tunefleet's, TRL's (`model_name_or_path`, `lr_scheduler_type`, ...) or an older library's (with a note); a
    `recipe` file gives the values these leave out."""
    own = recipe_file.read(values, where, form=values.get("config_form"))
    return build(with_recipe(own, values, where), where, check_required)


def recipe_model(path: str) -> str | None:
    """The base model a recipe file names (`model_name_or_path` or `model_name`), for run names before planning."""
    raw = schema.read_yaml_mapping(str(path), "recipe", "expected a mapping of settings")
    return raw.get("model_name_or_path") or raw.get("model_name")


def with_recipe(own: recipe_file.Read, given: dict[str, Any], where: str = "") -> recipe_file.Read:
    """`own` over the recipe file it names (if any): the recipe's values where `own` leaves a setting out, its form
    where `own` does not name its model in TRL's way, and a note with the file's path and sha256."""
    path = own.values.get("recipe")
    if not path:
        return own
    import hashlib

    where_in = f"{path}: "
    raw = schema.read_yaml_mapping(str(path), "recipe", "expected a mapping of settings")
    if "recipe" in raw:
        raise TunefleetError(f"{where_in}a recipe names another recipe ('recipe: {raw['recipe']}'): give one file")
    form = given.get("config_form") or ("trl" if own.form == "trl" else recipe_file.form_of(raw))
    base = recipe_file.read(raw, where_in, form)
    base.values = {k: coerce(k, v, where_in) for k, v in base.values.items()}  # errors name the recipe file
    digest = own.values.get("recipe_sha256") or hashlib.sha256(Path(path).read_bytes()).hexdigest()
    values = {**{k: v for k, v in base.values.items() if k not in own.values}, **own.values, "recipe_sha256": digest}
    notes = [f"recipe {path} (sha256 {digest[:12]}), in {base.form}'s form", *base.notes]
    notes += [n for n in own.notes if n not in notes]
    return recipe_file.Read(values, form, notes)


def build(read: recipe_file.Read, where: str = "", check_required: bool = True) -> TrainConfig:
    """A TrainConfig from settings already in tunefleet's keys: TRL fields go to `trl_args`; TRL's form takes TRL's
    defaults for what it leaves out."""
    own: dict[str, Any] = {}
    recorded: dict[str, Any] = read.values.get("trl_args") or {}  # a run record's TRL options
    trl: dict[str, Any] = {k: trl_fields.coerce(k, v, where) for k, v in recorded.items()}
    for key, value in read.values.items():
        if key in ("trl_args", "config_form", "config_notes"):
            continue
        if key in FIELDS:
            own[key] = coerce(key, value, where)
        else:
            trl[key] = coerce(key, value, where)  # a TRL field (anything else is refused here, nearest name given)
    notes = list(read.values.get("config_notes") or [])
    notes += [n for n in read.notes if n not in notes]
    method = own.get("method")
    if read.form == "trl" and method in METHODS:
        for name, value in trl_defaults(method, given=set(own)).items():
            own[name] = value
        if "finetune" not in read.values:
            own["finetune"] = "full"
            note = "no use_peft: full fine-tuning (TRL's default)"
            notes += [note] if note not in notes else []
    cfg = TrainConfig(**own, trl_args=trl, config_form=read.form, config_notes=notes)
    if check_required:
        needed = [n for n, f in FIELDS.items() if f.metadata.get("required") or (n == "dataset" and not cfg.mixture)]
        missing = [n for n in needed if getattr(cfg, n) is None]
        if missing:
            raise TunefleetError(f"{where}missing required setting(s): " + ", ".join(f"--{m}" for m in missing))
    validate(cfg, where)
    return cfg


def trl_defaults(method: str, given: set[str]) -> dict[str, Any]:
    """TRL's defaults for tunefleet settings of the same name that a recipe in TRL's form left out."""
    out: dict[str, Any] = {}
    for name, f in trl_fields.fields_of(method).items():
        default = f.default_for(method)
        if name in FIELDS and name not in given and name not in NOT_FROM_TRL_DEFAULTS and default is not None:
            out[name] = schema.coerce(TrainConfig, name, default)
    return out


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
    if cfg.loss_type and cfg.method in ("orpo", "rm"):
        raise TunefleetError(
            f"{where}--loss_type: {cfg.method} has one loss (SFT, DPO, KTO and GRPO take --loss_type)"
        )
    if cfg.method in ("grpo", "kto") and cfg.loss_type and len(cfg.loss_type) > 1:
        raise TunefleetError(f"{where}{cfg.method} takes one --loss_type, got {', '.join(cfg.loss_type)}")
    grpo_only = [
        *(["num_generations"] if cfg.num_generations != FIELDS["num_generations"].default else []),
        "temperature",
        "reward_weights",
        "scale_rewards",
        "mask_truncated_completions",
        "use_vllm",
    ]
    if cfg.max_prompt_length and cfg.method != "grpo":
        raise TunefleetError(
            f"{where}'max_prompt_length': TRL 1.16's {trl_fields.METHOD_CLASSES[cfg.method][1]} no longer cuts prompts "
            "on their own (max_length caps prompt and completion together): remove it (tunefleet reads it for GRPO)"
        )
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
    if cfg.test_split_size and cfg.eval_split:
        raise TunefleetError(
            f"{where}test_split_size holds out training rows for evaluation; eval_split names a split: give one"
        )
    if cfg.num_nodes > 1 and cfg.num_processes > 1 and cfg.num_processes != cfg.world_size:
        raise TunefleetError(
            f"{where}num_processes {cfg.num_processes} with num_nodes {cfg.num_nodes}: a multi-node run counts its "
            "processes per node: set processes_per_node (and leave num_processes out)"
        )
    if cfg.processes_per_node and cfg.num_nodes == 1 and cfg.processes_per_node != cfg.num_processes:
        raise TunefleetError(
            f"{where}processes_per_node {cfg.processes_per_node} is for a run over several nodes (num_nodes > 1); "
            "on one node use num_processes"
        )
    if cfg.method in METHODS:
        check_trl_args(cfg, where)


def check_trl_args(cfg: TrainConfig, where: str = "") -> None:
    """Every TRL option of the run belongs to its method's config, ModelConfig or ScriptArguments."""
    for name in cfg.trl_args:
        f = trl_fields.lookup(name)
        if f is not None and not f.shared and cfg.method not in f.methods:
            owners = ", ".join(f"{cls} ({m})" for cls, m in zip(f.owners, f.methods))
            raise TunefleetError(
                f"{where}'{name}' is an option of {owners}, not of {cfg.method}'s "
                f"{trl_fields.METHOD_CLASSES[cfg.method][1]}: set it for that method only (methods.<method> in a sweep)"
            )


def load_yaml(path: str) -> dict[str, Any]:
    return schema.read_yaml_mapping(path, "config file", "expected a mapping of flag names to values")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """tunefleet's own flags. Defaults are suppressed so we can tell what the user actually passed; TRL's fields are
    read from what is left over (`extra_flags`), each checked against TRL's dataclasses."""
    parser = parser or argparse.ArgumentParser(
        prog="tunefleet train",
        allow_abbrev=False,
        epilog="Every field of TRL's config for the method, of ModelConfig and of ScriptArguments is a flag too "
        "(--lr_scheduler_type cosine --warmup_steps 0.1 --lora_target_modules q_proj v_proj ...): "
        "--help-all lists them with their types, defaults and TRL's help.",
    )
    parser.add_argument("--config", help="YAML file of settings, in tunefleet's form or TRL's (flags override it).")
    parser.add_argument(
        "--help-all", action="store_true", help="List every TRL option of --method (or of every method) and exit."
    )
    return schema.add_flags(parser, TrainConfig)


def extra_flags(tokens: list[str]) -> dict[str, Any]:
    """`--name value [value ...]` pairs argparse did not know (TRL's fields, TRL's names): a flag alone is true, one
    value a scalar, several a list; `--name=value` works too."""
    out: dict[str, list[str]] = {}
    key = None
    for token in tokens:
        if token.startswith("--") and len(token) > 2:
            name, has_value, value = token[2:].partition("=")
            key = name.replace("-", "_")
            out[key] = [value] if has_value else []
        elif key is None:
            raise TunefleetError(f"unexpected argument {token!r}: settings are --name value")
        else:
            out[key].append(token)
    return {k: True if not v else v[0] if len(v) == 1 else v for k, v in out.items()}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI argv -> TrainConfig (YAML first, then flags). Raises TunefleetError on bad input."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "help_all")}
    flags.update(extra_flags(unknown))
    if args.help_all:
        print(help_all(flags.get("method")))
        raise SystemExit(0)
    path = getattr(args, "config", None)
    file_values = load_yaml(path) if path else {}
    form = "trl" if "model_name_or_path" in file_values or "model_name_or_path" in flags else "tunefleet"
    from_file = recipe_file.read(file_values, f"{path}: ", form)
    from_flags = recipe_file.read(flags, "", form)
    for source, where in ((from_file, f"{path}: "), (from_flags, "")):
        source.values = {k: coerce(k, v, where) for k, v in source.values.items()}  # errors name the file
    for key in list(from_file.values):
        # A flag overrides the file's value of the same setting, whatever name either gave it.
        if key in from_flags.values:
            del from_file.values[key]
    notes = from_file.notes + [n for n in from_flags.notes if n not in from_file.notes]
    merged = recipe_file.Read({**from_file.values, **from_flags.values}, form, notes)
    return build(with_recipe(merged, {**file_values, **flags}))


def help_all(method: str | None) -> str:
    """Every TRL option a run takes (of `method`, or of every method), with its type, default and TRL's help."""
    if method is not None:
        coerce("method", method)
    rows = trl_fields.fields_of(method) if method else trl_fields.table()
    lines = [
        f"TRL {trl_fields.versions().split('-')[0]} options"
        + (f" of {method} ({trl_fields.METHOD_CLASSES[method][1]}, ModelConfig, ScriptArguments)" if method else ""),
        "Set any as --name VALUE, a key of a --config file or of a sweep spec. Where tunefleet has a setting of the "
        "same name (marked *), it is that setting.",
        "",
    ]
    for name, f in sorted(rows.items()):
        mark = "*" if name in FIELDS else " "
        where = "" if method else f"  [{', '.join(f.methods) or 'all methods'}]"
        default = f.default_for(method) if method else f.default
        lines.append(f"{mark} --{name}  ({f.describe_type()}; default {default!r}){where}")
        if f.help:
            lines.append(f"      {f.help}")
    return "\n".join(lines)
