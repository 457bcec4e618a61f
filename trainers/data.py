"""Datasets as people have them -> the columns each TRL trainer expects; nothing dropped silently.

Loading: a hub name (with `--dataset_config` and `--data_files`), a local folder (one file per split:
`train_prefs.jsonl`, `data/test_sft-00000-of-00001.parquet`, ...), a single JSON/JSONL/Parquet/CSV file (split
`train`), or the embedded `tunefleet/tiny-ultrafeedback`. A broken JSON line is named with its file and line.

Layouts recognised (first match wins; `--columns prompt=query,...` renames yours to these names first):

| layout | columns | sft | dpo/orpo | kto | grpo |
|---|---|---|---|---|---|
| conversation | `messages` or `conversations`: role/content or ShareGPT from/value | yes | prompt turns (+ `chosen`/`rejected` replies) | + `label` | prompt = turns up to the last user turn |
| ultrafeedback | `chosen`/`rejected` full conversations (`prompt` inside them) | (`messages`) | yes | paired | - |
| alpaca | `instruction` (+ `input`, `history`) + `output` or `chosen`/`rejected` | yes | yes | + `label` | prompt |
| prompt strings | `prompt`, `question` or `input` + `chosen`/`rejected` or `completion` | prompt + completion | yes | + `label` | prompt |
| hh transcript | `chosen`/`rejected` strings with `Human:` / `Assistant:` turns | - | yes | paired | - |
| text | `text`; or `chosen`/`rejected` plain strings (TRL extracts the prompt) | yes | yes | - | - |

A `system` column becomes the system turn. KTO labels may be bool, 0/1 or "true"/"false". A preference layout
serves KTO too (each pair -> one desirable and one undesirable row). GRPO keeps every other column: TRL passes
them to the reward functions.

No silent drops: a text column (strings with spaces, or conversations) that the layout does not use is an error
naming it, unless its text is already inside the used columns (ultrafeedback's `prompt`), it is an identifier
(`prompt_id`), or you leave it out on purpose with `--ignore_columns`. Rows with an empty reply, identical
chosen and rejected, a missing turn, or chosen and rejected answering different prompts are dropped, counted,
printed and recorded in run.json.

Why one module of this size: detecting a layout, mapping its columns, mixing datasets and recording what was used
and dropped are one pipeline over shared helpers (loading, sampling, the record); split by layout, the parts would
import each other in a circle.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.trainers.config import DatasetPart
from tunefleet.trainers.tiny import DATA_DIR, TINY_DATASET

if TYPE_CHECKING:  # imported when used: datasets is slow to import
    from datasets import Dataset

    from tunefleet.trainers.config import TrainConfig

DATA_EXTS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")
CONVERSATION_COLUMNS = ("messages", "conversations")
PROMPT_COLUMNS = ("prompt", "question", "instruction", "input")
# The names --columns may map to: every column some layout reads.
KNOWN_COLUMNS = (
    *CONVERSATION_COLUMNS,
    *PROMPT_COLUMNS,
    "system",
    "history",
    "chosen",
    "rejected",
    "completion",
    "output",
    "label",
    "text",
)
ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
}
ID_NAME = re.compile(r"^(id|uid|uuid|idx|index)$|_(id|ids|uuid|idx|hash)$")
ACCEPTED = {
    "sft": "messages/conversations; instruction + output (alpaca); prompt + completion; text",
    "dpo": "chosen + rejected with the prompt inside (conversations or Human:/Assistant: text); "
    "prompt, question, instruction or input (or messages/conversations) + chosen + rejected",
    "kto": "prompt (question, instruction, input) + completion (output) + label; conversations + label; "
    "any preference layout",
    "grpo": "prompt; question; instruction (+ input); messages/conversations",
}
ACCEPTED["orpo"] = ACCEPTED["rm"] = ACCEPTED["dpo"]
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


# ---------------------------------------------------------------- loading
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


def check_files(dataset: str, files: list[str]) -> None:
    """One line for the usual file faults, before `datasets` turns them into a generic error."""
    for name in files:
        path = Path(name)
        if path.suffix not in (".jsonl", ".json", ".csv"):
            continue
        text = path.read_text(errors="replace")
        if not text.strip():
            raise TunefleetError(f"dataset {dataset}: {path} is empty")
        if path.suffix == ".csv":
            continue
        if path.suffix == ".json" and text.lstrip()[:1] in "[{":
            try:
                json.loads(text)
                continue
            except json.JSONDecodeError as exc:
                if text.lstrip()[:1] == "[":
                    raise TunefleetError(
                        f"dataset {dataset}: {path} line {exc.lineno}: not valid JSON ({exc.msg})"
                    ) from None
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TunefleetError(
                        f"dataset {dataset}: {path} line {number}: not valid JSON ({exc.msg}, column {exc.colno})"
                    ) from None


def load_split(dataset: str, split: str, config: str | None = None, data_files: list[str] | None = None):
    """One split as a `datasets.Dataset`; clear one-line errors for missing paths, splits and broken files."""
    import datasets

    datasets.disable_progress_bars()
    local = DATA_DIR if dataset == TINY_DATASET else Path(dataset).expanduser()
    if local.exists() and not config and not data_files:
        splits = _local_split_files(local)
        if not splits:
            raise TunefleetError(f"dataset {dataset}: no {'/'.join(DATA_EXTS)} files found")
        if split not in splits:
            raise TunefleetError(f"dataset {dataset} has no split '{split}'; splits: {', '.join(sorted(splits))}")
        files = splits[split]
        check_files(dataset, files)
        try:
            ds = datasets.load_dataset(DATA_EXTS[Path(files[0]).suffix], data_files={split: files}, split=split)
        except Exception as exc:  # malformed file: say which
            raise TunefleetError(f"dataset {dataset}: cannot read {files[0]}: {first_line(exc)}") from None
    else:
        if _looks_like_path(dataset) and not local.exists():
            raise TunefleetError(f"dataset path {dataset} does not exist")
        if local.exists() and data_files:
            check_files(dataset, [str(local / f) for f in data_files if (local / f).is_file()])
        ds = _load_hub(dataset, split, config, data_files)
    if len(ds) == 0:
        raise TunefleetError(f"dataset {dataset} split '{split}' is empty")
    return ds


def _load_hub(dataset: str, split: str, config: str | None, data_files: list[str] | None):
    """The real `datasets.load_dataset` call for hub names and folders with a dataset card (configs, files)."""
    import datasets

    files = {split: data_files} if data_files else None
    try:
        return datasets.load_dataset(dataset, config, data_files=files, split=split)
    except ValueError as exc:
        text = str(exc)
        if "config" in text.lower() and config:
            raise TunefleetError(f"dataset {dataset} has no config '{config}': {first_line(exc)}") from None
        if "split" in text.lower():
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


# ---------------------------------------------------------------- messages
def is_messages(value) -> bool:
    """A conversation: a non-empty list of role/content (or ShareGPT from/value) dicts."""
    return isinstance(value, list) and bool(value) and all(_is_message(m) for m in value)


def _is_message(value) -> bool:
    return isinstance(value, dict) and (
        ("role" in value and "content" in value) or ("from" in value and "value" in value)
    )


def to_message(m: dict) -> dict:
    role = str(m.get("role", m.get("from", ""))).lower()
    if role not in ROLES:
        raise TunefleetError(f"unknown role '{role}' in a conversation; known roles: {', '.join(sorted(ROLES))}")
    content = m.get("content", m.get("value"))
    return {"role": ROLES[role], "content": "" if content is None else str(content)}


def to_messages(value) -> list[dict]:
    return [to_message(m) for m in value]


def text_of(value) -> str:
    """The words of a cell: a string, a message's content, or every content of a conversation."""
    if isinstance(value, str):
        return value
    if _is_message(value):
        return str(value.get("content", value.get("value")) or "")
    if isinstance(value, list):
        return "\n".join(text_of(v) for v in value)
    return ""


def _as(role: str, value) -> list[dict]:
    """A cell as turns: a conversation, one message, or a string said by `role`."""
    if is_messages(value):
        return to_messages(value)
    if _is_message(value):
        return [to_message(value)]
    return [{"role": role, "content": "" if value is None else str(value)}]


def _system(row: dict) -> list[dict]:
    text = row.get("system")
    return [{"role": "system", "content": str(text)}] if isinstance(text, str) and text.strip() else []


def _with_system(row: dict, turns: list[dict]) -> list[dict]:
    return turns if turns and turns[0]["role"] == "system" else _system(row) + turns


def _history(row: dict) -> list[dict]:
    """Alpaca `history`: [[question, answer], ...] before the instruction."""
    turns = []
    for pair in row.get("history") or []:
        if isinstance(pair, list | tuple) and len(pair) == 2:
            turns += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
    return turns


def _alpaca_prompt(row: dict) -> str:
    instruction, extra = str(row.get("instruction") or ""), str(row.get("input") or "")
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _until_last_user(turns: list[dict]) -> list[dict]:
    last = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=-1)
    return turns[: last + 1]


def hh_to_messages(text: str) -> list[dict]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` (Anthropic HH transcripts) -> turns."""
    parts = HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return turns


def normalize_label(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "desirable", "good"):
        return True
    if text in ("false", "0", "no", "undesirable", "bad"):
        return False
    raise TunefleetError(f"label {value!r} is not a KTO label: use true/false, 1/0 or a bool")


# ---------------------------------------------------------------- layouts
@dataclass
class Layout:
    """How one dataset's rows become the method's columns."""

    name: str
    used: tuple[str, ...]  # the source columns it reads
    convert: Callable[[dict], dict]  # one source row -> the method's columns
    keep_other_columns: bool = False  # GRPO: other columns go to the reward functions


def _first(cols: set, names) -> str | None:
    return next((n for n in names if n in cols), None)


def _conversation_column(cols: set, row: dict) -> str | None:
    return next((c for c in CONVERSATION_COLUMNS if c in cols and is_messages(row.get(c))), None)


def _with_optional(cols: set, *names: str) -> tuple[str, ...]:
    return tuple(n for n in names if n in cols)


def _prompt_source(cols: set, row: dict, conversation_first: bool = True):
    """(layout name, columns, row -> prompt turns) for the first prompt source a row has, or None."""
    conv = _conversation_column(cols, row)
    if conv and (conversation_first or not _first(cols, ("prompt", "question", "instruction"))):
        return conv, (conv, *_with_optional(cols, "system")), lambda r: _with_system(r, to_messages(r[conv]))
    if "instruction" in cols:
        used = ("instruction", *_with_optional(cols, "input", "history", "system"))
        return "alpaca", used, lambda r: _system(r) + _history(r) + [{"role": "user", "content": _alpaca_prompt(r)}]
    name = _first(cols, ("prompt", "question", "input"))
    if name:
        return name, (name, *_with_optional(cols, "system")), lambda r: _with_system(r, _as("user", r[name]))
    return None


def _no_layout(method: str, cols: set) -> TunefleetError:
    found = ", ".join(sorted(cols)) or "none"
    return TunefleetError(
        f"no {method} layout fits the columns {found}; {method} accepts: {ACCEPTED[method]}. "
        "Map yours with --columns, e.g. --columns prompt=query,chosen=good,rejected=bad"
    )


def sft_layout(cols: set, row: dict) -> Layout:
    conv = _conversation_column(cols, row)
    if conv:
        kind = "sharegpt" if "from" in row[conv][0] else "messages"
        return Layout(
            f"{kind} ({conv})",
            (conv, *_with_optional(cols, "system")),
            lambda r: {"messages": _with_system(r, to_messages(r[conv]))},
        )
    if {"instruction", "output"} <= cols:
        source = _prompt_source(cols - set(CONVERSATION_COLUMNS), row)
        assert source is not None  # "instruction" is one of the columns: Alpaca's own prompt source
        return Layout(
            "alpaca", (*source[1], "output"), lambda r: {"messages": source[2](r) + _as("assistant", r["output"])}
        )
    if "completion" in cols and _first(cols, ("prompt", "question", "instruction", "input")):
        found = _prompt_source(cols - set(CONVERSATION_COLUMNS), row)
        assert found is not None  # one of prompt, question, instruction, input is a column (checked above)
        _, used, prompt_turns = found
        plain = used == ("prompt",) and isinstance(row["prompt"], str) and isinstance(row["completion"], str)
        if plain:  # TRL's own prompt-completion strings: passed through, as TRL users expect
            return Layout(
                "prompt-completion",
                ("prompt", "completion"),
                lambda r: {"prompt": r["prompt"], "completion": r["completion"]},
            )
        return Layout(
            f"prompt-completion ({'+'.join(used)})",
            (*used, "completion"),
            lambda r: {"prompt": prompt_turns(r), "completion": _as("assistant", r["completion"])},
        )
    if "text" in cols:
        return Layout("text", ("text",), lambda r: {"text": r["text"]})
    raise _no_layout("sft", cols)


def preference_layout(method: str, cols: set, row: dict) -> Layout:
    if not {"chosen", "rejected"} <= cols:
        raise _no_layout(method, cols)
    chosen = row["chosen"]
    if is_messages(chosen) and to_message(chosen[0])["role"] in ("user", "system"):
        # full conversations: the prompt is every turn before the last (ultrafeedback, HH as messages)
        name = "ultrafeedback" if isinstance(row.get("prompt"), str) else "conversation (prompt inside chosen)"
        return Layout(name, ("chosen", "rejected", *_with_optional(cols, "system")), _split_pair)
    source = _prompt_source(cols, row)
    if source:
        name, used, prompt_turns = source
        plain = used == ("prompt",) and all(isinstance(row[c], str) for c in ("prompt", "chosen", "rejected"))
        if plain:  # TRL's standard prompt/chosen/rejected strings: passed through
            return Layout(
                "prompt-chosen-rejected",
                ("prompt", "chosen", "rejected"),
                lambda r: {k: r[k] for k in ("prompt", "chosen", "rejected")},
            )
        label = "sharegpt" if name in CONVERSATION_COLUMNS and "from" in row[name][0] else name
        return Layout(
            f"{label} + chosen/rejected",
            (*used, "chosen", "rejected"),
            lambda r: {
                "prompt": prompt_turns(r),
                "chosen": _as("assistant", r["chosen"]),
                "rejected": _as("assistant", r["rejected"]),
            },
        )
    if isinstance(chosen, str) and HH_TURN.search(chosen):
        return Layout("hh transcript", ("chosen", "rejected", *_with_optional(cols, "system")), _split_hh_pair)
    if isinstance(chosen, str):  # TRL extracts the shared beginning as the prompt
        return Layout(
            "text (prompt inside chosen)",
            ("chosen", "rejected"),
            lambda r: {"chosen": r["chosen"], "rejected": r["rejected"]},
        )
    raise _no_layout(method, cols)


def _split_pair(r: dict) -> dict:
    chosen, rejected = to_messages(r["chosen"]), to_messages(r["rejected"])
    return {
        "prompt": _with_system(r, chosen[:-1]),
        "chosen": chosen[-1:],
        "rejected": rejected[-1:],
        "prompt_mismatch": chosen[:-1] != rejected[:-1],
    }


def _split_hh_pair(r: dict) -> dict:
    return _split_pair({**r, "chosen": hh_to_messages(r["chosen"]), "rejected": hh_to_messages(r["rejected"])})


def kto_layout(cols: set, row: dict) -> Layout:
    if "label" not in cols:
        pairs = preference_layout("kto", cols, row)
        return Layout(f"paired ({pairs.name})", pairs.used, pairs.convert)
    conv = _conversation_column(cols, row)
    completion = _first(cols, ("completion", "output"))
    if conv and not completion:
        return Layout(
            f"{conv} + label",
            (conv, "label", *_with_optional(cols, "system")),
            lambda r: {
                "prompt": _with_system(r, to_messages(r[conv])[:-1]),
                "completion": to_messages(r[conv])[-1:],
                "label": normalize_label(r["label"]),
            },
        )
    source = _prompt_source(cols, row)
    if not (source and completion):
        raise _no_layout("kto", cols)
    name, used, prompt_turns = source
    plain = used == ("prompt",) and completion == "completion" and isinstance(row["prompt"], str)
    if plain and isinstance(row["completion"], str):
        return Layout(
            "prompt-completion-label",
            ("prompt", "completion", "label"),
            lambda r: {"prompt": r["prompt"], "completion": r["completion"], "label": normalize_label(r["label"])},
        )
    return Layout(
        f"{name} + {completion} + label",
        (*used, completion, "label"),
        lambda r: {
            "prompt": prompt_turns(r),
            "completion": _as("assistant", r[completion]),
            "label": normalize_label(r["label"]),
        },
    )


def grpo_layout(cols: set, row: dict) -> Layout:
    source = _prompt_source(cols, row, conversation_first=False)  # GRPO datasets name their prompt `prompt`
    if not source:
        raise _no_layout("grpo", cols)
    name, used, prompt_turns = source
    if name in CONVERSATION_COLUMNS:  # a whole conversation: the prompt is what the assistant answers next
        return Layout(name, used, lambda r: {"prompt": _until_last_user(prompt_turns(r))}, keep_other_columns=True)
    return Layout(name, used, lambda r: {"prompt": prompt_turns(r)}, keep_other_columns=True)


def detect_layout(method: str, ds) -> Layout:
    """The layout of `ds` for `method`, or a TunefleetError listing what fits."""
    cols, row = set(ds.column_names), ds[0] if len(ds) else {}
    if method == "sft":
        return sft_layout(cols, row)
    if method in ("dpo", "orpo", "rm"):
        return preference_layout(method, cols, row)
    if method == "kto":
        return kto_layout(cols, row)
    if method == "grpo":
        return grpo_layout(cols, row)
    raise TunefleetError(f"unknown method '{method}'")


# ---------------------------------------------------------------- columns: mapping and what is left out
def apply_column_mapping(ds, columns: dict[str, str] | None, ignore: list[str] | None):
    """Rename the user's columns to the names layouts read; drop the ones left out on purpose."""
    have = set(ds.column_names)
    for name in ignore or []:
        if name not in have:
            raise TunefleetError(
                f"--ignore_columns names '{name}', which the dataset does not have; columns: {', '.join(sorted(have))}"
            )
    ds = ds.remove_columns(list(ignore or []))
    have = set(ds.column_names)
    columns = columns or {}
    for target, source in columns.items():
        if target not in KNOWN_COLUMNS:
            raise TunefleetError(
                f"--columns maps to '{target}', which no layout reads; use one of: {', '.join(KNOWN_COLUMNS)}"
            )
        if source not in have:
            raise TunefleetError(
                f"--columns {target}={source}: the dataset has no column '{source}'; "
                f"columns: {', '.join(sorted(have))}"
            )
        if target in have and target not in columns.values() and target != source:
            raise TunefleetError(
                f"--columns {target}={source}: the dataset already has a '{target}' column; "
                f"map it elsewhere or leave it out with --ignore_columns {target}"
            )
    renames = {source: target for target, source in (columns or {}).items() if source != target}
    return ds.rename_columns(renames) if renames else ds


def _is_text_column(ds, column: str, rows: list[dict]) -> bool:
    """Content a model could learn from: strings with spaces, or conversations (not ids, tags, numbers)."""
    if ID_NAME.search(column):
        return False
    values = [r.get(column) for r in rows]
    return any(is_messages(v) or _is_message(v) or (isinstance(v, str) and " " in v.strip()) for v in values)


def not_used_columns(method: str, ds, layout: Layout) -> tuple[dict[str, str], list[str]]:
    """({column: why it is fine to leave out}, [text columns the layout would lose])."""
    rows = [ds[i] for i in range(min(20, len(ds)))]
    fine, lost = {}, []
    for column in ds.column_names:
        if column in layout.used:
            continue
        if layout.keep_other_columns:
            fine[column] = "passed to the reward functions"
        elif not _is_text_column(ds, column, rows):
            fine[column] = "identifier" if ID_NAME.search(column) else "not text"
        elif all(_inside(text_of(r.get(column)), " ".join(text_of(r.get(u)) for u in layout.used)) for r in rows):
            fine[column] = "its text is inside the used columns"
        elif method == "sft" and column == "rejected":
            fine[column] = "SFT trains on the preferred reply only"
        else:
            lost.append(column)
    return fine, lost


def _inside(part: str, whole: str) -> bool:
    return " ".join(part.split()) in " ".join(whole.split())


# ---------------------------------------------------------------- rows the trainer should not see
def row_problem(method: str, row: dict) -> str | None:
    """Why a converted row cannot train, or None."""
    if row.get("prompt_mismatch"):
        return "chosen and rejected answer different prompts"
    if "messages" in row:
        turns = row["messages"]
        if not turns or turns[-1]["role"] != "assistant" or not any(t["role"] == "user" for t in turns):
            return "missing turn"
        return "empty reply" if not turns[-1]["content"].strip() else None
    if "prompt" in row and not text_of(row["prompt"]).strip():
        return "missing turn"
    if isinstance(row.get("prompt"), list) and not any(t["role"] == "user" for t in row["prompt"]):
        return "missing turn"
    if method == "grpo":
        return None
    replies = [row[k] for k in ("chosen", "rejected", "completion", "text") if k in row]
    if any(not text_of(r).strip() for r in replies):
        return "empty reply"
    if "chosen" in row and text_of(row["chosen"]).strip() == text_of(row["rejected"]).strip():
        return "identical chosen and rejected"
    return None


def drop_bad_rows(method: str, ds):
    """(dataset without the rows that cannot train, {reason: count})."""
    problems = [row_problem(method, row) for row in ds]
    counts: dict[str, int] = {}
    for p in problems:
        if p:
            counts[p] = counts.get(p, 0) + 1
    if counts:
        ds = ds.select([i for i, p in enumerate(problems) if p is None])
    if "prompt_mismatch" in ds.column_names:
        ds = ds.remove_columns("prompt_mismatch")
    return ds, counts


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


# ---------------------------------------------------------------- one dataset, prepared
@dataclass
class Prepared:
    """A dataset in the method's columns, and what was done to get there (run.json's `data`)."""

    dataset: Dataset
    source: str
    split: str
    layout: str
    columns_used: list[str]
    columns_not_used: dict[str, str]
    rows_in: int
    dropped: dict[str, int] = field(default_factory=dict)
    parts: list[dict] = field(default_factory=list)  # a mixture's parts, each as this record

    @property
    def rows(self) -> int:
        return len(self.dataset)

    def record(self) -> dict:
        out = {
            "dataset": self.source,
            "split": self.split,
            "layout": self.layout,
            "columns_used": self.columns_used,
            "columns_not_used": self.columns_not_used,
            "rows_in": self.rows_in,
            "rows": self.rows,
            "dropped": self.dropped,
        }
        return out | ({"parts": self.parts} if self.parts else {})

    def notes(self, what: str) -> list[str]:
        lines = []
        if self.dropped:
            detail = ", ".join(f"{n} {reason}" for reason, n in self.dropped.items())
            lines.append(f"{what}: dropped {sum(self.dropped.values())} of {self.rows_in} rows ({detail})")
        return lines


def check(
    method: str,
    ds,
    columns: dict | None = None,
    ignore: list[str] | None = None,
    source: str = "",
    split: str = "",
    strict: bool = True,
):
    """Map columns, detect the layout and refuse text it would lose (when `strict`), without converting anything.

    Returns (the mapped dataset, its layout, {column left out: why})."""
    mapped = apply_column_mapping(ds, columns, ignore)
    layout = detect_layout(method, mapped)
    fine, lost = not_used_columns(method, mapped, layout)
    if lost and strict:
        names = ", ".join(f"'{c}'" for c in lost)
        raise TunefleetError(
            f"{source or 'dataset'} split '{split}': column(s) {names} hold text that the {method} layout "
            f"'{layout.name}' would not use; {column_fix(method, ds, columns, ignore, lost)}"
        )
    return mapped, layout, fine


SYSTEM_LIKE = re.compile(r"^(sys|system)([ _-]?(prompt|message|msg|instructions?|text|turn|content))?$", re.IGNORECASE)
ROLE_OF_TARGET = {"system": "the system turn", "prompt": "the prompt"}


def column_fix(method: str, ds, columns: dict | None, ignore: list[str] | None, lost: list[str]) -> str:
    """The flags that make a dataset with unused text columns train, each tried before it is suggested.

    A system-like column (system_prompt, sys, system_message, ...) is suggested as `system`; another column as
    `prompt` where the layout has no prompt yet; a mapping counts only if the layout then reads the column and
    loses nothing it read before. The rest are left out on purpose (--ignore_columns), which always works."""
    columns, ignore = dict(columns or {}), list(ignore or [])
    added: dict[str, str] = {}
    left_out: list[str] = []
    for column in lost:
        name = columns.get(column, column)  # the dataset's own name for it
        targets = ("system",) if SYSTEM_LIKE.match(name) else ("prompt",)
        target = next((t for t in targets if _reads(method, ds, {**columns, **added, t: name}, ignore, t, lost)), None)
        if target:
            added[target] = name
        else:
            left_out.append(name)
    mapping, leave = {**columns, **added}, ignore + left_out
    if added and not _trains(method, ds, mapping, leave):  # all together, as the user will pass them
        added, left_out = {}, [columns.get(c, c) for c in lost]
        mapping, leave = columns, ignore + left_out
    flags = ([f"--columns {','.join(f'{t}={s}' for t, s in mapping.items())}"] if added else []) + (
        [f"--ignore_columns {' '.join(leave)}"] if left_out else []
    )
    why = [f"'{s}' as {ROLE_OF_TARGET[t]}" for t, s in added.items()] + [f"'{c}' left out" for c in left_out]
    fix = f"fix: {' '.join(flags)} ({', '.join(why)})"
    if added:
        fix += f"; or leave them out on purpose with --ignore_columns {' '.join(ignore + [columns.get(c, c) for c in lost])}"
    return fix


def _reads(method: str, ds, columns: dict, ignore: list[str], target: str, lost_before: list[str]) -> bool:
    """Whether with `columns` the layout reads `target` and loses fewer columns than before."""
    try:
        mapped = apply_column_mapping(ds, columns, ignore)
        layout = detect_layout(method, mapped)
        _, lost = not_used_columns(method, mapped, layout)
    except TunefleetError:
        return False
    return target in layout.used and len(lost) < len(lost_before)


def _trains(method: str, ds, columns: dict, ignore: list[str]) -> bool:
    try:
        mapped = apply_column_mapping(ds, columns, ignore)
        return not not_used_columns(method, mapped, detect_layout(method, mapped))[1]
    except TunefleetError:
        return False


def prepare(
    method: str,
    ds,
    columns: dict | None = None,
    ignore: list[str] | None = None,
    source: str = "",
    split: str = "",
    strict: bool = True,
) -> Prepared:
    """Map columns, detect the layout, refuse lost text (when `strict`), convert, and drop rows that cannot train."""
    import datasets

    datasets.disable_progress_bars()
    ds, layout, fine = check(method, ds, columns, ignore, source, split, strict)
    rows_in = len(ds)
    remove = [c for c in ds.column_names if c in layout.used or not layout.keep_other_columns]

    def convert(row, index):
        try:
            return layout.convert(row)
        except TunefleetError as exc:
            raise TunefleetError(f"{source or 'dataset'} split '{split}' row {index}: {exc}") from None
        except Exception as exc:
            raise TunefleetError(
                f"{source or 'dataset'} split '{split}' row {index}: cannot convert the "
                f"'{layout.name}' layout for {method}: {first_line(exc)}"
            ) from None

    converted = ds.map(convert, with_indices=True, remove_columns=remove)
    if "label" in converted.column_names and converted.features["label"].dtype != "bool":
        from datasets import Value

        converted = converted.cast_column("label", Value("bool"))  # an int label column keeps its type otherwise
    converted, dropped = drop_bad_rows(method, converted)
    if method == "kto" and {"chosen", "rejected"} <= set(converted.column_names):
        converted = _unpair(converted)
    if len(converted) == 0:
        raise TunefleetError(f"{source} split '{split}': no row left to train on ({dropped})")
    return Prepared(converted, source, split, layout.name, list(layout.used), fine, rows_in, dropped)


def drop_long_prompts(prepared: Prepared, tokenizer, max_tokens: int) -> None:
    """GRPO: drop prompts longer than `max_tokens` (chat template applied), counted like every other drop."""
    from trl.data_utils import maybe_apply_chat_template

    lengths = [
        len(
            tokenizer(maybe_apply_chat_template({"prompt": p}, tokenizer)["prompt"], add_special_tokens=False)[
                "input_ids"
            ]
        )
        for p in prepared.dataset["prompt"]
    ]
    keep = [i for i, n in enumerate(lengths) if n <= max_tokens]
    if len(keep) == len(lengths):
        return
    if not keep:
        raise TunefleetError(
            f"every prompt is longer than --max_prompt_length {max_tokens} (shortest: {min(lengths)})"
        )
    reason = f"prompt longer than {max_tokens} tokens"
    prepared.dropped[reason] = prepared.dropped.get(reason, 0) + len(lengths) - len(keep)
    prepared.dataset = prepared.dataset.select(keep)


# ---------------------------------------------------------------- what a run trains and evaluates on
def training_data(cfg: TrainConfig) -> Prepared:
    """The run's training rows: one dataset, or a mixture of several (less the rows `test_split_size` holds out)."""
    if cfg.mixture:
        prepared = mixture(cfg.method, cfg.mixture, cfg.mixture_seed or cfg.seed, cfg.max_train_samples)
    else:
        dataset = single_dataset(cfg)
        raw = load_split(dataset, cfg.split, cfg.dataset_config, cfg.data_files)
        raw = sample(raw, cfg.max_train_samples, cfg.seed, "--max_train_samples")
        prepared = prepare(cfg.method, raw, cfg.columns, cfg.ignore_columns, dataset, cfg.split)
    if cfg.test_split_size:
        prepared, HELD_OUT[cfg.output_dir] = hold_out(prepared, cfg.test_split_size, cfg.mixture_seed or cfg.seed)
    return prepared


# The rows `test_split_size` held out of each run's training data, until its evaluation data is asked for.
HELD_OUT: dict[str, Prepared] = {}


def hold_out(prepared: Prepared, share: float, seed: int) -> tuple[Prepared, Prepared]:
    """Split prepared rows into (training, held out): a seeded share of the rows, as the alignment-handbook's
    `test_split_size` does with `train_test_split`."""
    import dataclasses

    if len(prepared.dataset) < 2:
        raise TunefleetError(f"test_split_size {share}: {prepared.rows} row(s) cannot be split into train and test")
    halves = prepared.dataset.train_test_split(test_size=share, seed=seed)
    train = dataclasses.replace(prepared, dataset=halves["train"])
    test = dataclasses.replace(prepared, dataset=halves["test"], split=f"{prepared.split} (held out: {share})")
    return train, test


def eval_part(cfg: TrainConfig) -> DatasetPart | None:
    """Where the eval split comes from: --dataset, else the mixture's first part (its columns and files)."""
    if not cfg.eval_split:
        return None
    if cfg.mixture and not cfg.dataset:
        first = cfg.mixture[0]
        return DatasetPart(
            first.dataset, cfg.eval_split, first.config, first.data_files, first.columns, first.ignore_columns
        )
    return DatasetPart(
        single_dataset(cfg), cfg.eval_split, cfg.dataset_config, cfg.data_files, cfg.columns, cfg.ignore_columns
    )


def train_parts(cfg: TrainConfig) -> list[DatasetPart]:
    """What the run trains on, as dataset parts (one, or the mixture's)."""
    if cfg.mixture:
        return list(cfg.mixture)
    return [
        DatasetPart(
            single_dataset(cfg), cfg.split, cfg.dataset_config, cfg.data_files, cfg.columns, cfg.ignore_columns
        )
    ]


def single_dataset(cfg: TrainConfig) -> str:
    """--dataset of a run without a mixture (the config's validation requires one of the two)."""
    assert cfg.dataset is not None, "a run without --mixture has a --dataset"
    return cfg.dataset


def evaluation_data(cfg: TrainConfig) -> Prepared | None:
    """The eval split, prepared like the training data (or the rows `test_split_size` held out of it)."""
    if cfg.test_split_size:
        if cfg.output_dir not in HELD_OUT:
            training_data(cfg)
        held = HELD_OUT.pop(cfg.output_dir)
        return dataclasses.replace(
            held, dataset=sample(held.dataset, cfg.max_eval_samples, cfg.seed, "--max_eval_samples")
        )
    part = eval_part(cfg)
    if part is None:
        return None
    raw = load_split(part.dataset, part.split, part.config, part.data_files)
    raw = sample(raw, cfg.max_eval_samples, cfg.seed, "--max_eval_samples")
    return prepare(cfg.method, raw, part.columns, part.ignore_columns, part.dataset, part.split)


def mixture(method: str, parts: list[DatasetPart], seed: int, max_rows: int | None) -> Prepared:
    """Several datasets in one run: each part converted on its own, sized by samples or weight, then shuffled."""
    import datasets

    prepared = []
    for part in parts:
        raw = load_split(part.dataset, part.split, part.config, part.data_files)
        ignore = [*(part.ignore_columns or []), *left_out_by_selection(raw, part)]
        prepared.append(prepare(method, raw, part.columns, ignore, part.dataset, part.split))
    available = [
        int(len(p.dataset) * part.portion) if part.portion else len(p.dataset) for p, part in zip(prepared, parts)
    ]
    counts = mixture_counts(available, [p.samples for p in parts], [p.weight for p in parts], max_rows)
    pieces = []
    for p, n in zip(prepared, counts):
        p.dataset = p.dataset.shuffle(seed=seed).select(range(n))
        pieces.append(p)
    tables = _same_shape([p.dataset for p in pieces], [f"{p.source}:{p.split}" for p in pieces])
    mixed = datasets.concatenate_datasets(tables).shuffle(seed=seed)
    if max_rows and len(mixed) > max_rows and not any(p.weight for p in parts):
        mixed = mixed.select(range(max_rows))
    return Prepared(
        mixed,
        "mixture",
        "+".join(p.split for p in pieces),
        "mixture",
        sorted({c for p in pieces for c in p.columns_used}),
        {},
        sum(p.rows_in for p in pieces),
        {},
        [p.record() for p in pieces],
    )


def left_out_by_selection(raw, part: DatasetPart) -> list[str]:
    """The columns a part's `select_columns` leaves out (TRL's and the handbook's `columns:` list)."""
    if not part.select_columns:
        return []
    missing = [c for c in part.select_columns if c not in raw.column_names]
    if missing:
        raise TunefleetError(
            f"{part.dataset} split '{part.split}': select_columns names {', '.join(missing)}, which it does not have; "
            f"columns: {', '.join(raw.column_names)}"
        )
    return [c for c in raw.column_names if c not in part.select_columns and c not in (part.ignore_columns or [])]


def mixture_counts(
    available: list[int], samples: list[int | None], weights: list[float | None], max_rows: int | None = None
) -> list[int]:
    """Rows per part (pure). `samples`: exactly that many (all when fewer exist); `weight`: shares of the largest
    total the weighted parts can give without repeating a row (capped by `max_rows`); neither: every row."""
    if any(w for w in weights):
        total_weight = sum(w for w in weights if w)
        total = min(n * total_weight / w for n, w in zip(available, weights) if w)
        if max_rows:
            total = min(total, max_rows)
        return [min(n, int(total * w / total_weight)) if w else n for n, w in zip(available, weights)]
    return [min(n, s) if s else n for n, s in zip(available, samples)]


def _same_shape(tables: list, names: list[str]) -> list:
    """Parts must give the same columns; strings meet conversations as one turn (prompt: user, replies: assistant)."""
    columns = [set(t.column_names) for t in tables]
    if any(c != columns[0] for c in columns):
        detail = "; ".join(f"{n}: {', '.join(sorted(c))}" for n, c in zip(names, columns))
        raise TunefleetError(
            f"mixture parts give different columns ({detail}); map them to one layout with "
            "--columns per part, or leave extra columns out with ignore_columns"
        )
    conversational = {c for t in tables for c in t.column_names if isinstance(t[0][c], list)}
    out = []
    for t, name in zip(tables, names):
        strings = [c for c in t.column_names if c in conversational and not isinstance(t[0][c], list)]
        if "text" in strings:
            raise TunefleetError(f"mixture part {name} is plain text; other parts are conversations")
        if strings:
            t = t.map(
                lambda r, cols=tuple(strings): {c: _as("user" if c == "prompt" else "assistant", r[c]) for c in cols}
            )
        out.append(t.cast(out[0].features) if out else t)
    return out


# ---------------------------------------------------------------- what the trainer sees
def example_text(trainer, tokenizer) -> dict[str, str]:
    """The first training example as the trainer will feed it: its token ids decoded (GRPO: the templated prompt)."""
    row = trainer.train_dataset[0]
    ids = {c: v for c, v in row.items() if c.endswith("input_ids") or c.endswith("_ids")}
    ids = {c: v for c, v in ids.items() if isinstance(v, list) and v and isinstance(v[0], int)}
    if ids:
        return {c: tokenizer.decode(v) for c, v in ids.items()}
    from trl.data_utils import maybe_apply_chat_template

    return {k: v for k, v in maybe_apply_chat_template({"prompt": row["prompt"]}, tokenizer).items() if k == "prompt"}
