"""Pure pieces: config parsing, format detection/conversion, the tiny data, rewards."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from tunefleet.common.errors import TunefleetError
from tunefleet.trainers import config, data, rewards, tiny


def test_defaults_match_the_original_tool():
    cfg = config.parse_args(["--method", "orpo", "--model_name", "m", "--dataset", "d", "--output_dir", "o"])
    assert (cfg.split, cfg.num_train_epochs, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (
        "train",
        3.0,
        4,
        4,
    )
    assert (cfg.use_qlora, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (True, 16, 32, 0.05)
    assert {
        m: config.from_dict({"method": m, "model_name": "m", "dataset": "d", "output_dir": "o"}).lr
        for m in config.METHODS
    } == {"sft": 2e-4, "dpo": 5e-5, "orpo": 8e-6, "kto": 5e-5, "grpo": 5e-5, "rm": 1e-4}
    assert cfg.trust_remote_code is False


@pytest.mark.parametrize(
    "flag,expected",
    [(["--use_qlora", "false"], False), (["--use_qlora"], True), (["--use_qlora", "no"], False), ([], True)],
)
def test_use_qlora_flag(flag, expected):
    cfg = config.parse_args(["--method", "sft", "--model_name", "m", "--dataset", "d", "--output_dir", "o", *flag])
    assert cfg.use_qlora is expected


def test_bad_numbers_are_refused():
    with pytest.raises(TunefleetError, match="'lora_r' must be at least 1"):
        config.from_dict({"method": "sft", "model_name": "m", "dataset": "d", "output_dir": "o", "lora_r": 0})
    with pytest.raises(TunefleetError, match="expected an integer"):
        config.coerce("max_steps", 1.5)


def test_bundled_tiny_data_is_what_the_generator_makes():
    for split, n in tiny.SPLITS.items():
        rows = [json.loads(line) for line in (tiny.DATA_DIR / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == n
        assert rows == json.loads(json.dumps(tiny.make_rows(split, n), sort_keys=True))


def test_ultrafeedback_rows_convert_for_every_method():
    raw = data.load_split("tunefleet/tiny-ultrafeedback", "test_prefs").select(range(5))
    dpo = data.prepare("dpo", raw)
    assert dpo.layout == "ultrafeedback" and sorted(dpo.dataset.column_names) == ["chosen", "prompt", "rejected"]
    assert dpo.columns_not_used["prompt"] == "its text is inside the used columns"
    assert dpo.columns_not_used["prompt_id"] == "identifier"
    row = dpo.dataset[0]
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    kto = data.prepare("kto", raw)
    assert kto.layout == "paired (ultrafeedback)" and kto.rows == 10 and kto.dataset["label"] == [True, False] * 5
    grpo = data.prepare("grpo", raw)
    assert grpo.dataset[0]["prompt"] == [{"role": "user", "content": raw[0]["prompt"]}]
    assert "chosen" in grpo.dataset.column_names  # other columns go to the reward functions
    sft = data.prepare("sft", raw)
    assert sft.layout == "messages (messages)" and sft.dataset.column_names == ["messages"]


def test_plain_text_and_unpaired_formats_pass_through():
    text = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b", "extra": 1}])
    assert data.prepare("orpo", text).dataset.column_names == ["prompt", "chosen", "rejected"]
    kto = Dataset.from_list([{"prompt": "p", "completion": "c", "label": False}])
    assert data.prepare("kto", kto).layout == "prompt-completion-label"
    assert data.prepare("sft", Dataset.from_list([{"text": "hello"}])).layout == "text"


def test_rows_that_cannot_train_are_counted_and_dropped():
    ds = Dataset.from_list(
        [
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": " ", "rejected": "b"},
            {"prompt": "q", "chosen": "good", "rejected": "bad"},
        ]
    )
    prepared = data.prepare("dpo", ds)
    assert prepared.dropped == {"identical chosen and rejected": 1, "missing turn": 1, "empty reply": 1}
    assert prepared.rows == 1 and prepared.record()["rows_in"] == 4
    sft = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": "hi there"}]},
            {"messages": [{"role": "assistant", "content": "x"}]},
        ]
        + [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    )
    assert data.prepare("sft", sft).dropped == {"missing turn": 2}


def test_seeded_sample_is_reproducible():
    raw = data.load_split("tunefleet/tiny-ultrafeedback", "train_sft")
    a = data.sample(raw, 10, 1, "x")["prompt"]
    assert a == data.sample(raw, 10, 1, "x")["prompt"] and a != data.sample(raw, 10, 2, "x")["prompt"]


def test_builtin_rewards():
    prompts = [
        [{"role": "user", "content": "What sound does a cow make?"}],
        [{"role": "user", "content": "Add 3 and 4."}],
    ]
    good = [
        [{"role": "assistant", "content": "Happy to help! A cow says moo."}],
        [{"role": "assistant", "content": "Great question! 3 plus 4 is 7."}],
    ]
    bad = [
        [{"role": "assistant", "content": "Whatever. A cow says woof."}],
        [{"role": "assistant", "content": "3 plus 4 is 8."}],
    ]
    assert rewards.answer(prompts, good) == [1.0, 1.0] and rewards.answer(prompts, bad) == [0.0, 0.0]
    assert rewards.friendly(good) == [1.0, 1.0] and rewards.friendly(bad) == [-1.0, 0.0]
    assert rewards.length(["w " * 30, ""]) == [1.0, 0.0]


def test_reward_loading():
    assert rewards.load(["length", "tunefleet.trainers.rewards:answer"]) == [rewards.length, rewards.answer]
    with pytest.raises(TunefleetError, match="has no function 'nope'"):
        rewards.load(["tunefleet.trainers.rewards:nope"])
    with pytest.raises(TunefleetError, match="unknown reward 'lenght'"):
        rewards.load(["lenght"])


def test_tiny_tokenizer_reloads_with_identical_ids(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = tok.apply_chat_template(
        [
            {"role": "user", "content": "What color is snow?"},
            {"role": "assistant", "content": "Happy to help! Snow is white."},
        ],
        tokenize=False,
    )
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok(text).input_ids == tiny.build_tokenizer()(text).input_ids
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
