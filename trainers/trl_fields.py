"""TRL's own options, read from TRL's dataclasses: which fields exist, for which method, of what type.

Every field of the method's TRL config (`SFTConfig`, `DPOConfig`, ... and so every `TrainingArguments` field), of
TRL's `ModelConfig` and of its `ScriptArguments` is a setting of a tunefleet run. Nothing here lists fields by
hand: the table is built from the installed TRL's classes, so a TRL upgrade that adds a field is taken as it is.

Building the table imports TRL (and torch): seconds. It is kept as JSON in the user's cache, keyed by the
versions of trl and transformers, so a launcher that only checks a spec (a Ray task, a SLURM submitter) does not
import the ML stack to read it.

    >>> from tunefleet.trainers import trl_fields
    >>> trl_fields.lookup("lr_scheduler_type").owners
    ('SFTConfig', 'DPOConfig', 'ORPOConfig', 'KTOConfig', 'GRPOConfig', 'RewardConfig')
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import subprocess
import sys
import types
import typing
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tunefleet.common import schema
from tunefleet.common.contract import CACHE_ENV
from tunefleet.common.errors import TunefleetError
from tunefleet.common.jsonfile import write_json_atomic

# The TRL class that holds each method's training options (ORPO lives in trl.experimental in TRL 1.x).
METHOD_CLASSES = {
    "sft": ("trl", "SFTConfig"),
    "dpo": ("trl", "DPOConfig"),
    "orpo": ("trl.experimental.orpo", "ORPOConfig"),
    "kto": ("trl", "KTOConfig"),
    "grpo": ("trl", "GRPOConfig"),
    "rm": ("trl", "RewardConfig"),
}
# What TRL's scripts parse besides the method's config (`TrlParser((ScriptArguments, DPOConfig, ModelConfig))`).
SHARED_CLASSES = {"model": ("trl", "ModelConfig"), "script": ("trl", "ScriptArguments")}
# The order a value's forms are tried in: the narrowest first, so "3" is an int where a field takes int or str.
FORM_ORDER = ["bool", "int", "float", "false", "choice", "list", "dict", "str", "object"]
TABLE_VERSION = 2  # bump when the table's own layout changes


@dataclass(frozen=True)
class TrlField:
    """One TRL option: its accepted forms in order (`bool`, `int`, `float`, `choice`, `list`, `dict`, `str`, `false`),
    choices (enum or Literal values), element form of a list, default, help, and the classes and methods that have it."""

    name: str
    forms: tuple[str, ...]
    choices: tuple[str, ...]
    element: str
    defaults: dict[str, Any]  # by method ("sft", ...) or by class ("ModelConfig") for the shared ones
    help: str
    owners: tuple[str, ...]
    methods: tuple[str, ...]  # methods whose config has it; empty for ModelConfig / ScriptArguments fields

    @property
    def default(self) -> Any:
        """The default as most classes have it (the one shown where no method is named)."""
        values = list(self.defaults.values())
        return max(values, key=lambda v: values.count(v)) if values else None

    def default_for(self, method: str) -> Any:
        return self.defaults.get(method, self.default)

    @property
    def shared(self) -> bool:
        """A field of ModelConfig or ScriptArguments: every method takes it."""
        return not self.methods

    def describe_type(self) -> str:
        if "choice" in self.forms:
            return "one of " + ", ".join(self.choices)
        return " or ".join(f"list of {self.element}" if f == "list" else f for f in self.forms)


def versions() -> str:
    return "-".join(metadata.version(p) for p in ("trl", "transformers"))


def cache_file() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tunefleet"
    )
    return Path(root) / f"trl_fields-v{TABLE_VERSION}-{versions()}.json"


@functools.cache
def table() -> dict[str, TrlField]:
    """Every TRL field by name (from the cache when this TRL was read before)."""
    path = cache_file()
    rows = read_cache(path)
    if rows is None and "trl" not in sys.modules:
        # Built in a child process: a launcher that checks a spec keeps torch out of its own memory.
        subprocess.run([sys.executable, "-m", "tunefleet.trainers.trl_fields"], capture_output=True, check=False)
        rows = read_cache(path)
    if rows is None:
        rows = build_rows()
        try:
            write_json_atomic(path, rows)
        except OSError:
            pass  # a read-only cache folder: the table is built again next time, nothing lost
    return {row["name"]: from_row(row) for row in rows}


def from_row(row: dict[str, Any]) -> TrlField:
    return TrlField(
        name=str(row["name"]),
        forms=tuple(row["forms"]),
        choices=tuple(row["choices"]),
        element=str(row["element"]),
        defaults=dict(row["defaults"]),
        help=str(row["help"]),
        owners=tuple(row["owners"]),
        methods=tuple(row["methods"]),
    )


def read_cache(path: Path) -> list[dict[str, Any]] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_class(module: str, name: str) -> type:
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns that it is experimental: known, and said in docs
        return getattr(importlib.import_module(module), name)


def build_rows() -> list[dict[str, Any]]:
    """Read TRL's classes: one row per field name, with every class and method that has it."""
    rows: dict[str, dict[str, Any]] = {}
    for key, (module, name) in [*METHOD_CLASSES.items(), *SHARED_CLASSES.items()]:
        cls = load_class(module, name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            forms, choices, element = type_forms(hints[f.name])
            row = rows.setdefault(
                f.name,
                {
                    "name": f.name,
                    "forms": forms,
                    "choices": choices,
                    "element": element,
                    "defaults": {},
                    "help": " ".join(str(f.metadata.get("help", "")).replace("%%", "%").split()),
                    "owners": [],
                    "methods": [],
                },
            )
            row["owners"].append(name)
            row["defaults"][key if key in METHOD_CLASSES else name] = plain(schema.default_of(f))
            for form in forms:  # a field typed differently by two classes (loss_type: one name, or a list)
                if form not in row["forms"]:
                    row["forms"].append(form)
            if key in METHOD_CLASSES:
                row["methods"].append(key)
    for row in rows.values():
        row["forms"].sort(key=FORM_ORDER.index)
    return list(rows.values())


def plain(value: Any) -> Any:
    """A default as JSON holds it (enums by value, objects by their text)."""
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


def type_forms(tp: Any) -> tuple[list[str], list[str], str]:
    """An annotation -> (forms in the order a value is tried, choices, list element form)."""
    members = list(typing.get_args(tp)) if is_union(tp) else [tp]
    forms: list[str] = []
    choices: list[str] = []
    element = "str"
    for member in members:
        origin = typing.get_origin(member)
        if member is type(None):
            continue
        if origin is typing.Literal:
            values = typing.get_args(member)
            if values == (False,):
                forms.append("false")
            else:
                forms.append("choice")
                choices += [str(v) for v in values]
        elif isinstance(member, type) and issubclass(member, enum.Enum):
            forms.append("choice")
            choices += [str(m.value) for m in member]
        elif origin in (list, tuple) or member in (list, tuple):
            (inner,) = typing.get_args(member)[:1] or (str,)
            element = {bool: "bool", int: "int", float: "float"}.get(inner, "str")
            forms.append("list")
        elif origin is dict or member is dict:
            forms.append("dict")
        elif member in (bool, int, float, str):
            forms.append(member.__name__)
        else:
            forms.append("object")  # a Python object (accelerate's ParallelismConfig): not settable from text
    forms = sorted(dict.fromkeys(forms), key=FORM_ORDER.index)
    if "choice" in forms and "str" in forms:
        forms.remove("str")  # `SchedulerType | str`: the str is the enum's value; TRL rejects anything else
    return forms, list(dict.fromkeys(choices)), element


def is_union(tp: Any) -> bool:
    return isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union


def lookup(name: str) -> TrlField | None:
    return table().get(name)


def names() -> list[str]:
    return list(table())


def fields_of(method: str) -> dict[str, TrlField]:
    """The fields a run of `method` takes: its config class's, ModelConfig's and ScriptArguments'."""
    return {n: f for n, f in table().items() if f.shared or method in f.methods}


def coerce(name: str, value: Any, where: str = "") -> Any:
    """One value of a TRL field, checked and converted by the field's own type; one-line errors naming it."""
    f = lookup(name)
    if f is None:
        raise TunefleetError(f"{where}unknown key '{name}'")
    if value is None:
        return None
    if f.forms == ("object",):
        raise TunefleetError(
            f"{where}{name} holds a Python object in TRL's {f.owners[0]}; it cannot be set from a file or a flag"
        )
    errors = []
    for form in f.forms:
        try:
            return convert(form, f, value)
        except ValueError as exc:
            errors.append(str(exc))
    expected = f.describe_type()
    if len(f.choices) > 12:  # the optimizers: the nearest name, and where to see them all
        expected = f"one of {len(f.choices)} names (tunefleet train --help-all lists them)"
    shown = value if not isinstance(value, str) else repr(value)
    hint = schema.nearest(str(value), f.choices) if f.choices and isinstance(value, str) else ""
    raise TunefleetError(f"{where}bad value for '{name}': expected {expected}, got {shown}{hint}")


def convert(form: str, f: TrlField, value: Any) -> Any:
    if form in ("bool", "int", "float", "str"):
        if isinstance(value, list | dict):
            raise ValueError("not a scalar")
        return schema.scalar({"bool": bool, "int": int, "float": float, "str": str}[form], value)
    if form == "false":
        if value is False or str(value).lower() == "false":
            return False
        raise ValueError("not false")
    if form == "choice":
        text = value.value if isinstance(value, enum.Enum) else value
        if isinstance(text, str) and text in f.choices:
            return text
        raise ValueError("not a choice")
    if form == "list":
        items = value if isinstance(value, list | tuple) else [v.strip() for v in str(value).split(",") if v.strip()]
        kind = {"bool": bool, "int": int, "float": float}.get(f.element, str)
        return [schema.scalar(kind, v) for v in items]
    if form == "dict":
        if isinstance(value, dict):
            return value
        text = str(value).strip()
        if text.startswith("{"):
            import yaml

            try:
                loaded = yaml.safe_load(text)  # JSON is YAML: TRL's flags take dicts as JSON text
            except yaml.YAMLError:
                raise ValueError("not a mapping") from None
            if isinstance(loaded, dict):
                return loaded
        raise ValueError("not a mapping")
    raise ValueError(f"{f.name} holds a Python object ({f.owners[0]}); it cannot be set from a file or a flag")


if __name__ == "__main__":
    write_json_atomic(cache_file(), build_rows())
