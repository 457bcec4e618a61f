"""Typed settings: one dataclass per group of settings gives CLI flags, YAML keys and job command lines.

A field is declared once with `option(default, help, ...)`; from that one declaration come its `--flag`
(`add_flags`), the check of a YAML or sweep value (`coerce`, with the nearest valid key on a typo), and the
flags that reproduce a value on another machine's command line (`to_argv`). TRL's configs work the same way:
a dataclass with `metadata={"help": ...}` on every field.

Metadata a field may carry: `help` (required), `choices`, `required`, ranges `at_least`, `at_most`, `above`,
`below` (each checked by `coerce`, with a one-line error naming the key), `parse` (a function turning the
given value into the field's value, raising ValueError with the reason), `nargs` (its flag's argparse nargs) and
`internal` (a key of files and records, with no flag of its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import types
import typing
from pathlib import Path

from tunefleet.common.errors import TunefleetError

T = typing.TypeVar("T")


def option(default: typing.Any, help: str, **meta: typing.Any) -> typing.Any:
    """A dataclass field with its help text and checks (lists and dicts get a fresh copy per instance).

    Typed Any, as `dataclasses.field` is to type checkers: the annotation of the field it defines is its type."""
    if isinstance(default, list | tuple):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def fields(cls: typing.Any) -> dict[str, dataclasses.Field[typing.Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def default_of(f: dataclasses.Field[typing.Any]) -> typing.Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _unwrap(tp):
    """`int | None` -> int; `list[str] | None` -> list[str]."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else tp
    return tp


@functools.cache
def _hints(cls: typing.Any) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)  # evaluates every annotation of the class: once per class is enough


def kind(cls: typing.Any, name: str) -> tuple[typing.Any, typing.Any]:
    """(base type, element type for lists) of a field: (int, None), (list, float), (dict, str), ..."""
    tp = _unwrap(_hints(cls)[name])
    origin = typing.get_origin(tp)
    if origin is list:
        (elem,) = typing.get_args(tp) or (str,)
        return list, elem
    if origin is dict:
        return dict, str
    if origin in (types.UnionType, typing.Union):  # e.g. `float | str`: kept as given, checked by the owner
        return object, None
    return tp, None


def nearest(name: str, choices: typing.Iterable[typing.Any]) -> str:
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def parse_bool(value: typing.Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def scalar(tp: typing.Any, value: typing.Any) -> typing.Any:
    if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):  # a nested settings object
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_mapping(tp, value)
        return tp.parse(str(value))  # its own text form (DatasetPart.parse)
    if tp is bool:
        return parse_bool(value)
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, list | dict):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    return value


def coerce(cls: typing.Any, name: str, value: typing.Any, where: str = "", label: str | None = None) -> typing.Any:
    """Check one value against its field (name, type, choices, range) and convert it; one-line errors.

    `label` is how errors name the key (`resources.gpus_per_run` in a sweep spec); default: its name.
    """
    known = fields(cls)
    label = label or name
    if name not in known:
        raise TunefleetError(f"{where}unknown key '{label}'{nearest(name, known)}")
    if value is None:
        return None
    tp, elem = kind(cls, name)
    try:
        if "parse" in known[name].metadata:  # a field with its own syntax (e.g. `auto` or a number)
            value = known[name].metadata["parse"](value)
        elif tp is list:
            items = value if isinstance(value, list | tuple) else [v for v in str(value).split(",") if v.strip()]
            value = [scalar(elem, v.strip() if isinstance(v, str) else v) for v in items]
        elif tp is dict:
            value = parse_mapping(value)
        else:
            value = scalar(tp, value)
    except ValueError as exc:
        raise TunefleetError(f"{where}bad value for '{label}': {exc}") from None
    except TunefleetError as exc:  # a nested settings object named the inner key
        raise TunefleetError(f"{where}bad value for '{label}': {exc}") from None
    meta = known[name].metadata
    choices = meta.get("choices")
    for item in value if isinstance(value, list) else [value]:
        if choices and item not in choices:
            raise TunefleetError(
                f"{where}unknown {label} '{item}'{nearest(str(item), choices)}; choose one of: {', '.join(choices)}"
            )
        check_range(label, item, meta, where)
    return value


def parse_mapping(value: typing.Any) -> dict[str, str]:
    """`{a: b}` (YAML) or `a=b,c=d` (a flag) -> {"a": "b", "c": "d"}."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    pairs = [p.strip() for p in str(value).split(",") if p.strip()]
    out = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise ValueError(f"expected NAME=VALUE pairs separated by commas, got {pair!r}")
        out[key.strip()] = val.strip()
    return out


def check_range(name: str, value: typing.Any, meta: typing.Mapping[str, typing.Any], where: str = "") -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if "at_least" in meta and value < meta["at_least"]:
        raise TunefleetError(f"{where}'{name}' must be at least {meta['at_least']}, got {value}")
    if "at_most" in meta and value > meta["at_most"]:
        raise TunefleetError(f"{where}'{name}' must be at most {meta['at_most']}, got {value}")
    if "above" in meta and value <= meta["above"]:
        raise TunefleetError(f"{where}'{name}' must be greater than {meta['above']}, got {value}")
    if "below" in meta and value >= meta["below"]:
        raise TunefleetError(f"{where}'{name}' must be below {meta['below']}, got {value}")


def from_mapping(cls: type[T], values: typing.Mapping[str, typing.Any], where: str = "") -> T:
    """An instance of `cls` from plain values (YAML, a sweep spec, parsed flags), every key and value checked."""
    return cls(**{k: coerce(cls, k, v, where) for k, v in values.items()})


def add_flags(parser: argparse.ArgumentParser, cls: typing.Any, skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A `--name` flag per field. Defaults are suppressed, so the parsed namespace holds only what was passed."""
    for name, f in fields(cls).items():
        if name in skip or f.metadata.get("internal"):
            continue
        tp, _ = kind(cls, name)
        default = default_of(f)
        shown = "" if default in (None, (), []) else f" (default: {default})"
        kw = {"default": argparse.SUPPRESS, "help": f.metadata["help"] + shown}
        if "nargs" in f.metadata:
            parser.add_argument(f"--{name}", nargs=f.metadata["nargs"], **kw)
        elif tp is bool:
            parser.add_argument(f"--{name}", nargs="?", const=True, type=parse_bool, metavar="true|false", **kw)
        elif tp is dict:
            parser.add_argument(f"--{name}", type=str, metavar="NAME=VALUE,...", **kw)
        elif tp is list:
            parser.add_argument(f"--{name}", nargs="+", **kw)
        else:
            parser.add_argument(f"--{name}", type=str, **kw)  # checked by coerce(), with a nearest-name hint
    return parser


def to_argv(obj: typing.Any, skip: tuple[str, ...] = ()) -> list[str]:
    """Flags that give another process the same settings (only the values that differ from the defaults)."""
    argv = []
    for name, f in fields(type(obj)).items():
        value = getattr(obj, name)
        if name in skip or value is None or value == default_of(f):
            continue
        if isinstance(value, list):
            argv += [f"--{name}", *(text_form(v) for v in value)]
        elif isinstance(value, dict):
            argv += [f"--{name}", ",".join(f"{k}={v}" for k, v in value.items())]
        else:
            argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def text_form(value: typing.Any) -> str:
    """A value as a flag gives it: a settings object by its own `to_text` (DatasetPart), anything else by str."""
    return value.to_text() if hasattr(value, "to_text") else str(value)


def to_dict(obj: typing.Any) -> dict[str, typing.Any]:
    """Every field of a settings object, as plain values (JSON and YAML friendly; nested objects as mappings)."""
    return dataclasses.asdict(obj)


def read_yaml_mapping(path: str, what: str, expected: str, with_nodes: bool = False) -> typing.Any:
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
