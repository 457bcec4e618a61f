"""The evaluator: exact batched scoring, sharding, merging, results file, report, bad input."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import TINY, read_json, run_cli, sft_train, tunefleet

from tunefleet.eval import metrics, plan
from tunefleet.eval.plan import Task
from tunefleet.eval.results import RESULT_KEYS, training_metrics

# Margins measured on the tiny default after these short runs (60 steps): DPO preference accuracy
# 1.00 vs base 0.58; SFT test loss 4.86 vs base 6.30. The asserted margins leave room for seed noise.
PREF_MARGIN = 0.5  # the pretrained base prefers the hostile replies (0.10): DPO must turn that around
LOSS_SHARE = 0.85  # SFT's test loss at most this share of the base's (measured: 0.20-0.30 against 0.39)


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, tiny_model):
    """An SFT and a DPO run, 60 steps each, with the demo's settings for the tiny model."""
    root = tmp_path_factory.mktemp("runs")
    from tunefleet.launcher.cli import main

    for method, split, lr, extra in (
        ("sft", "train_sft", "5e-3", ["--assistant_only_loss"]),
        ("dpo", "train_prefs", "3e-3", ["--loss_type", "sigmoid", "sft"]),
    ):
        assert (
            main(
                [
                    "train",
                    "--method",
                    method,
                    *TINY,
                    "--split",
                    split,
                    "--output_dir",
                    str(root / f"{method}_tiny_s1"),
                    "--max_steps",
                    "60",
                    "--learning_rate",
                    lr,
                    "--use_qlora",
                    "false",
                    "--per_device_train_batch_size",
                    "8",
                    "--gradient_accumulation_steps",
                    "1",
                    "--logging_steps",
                    "20",
                    *extra,
                ]
            )
            == 0
        )
    return root


def copy_runs(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("evaluation_*", "*.png"))
    return dst


# ------------------------------------------------------------------ pure pieces
def test_plan_covers_every_sample_once_and_balances():
    sizes = {"ppl": 100, "pref": 100, "gen": 3}
    for shards in (1, 2, 3, 7):
        work = plan.plan_shards(["base", "a", "b"], sizes, shards)
        assert len(work) <= shards
        fake = [(t, list(range(t.start, t.end))) for shard in work for t in shard]
        merged = plan.merge(fake)
        assert set(merged) == {(t, m) for t in ("base", "a", "b") for m in sizes}
        assert all(merged[k] == list(range(sizes[k[1]])) for k in merged)
        loads = [sum(t.cost for t in s) for s in work]
        if shards > 1:
            assert max(loads) <= 1.5 * (sum(loads) / len(loads)), loads


def test_merge_refuses_gaps_and_overlaps():
    with pytest.raises(ValueError, match="missing or duplicated"):
        plan.merge([(Task("a", "ppl", 0, 2), [1, 2]), (Task("a", "ppl", 3, 4), [4])])
    with pytest.raises(ValueError, match="got 1 values"):
        plan.merge([(Task("a", "ppl", 0, 2), [1])])


def test_reward_model_win_rates_count_ties_half_and_move_to_the_parent_in_a_pipeline():
    from tunefleet.eval.evaluate import compare_with_root

    values = [
        {"prompt": "q", "response": "a", "reward": 1.0, "rewards": {"length": 1.0}, "rm": score}
        for score in (2.0, 1.0, 0.0)
    ]
    parent = [{"reward": 0.0, "rewards": {"length": 0.0}, "rm": 1.0}] * 3
    entry = metrics.reward_metrics(values, parent)
    assert entry["rm_score"] == 1.0 and entry["rm_win_rate_vs_base"] == pytest.approx(0.5)  # a win, a tie, a loss
    root = [{"reward": 0.0, "rewards": {"length": 0.0}, "rm": -1.0}] * 3  # the pipeline's raw base
    compare_with_root(entry, values, root)  # the group's base row was the parent: its rates move
    assert entry["rm_win_rate_vs_parent"] == pytest.approx(0.5) and entry["rm_win_rate_vs_base"] == 1.0
    assert metrics.reward_metrics(values)["rm_win_rate_vs_base"] is None


def test_metrics_are_exact_sums_not_means_of_means():
    values = [[30.0, 10], [1.0, 2]]  # token-weighted 31/12, not the mean of means (3.0 + 0.5) / 2
    assert metrics.perplexity_metrics(values)["test_loss"] == pytest.approx(31 / 12)
    pref = metrics.preference_metrics([[1.0, 1, 2.0, 1], [4.0, 2, 1.0, 1]], base=[[2.0, 1, 2.0, 1], [4.0, 2, 4.0, 1]])
    assert pref["preference_correct"] == 1 and pref["preference_total"] == 2
    assert pref["loss_margin"] == pytest.approx((2.0 + 1.0) / 2 - (1.0 + 2.0) / 2)
    assert pref["reward_accuracy"] == 0.5  # rewards (chosen, rejected): (1, 0) right, (0, 3) wrong


def test_training_metrics_from_state(tmp_path):
    (tmp_path / "trainer_state.json").write_text(
        json.dumps(
            {
                "global_step": 4,
                "log_history": [
                    {"loss": 3.0, "step": 1},
                    {"eval_loss": 2.5, "step": 2},
                    {"loss": 2.0, "step": 4},
                    {"eval_loss": 2.7, "step": 4},
                    {"train_runtime": 7200.0, "step": 4},
                ],
            }
        )
    )
    m = training_metrics(tmp_path)
    assert m == {
        "initial_train_loss": 3.0,
        "final_train_loss": 2.0,
        "best_eval_loss": 2.5,
        "final_eval_loss": 2.7,
        "total_steps": 4,
        "training_time_seconds": 7200.0,
        "training_time_hours": 2.0,
    }
    (tmp_path / "trainer_state.json").write_text("{corrupt")
    assert set(training_metrics(tmp_path).values()) == {None}


# ------------------------------------------------------------------ scoring
@pytest.mark.slow
def test_batched_scoring_equals_per_sample_reference(trained_runs, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefleet.eval.settings import EvalData
    from tunefleet.eval.worker import load_eval_data
    from tunefleet.trainers.scoring import encode_conversation, score_batched, score_one

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), trained_runs / "sft_tiny_s1")
    model.eval()
    data = load_eval_data(EvalData("tunefleet/tiny-ultrafeedback", "test_sft", "test_prefs", 40, 0))
    seqs = [encode_conversation(tok, m) for m in data["ppl"]] + [encode_conversation(tok, c) for c, _ in data["pref"]]
    assert len({len(s) for s in seqs}) > 5  # mixed lengths: padding is really exercised
    sums, counts = score_batched(model, seqs, batch_size=7, pad_id=tok.pad_token_id)
    for seq, s, c in zip(seqs, sums, counts):
        ref_s, ref_c = score_one(model, seq)
        assert c == ref_c == len(seq.completion_ids)
        assert s == pytest.approx(ref_s, rel=1e-5)


def test_pairs_scored_from_their_shared_prompt_equal_the_reference(trained_runs, tiny_model):
    """Chosen and rejected continue from one forward over their prompt; a pair whose prompts differ is scored as
    two sequences. Both equal one sequence at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefleet.eval.settings import EvalData
    from tunefleet.eval.worker import load_eval_data
    from tunefleet.trainers.scoring import Sequence, encode_conversation, score_one, score_pairs

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), trained_runs / "dpo_tiny_s1")
    model.eval()
    data = load_eval_data(EvalData("tunefleet/tiny-ultrafeedback", "test_sft", "test_prefs", 30, 0))
    pairs = [(encode_conversation(tok, c), encode_conversation(tok, r)) for c, r in data["pref"]]
    chosen = pairs[0][0]
    pairs.append((chosen, Sequence(chosen.prompt_ids[1:], pairs[1][1].completion_ids)))  # prompts differ
    scored = score_pairs(model, pairs, batch_size=4, pad_id=tok.pad_token_id)
    for (c, r), (c_sum, c_count, r_sum, r_count) in zip(pairs, scored):
        assert (c_count, r_count) == (len(c.completion_ids), len(r.completion_ids))
        assert c_sum == pytest.approx(score_one(model, c)[0], rel=1e-5)
        assert r_sum == pytest.approx(score_one(model, r)[0], rel=1e-5)


def test_adapters_taking_turns_in_one_slot_leave_the_base_exact(trained_runs):
    """Each run's adapter is copied into one slot (merged into a float32 base while it scores): a run scores
    the same whichever ran before it, and the base row after them equals the base row before, bit for bit."""
    import torch

    from tunefleet.eval.settings import EvalData
    from tunefleet.eval.worker import Scorer

    scorer = Scorer("tunefleet/tiny-qwen2", EvalData("tunefleet/tiny-ultrafeedback", "test_sft", "test_prefs", 20, 0))
    sizes = scorer.sizes()
    targets = {"base": None, "sft": str(trained_runs / "sft_tiny_s1"), "dpo": str(trained_runs / "dpo_tiny_s1")}

    def scores(*names):
        tasks = [Task(n, m, 0, sizes[m]) for n in names for m in ("ppl", "pref")]
        result = scorer.run(targets, tasks)
        assert not result.errors
        return {(task.target, task.metric): values for task, values in result.results}

    loaded = {name: p.detach().clone() for name, p in scorer.base.named_parameters()}
    first = scores("dpo", "base")
    later = scores("sft", "dpo", "base")
    assert scorer.merge and len(scorer.slots) == 1  # one shape, one slot
    assert later[("dpo", "ppl")] == first[("dpo", "ppl")] and later[("dpo", "pref")] == first[("dpo", "pref")]
    assert later[("base", "ppl")] == first[("base", "ppl")] and later[("base", "pref")] == first[("base", "pref")]
    assert later[("sft", "ppl")] != later[("dpo", "ppl")]
    now = {n.replace(".base_layer", ""): p for n, p in scorer.base.named_parameters() if "lora_" not in n}
    assert now.keys() == loaded.keys() and all(torch.equal(loaded[n], now[n]) for n in loaded)


# ------------------------------------------------------------------ end to end
def test_eval_scores_runs_and_learning_shows(trained_runs, tmp_path, capsys):
    runs = copy_runs(trained_runs, tmp_path / "runs")
    code, out, err = run_cli(capsys, "eval", "--runs_dir", runs, "--max_samples", 100)
    assert code == 0, err
    res = read_json(runs / "evaluation_results.json")
    base = res["base:tunefleet/tiny-qwen2"]
    assert set(res) == {"base:tunefleet/tiny-qwen2", "sft_tiny_s1", "dpo_tiny_s1"}
    for entry in res.values():
        assert set(RESULT_KEYS) <= set(entry)
        assert entry["preference_total"] == 100 and entry["error"] is None
        assert len(entry["generation_samples"]) == 3 and {"prompt", "response"} <= set(entry["generation_samples"][0])
    dpo, sft = res["dpo_tiny_s1"], res["sft_tiny_s1"]
    assert dpo["preference_accuracy"] >= base["preference_accuracy"] + PREF_MARGIN, (dpo, base)
    assert dpo["reward_accuracy"] > 0.5 and base["reward_accuracy"] is None
    assert sft["test_loss"] <= base["test_loss"] * LOSS_SHARE, (sft["test_loss"], base["test_loss"])
    assert sft["perplexity"] == pytest.approx(2.718281828 ** sft["test_loss"])
    assert sft["total_steps"] == 60 and sft["initial_train_loss"] > sft["final_train_loss"]
    assert base["total_steps"] is None and base["model_path"] == "tunefleet/tiny-qwen2"
    report = (runs / "evaluation_report.md").read_text()
    assert "sft_tiny_s1" in report and "**" in report
    assert "(mean and 95% t interval over seeds)" in report and "(1 seed: no interval)" in report  # one seed each
    for png in ("loss_curves.png", "preference_accuracy.png", "perplexity.png"):
        assert (runs / png).stat().st_size > 1000
    assert "pref. acc." in out


def test_a_run_of_any_method_logs_the_evaluators_metrics_at_each_evaluation(tmp_path, capsys, tiny_model):
    """SFT (whose trainer logs no pair metric) with --eval_pairs and --eval_prompts: each evaluation during training
    logs the evaluator's preference accuracy and held-out reward, and the last equals `tunefleet eval`'s numbers.
    QLoRA on CPU: evaluating mid-training must leave the 4-bit layers trainable."""
    runs = tmp_path / "runs"
    run = runs / "sft_heldout"
    flags = ["--eval_pairs", "test_prefs", "--eval_prompts", "test_gen", "--reward_funcs", "length"]
    steps = ["--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--learning_rate", "5e-3"]
    done = tunefleet(*sft_train(run), "--eval_split", "test_sft", "--heldout_samples", "24", *flags, *steps)
    assert "done:" in done.stdout, done.stdout[-3000:]
    evaluations = read_json(run / "progress.json")["evaluations"]
    assert [e["step"] for e in evaluations] == [2, 4]
    last = evaluations[-1]
    assert 0 <= last["eval_preference_accuracy"] <= 1 and last["eval_heldout_reward"] > 0
    history = read_json(run / "trainer_state.json")["log_history"]
    assert [h["eval_preference_accuracy"] for h in history if "eval_loss" in h] == [
        e["eval_preference_accuracy"] for e in evaluations
    ]
    args = ["--max_samples", 24, "--heldout_prompts", 24, "--reward_funcs", "length", "--skip_perplexity"]
    code, _, err = run_cli(capsys, "eval", "--runs_dir", runs, *args)
    assert code == 0, err
    scored = read_json(runs / "evaluation_results.json")["sft_heldout"]
    assert last["eval_preference_accuracy"] == pytest.approx(scored["preference_accuracy"], abs=1e-6)
    # Same prompts and rewards; a greedy answer may differ by a token where the evaluator's batches (all runs in one
    # mixed-adapter batch) round differently from a run's own.
    assert last["eval_heldout_reward"] == pytest.approx(scored["heldout_reward"], rel=0.1)


def test_shards_give_identical_numbers(trained_runs, tmp_path, capsys):
    outs = []
    for shards in (1, 3):
        runs = copy_runs(trained_runs, tmp_path / f"runs{shards}")
        assert run_cli(capsys, "eval", "--runs_dir", runs, "--max_samples", 30, "--shards", shards)[0] == 0
        res = read_json(runs / "evaluation_results.json")
        outs.append(
            {k: {m: v for m, v in e.items() if m not in ("eval_seconds", "model_path")} for k, e in res.items()}
        )
    for name in outs[0]:
        for key, value in outs[0][name].items():
            other = outs[1][name][key]
            assert other == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), (name, key)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_workers_give_the_local_numbers(trained_runs, tmp_path, capsys):
    local = copy_runs(trained_runs, tmp_path / "local")
    ray_runs = copy_runs(trained_runs, tmp_path / "ray")
    bench = ["--tasks", "tiny_world", "--limit", 20]  # benchmark tasks shard across the workers with the rest
    assert run_cli(capsys, "eval", "--runs_dir", local, "--max_samples", 30, *bench)[0] == 0
    ray_args = ["--max_samples", 30, "--backend", "ray", "--shards", 3, *bench]
    assert run_cli(capsys, "eval", "--runs_dir", ray_runs, *ray_args)[0] == 0
    a, b = read_json(local / "evaluation_results.json"), read_json(ray_runs / "evaluation_results.json")
    assert a.keys() == b.keys() and a["dpo_tiny_s1"]["benchmarks"]["tiny_world"]["acc"] is not None
    for name in a:
        for key in ("test_loss", "preference_accuracy", "avg_chosen_loss", "reward_accuracy", "generation_samples"):
            value = a[name][key]
            assert b[name][key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), (name, key)
        for task, numbers in a[name]["benchmarks"].items():
            assert b[name]["benchmarks"][task] == pytest.approx(numbers, rel=1e-6), (name, task)


@pytest.mark.slow
def test_benchmarks_on_one_base_load_equal_lm_evals_own_run_on_the_merged_export(trained_runs, tmp_path, capsys):
    """tiny_world through lm-eval's HFLM around the worker's loaded base (adapters in turn) gives what lm-eval's own
    CLI gives on the run's merged export: same task, same limit."""
    from tunefleet.eval.benchmarks import TASKS_DIR

    runs = copy_runs(trained_runs, tmp_path / "runs")
    args = ["--tasks", "tiny_world", "--limit", 40, "--max_samples", 4, "--max_generation_samples", 0]
    code, out, err = run_cli(capsys, "eval", "--runs_dir", runs, *args)
    assert code == 0, err
    ours = read_json(runs / "evaluation_results.json")
    assert "tiny_world acc" in out and "tiny_world acc_norm" in (runs / "evaluation_report.md").read_text()
    export = tmp_path / "dpo_merged"
    assert run_cli(capsys, "export", runs / "dpo_tiny_s1", "--output_dir", export, "--dtype", "float32")[0] == 0
    out_dir = tmp_path / "lm_eval"
    lm_eval = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
               f"pretrained={export},dtype=float32", "--tasks", "tiny_world", "--include_path", str(TASKS_DIR),
               "--limit", "40", "--batch_size", "32", "--device", "cpu", "--output_path", str(out_dir)]  # fmt: skip
    done = subprocess.run(lm_eval, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = out_dir.rglob("results_*.json")
    theirs = json.loads(written.read_text())["results"]["tiny_world"]
    mine = ours["dpo_tiny_s1"]["benchmarks"]["tiny_world"]
    for metric in ("acc", "acc_norm", "acc_stderr"):
        assert mine[metric] == pytest.approx(theirs[f"{metric},none"], abs=1e-6), metric


def test_partial_rerun_keeps_other_entries_and_reuses_unchanged(trained_runs, tmp_path, capsys):
    runs = copy_runs(trained_runs, tmp_path / "runs")
    assert run_cli(capsys, "eval", "--runs_dir", runs, "--max_samples", 20)[0] == 0
    first = read_json(runs / "evaluation_results.json")
    # Only SFT: the DPO entry must survive untouched; the unchanged SFT entry is reused.
    assert run_cli(capsys, "eval", "--runs_dir", runs, "--max_samples", 20, "--methods", "sft")[0] == 0
    second = read_json(runs / "evaluation_results.json")
    assert second["dpo_tiny_s1"] == first["dpo_tiny_s1"] and second["sft_tiny_s1"] == first["sft_tiny_s1"]
    # A changed adapter is re-scored; --force re-scores everything.
    from safetensors.torch import load_file, save_file

    weights = load_file(runs / "sft_tiny_s1" / "adapter_model.safetensors")
    save_file(
        {k: v * 0 if "lora_B" in k else v for k, v in weights.items()},
        runs / "sft_tiny_s1" / "adapter_model.safetensors",
    )
    assert run_cli(capsys, "eval", "--runs_dir", runs, "--max_samples", 20, "--methods", "sft")[0] == 0
    third = read_json(runs / "evaluation_results.json")
    assert third["sft_tiny_s1"]["fingerprint"] != first["sft_tiny_s1"]["fingerprint"]
    base = third["base:tunefleet/tiny-qwen2"]
    assert third["sft_tiny_s1"]["test_loss"] == pytest.approx(base["test_loss"], rel=1e-6)  # B = 0: adapter is a no-op
    assert third["dpo_tiny_s1"] == first["dpo_tiny_s1"]


def test_bad_runs_do_not_stop_the_others(trained_runs, tmp_path, capsys, monkeypatch):
    runs = copy_runs(trained_runs, tmp_path / "runs")
    (runs / "sft_tiny_s1" / "trainer_state.json").write_text("{ not json")
    (runs / "dpo_tiny_s1" / "adapter_model.safetensors").write_bytes(b"garbage")

    # Nothing from a run folder may be unpickled.
    def no_unpickle(*a, **k):
        raise AssertionError("the evaluator unpickled a file")

    monkeypatch.setattr(pickle, "load", no_unpickle)
    monkeypatch.setattr(pickle, "loads", no_unpickle)
    code, out, _ = run_cli(capsys, "eval", "--runs_dir", runs, "--max_samples", 10)
    assert code == 1  # one run failed
    res = read_json(runs / "evaluation_results.json")
    sft, dpo = res["sft_tiny_s1"], res["dpo_tiny_s1"]
    assert sft["error"] is None and sft["final_train_loss"] is None and sft["test_loss"] is not None
    assert dpo["error"] and dpo["test_loss"] is None and set(RESULT_KEYS) <= set(dpo)
    assert "error in dpo_tiny_s1" in out


def test_unloadable_base_model_is_an_error_on_its_runs(trained_runs, tmp_path, capsys):
    runs = copy_runs(trained_runs, tmp_path / "runs")
    code, _, _ = run_cli(capsys, "eval", "--runs_dir", runs, "--base_model", str(tmp_path), "--max_samples", 5)
    res = read_json(runs / "evaluation_results.json")
    assert code == 1 and "holds no config.json" in res["sft_tiny_s1"]["error"]


def test_eval_bad_input(tmp_path, capsys, trained_runs):
    code, _, err = run_cli(capsys, "eval", "--runs_dir", tmp_path / "nope")
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "eval", "--runs_dir", tmp_path / "empty")
    assert code == 2 and "no runs with an adapter" in err
    runs = copy_runs(trained_runs, tmp_path / "runs")
    data = tmp_path / "ds"
    data.mkdir()
    for split in ("test_sft", "test_prefs"):
        (data / f"{split}.jsonl").write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    code, _, err = run_cli(capsys, "eval", "--runs_dir", runs, "--dataset", data)
    assert code == 2 and err.count("\n") == 1
    assert "no sft layout fits the columns answer, prompt" in err


@pytest.mark.slow
def test_benchmark_tasks_that_cannot_run_are_one_line(trained_runs, tmp_path, capsys, monkeypatch):
    runs = copy_runs(trained_runs, tmp_path / "runs")
    code, _, err = run_cli(capsys, "eval", "--runs_dir", runs, "--tasks", "tiny_world,tiny_wrld")  # as lm-eval's
    assert (
        code == 2 and err.count("\n") == 1 and "unknown benchmark task 'tiny_wrld' (did you mean 'tiny_world'" in err
    )
    code, _, err = run_cli(capsys, "eval", "--runs_dir", runs, "--tasks", "arc_easy")  # a hub task, offline here
    assert code == 2 and err.count("\n") == 1, err
    assert "benchmark task arc_easy: its data cannot be reached" in err and "only local tasks run" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    code, _, err = run_cli(capsys, "eval", "--runs_dir", runs, "--tasks", "tiny_world")
    assert code == 2 and "pip install 'tunefleet[bench]'" in err
    assert not (runs / "evaluation_results.json").exists()  # nothing was scored


def test_report_rebuilds_from_json(trained_runs, tmp_path, capsys):
    runs = copy_runs(trained_runs, tmp_path / "runs")
    assert run_cli(capsys, "eval", "--runs_dir", runs, "--max_samples", 5, "--skip_perplexity")[0] == 0
    res = read_json(runs / "evaluation_results.json")
    assert all(e["perplexity"] is None for e in res.values())
    (runs / "evaluation_report.md").unlink()
    code, out, _ = run_cli(capsys, "report", "--runs_dir", runs)
    assert code == 0 and (runs / "evaluation_report.md").exists() and "dpo_tiny_s1" in out
