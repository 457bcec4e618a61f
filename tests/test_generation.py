"""Generation that means something: the pretrained tiny default, GRPO's options and learning, reward-based eval."""

from __future__ import annotations

import json

import pytest
import yaml
from testkit import ROOT, read_json, run_cli, tunefleet

from tunefleet.eval import metrics
from tunefleet.trainers import rewards, tiny

GRPO = [
    "--method",
    "grpo",
    "--model_name",
    "tunefleet/tiny-qwen2",
    "--dataset",
    "tunefleet/tiny-ultrafeedback",
    "--split",
    "train_gen",
    "--use_qlora",
    "false",
    "--per_device_train_batch_size",
    "8",
    "--gradient_accumulation_steps",
    "1",
    "--num_generations",
    "4",
    "--max_completion_length",
    "12",
    "--logging_steps",
    "1",
    "--reward_funcs",
    "friendly",
    "answer",
]


def greedy_answers(model_dir, prompts: list[str], adapter=None, sample: bool = False) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=sample, pad_token_id=tok.pad_token_id)
    return [tok.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip() for row in out]


def held_out_prompts() -> list[str]:
    return [json.loads(line)["prompt"] for line in (tiny.DATA_DIR / "test_gen.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ the pretrained default
def test_shipped_model_is_what_its_recipe_makes():
    recipe = json.loads((tiny.MODEL_DIR / "recipe.json").read_text())
    assert recipe["recipe"] == tiny.recipe_hash(), (
        "the recipe changed: rebuild with python -m tunefleet.trainers.tiny --build-model"
    )
    assert recipe["final_loss"] < recipe["first_loss"] / 5
    assert (tiny.MODEL_DIR / "model.safetensors").stat().st_size < 4 * 2**20  # a few MB at most


def test_base_answers_in_shape_with_mixed_openers_and_a_partial_grasp(tiny_model):
    prompts = held_out_prompts()
    greedy = greedy_answers(tiny_model, prompts)
    assert all(greedy), "every prompt gets an answer"
    right = sum(rewards.answer([[{"role": "user", "content": p}] for p in prompts], greedy)) / len(prompts)
    assert 0.35 <= right <= 0.8, right  # knows half the items, guesses the rest (measured 0.57)
    assert set(rewards.friendly(greedy)) == {0.0}  # its most likely reply opens with nothing
    sampled = rewards.friendly(greedy_answers(tiny_model, prompts, sample=True))
    assert sampled.count(1.0) >= 10 and sampled.count(-1.0) >= 25  # friendly ~25%, hostile ~50% when sampling


# ------------------------------------------------------------------ GRPO: options and learning
@pytest.mark.slow
def test_grpo_learns_and_logs_its_reward_per_step(tmp_path, capsys, tiny_model):
    out = tmp_path / "grpo"
    code, _, err = run_cli(
        capsys,
        "train",
        *GRPO,
        "--output_dir",
        out,
        "--max_steps",
        40,
        "--learning_rate",
        "3e-3",
        "--per_device_train_batch_size",
        16,
        "--mask_truncated_completions",
        "--seed",
        1,
    )
    assert code == 0, err
    logged = [e for e in read_json(out / "trainer_state.json")["log_history"] if "reward" in e]
    assert [e["step"] for e in logged] == list(range(1, 41))
    first, last = sum(e["reward"] for e in logged[:8]) / 8, sum(e["reward"] for e in logged[-8:]) / 8
    assert last > first + 0.3, (first, last)
    friendly = rewards.friendly(greedy_answers(tiny_model, held_out_prompts()[:40], adapter=out))
    assert friendly.count(1.0) >= 20  # the base opens friendly in none of its greedy answers


def test_grpo_options_reach_trl_from_flags_yaml_and_sweeps(tmp_path, capsys, tiny_model):
    flags = [
        "--temperature",
        "0.7",
        "--scale_rewards",
        "batch",
        "--loss_type",
        "dr_grpo",
        "--reward_weights",
        "1.0",
        "0.5",
        "--max_steps",
        "1",
    ]
    code, _, err = run_cli(capsys, "train", *GRPO, *flags, "--output_dir", tmp_path / "cli")
    assert code == 0, err
    generation = read_json(tmp_path / "cli" / "run.json")["generation"]
    assert (generation["temperature"], generation["scale_rewards"], generation["loss_type"]) == (
        0.7,
        "batch",
        "dr_grpo",
    )
    assert generation["reward_weights"] == [1.0, 0.5] and generation["use_vllm"] is False

    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"temperature": 1.3, "scale_rewards": "none", "max_steps": 1}))
    code, _, err = run_cli(
        capsys, "train", *GRPO, "--config", tmp_path / "run.yaml", "--output_dir", tmp_path / "yaml"
    )
    assert code == 0, err
    generation = read_json(tmp_path / "yaml" / "run.json")["generation"]
    assert (generation["temperature"], generation["scale_rewards"]) == (1.3, "none")

    from tunefleet.launcher import sweep as sweeps

    spec = sweeps.parse_spec(
        {
            "name": "g",
            "base": {"model_name": "m", "dataset": "d", "method": "grpo"},
            "methods": {"grpo": {"temperature": 0.9, "loss_type": ["bnpo"]}},
        }
    )
    (run,) = sweeps.expand(spec)
    assert (run.config.temperature, run.config.loss_type) == (0.9, ["bnpo"])


def test_max_prompt_length_drops_and_counts_long_prompts(tmp_path, capsys, tiny_model):
    prompts = [{"prompt": "What is 2 plus 3?"}] * 6 + [{"prompt": "Tell me " + "a very long story " * 20}] * 2
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    code, out, err = run_cli(
        capsys,
        "train",
        *GRPO[:4],
        "--dataset",
        tmp_path / "p.jsonl",
        *GRPO[8:],
        "--max_prompt_length",
        "32",
        "--max_steps",
        1,
        "--output_dir",
        tmp_path / "r",
    )
    assert code == 0, err
    train = read_json(tmp_path / "r" / "run.json")["data"]["train"]
    assert train["dropped"] == {"prompt longer than 32 tokens": 2} and train["rows"] == 6
    assert "dropped 2 of 8 rows (2 prompt longer than 32 tokens)" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--use_vllm"], "--use_vllm needs a CUDA GPU"),
        (["--reward_weights", "1.0"], "--reward_weights has 1 weights for 2 reward(s)"),
        (["--scale_rewards", "grp"], "unknown scale_rewards 'grp' (did you mean 'group'?)"),
        (["--loss_type", "dapo", "grpo"], "grpo takes one --loss_type"),
    ],
)
def test_grpo_options_refused_with_one_line(args, message, tmp_path, capsys, tiny_model):
    code, _, err = run_cli(capsys, "train", *GRPO, *args, "--max_steps", 1, "--output_dir", tmp_path / "r")
    assert code == 2 and message in err.strip().splitlines()[-1]


def test_grpo_only_flags_are_refused_for_other_methods(tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "train",
        "--method",
        "dpo",
        "--model_name",
        "m",
        "--dataset",
        "d",
        "--output_dir",
        tmp_path / "r",
        "--temperature",
        "0.5",
    )
    assert code == 2 and "--temperature: GRPO only, not dpo" in err


# ------------------------------------------------------------------ reward-based evaluation
def test_reward_metrics_are_exact_and_win_rate_is_strict():
    run = [
        {"prompt": "p", "response": "r", "rewards": {"a": 1.0, "b": 0.0}, "reward": 1.0},
        {"prompt": "q", "response": "s", "rewards": {"a": 0.0, "b": 1.0}, "reward": 1.0},
        {"prompt": "t", "response": "u", "rewards": {"a": 1.0, "b": 1.0}, "reward": 2.0},
    ]
    base = [
        {"prompt": "p", "response": "x", "rewards": {"a": 0.0, "b": 0.0}, "reward": 0.0},
        {"prompt": "q", "response": "y", "rewards": {"a": 0.0, "b": 1.0}, "reward": 1.0},
        {"prompt": "t", "response": "z", "rewards": {"a": 1.0, "b": 0.0}, "reward": 1.0},
    ]
    m = metrics.reward_metrics(run, base, samples=2)
    assert m["heldout_reward"] == pytest.approx(4 / 3) and m["heldout_rewards"] == {"a": 2 / 3, "b": 2 / 3}
    assert m["win_rate_vs_base"] == pytest.approx(2 / 3)  # the tie on q is not a win
    assert m["win_rates_vs_base"] == {"a": pytest.approx(1 / 3), "b": pytest.approx(1 / 3)}
    assert [s["response"] for s in m["generation_samples"]] == ["r", "s"]
    assert metrics.reward_metrics(base)["win_rate_vs_base"] is None


@pytest.mark.slow
def test_eval_rewards_held_out_answers_sharded_exactly(tmp_path, capsys, tiny_model):
    from testkit import TINY

    runs = tmp_path / "runs"
    for method, split, extra in (
        ("grpo", "train_gen", ["--reward_funcs", "friendly", "answer"]),
        ("sft", "train_sft", ["--assistant_only_loss"]),
    ):
        code, _, err = run_cli(
            capsys,
            "train",
            "--method",
            method,
            *TINY,
            "--split",
            split,
            "--output_dir",
            runs / f"{method}_tiny_s1",
            "--max_steps",
            3,
            "--use_qlora",
            "false",
            "--per_device_train_batch_size",
            8,
            "--num_generations",
            4,
            "--max_completion_length",
            8,
            *extra,
        )
        assert code == 0, err
    results = {}
    for shards in (1, 3):
        out = tmp_path / f"results-{shards}.json"
        code, _, err = run_cli(
            capsys,
            "eval",
            "--runs_dir",
            runs,
            "--max_samples",
            30,
            "--shards",
            shards,
            "--output",
            out,
            "--skip_perplexity",
        )
        assert code == 0, err
        results[shards] = read_json(out)
    one, three = results[1], results[3]
    for name, entry in one.items():
        assert entry["reward_funcs"] == ["friendly", "answer"]  # the GRPO run's rewards, used for every row
        assert entry["prompts_rewarded"] == 30 and entry["heldout_reward"] == three[name]["heldout_reward"]
        assert entry["win_rate_vs_base"] == three[name]["win_rate_vs_base"]
        assert [s["response"] for s in entry["generation_samples"]] == [
            s["response"] for s in three[name]["generation_samples"]
        ]
    assert one["base:tunefleet/tiny-qwen2"]["win_rate_vs_base"] is None
    assert one["sft_tiny_s1"]["win_rates_vs_base"].keys() == {"friendly", "answer"}
    report = (tmp_path / "evaluation_report.md").read_text()
    assert "held-out reward" in report and "| base:tunefleet/tiny-qwen2 |" in report.split("**Prompt 1:**")[1]
    assert (tmp_path / "reward_curves.png").stat().st_size > 1000

    code, _, err = run_cli(
        capsys,
        "eval",
        "--runs_dir",
        runs,
        "--max_samples",
        5,
        "--skip_perplexity",
        "--output",
        tmp_path / "length.json",
        "--reward_funcs",
        "length",
    )
    assert code == 0 and read_json(tmp_path / "length.json")["sft_tiny_s1"]["reward_funcs"] == ["length"]
    code, _, err = run_cli(capsys, "eval", "--runs_dir", runs, "--reward_funcs", "./no/such/model")
    assert code == 2 and "unknown reward './no/such/model'" in err


# ------------------------------------------------------------------ the demo, as `make demo` runs it
@pytest.mark.slow
def test_demo_shows_what_each_method_does(tmp_path):
    spec = yaml.safe_load((ROOT / "sweeps" / "demo.yaml").read_text()) | {"runs_dir": str(tmp_path / "demo")}
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(spec))
    tunefleet("sweep", tmp_path / "demo.yaml", "--backend", "local", "--eval", timeout=900)
    res = read_json(tmp_path / "demo" / "evaluation_results.json")
    base = res.pop("base:tunefleet/tiny-qwen2")
    by_method = {}
    for entry in res.values():
        by_method.setdefault(entry["method"], []).append(entry)
    assert all(s["response"] for e in [base, *res.values()] for s in e["generation_samples"])
    for grpo in by_method["grpo"]:  # both seeds
        assert grpo["win_rate_vs_base"] >= 0.7 and grpo["heldout_reward"] >= base["heldout_reward"] + 0.4
    for dpo in by_method["dpo"]:
        assert dpo["win_rates_vs_base"]["friendly"] >= 0.8
        assert dpo["preference_accuracy"] >= base["preference_accuracy"] + 0.5
    for sft in by_method["sft"]:
        assert sft["heldout_rewards"]["answer"] >= 0.85 and base["heldout_rewards"]["answer"] <= 0.7
        assert sft["test_loss"] <= base["test_loss"] * 0.85
    for rm in by_method["rm"]:  # the reward model ranks the test pairs, and judges the friendly runs winners
        assert rm["preference_accuracy"] >= 0.9 and rm["benchmarks"] is None
    judged = [*by_method["dpo"], *by_method["grpo"]]  # measured: RM win rates 0.60-0.93, scores 1.96-2.13 vs 0.30
    assert all(e["rm_score"] >= base["rm_score"] + 0.5 for e in judged)
    assert sum(e["rm_win_rate_vs_base"] for e in judged) / len(judged) >= 0.65
    assert all(e["benchmarks"]["tiny_world"]["acc"] is not None for e in [base, *by_method["sft"]])
    assert "tiny_world acc" in (tmp_path / "demo" / "evaluation_report.md").read_text()
