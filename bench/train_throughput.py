"""Training speed: `tunefleet train` against a plain TRL script with TRL's defaults, pair by pair in one run.

For each method and model, both train the same data (one epoch, same batch, lr and LoRA) in their own
process; the table gives real (non-pad) tokens per second of training, the ratio, peak memory and start-up
overhead (process wall time minus training time). Same data, same epoch: equal token counts, so the
tokens/s ratio is the training-time ratio. First, per-run start-up (process start to first training step) of a
run started cold against one forked by a warm process (tunefleet.launcher.warm).

    python bench/train_throughput.py                    # CPU: tiny (0.4M) and 10M models, ~8 minutes
    python bench/train_throughput.py --methods sft dpo --models 10m
    python bench/train_throughput.py --startup_only     # start-up cold vs warm, ~1 minute
    python bench/train_throughput.py --qwen05b --qlora  # GPU (bench/gpu_check.sh): Qwen2-0.5B architecture
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LR = {"sft": 2e-4, "dpo": 5e-5, "orpo": 8e-6, "kto": 5e-5, "grpo": 5e-5}
GRPO_STEPS = 12


def build_models(root: Path, which: list[str], qwen05b: bool) -> dict[str, Path]:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tunefleet.trainers.tiny import ensure_model

    tiny = ensure_model()
    models = {}
    if "tiny" in which:
        models["tiny"] = tiny
    tok = AutoTokenizer.from_pretrained(tiny)
    shapes = {
        "10m": dict(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, intermediate_size=1024
        )
    }
    if qwen05b:  # the real Qwen2-0.5B-Instruct architecture (config kept in bench/), random init, tiny tokenizer
        shapes["qwen2-0.5b"] = {
            k: v
            for k, v in json.loads((ROOT / "bench" / "qwen2_0.5b_config.json").read_text()).items()
            if k
            in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "vocab_size",
                "num_key_value_heads",
                "intermediate_size",
                "rope_theta",
            )
        }
        which = [*which, "qwen2-0.5b"]
    for name, shape in shapes.items():
        if name not in which:
            continue
        torch.manual_seed(0)
        # The tiny tokenizer's ids fit any vocabulary; the 0.5B shape keeps Qwen's 151,936 rows (real memory).
        cfg = Qwen2Config(
            **{"vocab_size": len(tok), **shape},
            tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        path = root / f"model-{name}"
        Qwen2ForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        models[name] = path
    return models


def build_data(root: Path, tokenizer, n: int) -> tuple[dict[str, Path], dict[str, int]]:
    """TRL-format JSONL per method, and the real tokens one epoch trains on."""
    from tunefleet.trainers import data
    from tunefleet.trainers.tiny import make_rows

    sft_rows = make_rows("train_sft", 400)
    convs = []
    for i in range(n):  # 1-8 turns: 30-300 tokens, the mixed lengths of real chat data
        turns = []
        for k in range(1 + (i * 5) % 8):
            turns += sft_rows[(i * 7 + k) % len(sft_rows)]["messages"]
        convs.append({"messages": turns})
    prefs = data.load_split("tunefleet/tiny-ultrafeedback", "train_prefs").select(range(n))
    sets = {
        "sft": convs,
        "dpo": list(data.prepare("dpo", prefs).dataset),
        "kto": list(data.prepare("kto", prefs.select(range(n // 2))).dataset),
        "grpo": list(data.prepare("grpo", prefs).dataset),
    }
    sets["orpo"] = sets["dpo"]
    files, tokens = {}, {}

    def count(messages):
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))

    for method, rows in sets.items():
        files[method] = root / f"{method}.jsonl"
        files[method].write_text("".join(json.dumps(r) + "\n" for r in rows))
        if method == "sft":
            tokens[method] = sum(count(r["messages"]) for r in rows)
        elif method in ("dpo", "orpo"):
            tokens[method] = sum(count(r["prompt"] + r["chosen"]) + count(r["prompt"] + r["rejected"]) for r in rows)
        elif method == "kto":
            tokens[method] = sum(count(r["prompt"] + r["completion"]) for r in rows)
        else:
            tokens[method] = 0  # GRPO: generation-bound; compared by time alone
    return files, tokens


def run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


def plain(method, model, data, out, batch, qlora) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "plain_trl.py"),
        method,
        str(model),
        str(data),
        str(out),
        "--batch",
        str(batch),
        "--lr",
        str(LR[method]),
    ]
    if method == "grpo":
        cmd += ["--max_steps", str(GRPO_STEPS)]
    if qlora:
        cmd.append("--qlora")
    wall, stdout = run(cmd, ROOT)
    res = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {**res, "wall": wall}


def tunefleet(method, model, data, out, batch, qlora) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "tunefleet.launcher.cli",
        "train",
        "--method",
        method,
        "--model_name",
        str(model),
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        str(batch),
        "--gradient_accumulation_steps",
        "1",
        "--learning_rate",
        str(LR[method]),
        "--use_qlora",
        str(qlora).lower(),
        "--save_steps",
        "100000",
        "--logging_steps",
        "1",
        "--seed",
        "42",
    ]
    if method == "grpo":
        cmd += [
            "--max_steps",
            str(GRPO_STEPS),
            "--num_generations",
            "4",
            "--max_completion_length",
            "16",
            "--reward_funcs",
            "friendly",
        ]
    wall, _ = run(cmd, ROOT)
    record = json.loads((out / "run.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    return {
        "train_runtime": record["train_runtime_s"],
        "first_loss": losses[0],
        "steps": record["global_step"],
        "peak_rss_mb": record["peak_rss_mb"],
        "peak_gpu_mb": record.get("peak_gpu_mb"),
        "wall": wall,
        "fast_path": {k: v["on"] for k, v in record["fast_path"].items()},
    }


def startup(methods: list[str], repeats: int = 3) -> list[dict]:
    """Per-run overhead, cold against warm: the same 1-step run of each method on the tiny model, started as a sweep
    starts it (`python -m tunefleet.trainers.train`), once as a new interpreter and once forked by a warm process
    that is already serving (what a sweep's later runs get). Start-up = from the launcher starting the process to
    the first training step (run.json `startup`); also the whole run's wall time. Fastest of `repeats` each."""
    from tunefleet.common.contract import WARM_SWITCH_ENV
    from tunefleet.launcher import warm

    root = Path(tempfile.mkdtemp(prefix="tf-bench-startup-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    assert warm.own_server(env).wait_ready(), "the warm process did not start"
    print(
        f"\n{'method':<5} {'start-up s cold':>15} {'warm':>6} {'ratio':>6} {'1-step run wall s cold':>23} {'warm':>6}"
    )
    rows = []
    for method in methods:
        split = {"sft": "train_sft", "grpo": "train_gen"}.get(method, "train_prefs")
        times = {}
        for kind in ("cold", "warm"):
            best = None
            for i in range(repeats):
                out = root / f"{method}-{kind}-{i}"
                cmd = [sys.executable, "-m", "tunefleet.trainers.train", "--method", method]
                cmd += ["--model_name", "tunefleet/tiny-qwen2", "--dataset", "tunefleet/tiny-ultrafeedback"]
                cmd += ["--split", split, "--output_dir", str(out), "--max_steps", "1", "--use_qlora", "false"]
                cmd += ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1"]
                run_env = {**env, WARM_SWITCH_ENV: "1" if kind == "warm" else "0"}
                t0 = time.perf_counter()
                with open(root / f"{method}-{kind}-{i}.log", "w") as log:
                    proc = warm.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env, cwd=str(ROOT))
                    assert proc.wait() == 0, (root / f"{method}-{kind}-{i}.log").read_text()[-2000:]
                wall = time.perf_counter() - t0
                record = json.loads((out / "run.json").read_text())
                assert record["startup"]["kind"] == kind
                first = record["startup"]["to_first_step_s"]
                if best is None or first < best[0]:
                    best = (first, wall)
            times[kind] = best
        (cold_s, cold_wall), (warm_s, warm_wall) = times["cold"], times["warm"]
        rows.append({"method": method, "cold": times["cold"], "warm": times["warm"]})
        print(
            f"{method:<5} {cold_s:>15.2f} {warm_s:>6.2f} {cold_s / warm_s:>6.1f} {cold_wall:>23.2f} {warm_wall:>6.2f}",
            flush=True,
        )
    warm.stop_all()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["sft", "dpo", "orpo", "kto", "grpo"])
    p.add_argument("--models", nargs="*", default=["tiny", "10m"], help="tiny, 10m (none: only --qwen05b).")
    p.add_argument(
        "--samples",
        type=int,
        default=256,
        help="Samples per epoch (x4 for the tiny model: its steps take milliseconds, and short runs are noise).",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--qwen05b", action="store_true", help="Add the Qwen2-0.5B architecture (GPU).")
    p.add_argument("--qlora", action="store_true", help="4-bit QLoRA on both sides (GPU).")
    p.add_argument("--json", help="Also write the rows here.")
    p.add_argument("--startup_only", action="store_true", help="Only the per-run start-up, cold against warm.")
    a = p.parse_args()
    startup(a.methods)
    if a.startup_only:
        return
    from transformers import AutoTokenizer

    from tunefleet.trainers.tiny import ensure_model

    root = Path(tempfile.mkdtemp(prefix="tf-bench-train-"))
    models = build_models(root, a.models, a.qwen05b)
    tokenizer = AutoTokenizer.from_pretrained(ensure_model())
    data_sets = {}
    rows = []
    print(
        f"{'method':<5} {'model':<10} {'plain tok/s':>11} {'tunefleet':>10} {'ratio':>6} {'peak MiB plain/tf':>18}"
        f" {'start-up s plain/tf':>20} {'first loss plain/tf':>20}"
    )
    for name, model in models.items():
        n = a.samples * (4 if name == "tiny" else 1)
        if n not in data_sets:
            (root / f"data-{n}").mkdir()
            data_sets[n] = build_data(root / f"data-{n}", tokenizer, n)
        files, tokens = data_sets[n]
        for method in a.methods:
            b = 4 if method == "grpo" else a.batch
            base = plain(method, model, files[method], root / f"plain-{name}-{method}", b, a.qlora)
            ours = tunefleet(method, model, files[method], root / f"tf-{name}-{method}", b, a.qlora)
            speed = base["train_runtime"] / ours["train_runtime"]
            tok = tokens[method]
            mem = "peak_gpu_mb" if base.get("peak_gpu_mb") else "peak_rss_mb"
            rows.append(
                {"method": method, "model": name, "tokens": tok, "plain": base, "tunefleet": ours, "speedup": speed}
            )

            def fmt(r, tok=tok):
                return f"{tok / r['train_runtime']:.0f}" if tok else f"{r['steps'] / r['train_runtime']:.2f}st/s"

            print(
                f"{method:<5} {name:<10} {fmt(base):>11} {fmt(ours):>10} {speed:6.2f} "
                f"{base[mem]:>8.0f}/{ours[mem]:<9.0f} "
                f"{base['wall'] - base['train_runtime']:>9.1f}/{ours['wall'] - ours['train_runtime']:<10.1f} "
                f"{base['first_loss']:>9.4f}/{ours['first_loss']:<10.4f}",
                flush=True,
            )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    worst = min(r["speedup"] for r in rows)
    print(f"\nslowest ratio {worst:.2f}; tunefleet fast path: {rows[-1]['tunefleet']['fast_path']}")


if __name__ == "__main__":
    main()
