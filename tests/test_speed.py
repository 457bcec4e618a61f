"""The training fast path: choices per device (pure), and the same first-step loss as a plain TRL script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from testkit import ROOT, read_json, tunefleet

from tunefleet.trainers import speed
from tunefleet.trainers.config import from_dict

# First-step losses are computed before any update (LoRA B starts at zero), on one batch holding every
# sample: the fast path (no checkpointing, length-grouped order, SDPA) must give the plain path's loss.
FIRST_LOSS_REL_TOL = 1e-5


def cfg(method, **kw):
    return from_dict({"method": method, "model_name": "m", "dataset": "d", "output_dir": "o", **kw})


def test_cpu_choices():
    fits = speed.MemoryFit(2**30, 16 * 2**30, "free CPU memory")
    fast = speed.choose(cfg("sft"), has_gpu=False, flash=False, liger=False, memory=fits)
    assert {k: v["on"] for k, v in fast.record().items()} == {
        "group_by_length": True,
        "attn_implementation": "sdpa",
        "padding_free": False,
        "use_liger_kernel": False,
        "tf32": False,
        "gradient_checkpointing": False,
    }
    assert "KTO's KL estimate" in speed.choose(cfg("kto"), False, flash=False, liger=False).group_by_length.why
    assert speed.choose(cfg("grpo"), False, flash=False, liger=False).group_by_length.on is False


def test_gpu_choices_and_flags():
    fast = speed.choose(cfg("sft"), has_gpu=True, gpu_capability=(9, 0), flash=True, liger=True)
    assert fast.attn_implementation.on == "flash_attention_2" and fast.padding_free.on is True
    assert fast.use_liger_kernel.on and fast.tf32.on
    assert speed.choose(cfg("dpo"), True, (8, 0), flash=True, liger=False).padding_free.on is False
    off = speed.choose(
        cfg("sft", group_by_length=False, attn_implementation="eager", tf32=False),
        True,
        (9, 0),
        flash=True,
        liger=True,
    )
    assert off.group_by_length == speed.Choice(False, "set by flag")
    assert off.attn_implementation.on == "eager" and off.padding_free.on is False
    assert speed.choose(cfg("sft"), True, (7, 5), flash=False, liger=False).tf32.on is False


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory, tiny_model):
    """8 SFT conversations of mixed lengths and 8 preference pairs in TRL's format, one batch each."""
    from tunefleet.trainers import data

    root = tmp_path_factory.mktemp("speed")
    sft = data.load_split("tunefleet/tiny-ultrafeedback", "train_sft").select(range(16))["messages"]
    convs = [{"messages": sum(sft[i : i + 1 + i % 4], [])} for i in range(8)]
    (root / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    prefs = data.prepare(
        "orpo", data.load_split("tunefleet/tiny-ultrafeedback", "train_prefs").select(range(8))
    ).dataset
    (root / "orpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "orpo"])
def test_fast_path_first_loss_matches_plain_trl(method, one_batch, tiny_model, tmp_path):
    data = one_batch / f"{method}.jsonl"
    plain = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "plain_trl.py"),
            method,
            str(tiny_model),
            str(data),
            str(tmp_path / "plain"),
            "--batch",
            "8",
            "--max_steps",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    plain_loss = json.loads(next(ln for ln in plain.stdout.splitlines() if ln.startswith("RESULT "))[7:])["first_loss"]
    tunefleet(
        "train",
        "--method",
        method,
        "--model_name",
        "tunefleet/tiny-qwen2",
        "--dataset",
        data,
        "--output_dir",
        tmp_path / "tf",
        "--max_steps",
        1,
        "--per_device_train_batch_size",
        8,
        "--gradient_accumulation_steps",
        1,
        "--use_qlora",
        "false",
        "--logging_steps",
        1,
    )
    record = read_json(tmp_path / "tf" / "run.json")
    assert record["fast_path"]["group_by_length"]["on"] is True
    assert record["fast_path"]["gradient_checkpointing"]["on"] is False
    ours = [e["loss"] for e in read_json(tmp_path / "tf" / "trainer_state.json")["log_history"] if "loss" in e][0]
    assert ours == pytest.approx(plain_loss, rel=FIRST_LOSS_REL_TOL)
