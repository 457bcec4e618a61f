"""`tunefleet export`: a run's model in a form that serves without PEFT.

    tunefleet export runs/demo/dpo_tiny-qwen2_s1 --output_dir exported/dpo
    tunefleet export --runs_dir runs/demo --best win_rate_vs_base --method dpo --output_dir exported/best
    tunefleet export runs/demo/dpo_tiny-qwen2_s1 --output_dir exported/dpo --push_to_hub me/tiny-dpo

The LoRA adapter is merged into the base loaded in float32, then saved in the chosen dtype: a QLoRA run is merged
into the base's original weights, never into its 4-bit ones (4-bit weights cannot hold the sum; PEFT would round
it back to NF4). The folder holds safetensors, the tokenizer with its chat template, the generation config and a
README model card (the run's config, data and evaluation numbers). It is written beside `--output_dir` and renamed into
place when complete, so an interrupted export never looks finished.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tunefleet.common import hub
from tunefleet.common.contract import RESULTS_FILE, RUN_RECORD
from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import Store, is_uri, join, scratch_dir
from tunefleet.common.terminal import calm
from tunefleet.eval.results import BETTER, fetch, load_results, results_path
from tunefleet.trainers.model import merge_adapter, relocated, save_full_model, save_tokenizer

DTYPES = ("auto", "float32", "bfloat16", "float16")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Written by the trainer beside the adapter; the export takes them over (the run's pad token and chat template).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)
# A full fine-tuning run keeps its whole model at the top of its folder, as save_pretrained writes it.
FULL_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
COPIED = (*ADAPTER_FILES, *TOKENIZER_FILES, RUN_RECORD, "trainer_state.json")


@dataclass
class Chosen:
    """The run an export takes, and why."""

    name: str
    location: str  # its folder or URI
    entry: dict  # its evaluation_results.json entry ({} when not evaluated)
    metric: str | None = None
    value: float | None = None
    among: int = 0  # how many runs had the metric

    def describe(self) -> str:
        if self.metric is None:
            return f"run {self.name}"
        way = "lower" if BETTER[self.metric] == "min" else "higher"
        return f"{self.name}: best {self.metric} ({way} is better) of {self.among} runs, {self.value:.4g}"


def choose_best(runs_dir: str, metric: str, method: str | None = None, results_file: str | None = None) -> Chosen:
    """The run of evaluation_results.json with the best `metric` (ties: first by name); base and failed rows out."""
    if metric not in BETTER:
        raise TunefleetError(f"--best {metric}: not a metric runs are compared by; use one of {', '.join(BETTER)}")
    path = results_path(runs_dir, results_file)
    results = load_results(path)
    if not results:
        raise TunefleetError(f"no evaluation results at {path}: run `tunefleet eval --runs_dir {runs_dir}` first")
    scored = [
        (name, entry)
        for name, entry in results.items()
        if entry.get("method") != "base"
        and not entry.get("error")
        and (method is None or entry.get("method") == method)
        and isinstance(entry.get(metric), (int, float))
        and not math.isnan(entry[metric])
    ]
    if not scored:
        which = f"{method} runs" if method else "runs"
        raise TunefleetError(f"no {which} in {path} have {metric}; the metrics there: {present_metrics(results)}")
    sign = 1 if BETTER[metric] == "min" else -1
    name, entry = min(scored, key=lambda item: (sign * item[1][metric], item[0]))
    location = join(runs_dir, name)
    run = Store(location)
    if not (run.exists("adapter_config.json") or run.exists(RUN_RECORD)) and entry.get("model_path"):
        location = entry["model_path"]  # results written by an older layout: where the evaluator found it
    return Chosen(name, location, entry, metric, float(entry[metric]), len(scored))


def present_metrics(results: dict) -> str:
    found = [m for m in BETTER if any(isinstance(e.get(m), (int, float)) for e in results.values())]
    return ", ".join(found) or "none"


def evaluation_entry(location: str, name: str) -> dict:
    """The run's row of the evaluation_results.json in its parent folder, if it was evaluated there."""
    parent = location.rstrip("/").rpartition("/")[0] or "."
    return load_results(join(parent, RESULTS_FILE)).get(name) or {}


def local_run(location: str, full: bool = False) -> Path:
    """A local folder with the run's adapter (or, for full fine-tuning, its model), tokenizer and records (a store's
    run is fetched; checkpoints never)."""
    store = Store(location)
    kept = "model.safetensors" if full else "adapter_config.json"
    if not store.exists(kept) and not (full and store.exists("model.safetensors.index.json")):
        hint = " (a checkpoint folder is not a run: give the run's folder)" if "checkpoint-" in location else ""
        raise TunefleetError(f"{location} holds no {kept}: not a finished run{hint}")
    if not store.remote:
        return Path(location)
    if full:
        shards = (store.read_json("model.safetensors.index.json") or {}).get("weight_map", {}).values()
        names = (*FULL_MODEL_FILES, *sorted(set(shards)), *TOKENIZER_FILES, RUN_RECORD, "trainer_state.json")
        return fetch(store, scratch_dir(location, "export"), names)
    return fetch(store, scratch_dir(location, "export"), COPIED)


def check_finished(record: dict, location: str) -> None:
    status = record.get("status")
    if status and status != RunStatus.FINISHED:
        raise TunefleetError(
            f"run {location} is {status}, not finished: its adapter is a partial model; finish it first (rerun "
            "its command: it resumes from its latest checkpoint)"
        )


def hub_token() -> str:
    """The token `--push_to_hub` uploads with; refuses before any work when there is none."""
    return hub.token_for("--push_to_hub")


def export_run(
    location: str,
    out: Path,
    dtype: str = "auto",
    adapter_only: bool = False,
    chosen: Chosen | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the merged model (or the adapter) of the run at `location` into `out`; returns `out`."""
    if dtype not in DTYPES:
        raise TunefleetError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TunefleetError(f"{out} exists and is not empty; choose another --output_dir or pass --overwrite")
    record = Store(location).read_json(RUN_RECORD) or {}
    full = finetune_of(record.get("config") or {}) == "full"
    if full and adapter_only:
        raise TunefleetError(f"--adapter_only: {location} is a full fine-tuning run (no adapter); export it whole")
    run_path = local_run(location, full)
    check_finished(record, location)
    base = record.get("base_model") or (Store(location).read_json("adapter_config.json") or {}).get(
        "base_model_name_or_path"
    )
    if not base:
        raise TunefleetError(f"{location}: neither run.json nor adapter_config.json names the base model")
    if not is_uri(location):  # a parent run recorded where the study folder was when it trained
        base = relocated(base, Path(location), record)
    name = location.rstrip("/").rsplit("/", 1)[-1]
    chosen = chosen or Chosen(name, location, evaluation_entry(location, name))

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        trust_remote_code = bool((record.get("config") or {}).get("trust_remote_code"))
        if full:
            saved_dtype = save_full_model(run_path, dtype, partial, trust_remote_code, record.get("method") == "rm")
        elif adapter_only:
            for file in ADAPTER_FILES:
                shutil.copy2(run_path / file, partial / file)
            saved_dtype = "adapter"
        else:
            saved_dtype = merge_adapter(
                run_path, base, dtype, partial, bool((record.get("config") or {}).get("trust_remote_code"))
            )
        save_tokenizer(run_path, base, partial, bool((record.get("config") or {}).get("trust_remote_code")))
        (partial / "README.md").write_text(model_card(chosen, record, base, saved_dtype, adapter_only))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def finetune_of(config: dict) -> str:
    """qlora, lora or full, from a run record's config (records written before `finetune` hold `use_qlora`)."""
    if "finetune" in config:
        return str(config["finetune"])
    return "qlora" if config.get("use_qlora") else "lora"


def model_card(chosen: Chosen, record: dict, base: str, saved: str, adapter_only: bool) -> str:
    """A Hub model card: front matter, how it was made, its data, its evaluation numbers, how to load it."""
    config = record.get("config") or {}
    method = record.get("method") or config.get("method") or "?"
    dataset = record.get("dataset") or config.get("dataset")
    finetune = finetune_of(config)
    tags = ["tunefleet", "trl", method] + {"qlora": ["lora", "qlora"], "lora": ["lora"], "full": ["full"]}[finetune]
    front = ["---", f"base_model: {base}", f"library_name: {'peft' if adapter_only else 'transformers'}"]
    front += ["pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags]
    if dataset and not dataset.startswith(("/", ".")):
        front += ["datasets:", f"- {dataset}"]
    front.append("---")

    if adapter_only:
        what = f"The LoRA adapter of this run, to apply to `{base}` with PEFT."
    elif finetune == "full":
        what = f"The whole model, fine-tuned from `{base}` ({saved}). Loads with plain transformers or vLLM, no PEFT."
    elif finetune == "qlora":
        what = (
            f"Merged weights ({saved}): the LoRA adapter, trained on a 4-bit (NF4) `{base}`, merged into the base's "
            "original full-precision weights. Loads with plain transformers or vLLM, no PEFT."
        )
    else:
        what = f"Merged weights ({saved}): the LoRA adapter merged into `{base}`. Loads with plain transformers or vLLM, no PEFT."
    lines = [
        *front,
        "",
        f"# {chosen.name}",
        "",
        f"{method.upper()} fine-tune of `{base}`, trained and exported by tunefleet.",
        what,
    ]
    if chosen.metric:
        lines += ["", f"Chosen as {chosen.describe()}."]

    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    shown = [
        ("method", method),
        ("dataset", dataset),
        ("split", record.get("split") or config.get("split")),
        ("seed", record.get("seed")),
        ("steps", record.get("global_step")),
        ("learning rate", config.get("learning_rate")),
        ("effective batch", record.get("effective_batch_size")),
        (
            "per-device batch x accumulation",
            f"{config.get('per_device_train_batch_size')} x {config.get('gradient_accumulation_steps')}",
        ),
        (
            "LoRA r / alpha / dropout",
            None
            if finetune == "full"
            else f"{config.get('lora_r')} / {config.get('lora_alpha')} / {config.get('lora_dropout')}",
        ),
        ("fine-tuning", finetune),
        ("mean train loss", record.get("train_loss")),
    ]
    if method in ("dpo", "orpo", "kto"):
        shown.append(("beta", config.get("beta")))
    if method == "dpo":
        shown.append(("loss type", config.get("loss_type")))
    if method == "grpo":
        shown.append(("reward functions", ", ".join(config.get("reward_funcs") or [])))
    lines += [f"| {key} | {value} |" for key, value in shown if value not in (None, "")]

    data = record.get("data") or {}
    if data:
        lines += [
            "",
            "## Data",
            "",
            "| part | dataset | split | layout | rows used / read | columns used |",
            "|---|---|---|---|---|---|",
        ]
        for part, info in data.items():
            if isinstance(info, dict):
                lines.append(
                    f"| {part} | {info.get('dataset')} | {info.get('split')} | {info.get('layout')} | "
                    f"{info.get('rows')} / {info.get('rows_in')} | {', '.join(info.get('columns_used') or [])} |"
                )

    scores = {k: v for k, v in chosen.entry.items() if k in BETTER and isinstance(v, (int, float))}
    for group in ("heldout_rewards", "win_rates_vs_base"):
        for reward, value in (chosen.entry.get(group) or {}).items():
            scores[f"{group}.{reward}"] = value
    lines += ["", "## Evaluation", ""]
    if scores:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in scores.items()]
    else:
        lines.append("Not evaluated: `tunefleet eval --runs_dir <its runs folder>` scores it.")

    lines += ["", "## Use", "", "```python"]
    kind = "SequenceClassification" if method == "rm" else "CausalLM"  # a reward model: one score per sequence
    if adapter_only:
        lines += [
            f"from peft import AutoPeftModelFor{kind}",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelFor{kind}.from_pretrained("<this folder or repo>")',
            'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")',
        ]
    else:
        lines += [
            f"from transformers import AutoModelFor{kind}, AutoTokenizer",
            "",
            f'model = AutoModelFor{kind}.from_pretrained("<this folder or repo>")',
            'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")',
        ]
    lines += ["```", ""]
    versions = record.get("versions") or {}
    if versions:
        lines.append("Trained with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
        lines.append("")
    return "\n".join(lines)


def push(folder: Path, repo: str, private: bool, token: str) -> str:
    """Upload the exported folder to a Hub model repo (created when missing); returns its address."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message="tunefleet export")
    except Exception as exc:
        raise TunefleetError(f"push to {repo} failed: {first_line(exc)}") from None
    return f"https://huggingface.co/{repo}"


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunefleet export",
        description="Write a run's model merged into its base (or its adapter) for serving without PEFT.",
        allow_abbrev=False,
    )
    p.add_argument("run", nargs="?", help="The run's folder (or URI). Or choose it with --runs_dir and --best.")
    p.add_argument("--runs_dir", help="Runs folder whose evaluation_results.json --best reads.")
    p.add_argument("--best", metavar="METRIC", help=f"Export the best run by this metric: {', '.join(BETTER)}.")
    p.add_argument("--method", help="With --best: only runs of this method (sft, dpo, orpo, kto, grpo).")
    p.add_argument("--results", help="With --best: results file (default: <runs_dir>/evaluation_results.json).")
    p.add_argument(
        "--output_dir",
        "--out",
        dest="output_dir",
        required=True,
        help="Folder to write (must be empty or missing, unless --overwrite); --out is the same flag.",
    )
    p.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="Dtype of the merged weights (default auto: the base's)."
    )
    p.add_argument("--adapter_only", action="store_true", help="Copy the adapter (and tokenizer, card) unmerged.")
    p.add_argument("--push_to_hub", metavar="REPO", help="Also upload the folder to this Hub repo (needs a token).")
    p.add_argument("--private", action="store_true", help="With --push_to_hub: create the repo private.")
    p.add_argument("--overwrite", action="store_true", help="Replace what --output_dir holds.")
    return p


def cmd_export(argv: list[str]) -> int:
    a = export_parser().parse_args(argv)
    calm()
    if bool(a.run) == bool(a.best):
        raise TunefleetError("give a run folder, or --runs_dir with --best METRIC (not both)")
    if a.best and not a.runs_dir:
        raise TunefleetError("--best needs --runs_dir: the folder whose evaluation_results.json ranks the runs")
    if is_uri(a.output_dir):
        raise TunefleetError("--output_dir must be a local folder; use --push_to_hub to publish it")
    Store(a.run or a.runs_dir).check()
    if a.results and is_uri(a.results):
        Store(a.results.rsplit("/", 1)[0]).check()
    token = hub_token() if a.push_to_hub else None  # before minutes of merging, not after
    if a.best:
        chosen = choose_best(a.runs_dir, a.best, a.method, a.results)
        print(f"export {chosen.describe()}")
    else:
        name = a.run.rstrip("/").rsplit("/", 1)[-1]
        chosen = Chosen(name, a.run, evaluation_entry(a.run, name))
    out = export_run(chosen.location, Path(a.output_dir), a.dtype, a.adapter_only, chosen, a.overwrite)
    full = finetune_of((Store(chosen.location).read_json(RUN_RECORD) or {}).get("config") or {}) == "full"
    kind = "adapter" if a.adapter_only else "model" if full else "merged model"
    print(f"wrote {kind} of {chosen.name} to {out}")
    if a.push_to_hub and token:
        print(f"pushed to {push(out, a.push_to_hub, a.private, token)}")
    return 0
