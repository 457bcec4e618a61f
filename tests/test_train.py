"""End-to-end runs of every method through the real CLI on the embedded tiny default."""

from __future__ import annotations

import signal
import time

import pytest
from safetensors.torch import load_file
from testkit import (
    FAST,
    SPLIT,
    TINY,
    Started,
    checkpoint_steps,
    read_json,
    run_cli,
    sft_train,
    tunefleet,
    wait_for_checkpoint,
)

TOP_LEVEL = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "trainer_state.json",
    "training_args.bin",
    "tokenizer_config.json",
    "tokenizer.json",
    "run.json",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,qlora", [("sft", "true"), ("dpo", "false"), ("orpo", "true"), ("kto", "false"), ("grpo", "true")]
)
def test_method_end_to_end(method, qlora, tiny_model, tmp_path, capsys):
    out = tmp_path / method
    code, stdout, stderr = run_cli(
        capsys,
        "train",
        "--method",
        method,
        *TINY,
        "--split",
        SPLIT[method],
        "--output_dir",
        out,
        "--max_steps",
        3,
        "--save_steps",
        2,
        "--use_qlora",
        qlora,
        "--max_train_samples",
        48,
        "--learning_rate",
        "1e-3",
        *FAST,
        "--reward_funcs",
        "friendly",
        "answer",
    )
    assert code == 0, stderr
    for name in TOP_LEVEL:
        assert (out / name).is_file(), f"{name} missing at the top of the run folder"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]

    state = read_json(out / "trainer_state.json")
    assert state["global_step"] == 3
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]

    record = read_json(out / "run.json")
    assert record["status"] == "finished" and record["method"] == method
    assert record["config"]["learning_rate"] == 1e-3 and record["versions"]["trl"]
    assert (record["qlora_4bit_layers"] > 0) == (qlora == "true")

    # LoRA B matrices start at exactly zero: every one must have moved.
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())

    # Loads exactly as the original README shows, and generates.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What sound does a cow make?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def test_sft_learns(tiny_model, tmp_path, capsys):
    out = tmp_path / "sft"
    code, _, err = run_cli(
        capsys,
        "train",
        "--method",
        "sft",
        *TINY,
        "--split",
        "train_sft",
        "--output_dir",
        out,
        "--max_steps",
        25,
        "--learning_rate",
        "2e-3",
        "--use_qlora",
        "false",
        *FAST,
    )
    assert code == 0, err
    losses = [e["loss"] for e in read_json(out / "trainer_state.json")["log_history"] if "loss" in e]
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_runs_of_a_sweep_share_the_prepared_data(method, tiny_model, tmp_path, capsys, monkeypatch):
    """Two runs on the same data (another seed, another folder): the second reads the JSON-to-Arrow conversion,
    tunefleet's layout conversion and TRL's tokenization from the datasets cache (fingerprints that do not depend
    on the run) instead of preparing them again. DPO writes one index file per run: TRL's filter of over-long
    prompts closes over the run's arguments."""
    import datasets

    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)

    def files() -> set[str]:
        return {p.name for p in cache.rglob("*.arrow")}

    made = []
    for seed in (1, 2):
        before = files()
        args = ["--method", method, *TINY, "--split", SPLIT[method], "--output_dir", tmp_path / f"s{seed}"]
        code, _, err = run_cli(capsys, "train", *args, "--seed", seed, "--max_steps", 1, "--use_qlora", "false", *FAST)
        assert code == 0, err
        made.append(files() - before)
    assert len(made[0]) >= 2  # the split's Arrow file and the prepared data, written once
    tokenized = {name for name in made[0] if name.startswith("cache-")}
    assert len(made[1]) <= (0 if method == "sft" else 2) and len(made[1]) < len(made[0]) and tokenized


def test_sample_larger_than_data_uses_all(tiny_model, tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "train",
        "--method",
        "dpo",
        *TINY,
        "--split",
        "test_prefs",
        "--output_dir",
        tmp_path / "r",
        "--max_train_samples",
        100000,
        "--max_steps",
        1,
        "--use_qlora",
        "false",
        *FAST,
    )
    assert code == 0
    assert "asks for 100000 rows but the split has 200; using all 200" in err


def test_finished_run_is_not_retrained(tiny_model, tmp_path, capsys):
    args = [
        "train",
        "--method",
        "sft",
        *TINY,
        "--split",
        "test_sft",
        "--output_dir",
        tmp_path / "r",
        "--max_steps",
        1,
        "--use_qlora",
        "false",
        *FAST,
    ]
    assert run_cli(capsys, *args)[0] == 0
    first = read_json(tmp_path / "r" / "run.json")["started_at"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.strip().splitlines() == [
        f"error: {tmp_path / 'r'} holds a finished run; pass --overwrite to retrain it or choose another --output_dir"
    ]
    assert read_json(tmp_path / "r" / "run.json")["started_at"] == first  # nothing touched
    assert run_cli(capsys, *args, "--overwrite")[0] == 0


def test_yaml_config_with_cli_override(tiny_model, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"method: sft\nmodel_name: tunefleet/tiny-qwen2\ndataset: tunefleet/tiny-ultrafeedback\n"
        f"split: test_sft\noutput_dir: {tmp_path / 'r'}\nmax_steps: 5\nuse_qlora: false\n"
        "per_device_train_batch_size: 2\ngradient_accumulation_steps: 1\nseed: 7\n"
    )
    code, _, err = run_cli(capsys, "train", "--config", cfg, "--max_steps", 2, "--seed", 3)
    assert code == 0, err
    record = read_json(tmp_path / "r" / "run.json")
    assert record["config"]["max_steps"] == 2 and record["seed"] == 3
    assert record["config"]["per_device_train_batch_size"] == 2 and record["config"]["learning_rate"] == 2e-4


@pytest.mark.slow
def test_interrupted_run_resumes_from_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "r"
    args = [
        *sft_train(str(out)),
        "--max_steps",
        "400",
        "--save_steps",
        "3",
        "--use_qlora",
        "false",
        *FAST,
    ]
    proc = Started(*args)
    wait_for_checkpoint(out, 240)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # no clean shutdown at all
    proc.wait()
    done = checkpoint_steps(out)
    assert done, "no checkpoint was written before the kill"
    assert read_json(out / "run.json")["status"] == "running"
    last = done[-1]
    assert last < 400, "the run finished before it was killed"

    resumed = tunefleet(*args, check=False)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {out / f'checkpoint-{last}'}" in resumed.stdout
    first_step = int(next(line for line in resumed.stdout.splitlines() if line.startswith("step ")).split()[1])
    assert first_step > last  # continued, not restarted at step 1
    record = read_json(out / "run.json")
    assert record["status"] == "finished" and record["attempts"] == 2
    assert record["resumed_from"].endswith(f"checkpoint-{last}")
