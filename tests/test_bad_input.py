"""Bad input: one clear line on stderr, exit 2, nothing half-written."""

from __future__ import annotations

import json

import pytest
from testkit import TINY, run_cli


def one_error_line(capsys, *args) -> str:
    code, _, err = run_cli(capsys, *args)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def train(*extra, out="runs-none"):
    return ["train", "--method", "sft", *TINY, "--split", "train_sft", "--output_dir", out, "--max_steps", "1", *extra]


def test_unknown_method(capsys):
    line = one_error_line(capsys, "train", "--method", "dpoo", *TINY, "--output_dir", "x")
    assert "unknown method 'dpoo'" in line and "did you mean 'dpo'" in line and "sft, dpo, orpo, kto, grpo" in line


def test_missing_columns_names_them(tmp_path, capsys, tiny_model):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "hi", "answer": "hello"}) + "\n")
    line = one_error_line(
        capsys,
        "train",
        "--method",
        "dpo",
        "--model_name",
        "tunefleet/tiny-qwen2",
        "--dataset",
        data,
        "--output_dir",
        tmp_path / "r",
    )
    assert "no dpo layout fits the columns answer, question" in line and "dpo accepts:" in line
    assert "--columns prompt=query,chosen=good,rejected=bad" in line
    assert not (tmp_path / "r").exists()


def test_split_not_found_lists_splits(capsys, tmp_path):
    line = one_error_line(capsys, *train(out=tmp_path / "r")[:-2], "--split", "validation")
    assert "no split 'validation'" in line and "train_prefs" in line and "test_sft" in line


def test_empty_dataset(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    line = one_error_line(
        capsys,
        "train",
        "--method",
        "sft",
        "--model_name",
        "tunefleet/tiny-qwen2",
        "--dataset",
        data,
        "--output_dir",
        tmp_path / "r",
    )
    assert "empty" in line


def test_missing_model_path(tmp_path, capsys):
    line = one_error_line(
        capsys,
        "train",
        "--method",
        "sft",
        "--model_name",
        tmp_path / "no-model",
        "--dataset",
        "tunefleet/tiny-ultrafeedback",
        "--split",
        "train_sft",
        "--output_dir",
        tmp_path / "r",
    )
    assert line == f"error: model path {tmp_path / 'no-model'} does not exist"


def test_yaml_unknown_key_names_nearest(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: sft\nlearning_rat: 0.1\n")
    line = one_error_line(capsys, "train", "--config", cfg)
    assert line == f"error: {cfg}: unknown key 'learning_rat' (did you mean 'learning_rate'?)"


def test_yaml_bad_value_and_bad_yaml(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: sft\nlora_r: sixteen\n")
    assert "bad value for 'lora_r'" in one_error_line(capsys, "train", "--config", cfg)
    cfg.write_text("method: [sft\n")
    assert "not valid YAML" in one_error_line(capsys, "train", "--config", cfg)


def test_reward_function_that_cannot_be_imported(tmp_path, capsys, tiny_model):
    line = one_error_line(
        capsys,
        "train",
        "--method",
        "grpo",
        *TINY,
        "--split",
        "train_gen",
        "--output_dir",
        tmp_path / "r",
        "--reward_funcs",
        "no_such_module:score",
    )
    assert "cannot import reward function 'no_such_module:score'" in line
    assert not (tmp_path / "r" / "run.json").exists()


def test_missing_required_flags(capsys):
    assert "missing required setting(s): --model_name, --dataset, --output_dir" in one_error_line(
        capsys, "train", "--method", "sft"
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["check-data", "--method", "sft", "--dataset", "tunefleet/tiny-ultrafeedback", "--split", "nope"],
            "no split 'nope'",
        ),
        (["check-data", "--method", "xyz", "--dataset", "tunefleet/tiny-ultrafeedback"], "unknown method 'xyz'"),
        (["nonsense"], "unknown command 'nonsense'"),
    ],
)
def test_other_commands(capsys, args, needle):
    assert needle in one_error_line(capsys, *args)
