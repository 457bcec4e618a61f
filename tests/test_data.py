"""Datasets as people have them: layouts, column mapping, mixtures, nothing dropped silently, one-line errors."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from datasets import Dataset
from testkit import ROOT, read_json, run_cli

from tunefleet.common.errors import TunefleetError
from tunefleet.trainers import data

SYSTEM = "You answer like a pirate."
N = 8  # rows per file: enough for a step of batch 2


def question(i: int) -> str:
    return f"What is {i} plus {i + 1}?"


def answer(i: int) -> str:
    return f"{i} plus {i + 1} is {2 * i + 1}."


def wrong(i: int) -> str:
    return f"No idea about {i}, go away."


def sharegpt(i: int, system: bool = True) -> list[dict]:
    turns = [{"from": "system", "value": SYSTEM}] if system else []
    return turns + [{"from": "human", "value": question(i)}, {"from": "gpt", "value": answer(i)}]


# One file per layout, N rows each; every prompt is `question(i)`, every system prompt SYSTEM.
LAYOUTS = {
    "alpaca": lambda i: {
        "instruction": question(i),
        "input": "",
        "output": answer(i),
        "system": SYSTEM,
        "history": [["Hello there", "Ahoy!"]],
    },
    "alpaca-pref": lambda i: {
        "instruction": question(i),
        "input": "",
        "chosen": answer(i),
        "rejected": wrong(i),
        "system": SYSTEM,
    },
    "sharegpt": lambda i: {"conversations": sharegpt(i)},
    "sharegpt-roles": lambda i: {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question(i)},
            {"role": "tool", "content": "calculator says so"},
            {"role": "assistant", "content": answer(i)},
        ]
    },
    "sharegpt-pref": lambda i: {
        "conversations": sharegpt(i)[:2],
        "chosen": {"from": "gpt", "value": answer(i)},
        "rejected": {"from": "gpt", "value": wrong(i)},
    },
    "question-pref": lambda i: {"system": SYSTEM, "question": question(i), "chosen": answer(i), "rejected": wrong(i)},
    "hh": lambda i: {
        "chosen": f"\n\nHuman: {question(i)}\n\nAssistant: {answer(i)}",
        "rejected": f"\n\nHuman: {question(i)}\n\nAssistant: {wrong(i)}",
    },
    "kto-strings": lambda i: {
        "prompt": question(i),
        "completion": answer(i) if i % 2 else wrong(i),
        "label": "true" if i % 2 else "false",
        "system": SYSTEM,
    },
    "kto-sharegpt": lambda i: {"conversations": sharegpt(i), "label": i % 2},
    "kto-alpaca": lambda i: {"instruction": question(i), "output": answer(i), "label": bool(i % 2), "system": SYSTEM},
    "gsm": lambda i: {"question": question(i), "answer": str(2 * i + 1), "system": SYSTEM},
}


def write(folder, name: str, rows: list[dict]):
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def layout_file(folder, name: str):
    return write(folder, name, [LAYOUTS[name](i) for i in range(N)])


def train(capsys, method: str, dataset, out, *extra):
    return run_cli(
        capsys,
        "train",
        "--method",
        method,
        "--model_name",
        "tunefleet/tiny-qwen2",
        "--dataset",
        dataset,
        "--output_dir",
        out,
        "--max_steps",
        1,
        "--per_device_train_batch_size",
        2,
        "--gradient_accumulation_steps",
        1,
        "--use_qlora",
        "false",
        *(["--num_generations", 2, "--max_completion_length", 4] if method == "grpo" else []),
        *extra,
    )


def seen_text(run_dir) -> str:
    """Every tokenized column of the first training example, decoded, as run.json records it."""
    return "\n".join(read_json(run_dir / "run.json")["example"].values())


# ------------------------------------------------------------------ each layout through `tunefleet train`
@pytest.mark.slow
@pytest.mark.parametrize(
    "method,layout,expected,system",
    [
        ("sft", "alpaca", "alpaca", True),
        ("sft", "sharegpt", "sharegpt (conversations)", True),
        ("sft", "sharegpt-roles", "messages (messages)", True),
        ("dpo", "question-pref", "question + chosen/rejected", True),
        ("dpo", "sharegpt-pref", "sharegpt + chosen/rejected", True),
        ("dpo", "alpaca-pref", "alpaca + chosen/rejected", True),
        ("dpo", "hh", "hh transcript", False),
        ("orpo", "question-pref", "question + chosen/rejected", True),
        ("rm", "sharegpt-pref", "sharegpt + chosen/rejected", True),
        ("rm", "hh", "hh transcript", False),
        ("kto", "kto-strings", "prompt + completion + label", True),
        ("kto", "kto-sharegpt", "conversations + label", True),
        ("kto", "kto-alpaca", "alpaca + output + label", True),
        ("kto", "question-pref", "paired (question + chosen/rejected)", True),
        ("grpo", "alpaca", "alpaca", True),
        ("grpo", "sharegpt", "conversations", True),
        ("grpo", "gsm", "question", True),
    ],
)
def test_layout_reaches_the_tokenized_example(method, layout, expected, system, tmp_path, capsys, tiny_model):
    out = tmp_path / "run"
    code, stdout, err = train(capsys, method, layout_file(tmp_path, layout), out, "--reward_funcs", "length")
    assert code == 0, err
    record = read_json(out / "run.json")
    assert record["data"]["train"]["layout"] == expected
    seen = seen_text(out)
    assert question(0) in seen or any(question(i) in seen for i in range(N)), seen  # the prompt reaches the trainer
    assert (SYSTEM in seen) == system, seen
    assert "example " in stdout  # the example is also in the run's log


# ------------------------------------------------------------------ nothing dropped silently
def test_unused_system_and_question_are_an_error_until_mapped(tmp_path, capsys, tiny_model):
    """The layout the issue found: question + sys_prompt + good/bad answers. Nothing trains on half of it."""
    rows = [{"query": question(i), "sys_prompt": SYSTEM, "chosen": answer(i), "rejected": wrong(i)} for i in range(N)]
    path = write(tmp_path, "pairs", rows)
    code, _, err = train(capsys, "dpo", path, tmp_path / "r")
    assert code == 2 and err.count("\n") == 1
    assert "column(s) 'query', 'sys_prompt' hold text that the dpo layout" in err
    assert "fix: --columns prompt=query,system=sys_prompt" in err and err.strip().endswith(
        "--ignore_columns query sys_prompt"
    )
    assert not (tmp_path / "r").exists()

    code, _, err = train(capsys, "dpo", path, tmp_path / "r", "--columns", "prompt=query,system=sys_prompt")
    assert code == 0, err
    seen = seen_text(tmp_path / "r")
    assert SYSTEM in seen and question(0) in seen


def suggested_fixes(err: str) -> list[list[str]]:
    """The flags an unused-column error suggests: its fix, and its way to leave them out (when it offers one)."""
    fixes = [shlex.split(re.search(r"fix: (.*?) \(", err).group(1))]
    leave_out = re.search(r"or leave them out on purpose with (--ignore_columns .*)$", err.strip())
    return fixes + ([shlex.split(leave_out.group(1))] if leave_out else [])


@pytest.mark.parametrize(
    "method,rows,expected_fix,system_read",
    [
        (  # the issue's case: the old hint said prompt=system_prompt, which would have replaced the prompt
            "dpo",
            [
                {"prompt": question(i), "chosen": answer(i), "rejected": wrong(i), "system_prompt": SYSTEM}
                for i in range(N)
            ],
            "--columns system=system_prompt",
            True,
        ),
        (
            "sft",
            [
                {"prompt": question(i), "completion": answer(i), "system_message": SYSTEM, "notes": f"Seen on day {i}"}
                for i in range(N)
            ],
            "--columns system=system_message --ignore_columns notes",
            True,
        ),
        (
            "kto",
            [{"prompt": question(i), "completion": answer(i), "label": i % 2 == 0, "sys": SYSTEM} for i in range(N)],
            "--columns system=sys",
            True,
        ),
        (  # a system column is there already: the second one can only be left out
            "orpo",
            [
                {"prompt": question(i), "chosen": answer(i), "rejected": wrong(i), "system": SYSTEM, "sys_msg": "Hi x"}
                for i in range(N)
            ],
            "--ignore_columns sys_msg",
            True,
        ),
    ],
)
def test_every_suggested_column_fix_trains(method, rows, expected_fix, system_read, tmp_path, capsys, tiny_model):
    path = write(tmp_path, "d", rows)
    code, _, err = train(capsys, method, path, tmp_path / "refused")
    assert code == 2 and err.count("\n") == 1 and f"fix: {expected_fix} (" in err, err
    for i, flags in enumerate(suggested_fixes(err)):
        code, _, err = train(capsys, method, path, tmp_path / f"fixed{i}", *flags)
        assert code == 0, (flags, err)
        seen = seen_text(tmp_path / f"fixed{i}")
        assert question(0) in seen or any(question(j) in seen for j in range(N)), (
            seen
        )  # the prompt is still the prompt
        if i == 0:
            assert (SYSTEM in seen) == system_read, seen


@pytest.mark.parametrize(
    "method,row,extra_column",
    [
        ("sft", {"prompt": "Say hi to me", "completion": "hi there you"}, "notes"),
        ("dpo", {"prompt": "Say hi to me", "chosen": "hi there", "rejected": "go away"}, "context"),
        ("kto", {"prompt": "Say hi to me", "completion": "hi there", "label": True}, "context"),
    ],
)
def test_each_unused_text_column_is_named_and_mapping_it_trains(
    method, row, extra_column, tmp_path, capsys, tiny_model
):
    path = write(tmp_path, "d", [{**row, extra_column: f"Keep this in mind {i}"} for i in range(N)])
    code, _, err = train(capsys, method, path, tmp_path / "a")
    assert code == 2 and f"'{extra_column}'" in err and f"--ignore_columns {extra_column}" in err
    code, _, err = train(capsys, method, path, tmp_path / "b", "--columns", f"system={extra_column}")
    assert code == 0, err
    assert "Keep this in mind" in seen_text(tmp_path / "b")
    code, _, err = train(capsys, method, path, tmp_path / "c", "--ignore_columns", extra_column)
    assert code == 0, err
    assert read_json(tmp_path / "c" / "run.json")["data"]["train"]["columns_used"] == sorted(row, key=list(row).index)


def test_grpo_hands_other_columns_to_the_reward_functions(tmp_path, capsys, tiny_model, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "helpers"))
    code, _, err = train(
        capsys, "grpo", layout_file(tmp_path, "gsm"), tmp_path / "r", "--reward_funcs", "column_rewards:exact_answer"
    )
    assert code == 0, err  # the reward reads the `answer` column: had it been dropped, it would have raised
    assert read_json(tmp_path / "r" / "run.json")["data"]["train"]["columns_not_used"] == {
        "answer": "passed to the reward functions"
    }


def test_rows_that_cannot_train_are_dropped_counted_and_recorded(tmp_path, capsys, tiny_model):
    rows = [{"prompt": question(i), "chosen": answer(i), "rejected": wrong(i)} for i in range(N)]
    rows += [
        {"prompt": "Same?", "chosen": "same", "rejected": "same"},
        {"prompt": "Empty?", "chosen": "", "rejected": "x"},
    ]
    code, out, err = train(capsys, "dpo", write(tmp_path, "d", rows), tmp_path / "r")
    assert code == 0, err
    assert "train data: dropped 2 of 10 rows (1 identical chosen and rejected, 1 empty reply)" in out
    recorded = read_json(tmp_path / "r" / "run.json")["data"]["train"]
    assert recorded["rows_in"] == 10 and recorded["rows"] == 8
    assert recorded["dropped"] == {"identical chosen and rejected": 1, "empty reply": 1}

    code, out, _ = run_cli(capsys, "check-data", "--method", "dpo", "--dataset", tmp_path / "d.jsonl")
    assert code == 1 and "dropped 2: 1 identical chosen and rejected, 1 empty reply" in out


def test_check_data_names_the_layout_and_shows_the_system_prompt(tmp_path, capsys, tiny_model):
    path = layout_file(tmp_path, "question-pref")
    code, out, _ = run_cli(
        capsys, "check-data", "--method", "dpo", "--dataset", path, "--model_name", "tunefleet/tiny-qwen2"
    )
    assert code == 0
    assert "layout for dpo: question + chosen/rejected   uses: question, system, chosen, rejected" in out
    example = out.split("example as dpo sees it:")[1]
    assert SYSTEM in example and question(0) in example
    assert f"<|im_start|>system\n{SYSTEM}<|im_end|>" in out.split("rendered with the chat template")[1]


# ------------------------------------------------------------------ mixtures, hub configs
def test_mixture_of_two_datasets_records_each_part(tmp_path, capsys, tiny_model):
    ours = write(tmp_path, "ours", [{"query": question(i), "good": answer(i), "bad": wrong(i)} for i in range(N)])
    code, _, err = run_cli(
        capsys,
        "train",
        "--method",
        "dpo",
        "--model_name",
        "tunefleet/tiny-qwen2",
        "--output_dir",
        tmp_path / "r",
        "--max_steps",
        1,
        "--per_device_train_batch_size",
        2,
        "--use_qlora",
        "false",
        "--mixture",
        "tunefleet/tiny-ultrafeedback:train_prefs@12",
        f"{{dataset: {ours}, columns: {{prompt: query, chosen: good, rejected: bad}}, samples: 5}}",
    )
    assert code == 0, err
    train_data = read_json(tmp_path / "r" / "run.json")["data"]["train"]
    assert train_data["rows"] == 17 and train_data["layout"] == "mixture"
    first, second = train_data["parts"]
    assert [first["dataset"], first["split"], first["layout"], first["rows"]] == [
        "tunefleet/tiny-ultrafeedback", "train_prefs", "ultrafeedback", 12
    ]  # fmt: skip
    assert [second["dataset"], second["layout"], second["rows"], second["rows_in"]] == [
        str(ours), "prompt-chosen-rejected", 5, N
    ]  # fmt: skip


def test_mixture_weights_and_samples_are_sized_exactly():
    assert data.mixture_counts([100, 50], [None, None], [None, None]) == [100, 50]
    assert data.mixture_counts([100, 50], [10, 500], [None, None]) == [10, 50]
    assert data.mixture_counts([100, 50], [None, None], [1.0, 1.0]) == [50, 50]  # no row repeated
    assert data.mixture_counts([100, 50], [None, None], [3.0, 1.0]) == [100, 33]
    assert data.mixture_counts([100, 50], [None, None], [1.0, 1.0], max_rows=20) == [10, 10]


def test_hub_style_config_and_data_files(tmp_path, capsys, tiny_model):
    """A dataset folder whose card defines configs, as hub datasets do: the real `load_dataset` picks them."""
    root = tmp_path / "hubish"
    (root / "easy").mkdir(parents=True)
    (root / "hard").mkdir()
    write(root / "easy", "train", [LAYOUTS["question-pref"](i) for i in range(N)])
    write(root / "hard", "train", [LAYOUTS["hh"](i) for i in range(N)])
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: easy\n  data_files:\n  - split: train\n    path: easy/train.jsonl\n"
        "- config_name: hard\n  data_files:\n  - split: train\n    path: hard/train.jsonl\n---\n"
    )
    assert data.load_split(str(root), "train", "easy").column_names == ["system", "question", "chosen", "rejected"]
    assert data.load_split(str(root), "train", "hard").column_names == ["chosen", "rejected"]
    assert data.load_split(str(root), "train", None, ["hard/train.jsonl"]).column_names == ["chosen", "rejected"]
    with pytest.raises(TunefleetError, match="has no config 'medium'"):
        data.load_split(str(root), "train", "medium")
    code, _, err = train(capsys, "dpo", root, tmp_path / "r", "--dataset_config", "hard")
    assert code == 0, err
    assert read_json(tmp_path / "r" / "run.json")["data"]["train"]["layout"] == "hh transcript"


# ------------------------------------------------------------------ pure conversions
def test_sharegpt_roles_and_alpaca_history():
    conv = data.prepare("sft", Dataset.from_list([LAYOUTS["sharegpt-roles"](1)])).dataset[0]["messages"]
    assert [m["role"] for m in conv] == ["system", "user", "tool", "assistant"]
    row = LAYOUTS["alpaca"](2) | {"input": "Show your work."}
    turns = data.prepare("sft", Dataset.from_list([row])).dataset[0]["messages"]
    assert [m["role"] for m in turns] == ["system", "user", "assistant", "user", "assistant"]
    assert turns[3]["content"] == f"{question(2)}\n\nShow your work."
    with pytest.raises(TunefleetError, match="unknown role 'narrator'"):
        data.prepare("sft", Dataset.from_list([{"conversations": [{"from": "narrator", "value": "x y"}]}]))


@pytest.mark.parametrize("labels", [[True, False], [1, 0], ["true", "false"], ["True", "False"]])
def test_kto_labels_in_every_spelling(labels):
    rows = [{"prompt": "a b", "completion": f"c d {i}", "label": label} for i, label in enumerate(labels)]
    assert data.prepare("kto", Dataset.from_list(rows)).dataset["label"] == [True, False]


def test_kto_label_that_is_not_one_names_the_row():
    rows = [
        {"prompt": "a b", "completion": "c d", "label": "true"},
        {"prompt": "a b", "completion": "e f", "label": "maybe"},
    ]
    with pytest.raises(TunefleetError, match=r"row 1: label 'maybe' is not a KTO label"):
        data.prepare("kto", Dataset.from_list(rows), source="d.jsonl", split="train")


def test_column_mapping_is_validated():
    ds = Dataset.from_list([{"q": "a b", "prompt": "c d", "chosen": "e f", "rejected": "g h"}])
    with pytest.raises(TunefleetError, match="has no column 'query'"):
        data.apply_column_mapping(ds, {"prompt": "query"}, None)
    with pytest.raises(TunefleetError, match="already has a 'prompt' column"):
        data.apply_column_mapping(ds, {"prompt": "q"}, None)
    with pytest.raises(TunefleetError, match="maps to 'question_text', which no layout reads"):
        data.apply_column_mapping(ds, {"question_text": "q"}, None)
    with pytest.raises(TunefleetError, match="--ignore_columns names 'nope'"):
        data.apply_column_mapping(ds, None, ["nope"])
    mapped = data.apply_column_mapping(ds, {"prompt": "q"}, ["prompt"])
    assert mapped.column_names == ["prompt", "chosen", "rejected"] and mapped[0]["prompt"] == "a b"


# ------------------------------------------------------------------ bad files and values: one line each
def one_line(capsys, *args) -> str:
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1, err
    return err


def test_broken_jsonl_line_is_named(tmp_path, capsys):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"text": "a b"}) + "\n" + '{"text": "c d",}\n')
    err = one_line(capsys, "check-data", "--method", "sft", "--dataset", path)
    assert f"{path} line 2: not valid JSON" in err


def test_empty_file_is_named_as_empty(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    assert f"{tmp_path / 'empty.jsonl'} is empty" in one_line(
        capsys, "check-data", "--method", "sft", "--dataset", tmp_path / "empty.jsonl"
    )


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--learning_rate", "-1", "'learning_rate' must be greater than 0"),
        ("--lora_dropout", "2", "'lora_dropout' must be below 1"),
        ("--num_generations", "1", "'num_generations' must be at least 2"),
        ("--max_length", "0", "'max_length' must be at least 1"),
        ("--beta", "0", "'beta' must be greater than 0 for dpo"),
    ],
)
def test_out_of_range_values_before_anything_loads(flag, value, message, tmp_path, capsys):
    err = one_line(
        capsys,
        "train",
        "--method",
        "dpo",
        "--model_name",
        "nowhere/model",
        "--dataset",
        "nowhere/data",
        "--output_dir",
        tmp_path / "r",
        flag,
        value,
    )
    assert message in err


def test_reward_that_raises_is_one_line_naming_it(tmp_path, capsys, tiny_model, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "helpers"))
    code, _, err = train(
        capsys, "grpo", layout_file(tmp_path, "gsm"), tmp_path / "r", "--reward_funcs", "length", "failing_reward:boom"
    )
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: reward function 'failing_reward:boom' raised RuntimeError: reward exploded on purpose"
    )
    assert read_json(tmp_path / "r" / "run.json")["status"] == "failed"


def test_sweep_specs_take_columns_and_mixtures_and_check_them_before_any_run(tmp_path):
    from tunefleet.launcher import sweep as sweeps

    pairs = write(
        tmp_path, "pairs", [{"query": question(i), "chosen": answer(i), "rejected": wrong(i)} for i in range(N)]
    )
    base = {"model_name": "tunefleet/tiny-qwen2", "dataset": str(pairs), "method": "dpo"}
    runs = sweeps.expand(sweeps.parse_spec({"name": "c", "runs_dir": str(tmp_path / "runs"), "base": base}))
    with pytest.raises(TunefleetError, match="dpo on .*pairs.jsonl split 'train': .*'query' hold text"):
        sweeps.validate_data(runs)
    mapped = {**base, "columns": {"prompt": "query"}}
    sweeps.validate_data(sweeps.expand(sweeps.parse_spec({"name": "c", "base": mapped})))

    mixture = {
        **base,
        "dataset": None,
        "mixture": [
            {"dataset": str(pairs), "columns": {"prompt": "query"}},
            "tunefleet/tiny-ultrafeedback:train_prefs@10",
        ],
    }
    (run,) = sweeps.expand(sweeps.parse_spec({"name": "m", "base": mixture}))
    assert [p.dataset for p in run.config.mixture] == [str(pairs), "tunefleet/tiny-ultrafeedback"]
    assert [part.dataset for _, part in sweeps.data_checks([run])] == [str(pairs), "tunefleet/tiny-ultrafeedback"]
    sweeps.validate_data([run])
    assert sweeps.RunPlan.from_json(run.to_json()) == run  # what a SLURM task reads back from runs.json
