"""GRPO reward functions, chosen with `--reward_funcs` (several add up).

- built-in names:
  - `length`: closeness of the reply to 30 words: 1.0 at 30, falling linearly to 0.0 at 0 or 60+.
  - `friendly`: the tiny task's style rule: +1 when the reply opens with a friendly phrase, -1 when it
    holds a hostile one, 0 otherwise.
  - `answer`: the tiny task's map rule: 1.0 when the reply holds the right answer to the prompt
    (animal -> sound, thing -> colour, a + b), else 0.0.
- `package.module:function`: your own function `f(prompts, completions, **columns) -> list[float]`, imported
  from an explicit module path (nothing is imported from any other form of name).
- a reward-model path (local folder, or hub id) of a sequence-classification model with one label,
  loaded by TRL.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from pathlib import Path

from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.trainers import model
from tunefleet.trainers.tiny import ANIMALS, FRIENDLY, HOSTILE, THINGS


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return " ".join(m.get("content", "") for m in completion)
    return completion


def _prompt_text(prompt) -> str:
    return _text([m for m in prompt if m.get("role") == "user"][-1:]) if isinstance(prompt, list) else prompt


def length(completions, **kwargs) -> list[float]:
    return [max(0.0, 1.0 - abs(len(_text(c).split()) - 30) / 30) for c in completions]


def friendly(completions, **kwargs) -> list[float]:
    scores = []
    for c in completions:
        text = _text(c).strip()
        if any(h.lower() in text.lower() for h in HOSTILE):
            scores.append(-1.0)
        else:
            scores.append(1.0 if any(text.startswith(f) for f in FRIENDLY) else 0.0)
    return scores


def expected_answer(prompt: str) -> str | None:
    """The tiny task's right answer for a prompt, or None if the prompt is not from it."""
    numbers = re.findall(r"\d+", prompt)
    if len(numbers) == 2:
        return str(int(numbers[0]) + int(numbers[1]))
    for animal, sound in ANIMALS.items():
        if re.search(rf"\b{animal}\b", prompt):
            return sound
    for thing, colour in THINGS.items():
        if thing.split()[-1] in prompt:
            return colour
    return None


def answer(prompts, completions, **kwargs) -> list[float]:
    scores = []
    for p, c in zip(prompts, completions):
        want = expected_answer(_prompt_text(p))
        scores.append(1.0 if want and re.search(rf"\b{re.escape(want)}\b", _text(c)) else 0.0)
    return scores


BUILTIN = {"length": length, "friendly": friendly, "answer": answer}


def load(specs: list[str], trust_remote_code: bool = False) -> list:
    """Resolve every --reward_funcs entry; one clear error for the first that cannot be loaded."""
    funcs = []
    for spec in specs:
        if spec in BUILTIN:
            funcs.append(BUILTIN[spec])
        elif ":" in spec:
            funcs.append(_import(spec))
        elif Path(spec).expanduser().exists():  # a reward model's folder, or a tunefleet rm run (merged)
            if not (Path(spec).expanduser() / "config.json").exists() and not model.run_folder(spec):
                raise TunefleetError(f"reward model {spec} holds no config.json")
            funcs.append(model.reward_model_path(spec, trust_remote_code))
        elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
            funcs.append(spec)  # hub id of a reward model; TRL loads it
        else:
            raise TunefleetError(
                f"unknown reward '{spec}': use one of {', '.join(BUILTIN)}, "
                "package.module:function, or a reward-model path"
            )
    return funcs


class RewardError(TunefleetError):
    """A reward function raised or returned something that is not one score per completion."""


def guarded(spec: str, func) -> Callable[..., list[float | None]]:
    """`func` with its failures said in one line naming the reward (TRL would show a traceback from deep inside)."""

    @functools.wraps(func)
    def call(*args, **kwargs) -> list[float | None]:
        try:
            scores = func(*args, **kwargs)
        except Exception as exc:
            raise RewardError(f"reward function '{spec}' raised {type(exc).__name__}: {first_line(exc)}") from None
        completions = kwargs.get("completions", args[1] if len(args) > 1 else None)
        if not isinstance(scores, list | tuple) or (completions is not None and len(scores) != len(completions)):
            raise RewardError(
                f"reward function '{spec}' must return one score per completion (a list of "
                f"{len(completions or [])} numbers or None), got {type(scores).__name__}"
            )
        if any(s is not None and not isinstance(s, int | float) for s in scores):
            bad = next(s for s in scores if s is not None and not isinstance(s, int | float))
            raise RewardError(f"reward function '{spec}' returned {bad!r}, not a number")
        return [None if s is None else float(s) for s in scores]

    return call


def _import(spec: str):
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise TunefleetError(
            f"cannot import reward function '{spec}': {type(exc).__name__}: {first_line(exc)}"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise TunefleetError(f"cannot import reward function '{spec}': {module_name} has no function {func_name!r}")
    return func
