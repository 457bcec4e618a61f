"""Hyperparameter search (`search:` + `confirm:`): the spec's checks (pure), and searches on a real local Ray Tune."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from testkit import ROOT, Started, read_json, run_cli, tunefleet

from tunefleet.common.errors import TunefleetError
from tunefleet.common.jsonfile import read_json as maybe_json  # None while missing or half-written
from tunefleet.launcher import sweep as sweeps
from tunefleet.launcher import tune_search
from tunefleet.launcher.warm import process_lives

BASE = {
    "model_name": "tunefleet/tiny-qwen2",
    "dataset": "tunefleet/tiny-ultrafeedback",
    "split": "train_prefs",
    "eval_split": "test_prefs",
    "max_eval_samples": 40,
    "max_steps": 12,
    "eval_steps": 3,
    "logging_steps": 3,
    "save_steps": 3,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "use_qlora": False,
}
SPACE = {"dpo": {"learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}, "beta": {"uniform": [0.05, 0.5]}}}


def spec_text(**search) -> str:
    spec = {"name": "s", "base": BASE, "search": {"space": SPACE, **search}}
    return yaml.safe_dump(spec, sort_keys=False)


# ------------------------------------------------------------------ pure: the spec
def test_the_shipped_search_demo_plans_each_methods_trials(capsys):
    spec = sweeps.load_spec(str(ROOT / "sweeps" / "search_demo.yaml"))
    settings = spec.search
    assert settings is not None and settings.methods == ["dpo", "kto"]
    assert settings.metric_for("dpo") == "eval_rewards/accuracies" and settings.direction("dpo") == "max"
    assert settings.metric_for("kto") == "eval_loss" and settings.direction("kto") == "min"
    assert settings.confirm == {"seed": [1, 2]}
    setups = tune_search.trial_setups(spec, settings)
    plan = setups["dpo"].plan("abc12_00003", {"learning_rate": 2e-3, "beta": 0.3})
    assert plan.name == "dpo_tiny-qwen2_abc12_00003"
    assert Path(plan.output_dir) == (ROOT / "runs" / "search_demo" / "trials" / plan.name)
    assert (plan.config.learning_rate, plan.config.beta, plan.config.loss_type) == (2e-3, 0.3, ["sigmoid", "sft"])
    confirm = sweeps.expand_confirm(spec, settings.confirm, {"kto": {"learning_rate": 1e-3, "beta": 0.2}})
    assert [r.name for r in confirm] == ["kto_tiny-qwen2_s1", "kto_tiny-qwen2_s2"]
    assert {(r.config.learning_rate, r.config.beta, r.config.max_steps) for r in confirm} == {(1e-3, 0.2, 40)}
    code, out, _ = run_cli(capsys, "sweep", str(ROOT / "sweeps" / "search_demo.yaml"), "--dry-run")
    assert code == 0 and "kto: eval_loss (min), max_steps 40" in out and "learning_rate loguniform" in out


@pytest.mark.parametrize(
    "search,message",
    [
        (
            {"space": {"dpo": {"report_to": {"uniform": [0, 1]}}}},
            ":18: uniform needs a float flag, but 'report_to' is a string: use choice or grid",
        ),
        (
            {"searcher": "optuna", "space": {"dpo": {"beta": {"grid": [0.1, 0.2]}}}},
            ":18: grid values need searcher random or grid; optuna samples its own points: use choice",
        ),
        ({"metric": "eval_reward"}, "dpo runs cannot report eval_reward"),
        (
            {"metric": "eval_preference_accuracy"},
            "eval_preference_accuracy is scored on held-out rows at each evaluation: give dpo eval_pairs",
        ),
        ({"metric": "eval_heldout_rewards"}, "(did you mean 'eval_heldout_reward'?)"),
        ({"max_t": 50}, "search.max_t 50 is beyond dpo's max_steps 12"),
        (
            {"space": {"dpo": {"learning_rat": {"loguniform": [1e-4, 1e-2]}}}},
            ":18: unknown key 'learning_rat' (did you mean 'learning_rate'?)",
        ),
        ({"schedular": "asha"}, "unknown key 'search.schedular' (did you mean 'scheduler'?)"),
        ({"space": {"dpo": {"beta": {"loguniform": [0.5, 0.1]}}}}, "loguniform: low 0.5 must be below high 0.1"),
        ({"space": {"kto": {"beta": {"normal": [0, 1]}}}}, "unknown distribution 'normal'"),
    ],
)
def test_bad_searches_are_one_line_with_file_and_line(tmp_path, search, message):
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(**search))
    with pytest.raises(TunefleetError) as exc:
        sweeps.load_spec(str(path))
    text = str(exc.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text, text


def test_a_metric_needs_an_eval_split_and_optuna_needs_its_extra(tmp_path, monkeypatch):
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text().replace("  eval_split: test_prefs\n", ""))
    with pytest.raises(TunefleetError, match="give dpo an eval_split"):
        sweeps.load_spec(str(path))
    monkeypatch.setitem(__import__("sys").modules, "optuna", None)  # as if not installed
    path.write_text(spec_text(searcher="optuna"))
    with pytest.raises(TunefleetError, match=r"pip install 'tunefleet\[optuna\]'"):
        sweeps.load_spec(str(path))


def test_a_search_on_slurm_points_at_the_ray_on_slurm_script(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text())
    code, _, err = run_cli(capsys, "sweep", str(path), "--backend", "slurm")
    assert code == 2 and "cluster_configs/slurm/ray_cluster.sbatch" in err and "Traceback" not in err


def test_a_search_stage_starts_from_one_model_and_ends_its_pipeline(tmp_path, capsys):
    sft = {"method": "sft", "split": "train_sft"}
    search = {"space": SPACE}

    def load(stages):
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump({"name": "st", "base": BASE, "stages": stages}, sort_keys=False))
        return path

    with pytest.raises(TunefleetError, match="a search starts from one model: give stage 'tuned' 'best: METRIC'"):
        sweeps.load_spec(str(load({"sft": {"base": sft}, "tuned": {"from": "sft", "search": search}})))
    stages = {
        "sft": {"base": sft},
        "tuned": {"from": "sft", "best": "test_loss", "search": search},
        "more": {"from": "tuned", "grid": {"method": ["kto"]}},
    }
    with pytest.raises(TunefleetError, match="starts from the search stage 'tuned': a search stage ends a pipeline"):
        sweeps.load_spec(str(load(stages)))
    del stages["more"]
    path = load(stages)
    spec = sweeps.load_spec(str(path))
    assert [r.name for r in sweeps.expand(spec)] == ["sft_tiny-qwen2_s42"]  # the search stage's runs come later
    code, out, _ = run_cli(capsys, "sweep", str(path), "--dry-run")
    assert code == 0 and "stage tuned: a search from the best run of stage sft by test_loss" in out


# ------------------------------------------------------------------ on a real local Ray Tune
def search_spec(tmp_path: Path, **search) -> Path:
    spec = {
        "name": "srch",
        "runs_dir": str(tmp_path / "runs"),
        "base": {**BASE, "max_steps": 24},
        "search": {
            "metric": "eval_rewards/accuracies",
            "num_samples": 4,
            "grace_period": 3,
            "reduction_factor": 2,
            "max_concurrent": 1,  # one after another: each trial meets the rungs its elders recorded
            "space": {"dpo": {"learning_rate": {"loguniform": [1.0e-4, 2.0e-2]}, "beta": {"uniform": [0.05, 0.5]}}},
            **search,
        },
        "confirm": {"seed": [1, 2]},
        "eval": {"max_samples": 20, "max_generation_samples": 1, "skip_perplexity": True},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.ray
def test_asha_stops_trials_early_and_confirm_reruns_the_best_over_seeds(tmp_path, tiny_model, warm_process):
    done = tunefleet("sweep", search_spec(tmp_path), "--backend", "local", timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    runs = tmp_path / "runs"
    state = read_json(runs / "search.json")
    trials = state["methods"]["dpo"]["trials"]
    assert len(trials) == 4
    if warm_process:  # each trial, in its own Ray actor, was forked from the warm process the search was given
        warm_from = [read_json(Path(t["output_dir"]) / "run.json")["startup"].get("warm_process") for t in trials]
        assert warm_from == [warm_process] * 4
    stopped = [t for t in trials if t["status"] == "stopped"]
    assert stopped, trials  # ASHA ended at least one trial early
    for trial in stopped:
        record = read_json(Path(trial["output_dir"]) / "run.json")
        assert record["status"] == "stopped" and record["stopped"]["step"] < 24
        # the run waited at its evaluation for the verdict: it stopped at the step it was judged at
        assert record["stopped"]["step"] == record["stopped"]["last_evaluation_step"] == trial["steps"]
        assert any(Path(trial["output_dir"]).glob("checkpoint-*"))  # it saved a checkpoint on its way out
        pid = read_json(Path(trial["output_dir"]) / "launch.json")["pid"]
        assert not process_lives(pid)
    best = state["methods"]["dpo"]["best"]
    assert best["status"] == "finished" and best["steps"] == 24
    assert state["methods"]["dpo"]["steps_used"] < state["methods"]["dpo"]["steps_without_early_stopping"]
    # what early stopping saved, in steps and at the trials' own cost per step (every trial, stopped too, has one)
    saved = state["methods"]["dpo"]["saved_by_early_stopping"]
    assert saved["steps"] == 24 * 4 - state["methods"]["dpo"]["steps_used"] and saved["train_seconds"] > 0
    assert all(t["cost"]["tokens_trained"] > 0 and t["cost"]["train_seconds"] > 0 for t in trials), trials
    # confirm: the best values over seeds 1 and 2, at full length, evaluated
    for seed in (1, 2):
        record = read_json(runs / f"dpo_tiny-qwen2_s{seed}" / "run.json")
        assert record["status"] == "finished" and record["config"]["seed"] == seed
        assert record["config"]["learning_rate"] == pytest.approx(best["values"]["learning_rate"])
        assert record["config"]["beta"] == pytest.approx(best["values"]["beta"])
    results = read_json(runs / "evaluation_results.json")
    assert {"dpo_tiny-qwen2_s1", "dpo_tiny-qwen2_s2"} <= set(results)
    assert not any(name.startswith("trials") for name in results)  # trials are not the comparison
    report = (runs / "search_report.md").read_text()
    assert "## Best configuration per method" in report and "| dpo | learning_rate" in report and " ± " in report
    assert "stopped early" in report and (runs / "search_dpo.png").exists()
    status = tunefleet("status", str(runs)).stdout
    assert "stopped" in status and "dpo_tiny-qwen2_s1" in status


@pytest.mark.slow
@pytest.mark.ray
def test_a_search_whose_driver_is_killed_restores_without_retraining_finished_trials(tmp_path, tiny_model):
    spec = search_spec(tmp_path, scheduler="fifo", num_samples=2, max_concurrent=1)
    text = yaml.safe_load(spec.read_text())
    text["base"] = {**BASE, "max_steps": 18, "save_steps": 2}
    del text["confirm"]
    spec.write_text(yaml.safe_dump(text, sort_keys=False))
    trials = tmp_path / "runs" / "trials"

    def state(status):
        return [p for p in trials.glob("*") if (maybe_json(p / "run.json") or {}).get("status") == status]

    def running():  # trials that have not finished but saved a checkpoint
        done = state("finished")
        return [p for p in trials.glob("*") if p not in done and any(p.glob("checkpoint-*"))]

    proc = Started("sweep", spec, "--backend", "local")
    deadline = time.time() + 400
    while time.time() < deadline and not (state("finished") and running()) and proc.returncode is None:
        time.sleep(0.5)
    finished, interrupted = state("finished"), running()
    assert finished and interrupted, proc.output(1) if proc.returncode is not None else "no trial got that far"
    os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-search; Ray goes with it
    proc.wait(30)
    first_log = (finished[0] / "train.log").read_text()

    again = tunefleet("sweep", spec, "--backend", "local", timeout=600, check=False)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert "restoring" in again.stdout
    assert (finished[0] / "train.log").read_text() == first_log  # not trained again
    record = read_json(interrupted[0] / "run.json")
    assert record["status"] == "finished" and "checkpoint-" in (record.get("resumed_from") or "")
    ended = read_json(tmp_path / "runs" / "search.json")["methods"]["dpo"]["trials"]
    assert len(ended) == 2 and all(t["status"] == "finished" for t in ended)


@pytest.mark.slow
@pytest.mark.ray
def test_a_pipeline_searches_dpo_from_its_best_sft_run_then_confirms_it(tmp_path, tiny_model):
    """The study users run: SFT, then DPO's hyperparameters searched from the best SFT run, its best confirmed."""
    sft = {"method": "sft", "split": "train_sft", "eval_split": None, "learning_rate": 5.0e-3, "max_steps": 8}
    spec = {
        "name": "study",
        "runs_dir": str(tmp_path / "runs"),
        "base": {**BASE, "max_steps": 6, "eval_steps": 3},
        "stages": {
            "sft": {
                "grid": {"seed": [1, 2]},
                "base": sft,
                "eval": {"max_samples": 20, "max_generation_samples": 0, "heldout_prompts": 5},
            },
            "tuned": {
                "from": "sft",
                "best": "test_loss",
                "base": {"eval_pairs": "test_prefs", "heldout_samples": 20},  # the evaluator's metric, in training
                "search": {
                    "metric": "eval_preference_accuracy",
                    "scheduler": "fifo",
                    "num_samples": 2,
                    "space": SPACE,
                },
                "confirm": {"seed": [1]},
                "eval": {"max_samples": 20, "max_generation_samples": 1, "heldout_prompts": 5},
            },
        },
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = tunefleet("sweep", path, "--backend", "local", timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    runs = tmp_path / "runs"
    choice = read_json(runs / "sweep.json")["choices"]["tuned"]
    parent = runs / choice["run"]
    assert choice["run"] in ("sft_tiny-qwen2_s1", "sft_tiny-qwen2_s2") and "searching from" in done.stdout
    trials = read_json(runs / "tuned" / "search.json")["methods"]["dpo"]["trials"]
    assert len(trials) == 2
    for trial in trials:
        record = read_json(Path(trial["output_dir"]) / "run.json")
        assert record["status"] == "finished" and record["stage"] == "tuned"
        evaluations = read_json(Path(trial["output_dir"]) / "progress.json")["evaluations"]
        assert [e["step"] for e in evaluations] == [3, 6] and trial["metric"] == evaluations[-1][
            "eval_preference_accuracy"
        ]
        assert Path(record["base_model"]) == parent.resolve() and record["lineage"]["parent_name"] == parent.name
    confirmed = read_json(runs / "tuned" / "dpo_tiny-qwen2_s1" / "run.json")
    assert Path(confirmed["base_model"]) == parent.resolve()
    results = read_json(runs / "tuned" / "evaluation_results.json")
    assert results["dpo_tiny-qwen2_s1"]["win_rate_vs_parent"] is not None
    assert "| dpo |" in (runs / "tuned" / "search_report.md").read_text()


@pytest.mark.slow
@pytest.mark.ray
def test_a_failing_trial_is_retried_then_reported_and_the_search_goes_on(tmp_path, tiny_model):
    missing = str(tmp_path / "missing.jsonl")
    spec = search_spec(
        tmp_path,
        searcher="grid",
        scheduler="fifo",
        num_samples=1,
        space={"dpo": {"dataset": {"grid": ["tunefleet/tiny-ultrafeedback", missing]}}},
    )
    text = yaml.safe_load(spec.read_text())
    text["base"] = {**BASE, "max_steps": 3}
    del text["confirm"]
    spec.write_text(yaml.safe_dump(text, sort_keys=False))
    done = tunefleet("sweep", spec, "--backend", "local", "--retries", "1", check=False, timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    trials = read_json(tmp_path / "runs" / "search.json")["methods"]["dpo"]["trials"]
    by_dataset = {t["values"]["dataset"]: t for t in trials}
    assert by_dataset["tunefleet/tiny-ultrafeedback"]["status"] == "finished"
    failed = by_dataset[missing]
    assert failed["status"] == "failed" and "missing.jsonl" in failed["error"]
    assert len(read_json(Path(failed["output_dir"]) / "launch.json")["attempts"]) == 2  # tried, then once again
    assert "Traceback" not in done.stdout and f"{failed['name']}  failed" in done.stdout
