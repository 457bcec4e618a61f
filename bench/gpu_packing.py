"""On a GPU: N QLoRA runs packed on one GPU against the same runs one after another, and the memory estimate
against `torch.cuda.max_memory_allocated` (run.json `peak_gpu_mb`) of each run. Run by bench/gpu_check.sh.

Both phases are `tunefleet sweep --backend local` on the random-init Qwen2-0.5B-Instruct architecture
(bench/qwen2_0.5b_config.json): phase 1 with `gpus_per_run: 1` (one run at a time), phase 2 with `gpus_per_run:
auto` (as many at once as the estimate fits). Same runs, same steps: the makespan ratio is the throughput ratio.

    python bench/gpu_packing.py --runs 4 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def build(root: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tunefleet.trainers.tiny import ensure_model

    tok = AutoTokenizer.from_pretrained(ensure_model())
    shape = {
        k: v
        for k, v in json.loads((ROOT / "bench" / "qwen2_0.5b_config.json").read_text()).items()
        if not k.startswith("_") and k not in ("architectures", "model_type")
    }
    torch.manual_seed(0)
    cfg = Qwen2Config(**{**shape, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id})
    path = root / "qwen2-0.5b-arch"
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


MAX_LENGTH = 512


def long_conversations(root: Path, tokenizer_path: Path, rows: int = 256) -> Path:
    """SFT rows longer than MAX_LENGTH tokens, so every sequence is truncated to exactly MAX_LENGTH: the estimate
    assumes sequences at max_length, and only full-length batches measure it (short data would flatter nothing
    but make the estimate look 5-8x too high)."""
    import random

    from transformers import AutoTokenizer

    rng = random.Random(0)
    words = "snow is white grass is green the sky is blue two plus three is five".split()
    path = root / "long_sft.jsonl"
    with path.open("w") as f:
        for _ in range(rows):
            reply = " ".join(rng.choice(words) for _ in range(700))
            messages = [{"role": "user", "content": "Tell me a long story."}, {"role": "assistant", "content": reply}]
            f.write(json.dumps({"messages": messages}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    first = json.loads(path.read_text().splitlines()[0])["messages"]
    tokens = len(tokenizer(tokenizer.apply_chat_template(first, tokenize=False)).input_ids)
    assert tokens > MAX_LENGTH, f"a row has {tokens} tokens, not more than {MAX_LENGTH}"
    return path


def sweep(root: Path, model: Path, data: Path, runs: int, steps: int, gpus) -> tuple[float, list[dict]]:
    spec = {
        "name": f"pack-{gpus}",
        "runs_dir": str(root / f"runs-{gpus}"),
        "base": {
            "model_name": str(model),
            "dataset": str(data),
            "method": "sft",
            "split": "train",
            "max_steps": steps,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "max_length": MAX_LENGTH,
            "use_qlora": True,
            "logging_steps": 10,
        },
        "grid": {"seed": list(range(1, runs + 1))},
        "resources": {"gpus_per_run": gpus, "cpus_per_run": 1, **({"max_parallel": 1} if gpus == 1 else {})},
    }
    path = root / f"spec-{gpus}.yaml"
    path.write_text(yaml.safe_dump(spec))
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tunefleet.launcher.cli", "sweep", str(path), "--backend", "local"],
        check=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    makespan = time.perf_counter() - t0
    records = [json.loads(p.read_text()) for p in sorted(Path(spec["runs_dir"]).glob("*/run.json"))]
    return makespan, records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", help="Also write the figures here.")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tf-bench-pack-"))
    try:
        model = build(root)
        data = long_conversations(root, model)
        alone, _ = sweep(root, model, data, a.runs, a.steps, 1)
        packed, records = sweep(root, model, data, a.runs, a.steps, "auto")
        placement = records[0]["placement"]
        peaks = [r.get("peak_gpu_mb") for r in records]
        estimate_mb = placement["estimate_gb"] * 1024 if placement.get("estimate_gb") else None
        print(
            f"\n{a.runs} QLoRA SFT runs of the Qwen2-0.5B architecture, {a.steps} steps each, batch 8 of "
            f"{MAX_LENGTH}-token sequences"
        )
        print(
            f"one at a time: {alone:.1f} s; packed ({placement['runs_per_gpu']} per GPU, {placement['reason']}): "
            f"{packed:.1f} s; throughput ratio {alone / packed:.2f}x"
        )
        if estimate_mb:
            error = (estimate_mb - max(peaks)) / max(peaks)
            print(
                f"memory per run: estimated {estimate_mb:.0f} MiB, measured peak {max(peaks):.0f} MiB "
                f"(max_memory_allocated): error {error:+.0%}"
            )
        if a.json:
            Path(a.json).write_text(
                json.dumps(
                    {"alone_s": alone, "packed_s": packed, "placement": placement, "peak_gpu_mb": peaks}, indent=2
                )
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
