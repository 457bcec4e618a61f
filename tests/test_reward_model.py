"""Reward models: `--method rm` (TRL's RewardTrainer, LoRA + a score head), its export as a plain sequence
classifier, GRPO rewarded by it, and the evaluator judging every run's answers with it (`--reward_model`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from testkit import TINY, read_json, run_cli, tunefleet

FRIENDLY_DPO = ["--loss_type", "sigmoid", "sft", "--learning_rate", "3e-3"]  # as the demo's DPO
FAST = ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--logging_steps", "10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> Path:
    """A tiny reward model (rm, 40 steps) and a DPO run (60 steps) trained from the tiny preferences."""
    root = tmp_path_factory.mktemp("rm")
    from tunefleet.launcher.cli import main

    rm = ["--method", "rm", "--split", "train_prefs", "--eval_split", "test_prefs", "--learning_rate", "1e-3"]
    dpo = ["--method", "dpo", "--split", "train_prefs", *FRIENDLY_DPO, "--use_qlora", "false"]
    for name, flags, steps in (("rm_tiny_s1", rm, "40"), ("dpo_tiny_s1", dpo, "60")):
        out = root / "runs" / name
        assert main(["train", *TINY, *flags, *FAST, "--max_steps", steps, "--output_dir", str(out)]) == 0
    return root / "runs"


@pytest.mark.slow
def test_a_reward_model_trains_with_lora_and_a_full_score_head(runs):
    record = read_json(runs / "rm_tiny_s1" / "run.json")
    assert record["status"] == "finished" and record["method"] == "rm" and record["qlora_4bit_layers"] > 0
    adapter = read_json(runs / "rm_tiny_s1" / "adapter_config.json")
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    evaluations = read_json(runs / "rm_tiny_s1" / "progress.json")["evaluations"]
    assert evaluations[-1]["step"] == 40 and evaluations[-1]["eval_accuracy"] >= 0.9  # pair accuracy, held out


def test_the_evaluator_judges_every_answer_with_the_reward_model(runs, tmp_path, capsys):
    """The tiny RM ranks chosen above rejected on >= 90% of the test pairs, and the friendly DPO run's greedy answers
    win against the base's under it."""
    scored = tmp_path / "runs"
    shutil.copytree(runs, scored)
    args = ["--max_samples", 60, "--heldout_prompts", 20, "--max_generation_samples", 0, "--skip_perplexity"]
    code, out, err = run_cli(capsys, "eval", "--runs_dir", scored, "--reward_model", scored / "rm_tiny_s1", *args)
    assert code == 0, err
    results = read_json(scored / "evaluation_results.json")
    base, dpo, rm = results["base:tunefleet/tiny-qwen2"], results["dpo_tiny_s1"], results["rm_tiny_s1"]
    assert rm["method"] == "rm" and rm["preference_total"] == 60 and rm["preference_accuracy"] >= 0.9
    assert rm["rm_score"] is None and rm["heldout_reward"] is None  # a reward model generates nothing
    assert dpo["rm_win_rate_vs_base"] > 0.5 and dpo["rm_score"] > base["rm_score"], (dpo, base)
    assert base["rm_win_rate_vs_base"] is None and dpo["heldout_reward"] is not None  # rule rewards beside it
    report = (scored / "evaluation_report.md").read_text()
    assert "RM score" in report and "RM win vs base" in report
    # the same settings again: nothing is scored twice
    code, _, err = run_cli(capsys, "eval", "--runs_dir", scored, "--reward_model", scored / "rm_tiny_s1", *args)
    assert code == 0 and read_json(scored / "evaluation_results.json")["dpo_tiny_s1"] == dpo


def test_reward_model_scores_are_trls_chat_template_and_exact_in_batches(runs):
    """As TRL feeds a reward model (trl.data_utils.apply_chat_template over the conversation, no special tokens
    added), one conversation at a time; batched (right-padded, length-sorted) scores equal them."""
    import torch
    from trl.data_utils import apply_chat_template

    from tunefleet.trainers.heldout import load_pairs
    from tunefleet.trainers.model import load_reward_model
    from tunefleet.trainers.scoring import reward_model_scores

    scorer, tokenizer = load_reward_model(str(runs / "rm_tiny_s1"))
    conversations = [c for pair in load_pairs("tunefleet/tiny-ultrafeedback", "test_prefs", 12) for c in pair]
    batched = reward_model_scores(scorer, tokenizer, conversations, batch_size=5)
    for conversation, score in zip(conversations, batched):
        text = apply_chat_template({"messages": conversation}, tokenizer)["text"]
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            alone = float(scorer(**ids).logits[0, 0])
        assert score == pytest.approx(alone, rel=1e-5, abs=1e-5)


def test_an_exported_reward_model_is_a_plain_classifier_that_rewards_grpo(runs, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from tunefleet.trainers.model import load_reward_model
    from tunefleet.trainers.scoring import reward_model_scores

    export = tmp_path / "rm_export"
    code, _, err = run_cli(capsys, "export", runs / "rm_tiny_s1", "--output_dir", export)
    assert code == 0, err
    loaded = AutoModelForSequenceClassification.from_pretrained(export)
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id is not None
    assert "AutoModelForSequenceClassification" in (export / "README.md").read_text()
    conversation = [[{"role": "user", "content": "Which colour is snow?"}, {"role": "assistant", "content": "White."}]]
    from_export = reward_model_scores(*load_reward_model(str(export)), conversation)
    from_run = reward_model_scores(*load_reward_model(str(runs / "rm_tiny_s1")), conversation)
    assert from_export == pytest.approx(from_run, abs=1e-5)

    grpo = tmp_path / "grpo"
    flags = ["--method", "grpo", *TINY, "--split", "train_gen", "--output_dir", grpo, "--max_steps", "2"]
    done = tunefleet("train", *flags, "--reward_funcs", runs / "rm_tiny_s1", "friendly", "--logging_steps", "1")
    assert "done:" in done.stdout, done.stdout[-2000:]
    record = read_json(grpo / "run.json")
    assert record["status"] == "finished" and record["config"]["reward_funcs"][0] == str(runs / "rm_tiny_s1")
    logged = read_json(grpo / "trainer_state.json")["log_history"][0]
    assert any(key.startswith("rewards/") and "merged" in key for key in logged), logged  # the merged RM scored


def test_what_is_no_reward_model_is_one_line(runs, tmp_path, capsys, tiny_model):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    scored = tmp_path / "runs"
    shutil.copytree(runs / "dpo_tiny_s1", scored / "dpo_tiny_s1")
    code, _, err = run_cli(capsys, "eval", "--runs_dir", scored, "--reward_model", tiny_model)
    assert code == 2 and err.count("\n") == 1 and "is a causal LM, not a reward model" in err, err
    two = tmp_path / "two_labels"
    config = AutoConfig.from_pretrained(tiny_model, num_labels=2)  # from a config: no load report is logged
    AutoModelForSequenceClassification.from_config(config).save_pretrained(two)
    code, _, err = run_cli(capsys, "eval", "--runs_dir", scored, "--reward_model", two)
    assert code == 2 and err.count("\n") == 1 and "has 2 labels; a reward model gives one score" in err, err
    code, _, err = run_cli(capsys, "train", *TINY, "--method", "grpo", "--split", "train_gen", "--reward_funcs",
                           tiny_model, "--output_dir", tmp_path / "g")  # fmt: skip
    assert code == 2 and "is a causal LM, not a reward model" in err, err

    data = tmp_path / "no_pairs"
    data.mkdir()
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    (data / "train.jsonl").write_text(json.dumps(row) + "\n")
    code, _, err = run_cli(capsys, "train", "--method", "rm", "--model_name", "tunefleet/tiny-qwen2", "--dataset",
                           data, "--output_dir", tmp_path / "rm")  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "no rm layout fits" in err, err
