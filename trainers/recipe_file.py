"""Recipes as people already have them: TRL's names, the alignment-handbook's mixtures and older libraries' keys,
read into tunefleet's settings with a note for every translation.

Two forms are read. A mapping that names its model `model_name_or_path` is in TRL's form (a `trl dpo` command line,
a TRL or alignment-handbook config file): what it leaves out takes TRL's defaults, so without `use_peft` the whole
model trains, as in TRL. Anything else is tunefleet's own form (`model_name`), whose default stays QLoRA.

    model_name_or_path: Qwen/Qwen2-0.5B-Instruct      # TRL's form
    use_peft: true
    lora_target_modules: [q_proj, v_proj]
    dataset_mixture: {datasets: [{id: HuggingFaceH4/ultrafeedback_binarized, split: train_prefs, weight: 0.5}]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunefleet.common.errors import TunefleetError

# TRL's name -> tunefleet's setting of the same meaning.
TRL_NAMES = {"model_name_or_path": "model_name", "dataset_name": "dataset", "dataset_train_split": "split"}
# Keys of older releases (transformers, TRL, the alignment-handbook), honoured under today's name with a note.
RENAMED = {
    "torch_dtype": ("dtype", "transformers 4.56 renamed it"),
    "evaluation_strategy": ("eval_strategy", "transformers 4.46 renamed it"),
    "gradient_checkpointing_kwargs": ("activation_checkpointing_kwargs", "transformers 5 renamed it"),
    "warmup_ratio": ("warmup_steps", "transformers 5 reads a warmup_steps below 1 as a ratio of the steps"),
    "max_seq_length": ("max_length", "TRL 0.20 renamed it"),
    "overwrite_output_dir": ("overwrite", "transformers 5 removed it; tunefleet's overwrite retrains a finished run"),
    "preprocessing_num_workers": ("dataset_num_proc", "the alignment-handbook's name; TRL's configs call it so"),
    "text_column": ("dataset_text_field", "the alignment-handbook's older name; TRL's SFTConfig calls it so"),
}
# Keys that name something tunefleet cannot do as asked: refused in one line, never dropped.
REFUSED = {
    "dataset_streaming": "tunefleet samples, counts and mixes whole datasets: streaming is not read; remove it",
    "streaming": "tunefleet samples, counts and mixes whole datasets: streaming is not read; remove it",
    "tokenizer_name_or_path": "the tokenizer is loaded from the model's folder; give a chat_template to change "
    "how conversations are rendered, or remove it",
}
ADAPTER_KEYS = ("use_peft", "load_in_4bit", "load_in_8bit", "use_qlora")
FINETUNE_HELP = "qlora: LoRA on a 4-bit base; lora: LoRA on full-precision weights; full: every weight trains"


@dataclass
class Read:
    """A recipe mapping in tunefleet's keys: the values, the form it was written in, and what was translated."""

    values: dict[str, Any]
    form: str  # "trl" or "tunefleet"
    notes: list[str] = field(default_factory=list)


def form_of(values: dict[str, Any]) -> str:
    return "trl" if "model_name_or_path" in values else "tunefleet"


def read(values: dict[str, Any], where: str = "", form: str | None = None) -> Read:
    """Translate one source's keys (a file, or the flags) into tunefleet's. A setting named twice is an error."""
    form = form or form_of(values)
    out: dict[str, Any] = {}
    named: dict[str, str] = {}  # tunefleet key -> the key it was given as
    notes: list[str] = []

    def put(target: str, value: Any, source: str) -> None:
        if target in named and named[target] != source:
            raise TunefleetError(
                f"{where}'{named[target]}' and '{source}' are one setting ({target}): keep one of them"
            )
        named[target] = source
        out[target] = value

    for key, value in values.items():
        if key in REFUSED:
            raise TunefleetError(f"{where}'{key}': {REFUSED[key]}")
        if key in TRL_NAMES:
            put(TRL_NAMES[key], value, key)
        elif key in RENAMED:
            new, why = RENAMED[key]
            put(new, value, key)
            notes.append(f"'{key}' read as '{new}' ({why})")
        elif key in ADAPTER_KEYS or key in ("dataset_test_split",):
            continue  # read below, together
        elif key == "dataset_mixture":
            mixture, extra = handbook_mixture(value, where)
            put("mixture", mixture, key)
            for k, v in extra.items():
                put(k, v, f"dataset_mixture.{k}")
        elif key == "datasets":
            put("mixture", [trl_dataset(d, where) for d in as_list(value, "datasets", where)], key)
        elif key == "dataset_mixer":
            parts, note = old_mixer(value, values.get("dataset_splits"), where)
            put("mixture", parts["mixture"], key)
            for k in ("split", "eval_split"):
                if k in parts:
                    put(k, parts[k], "dataset_splits")
            notes.append(note)
        elif key == "dataset_splits":
            if "dataset_mixer" not in values:
                split, eval_split = old_splits(value, where)
                put("split", split, key)
                if eval_split:
                    put("eval_split", eval_split, key)
                notes.append(
                    f"'dataset_splits' read as split {split}" + (f", eval_split {eval_split}" if eval_split else "")
                )
        else:
            put(key, value, key)

    finetune = adapter_choice(values, form, where)
    if finetune is not None:
        source, choice = finetune
        put("finetune", choice, source)
        if "use_qlora" in values:
            notes.append(f"'use_qlora: {values['use_qlora']}' read as 'finetune: {choice}'")
    if values.get("load_in_8bit"):
        out["load_in_8bit"] = True  # which quantization the adapters train on (TRL's ModelConfig field)

    # TRL's test split is read only when the run evaluates (eval_strategy other than "no"), as in TRL's scripts.
    evaluates = str(out.get("eval_strategy", "no")) != "no"
    test_split = values.get("dataset_test_split")
    if evaluates and "eval_split" not in out and "test_split_size" not in out and (test_split or form == "trl"):
        put("eval_split", test_split or "test", "dataset_test_split")
    elif test_split and not evaluates:
        notes.append(
            f"'dataset_test_split: {test_split}' is evaluated only with eval_strategy steps or epoch (as in TRL): "
            "no evaluation during training"
        )
    if form == "trl":
        notes.insert(0, "read in TRL's form (model_name_or_path): TRL's defaults for what it leaves out")
    return Read(out, form, notes)


def adapter_choice(values: dict[str, Any], form: str, where: str) -> tuple[str, str] | None:
    """(the key it came from, qlora|lora|full) from TRL's use_peft / load_in_4bit / load_in_8bit or the old
    use_qlora; None where nothing asks (tunefleet's form keeps its default)."""
    from tunefleet.common.schema import parse_bool

    def flag(key: str) -> bool | None:
        if key not in values or values[key] is None:
            return None
        try:
            return parse_bool(values[key])
        except ValueError as exc:
            raise TunefleetError(f"{where}bad value for '{key}': {exc}") from None

    use_qlora = flag("use_qlora")
    trl_keys = [k for k in ("use_peft", "load_in_4bit", "load_in_8bit") if k in values]
    if use_qlora is not None and trl_keys:
        raise TunefleetError(f"{where}'use_qlora' and '{trl_keys[0]}' both choose the adapters: keep one of them")
    if use_qlora is not None:
        return "use_qlora", "qlora" if use_qlora else "lora"
    quantized = bool(flag("load_in_4bit") or flag("load_in_8bit"))
    if flag("load_in_4bit") and flag("load_in_8bit"):
        raise TunefleetError(f"{where}'load_in_4bit' and 'load_in_8bit' both set: choose one")
    use_peft = flag("use_peft")
    if use_peft is None and trl_keys:
        use_peft = form != "trl" or quantized
    if use_peft is None:
        return None  # TRL's form without use_peft: full fine-tuning, chosen once every source is read (config.build)
    if quantized and not use_peft:
        raise TunefleetError(
            f"{where}'{trl_keys[-1]}' quantizes the base, whose weights then cannot train: add 'use_peft: true' "
            "(LoRA on the quantized base) or remove it (full fine-tuning)"
        )
    return trl_keys[0] if trl_keys else "use_peft", "qlora" if quantized else ("lora" if use_peft else "full")


def as_list(value: Any, key: str, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise TunefleetError(f"{where}'{key}' must be a non-empty list of datasets")
    return value


def handbook_mixture(value: Any, where: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The alignment-handbook's `dataset_mixture` ({datasets: [{id, config, split, columns, weight}],
    test_split_size, seed}) -> mixture parts and the settings beside them. Its `weight` is the share of that
    dataset's own rows taken (tunefleet's `portion`)."""
    if not isinstance(value, dict):
        raise TunefleetError(f"{where}'dataset_mixture' must be a mapping with 'datasets:' (a list)")
    known = {"datasets", "test_split_size", "seed"}
    for key in value:
        if key not in known:
            raise TunefleetError(
                f"{where}unknown key 'dataset_mixture.{key}'; the mixture takes: {', '.join(sorted(known))}"
            )
    parts = []
    for item in as_list(value.get("datasets"), "dataset_mixture.datasets", where):
        if not isinstance(item, dict) or "id" not in item:
            raise TunefleetError(f"{where}every 'dataset_mixture.datasets' entry needs an 'id': got {item!r}")
        unknown = set(item) - {"id", "config", "split", "columns", "weight"}
        if unknown:
            raise TunefleetError(
                f"{where}unknown key '{sorted(unknown)[0]}' in dataset_mixture.datasets "
                "(id, config, split, columns, weight)"
            )
        part: dict[str, Any] = {"dataset": item["id"]}
        for src, dst in (("config", "config"), ("split", "split"), ("columns", "select_columns")):
            if item.get(src) is not None:
                part[dst] = item[src]
        if item.get("weight") is not None and float(item["weight"]) != 1.0:
            part["portion"] = item["weight"]
        parts.append(part)
    extra = {}
    if value.get("test_split_size") is not None:
        extra["test_split_size"] = value["test_split_size"]
    if value.get("seed") is not None:
        extra["mixture_seed"] = value["seed"]
    return parts, extra


def trl_dataset(item: Any, where: str) -> dict[str, Any]:
    """One entry of TRL's `datasets:` (DatasetMixtureConfig: path, name, data_files, split, columns, fraction)."""
    if not isinstance(item, dict) or "path" not in item:
        raise TunefleetError(f"{where}every 'datasets' entry needs a 'path': got {item!r}")
    unknown = set(item) - {"path", "name", "data_files", "split", "columns", "fraction"}
    if unknown:
        key = sorted(unknown)[0]
        why = " (give the files under data_files)" if key == "data_dir" else ""
        raise TunefleetError(f"{where}'datasets' entry key '{key}' is not read{why}")
    part: dict[str, Any] = {"dataset": item["path"]}
    for src, dst in (("name", "config"), ("split", "split"), ("columns", "select_columns"), ("fraction", "weight")):
        if item.get(src) is not None:
            part[dst] = item[src]
    files = item.get("data_files")
    if isinstance(files, dict):
        raise TunefleetError(f"{where}'data_files' of a 'datasets' entry: give a file or a list of files")
    if files is not None:
        part["data_files"] = [files] if isinstance(files, str) else files
    return part


def old_splits(value: Any, where: str) -> tuple[str, str | None]:
    """The handbook's old `dataset_splits: [train_x, test_x]`: the split with "train" trains, the "test" one evaluates."""
    splits = value if isinstance(value, list) else [value]
    train = [s for s in splits if "train" in str(s)]
    test = [s for s in splits if "test" in str(s)]
    if len(train) != 1 or len(test) > 1 or len(train) + len(test) != len(splits):
        raise TunefleetError(
            f"{where}'dataset_splits' needs one split named *train* and at most one named *test*, got {splits}"
        )
    return str(train[0]), str(test[0]) if test else None


def old_mixer(value: Any, splits: Any, where: str) -> tuple[dict[str, Any], str]:
    """The handbook's old `dataset_mixer: {name: fraction}` (+ `dataset_splits`) -> mixture parts."""
    if not isinstance(value, dict) or not value:
        raise TunefleetError(f"{where}'dataset_mixer' must map dataset names to the share of rows taken")
    split, eval_split = old_splits(splits, where) if splits is not None else ("train", "test")
    parts = []
    for name, fraction in value.items():
        part: dict[str, Any] = {"dataset": str(name), "split": split}
        if float(fraction) != 1.0:
            part["portion"] = fraction
        parts.append(part)
    out: dict[str, Any] = {"mixture": parts}
    if eval_split:
        out["eval_split"] = eval_split
    note = "'dataset_mixer' read as a mixture (today's key: dataset_mixture)"
    if len(parts) > 1 and eval_split:
        note += f"; evaluation uses the first dataset's {eval_split} split"
    return out, note
