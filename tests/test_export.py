"""`tunefleet export`: the best DPO run of a small sweep merged into its base and loaded by plain transformers (no
PEFT import) with the logits of base + adapter; a QLoRA run merged into the full-precision base; the hub refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from testkit import run_cli, tunefleet

from tunefleet.eval.results import load_results

# Two sentences through the chat template's tokens and one plain string: logits are compared on all of them.
SEQUENCES = [
    "<|im_start|>user\nWhich colour is snow?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\nGreat question! It is 5.<|im_end|>\n",
    "the quick brown fox",
]

# Plain transformers in a fresh interpreter: the merged folder must load and run without PEFT.
PLAIN_LOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, sequences = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
with torch.no_grad():
    logits = [model(**tokenizer(s, return_tensors="pt")).logits[0].tolist() for s in sequences]
print(json.dumps({"peft_imported": "peft" in sys.modules, "logits": logits, "template": tokenizer.chat_template}))
"""


def plain_logits(folder) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(folder), json.dumps(SEQUENCES)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def adapter_logits(base_path, run_dir, quantized: bool = False):
    """Logits of base + adapter through PEFT: the base in float32, or loaded in 4-bit and dequantized to float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefleet.trainers.model import quantization_config

    if quantized:
        base = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=torch.float32, quantization_config=quantization_config(torch.float32)
        )
        base = base.dequantize()  # the NF4 weights the adapter was trained against, as float32
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    with torch.no_grad():
        return [model(**tokenizer(s, return_tensors="pt")).logits[0] for s in SEQUENCES]


def max_difference(expected, got) -> float:
    import torch

    return max(float((e - torch.tensor(g)).abs().max()) for e, g in zip(expected, got, strict=True))


@pytest.fixture(scope="module")
def dpo_sweep(tmp_path_factory):
    """Two DPO runs (seeds 1, 2) trained by a local sweep and evaluated on a few samples."""
    root = tmp_path_factory.mktemp("export")
    runs_dir = root / "runs"
    spec = {
        "name": "exp",
        "runs_dir": str(runs_dir),
        "base": {
            "model_name": "tunefleet/tiny-qwen2",
            "dataset": "tunefleet/tiny-ultrafeedback",
            "method": "dpo",
            "split": "train_prefs",
            "max_steps": 8,
            "learning_rate": 3.0e-3,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "use_qlora": False,
            "logging_steps": 4,
        },
        "grid": {"seed": [1, 2]},
        "resources": {"cpus_per_run": 1},
        "eval": {"max_samples": 12, "max_generation_samples": 0, "max_new_tokens": 8},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    tunefleet("sweep", root / "spec.yaml", "--backend", "local", "--eval", "--skip_data_check", timeout=900)
    return runs_dir


@pytest.mark.slow
def test_best_dpo_run_exports_merged_and_loads_without_peft(dpo_sweep, tmp_path, capsys, tiny_model):
    results = load_results(str(dpo_sweep / "evaluation_results.json"))
    runs = {k: v for k, v in results.items() if v.get("method") == "dpo"}
    assert len(runs) == 2
    best = max(sorted(runs), key=lambda k: runs[k]["preference_accuracy"])  # first by name among ties

    out = tmp_path / "best"
    code, printed, err = run_cli(
        capsys, "export", "--runs_dir", dpo_sweep, "--best", "preference_accuracy", "--method", "dpo", "--out", out
    )
    assert code == 0, err
    assert f"export {best}: best preference_accuracy (higher is better) of 2 runs" in printed
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= files
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files
    assert not list(tmp_path.glob(".best.partial-*"))  # written beside, renamed into place

    card = (out / "README.md").read_text()
    assert "base_model: tunefleet/tiny-qwen2" in card and "- dpo" in card
    assert f"| preference_accuracy | {runs[best]['preference_accuracy']:.4g} |" in card
    assert "| train | tunefleet/tiny-ultrafeedback | train_prefs |" in card

    loaded = plain_logits(out)
    assert loaded["peft_imported"] is False
    assert "<|im_start|>" in (loaded["template"] or "")  # the chat template travels with the model
    expected = adapter_logits(tiny_model, dpo_sweep / best)
    assert max_difference(expected, loaded["logits"]) < 1e-4
    base = plain_logits(tiny_model)["logits"]  # the adapter did change the model: the check above means something
    assert max_difference(expected, base) > 1e-2


def test_adapter_only_bfloat16_and_refusals(dpo_sweep, tmp_path, capsys):
    run = dpo_sweep / "dpo_tiny-qwen2_s1"
    code, _, err = run_cli(capsys, "export", run, "--out", tmp_path / "adapter", "--adapter_only")
    assert code == 0, err
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= files
    assert "library_name: peft" in (tmp_path / "adapter" / "README.md").read_text()

    code, _, err = run_cli(capsys, "export", run, "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    assert code == 0, err
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"

    code, _, err = run_cli(capsys, "export", run, "--out", tmp_path / "bf16")
    assert code == 2 and "exists and is not empty" in err and "--overwrite" in err
    code, _, err = run_cli(capsys, "export", "--runs_dir", dpo_sweep, "--best", "accuracy", "--out", tmp_path / "x")
    assert code == 2 and err.startswith("error: --best accuracy: not a metric") and "win_rate_vs_base" in err
    with pytest.raises(SystemExit):  # --out missing: argparse's own one line
        run_cli(capsys, "export", "--runs_dir", dpo_sweep, "--best", "perplexity")
    code, _, err = run_cli(
        capsys, "export", "--runs_dir", dpo_sweep, "--best", "perplexity", "--method", "kto", "--out", tmp_path / "x"
    )
    assert code == 2 and "no kto runs" in err and "perplexity" in err
    code, _, err = run_cli(capsys, "export", run / "checkpoint-4", "--out", tmp_path / "x")
    assert code == 2 and "not a finished run" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_push_to_hub_refuses_without_a_token_before_any_work(dpo_sweep, tmp_path):
    home = tmp_path / "home"  # no stored token there
    env = {"HF_TOKEN": "", "HF_HOME": str(home), "HUGGING_FACE_HUB_TOKEN": ""}
    proc = tunefleet(
        "export", dpo_sweep / "dpo_tiny-qwen2_s1", "--out", tmp_path / "pushed", "--push_to_hub", "me/tiny-dpo",
        check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --push_to_hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`, then rerun"
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "pushed").exists()


@pytest.mark.slow
def test_qlora_run_merges_into_the_full_precision_base(tmp_path, tiny_model):
    """A QLoRA run's export = the float32 base + adapter exactly; against the dequantized 4-bit base + adapter (what
    training saw) it differs by the NF4 rounding of the base only, within the tolerance below."""
    run = tmp_path / "qlora"
    tunefleet(
        "train", "--method", "dpo", "--model_name", "tunefleet/tiny-qwen2", "--dataset", "tunefleet/tiny-ultrafeedback",
        "--split", "train_prefs", "--output_dir", run, "--use_qlora", "true", "--max_steps", 6, "--learning_rate", 3e-3,
        "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 1, "--logging_steps", 3,
    )  # fmt: skip
    assert json.loads((run / "run.json").read_text())["qlora_4bit_layers"] > 0
    out = tmp_path / "merged"
    tunefleet("export", run, "--out", out, "--dtype", "float32")
    assert "merged into the base's original full-precision weights" in (out / "README.md").read_text()
    loaded = plain_logits(out)
    assert loaded["peft_imported"] is False
    assert max_difference(adapter_logits(tiny_model, run), loaded["logits"]) < 1e-4

    # Stated tolerance against the dequantized 4-bit base + adapter (measured on this model, 6 DPO steps: mean
    # |difference| 0.04 of the logits' spread, largest 1.5 spreads on one logit, the same next token at every
    # position): NF4 rounding of the base moves logits by a few percent and leaves the argmax alone.
    import torch

    dequantized = adapter_logits(tiny_model, run, quantized=True)
    merged = [torch.tensor(g) for g in loaded["logits"]]
    spread = max(float(e.std()) for e in dequantized)
    mean_difference = sum(float((e - m).abs().mean()) for e, m in zip(dequantized, merged, strict=True)) / len(merged)
    assert mean_difference < 0.15 * spread
    assert max_difference(dequantized, loaded["logits"]) < 3 * spread
    same_top = sum(int((e.argmax(-1) == m.argmax(-1)).sum()) for e, m in zip(dequantized, merged, strict=True))
    assert same_top / sum(len(m) for m in merged) >= 0.9
