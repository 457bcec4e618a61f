"""Peak memory: the estimate `gpus_per_run: auto` packs by, against what training really takes, side by side.

For several model sizes and methods, one `tunefleet train` process each (LoRA r 16, batch 8, sequences of about
`--length` tokens, fp32 on CPU, plain LoRA) records its peak resident memory and its resident memory just before
the model loads (run.json); measured = the difference. The estimate is `tunefleet.trainers.memory.estimate`
for the same run in fp32 with the attention scores materialised (SDPA's math path on CPU). On a GPU
(`bench/gpu_check.sh`) the measurement is `torch.cuda.max_memory_allocated` in bf16 QLoRA instead.

    python bench/memory_estimate.py                  # ~3 minutes on 2 CPU cores
    python bench/memory_estimate.py --methods sft --models small
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {  # random-init Qwen2 models; the tiny tokenizer's ids fit any vocabulary
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=688,
        vocab_size=1024,
    ),
    "medium": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1376,
        vocab_size=32000,
    ),
    "wide-vocab": dict(
        hidden_size=384,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=1024,
        vocab_size=151936,
    ),
}
BATCH, COMPLETION = 8, 64


def build(root: Path, name: str) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tunefleet.trainers.tiny import ensure_model

    tok = AutoTokenizer.from_pretrained(ensure_model())
    torch.manual_seed(0)
    cfg = Qwen2Config(
        **SHAPES[name], tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    path = root / f"model-{name}"
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def data(root: Path, length: int) -> dict[str, Path]:
    """Rows of about `length` tokens (SFT conversations, DPO pairs) and GRPO prompts of about length/2."""
    sentence = "A cow says moo and the sky is blue today. "  # ~12 tokens
    words = lambda n: (sentence * (n // 12 + 1)).strip()  # noqa: E731
    user = {"role": "user", "content": words(length // 3)}
    rows = {
        "sft": [{"messages": [user, {"role": "assistant", "content": words(2 * length // 3)}]}] * 64,
        "dpo": [
            {
                "prompt": [user],
                "chosen": [{"role": "assistant", "content": words(2 * length // 3)}],
                "rejected": [{"role": "assistant", "content": words(2 * length // 3 - 4)}],
            }
        ]
        * 64,
        "grpo": [{"prompt": [{"role": "user", "content": words(length // 2)}]}] * 64,
    }
    files = {}
    for method, items in rows.items():
        files[method] = root / f"{method}.jsonl"
        files[method].write_text("".join(json.dumps(r) + "\n" for r in items))
    return files


def token_length(model: Path, file: Path, method: str) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    row = json.loads(file.read_text().splitlines()[0])
    conv = row["messages"] if method == "sft" else row["prompt"] + row.get("chosen", [])
    text = tok.apply_chat_template(conv, tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def measure(model: Path, file: Path, method: str, length: int, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "tunefleet.trainers.train",
        "--method",
        method,
        "--model_name",
        str(model),
        "--dataset",
        str(file),
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        str(BATCH),
        "--gradient_accumulation_steps",
        "1",
        "--use_qlora",
        "false",
        "--max_length",
        str(length),
        "--learning_rate",
        "1e-4",
        "--logging_steps",
        "1",
        "--num_generations",
        "4",
        "--max_completion_length",
        str(COMPLETION),
        "--reward_funcs",
        "length",
    ]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    record = json.loads((out / "run.json").read_text())
    return {"measured_mb": record["peak_rss_mb"] - record["rss_before_model_mb"]}


def main() -> None:
    from tunefleet.trainers import memory

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--methods", nargs="+", default=["sft", "dpo", "grpo"], choices=["sft", "dpo", "grpo"])
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--json", help="Also write the rows here.")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tf-bench-mem-"))
    files = data(root, a.length)
    rows = []
    print(f"{'model':<11} {'method':<6} {'params':>9} {'estimate MiB':>13} {'measured MiB':>13} {'error':>7}")
    for name in a.models:
        model = build(root, name)
        from transformers import AutoConfig

        shape = memory.ModelShape.from_config(AutoConfig.from_pretrained(model))
        for method in a.methods:
            seq = token_length(model, files[method], method)
            seq = seq if method == "grpo" else min(seq, a.length)  # SFT and DPO truncate to max_length
            est = memory.estimate(
                shape,
                method,
                BATCH,
                seq,
                lora_r=16,
                qlora=False,
                dtype_bytes=4,
                quadratic_attention=True,
                completion_len=COMPLETION,
                device="cpu",
            )
            got = measure(model, files[method], method, a.length, root / f"run-{name}-{method}")
            estimate_mb = est.total / 2**20
            error = (estimate_mb - got["measured_mb"]) / got["measured_mb"]
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "params": shape.params,
                    "tokens": seq,
                    "estimate_mb": round(estimate_mb, 1),
                    "parts_gb": est.record(),
                    **got,
                    "error": round(error, 3),
                }
            )
            print(
                f"{name:<11} {method:<6} {shape.params / 1e6:>8.1f}M {estimate_mb:>13.0f} {got['measured_mb']:>13.0f} "
                f"{error:>+7.0%}",
                flush=True,
            )
    errors = [abs(r["error"]) for r in rows]
    print(f"\nmean absolute error {sum(errors) / len(errors):.0%}, worst {max(errors):.0%} over {len(rows)} runs")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
