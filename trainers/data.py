"""Load a split and hand each method the columns it needs.

Accepted inputs: a hub name, a local folder (one file per split: `train_prefs.jsonl`,
`data/test_sft-00000-of-00001.parquet`, ...), a single JSON/JSONL/Parquet file (split `train`), or the
embedded `tunefleet/tiny-ultrafeedback`. Raw `HuggingFaceH4/ultrafeedback_binarized` rows fail inside TRL,
so every format is converted here, before TRL sees it:

| method   | formats accepted (first match wins)                                                     |
|----------|------------------------------------------------------------------------------------------|
| sft      | messages; prompt + completion; text                                                      |
| dpo/orpo | ultrafeedback (prompt str + chosen/rejected message lists); prompt/chosen/rejected        |
|          | (conversational or text); chosen/rejected with the prompt inside (conversational)         |
| kto      | prompt/completion/label; or any preference format above, unpaired (each pair -> 2 rows)   |
| grpo     | prompt (string -> one user message, so the chat template applies; or a message list)      |
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.trainers.tiny import DATA_DIR, TINY_DATASET

DATA_EXTS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
FORMATS = {
    "sft": ["messages", "prompt + completion", "text"],
    "dpo": [
        "ultrafeedback (prompt, chosen, rejected as message lists)",
        "prompt + chosen + rejected",
        "chosen + rejected (conversational, prompt inside)",
    ],
    "kto": ["prompt + completion + label", "any preference format (unpaired automatically)"],
    "grpo": ["prompt"],
}
FORMATS["orpo"] = FORMATS["dpo"]
SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix in DATA_EXTS


def _local_split_files(root: Path) -> dict[str, list[str]]:
    """Split name -> files, from file names (`test_sft.jsonl`, `train-00000-of-00002.parquet`)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in DATA_EXTS)
    splits: dict[str, list[str]] = {}
    for f in files:
        name = "train" if root.is_file() else SHARD_SUFFIX.sub("", f.stem)
        splits.setdefault(name, []).append(str(f))
    return splits


def load_split(dataset: str, split: str):
    """One split as a `datasets.Dataset`; clear one-line errors for missing paths and splits."""
    import datasets

    datasets.disable_progress_bars()
    local = DATA_DIR if dataset == TINY_DATASET else Path(dataset).expanduser()
    if local.exists():
        splits = _local_split_files(local)
        if not splits:
            raise TunefleetError(f"dataset {dataset}: no {'/'.join(DATA_EXTS)} files found")
        if split not in splits:
            raise TunefleetError(f"dataset {dataset} has no split '{split}'; splits: {', '.join(sorted(splits))}")
        files = splits[split]
        try:
            return datasets.load_dataset(DATA_EXTS[Path(files[0]).suffix], data_files={split: files}, split=split)
        except Exception as exc:  # malformed file: say which
            raise TunefleetError(f"dataset {dataset}: cannot read {files[0]}: {first_line(exc)}") from None
    if _looks_like_path(dataset):
        raise TunefleetError(f"dataset path {dataset} does not exist")
    try:
        return datasets.load_dataset(dataset, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise TunefleetError(f"dataset {dataset}: {first_line(exc)}") from None
        raise TunefleetError(f"cannot load dataset {dataset}: {first_line(exc)}") from None
    except Exception as exc:
        raise TunefleetError(f"cannot load dataset {dataset} (hub name or local path?): {first_line(exc)}") from None


def sample(ds, n: int | None, seed: int, what: str):
    """Seeded random sample of `n` rows; asking for more than there are uses all and says so."""
    if n is None:
        return ds
    if n > len(ds):
        print(f"note: {what} asks for {n} rows but the split has {len(ds)}; using all {len(ds)}", file=sys.stderr)
        return ds
    return ds.shuffle(seed=seed).select(range(n))


# ---------------------------------------------------------------- format detection and conversion
def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def detect_format(method: str, ds) -> str:
    """Name of the format `ds` is in for `method`, or a TunefleetError naming what is missing."""
    cols = set(ds.column_names)
    row = ds[0] if len(ds) else {}
    preference = _preference_format(cols, row)
    if method == "sft":
        if "messages" in cols:
            return "messages"
        if {"prompt", "completion"} <= cols:
            return "prompt-completion"
        if "text" in cols:
            return "text"
        need = "messages"
    elif method in ("dpo", "orpo"):
        if preference:
            return preference
        need = "prompt, chosen, rejected"
    elif method == "kto":
        if {"prompt", "completion", "label"} <= cols:
            return "unpaired"
        if preference:
            return f"paired ({preference})"
        need = "prompt, completion, label"
    elif method == "grpo":
        if "prompt" in cols:
            return "prompt"
        need = "prompt"
    else:
        raise TunefleetError(f"unknown method '{method}'")
    raise TunefleetError(
        f"dataset lacks the columns {method} needs: missing {need}; found {', '.join(sorted(cols)) or 'none'}; "
        f"{method} accepts: {'; '.join(FORMATS[method])}"
    )


def _preference_format(cols: set, row: dict) -> str | None:
    if not {"chosen", "rejected"} <= cols:
        return None
    chosen_conv = _is_messages(row.get("chosen"))
    if "prompt" in cols:
        if isinstance(row.get("prompt"), str) and chosen_conv:
            return "ultrafeedback"
        return "conversational" if chosen_conv else "text"
    return "implicit-prompt" if chosen_conv else "text-implicit-prompt"


def _split_conversation(conv: list[dict]) -> tuple[list[dict], list[dict]]:
    return conv[:-1], conv[-1:]


def _to_preference(ds, fmt: str):
    """Any preference format -> TRL's explicit prompt/chosen/rejected, keeping nothing else."""
    if fmt in ("ultrafeedback", "implicit-prompt"):

        def convert(row):
            prompt, chosen = _split_conversation(row["chosen"])
            _, rejected = _split_conversation(row["rejected"])
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

        return ds.map(convert, remove_columns=ds.column_names)
    keep = ["prompt", "chosen", "rejected"] if "prompt" in ds.column_names else ["chosen", "rejected"]
    return ds.select_columns(keep)


def _unpair(ds):
    """Preference pairs -> KTO rows: (prompt, chosen, True) and (prompt, rejected, False)."""

    def convert(batch):
        out = {"prompt": [], "completion": [], "label": []}
        for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
            out["prompt"] += [p, p]
            out["completion"] += [c, r]
            out["label"] += [True, False]
        return out

    return ds.map(convert, batched=True, remove_columns=ds.column_names)


def to_method_format(method: str, ds):
    """Convert `ds` to the columns TRL's trainer for `method` expects. Returns (dataset, format name)."""
    fmt = detect_format(method, ds)
    if method == "sft":
        cols = {"messages": ["messages"], "prompt-completion": ["prompt", "completion"], "text": ["text"]}[fmt]
        return ds.select_columns(cols), fmt
    if method in ("dpo", "orpo"):
        return _to_preference(ds, fmt), fmt
    if method == "kto":
        if fmt == "unpaired":
            return ds.select_columns(["prompt", "completion", "label"]), fmt
        pairs = _to_preference(ds, _preference_format(set(ds.column_names), ds[0]))
        if "prompt" not in pairs.column_names:
            raise TunefleetError("kto: text preference pairs need a prompt column to be unpaired")
        return _unpair(pairs), fmt
    # grpo: a string prompt becomes one user message so the chat template applies
    ds = ds.select_columns(["prompt"])
    if isinstance(ds[0]["prompt"], str):
        ds = ds.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    return ds, fmt


def problems(method: str, ds, limit: int = 2000) -> list[str]:
    """Row-level problems in the converted data (first `limit` rows): empty text, identical pairs, ..."""
    found = []

    def text(v):
        return " ".join(m.get("content") or "" for m in v) if isinstance(v, list) else (v or "")

    for i, row in enumerate(ds.select(range(min(limit, len(ds))))):
        for col, value in row.items():
            if col != "label" and not text(value).strip():
                found.append(f"row {i}: empty {col}")
        if "chosen" in row and text(row["chosen"]) == text(row["rejected"]):
            found.append(f"row {i}: chosen and rejected are identical")
        if method == "sft" and "messages" in row and row["messages"] and row["messages"][-1]["role"] != "assistant":
            found.append(f"row {i}: conversation does not end with an assistant reply")
        if len(found) >= 20:
            found.append("... (stopping after 20 problems)")
            break
    return found


def load_for_method(method: str, dataset: str, split: str, max_samples: int | None, seed: int, what: str):
    """load -> sample -> convert, with the checks a run needs before it starts."""
    raw = load_split(dataset, split)
    raw = sample(raw, max_samples, seed, what)
    if len(raw) == 0:
        raise TunefleetError(f"dataset {dataset} split '{split}' is empty after sampling")
    converted, _ = to_method_format(method, raw)
    return converted
