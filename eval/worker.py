"""A scorer holds one base model and the encoded test data; it applies each run's adapter in turn.

The base model is loaded once per worker; adapters are attached with PEFT's multi-adapter API
(`load_adapter` + `set_adapter`), and the base row is scored with adapters disabled. One worker per GPU
(or a fraction of one) under Ray, or one in-process worker for the local backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.eval.plan import Task
from tunefleet.eval.scoring import encode_conversation, generate, score_batched
from tunefleet.eval.settings import EvalData


@dataclass
class ShardResult:
    """What a worker returns for one shard: per-sample values per task, and the targets that failed."""

    results: list[tuple[Task, list]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # target -> message
    seconds: float = 0.0
    node_id: str | None = None  # the Ray node that scored it


GENERATION_CHUNK = 64  # rows (runs x prompts) per generate call: bounded memory, little padding


def _first_rows(ds, n: int):
    return ds.select(range(min(n, len(ds))))


def load_eval_data(spec: EvalData) -> dict:
    """Per metric, the first `max_samples` items of its test split: conversations (ppl), pairs (pref) and
    held-out prompts with their other columns (gen: greedy answers, rewards, samples).

    Any layout training accepts works here too (converted the same way); scoring needs conversations, so
    plain-text layouts are refused with the reason. Without a `gen_split`, the prompts of the SFT split serve.
    """
    from tunefleet.trainers import data

    def prepared(method: str, split: str):
        rows = _first_rows(data.load_split(spec.dataset, split), spec.max_samples)
        return data.prepare(method, rows, source=spec.dataset, split=split, strict=False).dataset

    out = {"ppl": [], "pref": [], "gen": [], "gen_columns": []}
    if spec.sft_split:
        sft = prepared("sft", spec.sft_split)
        if "messages" in sft.column_names:
            out["ppl"] = sft["messages"]
        elif "prompt" in sft.column_names and isinstance(sft[0]["prompt"], list):
            out["ppl"] = [p + c for p, c in zip(sft["prompt"], sft["completion"])]
        else:
            raise TunefleetError(
                f"dataset {spec.dataset} split '{spec.sft_split}' holds plain text; perplexity is scored on "
                "conversations (chat template): give a conversational split or --skip_perplexity"
            )
    if spec.pref_split:
        pairs = prepared("dpo", spec.pref_split)
        if "prompt" not in pairs.column_names or not isinstance(pairs[0]["prompt"], list):
            raise TunefleetError(
                f"dataset {spec.dataset} split '{spec.pref_split}' must hold conversational chosen/rejected "
                "for preference accuracy (its layout is plain text)"
            )
        out["pref"] = [(p + c, p + r) for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])]
    if spec.gen_split:
        try:
            prompts = prepared("grpo", spec.gen_split)
        except TunefleetError as exc:
            if "has no split" not in str(exc) or not out["ppl"]:
                raise
            print(
                f"note: {spec.dataset} has no split '{spec.gen_split}': the questions of '{spec.sft_split}' are "
                "the held-out prompts"
            )
            out["gen"] = [m[:-1] for m in out["ppl"]]
            out["gen_columns"] = [{} for _ in out["gen"]]
        else:
            others = [c for c in prompts.column_names if c != "prompt"]
            out["gen"] = prompts["prompt"]
            out["gen_columns"] = [{c: row[c] for c in others} for row in prompts]
    return out


def reward_functions(specs) -> list[tuple[str, object]]:
    """(name, guarded function) for the eval's rewards; reward models are refused (the evaluator runs functions)."""
    from tunefleet.trainers import rewards

    loaded = rewards.load(list(specs))
    models = [spec for spec, f in zip(specs, loaded) if not callable(f)]
    if models:
        raise TunefleetError(
            f"eval rewards must be functions (built-in names or module:function); {', '.join(models)} is a reward "
            "model: pass --reward_funcs with functions"
        )
    return [(spec, rewards.guarded(spec, f)) for spec, f in zip(specs, loaded)]


def ray_node_id() -> str | None:
    """The Ray node this worker runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


class Scorer:
    """Score tasks for many targets on one loaded base model."""

    def __init__(self, base_model: str, data_spec: EvalData, batch_size: int = 16, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM

        from tunefleet.trainers.model import load_tokenizer, resolve

        self.tokenizer = load_tokenizer(base_model, trust_remote_code)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.base = (
            AutoModelForCausalLM.from_pretrained(resolve(base_model), dtype=dtype, trust_remote_code=trust_remote_code)
            .to(device)
            .eval()
        )
        self.peft = None
        self.loaded: dict[str, str] = {}  # target -> adapter name
        self.batch_size = batch_size
        raw = load_eval_data(data_spec)
        self.data = {
            "ppl": [encode_conversation(self.tokenizer, m) for m in raw["ppl"]],
            "pref": [
                (encode_conversation(self.tokenizer, c), encode_conversation(self.tokenizer, r))
                for c, r in raw["pref"]
            ],
            "gen": raw["gen"],
        }
        self.gen_columns = raw["gen_columns"]
        self.rewards = reward_functions(data_spec.reward_funcs)
        self.max_new_tokens = data_spec.max_new_tokens

    def sizes(self) -> dict:
        return {k: len(v) for k, v in self.data.items()}

    def _model_for(self, target: str, adapter: str | None):
        if adapter is None:
            return None  # base row: adapters disabled
        if target not in self.loaded:
            from peft import PeftModel

            name = f"a{len(self.loaded)}"  # PEFT adapter names must be identifiers: not the run name
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, adapter, adapter_name=name).eval()
            else:
                self.peft.load_adapter(adapter, adapter_name=name)
            self.loaded[target] = name
        self.peft.set_adapter(self.loaded[target])
        return self.peft

    def run(self, targets: dict[str, str | None], tasks: list[Task]) -> ShardResult:
        """Score `tasks` (targets: name -> adapter folder, None for the base model alone)."""
        t0 = time.time()
        results, errors = [], {}
        for task in tasks:
            if task.target in errors or task.metric == "gen":
                continue
            try:
                model = self._model_for(task.target, targets[task.target])
                if model is None and self.peft is not None:
                    with self.peft.disable_adapter():
                        values = self._score(self.peft, task)
                else:
                    values = self._score(model or self.base, task)
                results.append((task, values))
            except Exception as exc:  # one bad adapter must not stop the others
                errors[task.target] = f"{type(exc).__name__}: {first_line(exc)}"
        results += self._generate_all(
            [t for t in tasks if t.metric == "gen" and t.target not in errors], targets, errors
        )
        return ShardResult(results, errors, time.time() - t0, ray_node_id())

    def _generate_all(self, tasks: list[Task], targets: dict, errors: dict) -> list:
        """Greedy answers of every target to its held-out prompts, in mixed-adapter batches (rows of many runs in
        one generate call), each answer scored by the eval's rewards."""
        rows = []  # (task, adapter name)
        for task in tasks:
            try:
                self._model_for(task.target, targets[task.target])  # attach its adapter
                rows.append((task, self.loaded.get(task.target, "__base__")))
            except Exception as exc:
                errors[task.target] = f"{type(exc).__name__}: {first_line(exc)}"
        prompts = [m for task, _ in rows for m in self.data["gen"][task.start : task.end]]
        names = [name for task, name in rows for _ in range(task.end - task.start)]
        replies = []
        try:
            for i in range(0, len(prompts), GENERATION_CHUNK):
                replies += generate(
                    self.peft or self.base,
                    self.tokenizer,
                    prompts[i : i + GENERATION_CHUNK],
                    max_new_tokens=self.max_new_tokens,
                    adapter_names=names[i : i + GENERATION_CHUNK] if self.peft is not None else None,
                )
        except Exception as exc:
            for task, _ in rows:
                errors[task.target] = f"generation failed: {type(exc).__name__}: {first_line(exc)}"
            return []
        out, i = [], 0
        for task, _ in rows:
            n = task.end - task.start
            try:
                out.append((task, self._rewarded(task, replies[i : i + n])))
            except TunefleetError as exc:
                errors[task.target] = str(exc)
            i += n
        return out

    def _rewarded(self, task: Task, replies: list[str]) -> list[dict]:
        """Per prompt: the prompt, the answer, each reward's score and their sum."""
        prompts = self.data["gen"][task.start : task.end]
        columns = self.gen_columns[task.start : task.end]
        extra = {c: [row[c] for row in columns] for c in (columns[0] if columns else {})}
        completions = [[{"role": "assistant", "content": r}] for r in replies]
        scores = {name: f(prompts=prompts, completions=completions, **extra) for name, f in self.rewards}
        out = []
        for i, (prompt, reply) in enumerate(zip(prompts, replies)):
            each = {name: float(values[i] or 0.0) for name, values in scores.items()}
            out.append(
                {"prompt": _last_user(prompt), "response": reply, "rewards": each, "reward": sum(each.values())}
            )
        return out

    def _score(self, model, task: Task) -> list:
        pad = self.tokenizer.pad_token_id or 0
        if task.metric == "ppl":
            sums, counts = score_batched(model, self.data["ppl"][task.start : task.end], self.batch_size, pad)
            return [[s, c] for s, c in zip(sums, counts)]
        if task.metric == "pref":
            pairs = self.data["pref"][task.start : task.end]
            # chosen and rejected share a prompt and have similar lengths: score them in the same batches
            sums, counts = score_batched(model, [s for pair in pairs for s in pair], self.batch_size, pad)
            return [[sums[2 * i], counts[2 * i], sums[2 * i + 1], counts[2 * i + 1]] for i in range(len(pairs))]
        raise ValueError(f"unknown metric {task.metric}")


def _last_user(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""
