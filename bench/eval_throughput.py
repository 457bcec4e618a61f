"""Evaluator speed, side by side in one run (ratios, not absolute times: these machines are noisy).

(a) scorer tokens/s: length-sorted batches vs unsorted batches vs a per-sample loop, same ~10M-param model
    and data;
(b) end to end: `tunefleet eval` on 10 runs vs the original way (each run: load base + adapter, score every
    sample on its own, chosen and rejected separately), like for like and with tunefleet's defaults, checking
    both give the same numbers (test loss to 1e-6, preference accuracy identical);
(c) benchmark tasks: `tunefleet eval --tasks tiny_world` on 10 runs (one process, the base loaded once, adapters
    in turn) vs lm-eval's own way (`lm_eval --model_args pretrained=<base>,peft=<run>`: one process per
    adapter), checking both give the same accuracies.

    python bench/eval_throughput.py            # ~5 minutes on 2 CPU cores
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tunefleet.eval.settings import EvalData, EvalSettings
from tunefleet.eval.worker import load_eval_data
from tunefleet.trainers.scoring import Sequence, encode_conversation, score_batched, score_one

DATASET = "tunefleet/tiny-ultrafeedback"


def model_10m(tokenizer):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(cfg).eval()


def mixed_lengths(tokenizer, n: int = 256) -> list[Sequence]:
    """Conversations of 1-8 turns of the tiny data: 30-300 tokens, like real chat data's spread."""
    data = load_eval_data(EvalData(DATASET, "test_sft", None, 200, 0))["ppl"]
    seqs = []
    for i in range(n):
        turns = []
        for k in range(1 + i % 8):
            turns += data[(i * 7 + k) % len(data)]
        seqs.append(encode_conversation(tokenizer, turns))
    return seqs


def bench_scorer() -> None:
    import random

    from transformers import AutoTokenizer

    from tunefleet.trainers.tiny import ensure_model

    tok = AutoTokenizer.from_pretrained(ensure_model())
    model = model_10m(tok)
    seqs = mixed_lengths(tok)
    tokens = sum(len(s) for s in seqs)
    print(
        f"(a) scorer: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-param model, {len(seqs)} sequences "
        f"of {min(map(len, seqs))}-{max(map(len, seqs))} tokens ({tokens} tokens)"
    )

    t0 = time.perf_counter()
    ref = [score_one(model, s) for s in seqs]
    loop_s = time.perf_counter() - t0
    rows = [("per-sample loop", loop_s, 1.0)]
    for bs in (8, 16):
        t0 = time.perf_counter()
        sums, _ = score_batched(model, seqs, bs, tok.pad_token_id)
        sec = time.perf_counter() - t0
        worst = max(abs(a - b[0]) / abs(b[0]) for a, b in zip(sums, ref))
        rows.append((f"sorted batches of {bs} (max rel. diff {worst:.1e})", sec, loop_s / sec))
    # Unsorted: same batches the order of the data gives, padded to each batch's longest.
    shuffled = seqs[:]
    random.Random(0).shuffle(shuffled)
    t0 = time.perf_counter()
    for i in range(0, len(shuffled), 16):
        score_batched(model, shuffled[i : i + 16], 16, tok.pad_token_id)  # one batch per call: no sorting across
    sec = time.perf_counter() - t0
    rows.append(("unsorted batches of 16", sec, loop_s / sec))
    for name, sec, ratio in rows:
        print(f"    {name:<44} {tokens / sec:9.0f} tok/s   {ratio:5.2f}x the loop")


def train_runs(root: Path, n: int) -> None:
    from tunefleet.trainers.config import from_dict
    from tunefleet.trainers.train import run

    for i in range(n):
        method, split = (("sft", "train_sft"), ("dpo", "train_prefs"))[i % 2]
        run(
            from_dict(
                {
                    "method": method,
                    "model_name": "tunefleet/tiny-qwen2",
                    "dataset": DATASET,
                    "split": split,
                    "output_dir": str(root / f"{method}_tiny_s{i}"),
                    "max_steps": 2,
                    "seed": i,
                    "per_device_train_batch_size": 4,
                    "gradient_accumulation_steps": 1,
                    "use_qlora": False,
                    "learning_rate": 1e-3,
                    "logging_steps": 1,
                }
            )
        )


def original_way(root: Path, max_samples: int, gens: int) -> dict:
    """What unified_evaluation.py did: per run, load base + adapter, then one sample at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefleet.trainers.model import resolve
    from tunefleet.trainers.scoring import generate

    base_path = resolve("tunefleet/tiny-qwen2")
    out = {}
    for run_dir in sorted(p for p in root.iterdir() if (p / "adapter_config.json").exists()):
        tok = AutoTokenizer.from_pretrained(base_path)
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), run_dir
        ).eval()
        data = load_eval_data(EvalData(DATASET, "test_sft", "test_prefs", max_samples, gens))
        nll = tokens = 0.0
        for conv in data["ppl"]:
            s, c = score_one(model, encode_conversation(tok, conv))
            nll, tokens = nll + s, tokens + c
        correct = 0
        for chosen, rejected in data["pref"]:
            cs, cc = score_one(model, encode_conversation(tok, chosen))
            rs, rc = score_one(model, encode_conversation(tok, rejected))
            correct += cs / cc < rs / rc
        for conv in data["gen"]:
            generate(model, tok, [conv])
        out[run_dir.name] = {"test_loss": nll / tokens, "preference_accuracy": correct / len(data["pref"])}
    return out


def tunefleet_eval(root: Path, max_samples: int, gens: int, heldout: int | None) -> dict:
    from tunefleet.eval.evaluate import evaluate

    for old in root.glob("evaluation_*"):  # a fresh evaluation each time: nothing reused
        old.unlink()
    settings = EvalSettings(max_samples=max_samples, max_generation_samples=gens, heldout_prompts=heldout)
    return evaluate(str(root), settings=settings, progress=False)


def best_of(repeats: int, fn, *args) -> tuple[float, object]:
    """The fastest of `repeats` calls (the others absorb what the machine was doing) and its result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times), result


def bench_end_to_end(n_runs: int = 10, max_samples: int = 100, gens: int = 3, repeats: int = 2) -> None:
    """Both sides in this process, after a warm-up of each (library imports and first-call costs are paid once
    per process by either side, so neither is charged for them); each timed `repeats` times, the fastest kept.

    - like for like: the original tool's work (test loss, preference accuracy, 3 answers per run); tunefleet
      answers the same 3 held-out prompts per run (their rewards and win rates come with them), and also scores
      the base row and writes the report and plots;
    - tunefleet's defaults: held-out rewards and win rates over `max_samples` prompts per run."""
    root = Path(tempfile.mkdtemp(prefix="tf-bench-eval-"))
    warm = Path(tempfile.mkdtemp(prefix="tf-bench-eval-warm-"))
    try:
        train_runs(root, n_runs)
        train_runs(warm, 2)
        original_way(warm, 10, 1)
        tunefleet_eval(warm, 10, 1, None)
        orig_s, ref = best_of(repeats, original_way, root, max_samples, gens)
        same_s, same = best_of(repeats, tunefleet_eval, root, max_samples, gens, gens)
        full_s, full = best_of(repeats, tunefleet_eval, root, max_samples, gens, None)
        print(
            f"(b) end to end, {n_runs} runs x ({max_samples} conversations + {max_samples} pairs + {gens} generations)"
        )
        print(f"    original way (per run: load base+adapter, per-sample loop)          {orig_s:7.2f} s")
        for label, sec, res in (
            (f"tunefleet eval, like for like ({gens} held-out answers per run)", same_s, same),
            (f"tunefleet eval, defaults ({max_samples} held-out answers per run)  ", full_s, full),
        ):
            worst = max(abs(res[name]["test_loss"] - r["test_loss"]) / r["test_loss"] for name, r in ref.items())
            same_acc = all(res[name]["preference_accuracy"] == r["preference_accuracy"] for name, r in ref.items())
            print(
                f"    {label} {sec:7.2f} s   {orig_s / sec:5.2f}x; test_loss max rel. diff {worst:.1e}, "
                f"preference accuracy identical: {same_acc}"
            )
            assert math.isfinite(worst) and worst < 1e-6 and same_acc
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(warm, ignore_errors=True)


def bench_benchmark_tasks(n_runs: int = 10, limit: int = 60) -> None:
    """Both sides as the commands a user runs, each its own process(es), so each pays its own start-up."""
    import json
    import subprocess
    import sys

    from tunefleet.eval.benchmarks import TASKS_DIR
    from tunefleet.trainers.model import resolve

    root = Path(tempfile.mkdtemp(prefix="tf-bench-tasks-"))
    bin_dir = Path(sys.executable).parent
    try:
        train_runs(root, n_runs)
        t0 = time.perf_counter()
        tunefleet = [str(bin_dir / "tunefleet"), "eval", "--runs_dir", str(root), "--tasks", "tiny_world"]
        tunefleet += [
            "--limit",
            str(limit),
            "--max_samples",
            "1",
            "--max_generation_samples",
            "0",
            "--skip_perplexity",
        ]
        subprocess.run(tunefleet, check=True, capture_output=True)
        ours_s = time.perf_counter() - t0
        ours = json.loads((root / "evaluation_results.json").read_text())

        base = resolve("tunefleet/tiny-qwen2")
        theirs, t0 = {}, time.perf_counter()
        for run_dir in sorted(p for p in root.iterdir() if (p / "adapter_config.json").exists()):
            out = root / "lm_eval" / run_dir.name
            lm_eval = [str(bin_dir / "lm_eval"), "--model", "hf", "--model_args",
                       f"pretrained={base},peft={run_dir},dtype=float32", "--tasks", "tiny_world",
                       "--include_path", str(TASKS_DIR), "--limit", str(limit), "--batch_size", "32",
                       "--device", "cpu", "--output_path", str(out)]  # fmt: skip
            subprocess.run(lm_eval, check=True, capture_output=True)
            (written,) = out.rglob("results_*.json")
            theirs[run_dir.name] = json.loads(written.read_text())["results"]["tiny_world"]
        theirs_s = time.perf_counter() - t0
        same = all(
            abs(ours[name]["benchmarks"]["tiny_world"][metric] - result[f"{metric},none"]) < 1e-6
            for name, result in theirs.items()
            for metric in ("acc", "acc_norm")
        )
        print(f"(c) benchmark task tiny_world ({limit} questions), {n_runs} runs")
        print(f"    lm-eval, one process per adapter                                    {theirs_s:7.2f} s")
        print(
            f"    tunefleet eval --tasks, one process, base loaded once               {ours_s:7.2f} s   "
            f"{theirs_s / ours_s:5.2f}x; acc and acc_norm identical: {same}"
        )
        assert same
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    bench_scorer()
    bench_end_to_end()
    bench_benchmark_tasks()
