"""Pipelines: stages whose runs start from runs of an earlier stage, scheduled as a DAG on local processes, a local
Ray and (tests/test_slurm.py) a real SLURM; lineage in run.json; evaluation against the parent."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from testkit import ROOT, read_json, run_cli, tunefleet

from tunefleet.common.errors import TunefleetError
from tunefleet.common.status import RunStatus
from tunefleet.launcher import sweep as sweeps
from tunefleet.launcher.dag import Dag

HELPERS = str(Path(__file__).parent / "helpers")
BASE = {
    "model_name": "tunefleet/tiny-qwen2",
    "dataset": "tunefleet/tiny-ultrafeedback",
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "use_qlora": False,
    "save_steps": 1000,
    "logging_steps": 2,
}
METHODS = {
    "sft": {"split": "train_sft", "learning_rate": 5.0e-3},
    "dpo": {"split": "train_prefs", "max_steps": 4, "learning_rate": 3.0e-3},
    "grpo": {"split": "train_gen", "max_steps": 2, "num_generations": 2, "max_completion_length": 4},
}


def study(runs_dir: Path, broken_reward: str = "failing_reward:boom") -> dict:
    """Two SFT parents (a short and a long one), a DPO child of each; a GRPO parent that fails (its reward raises)
    with a DPO child; and a DPO run from the best SFT parent by test loss."""
    return {
        "name": "study",
        "runs_dir": str(runs_dir),
        "base": BASE,
        "methods": METHODS,
        "eval": {"max_samples": 12, "max_generation_samples": 1, "reward_funcs": ["friendly", "answer"]},
        "stages": {  # the failing parent first: it takes a slot and frees it at once
            "broken": {"grid": {"method": ["grpo"], "seed": [1]}, "base": {"reward_funcs": [broken_reward]}},
            "sft": {"grid": {"method": ["sft"], "seed": [1], "max_steps": [4, 300]}, "naming": "sft_n{max_steps}"},
            "aligned": {"from": "sft", "grid": {"method": ["dpo"]}},
            "after_broken": {"from": "broken", "grid": {"method": ["dpo"]}},
            "tuned": {"from": "sft", "best": "test_loss", "grid": {"method": ["dpo"], "seed": [7]}},
        },
    }


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ------------------------------------------------------------------ pure: specs and the DAG
def test_stages_expand_into_children_of_each_parent(tmp_path):
    spec = sweeps.parse_spec(study(tmp_path / "runs"), "study.yaml")
    runs = {r.name: r for r in sweeps.expand(spec)}
    assert set(runs) == {
        "sft_n4",
        "sft_n300",
        "sft_n4-dpo",
        "sft_n300-dpo",
        "grpo_tiny-qwen2_s1",
        "grpo_tiny-qwen2_s1-dpo",
        "dpo_tiny-qwen2_s7_from_best_sft",
    }
    child = runs["sft_n4-dpo"]
    assert child.config.model_name == str(tmp_path / "runs" / "sft_n4") and child.config.seed == 1  # inherited
    assert child.lineage.parent == "sft_n4" and child.lineage.root_model == "tunefleet/tiny-qwen2"
    assert child.config.max_steps == 4 and child.config.stage == "aligned"
    tuned = runs["dpo_tiny-qwen2_s7_from_best_sft"]
    assert tuned.lineage.waits_for_choice and tuned.lineage.best == "test_loss" and tuned.config.seed == 7


def test_a_child_grid_over_the_matched_key_pairs_by_value(tmp_path):
    spec = study(tmp_path / "runs")
    spec["stages"] = {
        "sft": {"grid": {"method": ["sft"], "seed": [1, 2]}},
        "aligned": {"from": "sft", "match": ["seed"], "grid": {"method": ["dpo"], "seed": [2, 3]}},
    }
    runs = sweeps.expand(sweeps.parse_spec(spec, "s.yaml"))
    assert [r.name for r in runs if r.config.method == "dpo"] == ["sft_tiny-qwen2_s2-dpo"]  # seed 3: no parent


@pytest.mark.parametrize(
    "stages,message",
    [
        ({"a": {"from": "nope"}}, "stage 'a' starts from 'nope', which is no stage"),
        ({"a": {"from": "b"}, "b": {}}, "stage 'a' starts from 'b', which comes after it"),
        ({"a": {"from": "a"}}, "stage 'a' starts from itself: a cycle"),
        ({"a": {}, "b": {"from": "a", "best": "speed"}}, "best: 'speed' is no metric"),
        ({"a": {"eval": {"skip_perplexity": True}}, "b": {"from": "a", "best": "test_loss"}}, "cannot produce"),
        ({"a": {}, "b": {"from": "a", "best": "best_eval_loss"}}, "needs an eval_split in that stage's runs"),
        ({"a": {}, "b": {"from": "a", "base": {"model_name": "other/model"}}}, "whose runs were trained on"),
        ({"a": {"resources": {"max_parallel": 2}}}, "resources.max_parallel is the whole sweep's"),
        ({"a": {"form": "b"}}, "unknown key 'form' in a stage (did you mean 'from'?)"),
        ({"a": {}, "b": {"from": "a", "best": "test_loss", "match": ["seed"]}}, "by 'match' or by 'best', not both"),
    ],
)
def test_bad_stages_are_one_line_before_anything_runs(tmp_path, stages, message):
    spec = {"name": "bad", "runs_dir": str(tmp_path), "base": {**BASE, "method": "sft", "split": "train_sft"}}
    spec["stages"] = stages
    with pytest.raises(TunefleetError, match=re.escape(message)) as caught:
        sweeps.expand(sweeps.parse_spec(spec, "bad.yaml"))
    assert "\n" not in str(caught.value)


def test_a_spec_with_stages_takes_no_top_level_grid(tmp_path):
    spec = {"name": "g", "base": BASE, "grid": {"seed": [1]}, "stages": {"a": {}}}
    with pytest.raises(TunefleetError, match="gives each stage its own grid"):
        sweeps.parse_spec(spec, "g.yaml")


def test_the_dag_starts_children_when_their_own_parent_ends_and_blocks_those_of_a_failed_one(tmp_path):
    runs = sweeps.expand(sweeps.parse_spec(study(tmp_path / "runs"), "s.yaml"))
    dag = Dag(runs)
    first = {r.name for r in dag.ready()}
    assert first == {"sft_n4", "sft_n300", "grpo_tiny-qwen2_s1"}
    dag.ended("sft_n4", finished=True)
    assert [r.name for r in dag.ready()] == ["sft_n4-dpo"]  # no barrier: sft_n300 still trains
    dag.ended("grpo_tiny-qwen2_s1", finished=False)
    assert [(p.name, why) for p, why in dag.blocked()] == [
        ("grpo_tiny-qwen2_s1-dpo", "its parent grpo_tiny-qwen2_s1 did not finish")
    ]
    assert dag.choices() == []  # the best of sft waits for all of sft
    dag.ended("sft_n300", finished=True)
    assert [r.name for r in dag.ready()] == ["sft_n300-dpo"]
    assert dag.choices() == ["tuned"]
    assert dag.choose("tuned", dag.plan("sft_n300"), "lowest test loss") == []
    chosen = dag.ready()
    assert [(r.name, r.parent, r.config.model_name) for r in chosen] == [
        ("dpo_tiny-qwen2_s7_from_best_sft", "sft_n300", str(tmp_path / "runs" / "sft_n300"))
    ]


def test_dry_run_prints_each_runs_place_in_the_dag(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "sweep", write(tmp_path / "s.yaml", study(tmp_path / "runs")), "--dry-run")
    assert code == 0
    assert "stage aligned: starts from sft_n4 (once it finished)" in out
    assert "stage tuned: starts from the best run of stage sft by test_loss" in out
    assert "stage sft: starts from tunefleet/tiny-qwen2" in out


def test_every_shipped_pipeline_expands():
    for name in ("pipeline.yaml", "five_methods_pipeline.yaml"):
        runs = sweeps.expand(sweeps.load_spec(str(ROOT / "sweeps" / name)))
        assert any(r.parent for r in runs), name


# ------------------------------------------------------------------ a run folder as the base model
def test_a_run_folder_that_cannot_be_a_base_is_one_line(tmp_path, capsys, tiny_model):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "adapter_config.json").write_text('{"base_model_name_or_path": "tunefleet/tiny-qwen2"}')
    (unfinished / "run.json").write_text('{"status": "running"}')
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text('{"base_model_name_or_path": "tunefleet/tiny-qwen2"}')
    args = ["--method", "dpo", "--dataset", "tunefleet/tiny-ultrafeedback", "--split", "train_prefs"]
    for model, message in ((unfinished, "is a run that is running, not finished"), (empty, "holds no adapter_model")):
        code, _, err = run_cli(capsys, "train", *args, "--model_name", model, "--output_dir", tmp_path / "out")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------ a real study on local processes
@pytest.fixture(scope="module")
def local_study(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("study")
    spec = write(root / "study.yaml", study(root / "runs"))
    env = {"PYTHONPATH": HELPERS, "OMP_NUM_THREADS": "1"}
    first = tunefleet("sweep", spec, "--backend", "local", "--eval", check=False, env=env, timeout=900)
    return root, spec, env, first


@pytest.mark.slow
def test_a_child_starts_when_its_parent_ends_not_when_its_stage_does(local_study):
    root, _, _, first = local_study
    runs = root / "runs"
    short, long, child = (read_json(runs / n / "run.json") for n in ("sft_n4", "sft_n300", "sft_n4-dpo"))
    assert child["started_at"] >= short["ended_at"]  # after its own parent
    assert child["started_at"] < long["ended_at"]  # before the other parent of its stage ended
    assert child["lineage"]["parent_name"] == "sft_n4" and child["lineage"]["root_model"] == "tunefleet/tiny-qwen2"
    merged = runs / "sft_n4" / "merged" / "lineage.json"
    assert child["lineage"]["adapter_sha256"] == read_json(merged)["adapter_sha256"]
    assert child["lineage"]["weights_sha256"]["model.safetensors"]
    assert child["stage"] == "aligned" and child["base_model"].endswith("sft_n4")


def test_a_failed_parent_blocks_only_its_children(local_study):
    root, _, _, first = local_study
    assert first.returncode == 1, first.stdout[-3000:]
    state = read_json(root / "runs" / "sweep.json")["runs"]
    assert state["grpo_tiny-qwen2_s1"]["status"] == RunStatus.FAILED
    assert state["grpo_tiny-qwen2_s1-dpo"]["status"] == RunStatus.BLOCKED
    assert "its parent grpo_tiny-qwen2_s1 did not finish" in state["grpo_tiny-qwen2_s1-dpo"]["error"]
    assert not (root / "runs" / "grpo_tiny-qwen2_s1-dpo" / "run.json").exists()
    assert {state[n]["status"] for n in ("sft_n4-dpo", "sft_n300-dpo")} == {RunStatus.FINISHED}
    status = tunefleet("status", root / "runs").stdout
    assert "grpo_tiny-qwen2_s1-dpo" in status and "blocked" in status.split("grpo_tiny-qwen2_s1-dpo")[1][:40]


def test_best_takes_the_parent_with_the_best_metric(local_study):
    root, _, _, _ = local_study
    runs = root / "runs"
    results = read_json(runs / "evaluation_results.json")
    choice = read_json(runs / "sweep.json")["choices"]["tuned"]
    better = min(("sft_n4", "sft_n300"), key=lambda n: results[n]["test_loss"])
    assert choice["run"] == better == "sft_n300" and choice["metric"] == "test_loss" and choice["among"] == 2
    assert read_json(runs / "dpo_tiny-qwen2_s7_from_best_sft" / "run.json")["lineage"]["parent_name"] == better


def test_evaluation_scores_each_stage_against_its_parent(local_study):
    root, _, _, _ = local_study
    results = read_json(root / "runs" / "evaluation_results.json")
    assert {"base:tunefleet/tiny-qwen2", "parent:sft_n4", "parent:sft_n300"} <= set(results)
    child = results["sft_n4-dpo"]
    assert child["stage"] == "aligned" and child["parent"] == "sft_n4"
    assert child["win_rate_vs_parent"] is not None and child["win_rate_vs_base"] is not None
    assert results["parent:sft_n4"]["method"] == "parent" and results["sft_n4"]["win_rate_vs_parent"] is None
    report = (root / "runs" / "evaluation_report.md").read_text()
    assert "| stage |" in report.replace(" stage |", "| stage |", 1) or "stage" in report.splitlines()[4]
    assert report.index("parent:sft_n4") < report.index("sft_n4-dpo")  # the parent's row leads its stage


def test_the_reference_of_a_child_is_its_parent(local_study):
    """The DPO child's implicit reward (log p_child - log p_reference) ranks pairs differently against its parent
    (the reference it trained with) than against the raw base; the evaluator reports the one against the parent."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefleet.eval.metrics import preference_metrics
    from tunefleet.eval.settings import EvalData
    from tunefleet.eval.worker import load_eval_data
    from tunefleet.trainers.model import resolve
    from tunefleet.trainers.scoring import encode_conversation, score_pairs

    root, _, _, _ = local_study
    runs = root / "runs"
    parent_path, raw_path = resolve(str(runs / "sft_n4")), resolve("tunefleet/tiny-qwen2")
    tok = AutoTokenizer.from_pretrained(parent_path)
    data = load_eval_data(EvalData("tunefleet/tiny-ultrafeedback", None, "test_prefs", 12, 0))
    pairs = [(encode_conversation(tok, c), encode_conversation(tok, r)) for c, r in data["pref"]]
    torch.manual_seed(0)
    parent = AutoModelForCausalLM.from_pretrained(parent_path).eval()
    raw = AutoModelForCausalLM.from_pretrained(raw_path).eval()
    child = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(parent_path), runs / "sft_n4-dpo").eval()
    values = score_pairs(child, pairs, 4, tok.pad_token_id)
    against_parent = preference_metrics(values, score_pairs(parent, pairs, 4, tok.pad_token_id))["reward_accuracy"]
    against_raw = preference_metrics(values, score_pairs(raw, pairs, 4, tok.pad_token_id))["reward_accuracy"]
    assert against_parent != against_raw
    reported = read_json(runs / "evaluation_results.json")["sft_n4-dpo"]["reward_accuracy"]
    assert reported == pytest.approx(against_parent, abs=1e-9)


@pytest.mark.slow
def test_a_rerun_completes_the_study_and_a_retrained_parent_is_noticed(local_study):
    """Fixed (the GRPO parent's reward), the same command again: finished runs are skipped, the failed parent and
    its blocked child train. Then a parent retrained since: its child is trained again from it, not kept stale."""
    root, spec, env, _ = local_study
    fixed = write(root / "fixed.yaml", study(root / "runs", broken_reward="friendly"))
    again = tunefleet("sweep", fixed, "--backend", "local", check=False, env=env, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("skipped: finished before") == 5
    state = read_json(root / "runs" / "sweep.json")["runs"]
    assert all(info["status"] == RunStatus.FINISHED for info in state.values())

    parent = root / "runs" / "sft_n4"
    before = read_json(root / "runs" / "sft_n4-dpo" / "run.json")["lineage"]["adapter_sha256"]
    args = ["train", "--config", parent / "config.yaml", "--overwrite", "--seed", "5"]
    tunefleet(*args, env=env)  # the parent, trained again (another seed: another adapter)
    rerun = tunefleet("sweep", fixed, "--backend", "local", check=False, env=env, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    child = read_json(root / "runs" / "sft_n4-dpo" / "run.json")
    assert child["lineage"]["adapter_sha256"] != before and child["status"] == "finished"
    assert "trained again from it" in (root / "runs" / "sft_n4-dpo" / "train.log").read_text()


def test_a_parent_trained_on_another_base_than_the_spec_says_is_refused(local_study, capsys):
    root, _, _, _ = local_study
    spec = study(root / "runs")
    spec["base"] = {**BASE, "model_name": str(root / "runs" / "sft_n4" / "merged")}  # another model now
    code, _, err = run_cli(capsys, "sweep", write(root / "other.yaml", spec), "--backend", "local", "--dry-run")
    assert code == 0  # a plan only
    code, _, err = run_cli(capsys, "sweep", write(root / "other.yaml", spec), "--backend", "local")
    assert code == 2 and "trained on tunefleet/tiny-qwen2, but the spec now starts it from" in err, err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ the same DAG on a local Ray
@pytest.mark.ray
@pytest.mark.slow
def test_the_dag_on_ray_blocks_and_starts_children_as_locally(tmp_path, tiny_model):
    spec = study(tmp_path / "runs")
    del spec["stages"]["tuned"]
    path = write(tmp_path / "study.yaml", spec)
    done = tunefleet("sweep", path, "--backend", "ray", check=False, env={"PYTHONPATH": HELPERS}, timeout=900)
    assert done.returncode == 1, done.stdout[-3000:]
    state = read_json(tmp_path / "runs" / "sweep.json")["runs"]
    assert state["grpo_tiny-qwen2_s1-dpo"]["status"] == RunStatus.BLOCKED
    short, long, child = (read_json(tmp_path / "runs" / n / "run.json") for n in ("sft_n4", "sft_n300", "sft_n4-dpo"))
    assert short["ended_at"] <= child["started_at"] < long["ended_at"]
    assert child["node_id"]  # a Ray task


@pytest.mark.slow
def test_the_shipped_study_keeps_what_sft_taught(tmp_path, tiny_model):
    """sweeps/pipeline.yaml (as README shows it): the runs aligned from SFT keep the answers SFT taught while they are
    friendly; the same methods from the raw base are as friendly but answer as the base does."""
    if os.environ.get("TUNEFLEET_SKIP_STUDY"):
        pytest.skip("TUNEFLEET_SKIP_STUDY")
    spec = yaml.safe_load((ROOT / "sweeps" / "pipeline.yaml").read_text())
    spec["runs_dir"] = str(tmp_path / "runs")
    path = write(tmp_path / "pipeline.yaml", spec)
    done = tunefleet("sweep", path, "--backend", "local", "--eval", check=False, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:]
    results = read_json(tmp_path / "runs" / "evaluation_results.json")

    def answers(stage):
        return [
            e["heldout_rewards"]["answer"]
            for e in results.values()
            if e.get("stage") == stage and e["method"] != "parent"
        ]

    def friendly(stage):
        return [
            e["heldout_rewards"]["friendly"]
            for e in results.values()
            if e.get("stage") == stage and e["method"] != "parent"
        ]

    base = results["base:tunefleet/tiny-qwen2"]["heldout_rewards"]["answer"]  # 0.57
    aligned, direct = answers("aligned"), answers("direct")
    assert len(aligned) == 8 and len(direct) == 4
    assert min(aligned) > base + 0.1  # measured 0.75-0.93 against 0.57
    assert sum(aligned) / 8 > sum(direct) / 4 + 0.15  # measured 0.87 against 0.56
    assert min(friendly("aligned")) > 0.9 and min(friendly("direct")) > 0.9
    assert all(
        results[n]["win_rate_vs_parent"] is not None
        for n in results
        if results[n].get("stage") == "aligned" and results[n]["method"] != "parent"
    )
