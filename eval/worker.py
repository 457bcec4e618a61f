"""A scorer holds one base model and the encoded test data; it applies each run's adapter in turn.

The base model is loaded once per worker; adapters take turns in a PEFT adapter slot (the first of a shape is
loaded by PEFT, the next ones only copy their weights in), and the base row is scored with adapters disabled.
Each target's sequences are scored and its held-out answers generated while its adapter is active. One worker
per GPU (or a fraction of one) under Ray, or one in-process worker for the local backend.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.eval.plan import Task
from tunefleet.eval.settings import EvalData
from tunefleet.trainers.heldout import (
    first_rows,
    greedy_answers,
    load_pairs,
    load_prompts,
    reward_scorers,
    rewarded,
)
from tunefleet.trainers.scoring import (
    encode_conversation,
    reward_model_scores,
    score_batched,
    score_pairs,
)


@dataclass
class ShardResult:
    """What a worker returns for one shard: per-sample values per task, and the targets that failed."""

    results: list[tuple[Task, list]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # target -> message
    seconds: float = 0.0
    node_id: str | None = None  # the Ray node that scored it


EVAL_REWARD_MODEL_HINT = "give --reward_funcs functions; a reward model judges the answers as --reward_model"
MERGE_MAX_PARAMS = 200_000_000  # float32 bases up to this size score with the adapter merged (Scorer.merged)
# Adapter config keys that do not change the shape or the output of an adapter in eval mode.
NOT_SHAPE = {
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "init_lora_weights",
    "lora_dropout",
    "peft_version",
}


def load_eval_data(spec: EvalData) -> dict:
    """Per metric, the first `max_samples` items of its test split: conversations (ppl), pairs (pref) and
    held-out prompts with their other columns (gen: greedy answers, rewards, samples; the first `heldout`).

    Any layout training accepts works here too (converted the same way); scoring needs conversations, so
    plain-text layouts are refused with the reason. Without a `gen_split`, the prompts of the SFT split serve.
    """
    from tunefleet.trainers import data

    def prepared(method: str, split: str, rows_wanted: int = spec.max_samples):
        rows = first_rows(data.load_split(spec.dataset, split), rows_wanted)
        return data.prepare(method, rows, source=spec.dataset, split=split, strict=False).dataset

    out = {"ppl": [], "pref": [], "gen": [], "gen_columns": [], "bench": list(spec.tasks)}
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
        out["pref"] = load_pairs(spec.dataset, spec.pref_split, spec.max_samples)
    if spec.gen_split:
        try:
            out["gen"], out["gen_columns"] = load_prompts(spec.dataset, spec.gen_split, spec.heldout)
        except TunefleetError as exc:
            if "has no split" not in str(exc) or not out["ppl"]:
                raise
            print(
                f"note: {spec.dataset} has no split '{spec.gen_split}': the questions of '{spec.sft_split}' are "
                "the held-out prompts"
            )
            out["gen"] = [m[:-1] for m in out["ppl"]][: spec.heldout]
            out["gen_columns"] = [{} for _ in out["gen"]]
    return out


def ray_node_id() -> str | None:
    """The Ray node this worker runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


class Scorer:
    """Score tasks for many targets on one loaded base model."""

    def __init__(
        self,
        base_model: str,
        data_spec: EvalData,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        raw: dict | None = None,
    ):
        """`raw`: the test data as `load_eval_data(data_spec)` returns it, when the caller has it already."""
        import torch
        from transformers import AutoModelForCausalLM

        from tunefleet.trainers.model import load_tokenizer, resolve

        self.tokenizer = load_tokenizer(base_model, trust_remote_code, chat_template=data_spec.chat_template)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.base = AutoModelForCausalLM.from_pretrained(
            resolve(base_model), dtype=dtype, trust_remote_code=trust_remote_code, device_map={"": device}
        )
        self.base.eval()
        self.peft = None  # the PeftModel around the base, once a first adapter is loaded
        self.slots: dict[str, str] = {}  # adapter shape (its config) -> the PEFT adapter slot that holds it
        self.slot_tensors: dict[str, dict] = {}  # slot -> its weight tensors, keyed as in adapter files
        self.active: str | None = None  # the target whose weights the active slot holds
        params = sum(p.numel() for p in self.base.parameters())
        self.merge = dtype == torch.float32 and params <= MERGE_MAX_PARAMS
        self.pristine: dict | None = None  # the base's adapted weights, as loaded (while merging)
        self.batch_size = batch_size
        raw = raw or load_eval_data(data_spec)
        self.data = {
            "ppl": [encode_conversation(self.tokenizer, m) for m in raw["ppl"]],
            "pref": [
                (encode_conversation(self.tokenizer, c), encode_conversation(self.tokenizer, r))
                for c, r in raw["pref"]
            ],
            "gen": raw["gen"],
            "bench": raw["bench"],
        }
        self.benchmarks = None  # lm-eval's task index, built once per worker
        if raw["bench"]:
            from tunefleet.eval.benchmarks import Benchmarks

            self.benchmarks = Benchmarks(
                tuple(raw["bench"]), data_spec.num_fewshot, data_spec.limit, data_spec.include_path, batch_size
            )
        self.gen_columns = raw["gen_columns"]
        self.rewards = reward_scorers(list(data_spec.reward_funcs), EVAL_REWARD_MODEL_HINT)
        self.reward_model = None  # (model, tokenizer): loaded once, beside the base, when answers are judged by one
        if data_spec.reward_model and raw["gen"]:
            from tunefleet.trainers.model import load_reward_model

            self.reward_model = load_reward_model(data_spec.reward_model, trust_remote_code, device)
        self.max_new_tokens = data_spec.max_new_tokens

    def sizes(self) -> dict:
        return {k: len(v) for k, v in self.data.items()}

    def activate(self, target: str, adapter: str | None):
        """The model that scores `target`: None for the base row (the base alone, adapters off), else the base
        with the target's adapter in a slot.

        Adapters of one shape (the same LoRA rank, targets, alpha, ...) take turns in one slot: the first is
        loaded by PEFT, each next one only copies its weights into the slot's tensors (safetensors, no pickle).
        Loading every adapter as a new PEFT adapter instead costs more with every adapter already loaded."""
        if adapter is None:
            return None
        if self.active == target:
            return self.peft
        from safetensors.torch import load_file

        folder = Path(adapter)
        weights_file = folder / "adapter_model.safetensors"
        if not weights_file.is_file():
            raise TunefleetError(f"{adapter} holds no adapter_model.safetensors (tunefleet loads no pickled weights)")
        try:  # read whole before PEFT touches the model: a broken adapter must leave the base as it was
            weights = load_file(str(weights_file))
            config = json.loads((folder / "adapter_config.json").read_text())
        except Exception as exc:
            raise TunefleetError(f"{adapter}: cannot read the adapter: {first_line(exc)}") from None
        shape = json.dumps({k: v for k, v in config.items() if k not in NOT_SHAPE}, sort_keys=True, default=str)
        self.active = None  # until the slot holds this target's weights whole
        slot = self.slots.get(shape)
        if slot is None:
            from peft import PeftModel
            from peft.utils import get_peft_model_state_dict

            slot = f"slot{len(self.slots)}"  # PEFT adapter names must be identifiers: not the run name
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, adapter, adapter_name=slot).eval()
            else:
                self.peft.load_adapter(adapter, adapter_name=slot)
            self.slots[shape] = slot
            self.slot_tensors[slot] = get_peft_model_state_dict(self.peft, adapter_name=slot)
        else:
            tensors = self.slot_tensors[slot]
            if set(weights) != set(tensors) or any(weights[k].shape != tensors[k].shape for k in weights):
                raise TunefleetError(f"{adapter}: its weights do not match its adapter_config.json")
            import torch

            with torch.no_grad():
                for key, value in weights.items():
                    tensors[key].copy_(value)
        assert self.peft is not None  # made with the first slot
        self.peft.set_adapter(slot)
        self.active = target
        return self.peft

    @contextlib.contextmanager
    def merged(self, model):
        """The active adapter folded into the base weights while it scores, where that is exact to float32
        rounding and worth it: a float32 base small enough that LoRA's own matmuls are a sizeable share of each
        forward (~1.25x faster for the tiny model on CPU). Afterwards the base weights are restored bit for bit
        from a copy, not by subtracting the adapter again (which would leave rounding behind)."""
        if model is None or not self.merge:
            yield model
            return
        import torch

        if self.pristine is None:
            self.pristine = {
                n: p.detach().clone() for n, p in self.base.named_parameters() if n.endswith("base_layer.weight")
            }
        model.merge_adapter()
        try:
            yield model
        finally:
            model.unmerge_adapter()
            with torch.no_grad():
                for name, param in self.base.named_parameters():
                    if name in self.pristine:
                        param.copy_(self.pristine[name])

    def run(self, targets: dict[str, str | None], tasks: list[Task]) -> ShardResult:
        """Score `tasks` (targets: name -> adapter folder, None for the base model alone), target by target."""
        t0 = time.time()
        results, errors = [], {}
        by_target: dict[str, list[Task]] = {}
        for task in tasks:
            by_target.setdefault(task.target, []).append(task)
        for target, own in by_target.items():
            try:
                model = self.activate(target, targets[target])
                if model is None and self.peft is not None:
                    with self.peft.disable_adapter():
                        results += [(task, self._score(self.peft, task)) for task in own]
                else:
                    with self.merged(model) as merged:
                        results += [(task, self._score(merged or self.base, task)) for task in own]
            except TunefleetError as exc:  # one bad adapter must not stop the others
                errors[target] = str(exc)
            except Exception as exc:
                errors[target] = f"{type(exc).__name__}: {first_line(exc)}"
        return ShardResult([r for r in results if r[0].target not in errors], errors, time.time() - t0, ray_node_id())

    def _score(self, model, task: Task) -> list:
        pad = self.tokenizer.pad_token_id or 0
        if task.metric == "ppl":
            sums, counts = score_batched(model, self.data["ppl"][task.start : task.end], self.batch_size, pad)
            return [[s, c] for s, c in zip(sums, counts)]
        if task.metric == "pref":
            return score_pairs(model, self.data["pref"][task.start : task.end], self.batch_size, pad)
        if task.metric == "gen":
            prompts = self.data["gen"][task.start : task.end]
            return self._rewarded(task, greedy_answers(model, self.tokenizer, prompts, self.max_new_tokens))
        if task.metric == "bench" and self.benchmarks is not None:
            return [
                self.benchmarks.run(model, self.tokenizer, name) for name in self.data["bench"][task.start : task.end]
            ]
        raise ValueError(f"unknown metric {task.metric}")

    def _rewarded(self, task: Task, replies: list[str]) -> list[dict]:
        """Per prompt: the prompt, the answer, each reward's score and their sum."""
        prompts = self.data["gen"][task.start : task.end]
        columns = self.gen_columns[task.start : task.end]
        scores = rewarded(self.rewards, prompts, columns, replies)
        judged = [None] * len(replies)
        if self.reward_model is not None:
            scorer, tokenizer = self.reward_model
            conversations = [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, replies)]
            judged = reward_model_scores(scorer, tokenizer, conversations, self.batch_size)
        return [
            {"prompt": _last_user(prompt), "response": reply, "rewards": each, "reward": sum(each.values()), "rm": rm}
            for prompt, reply, each, rm in zip(prompts, replies, scores, judged)
        ]


def _last_user(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""
