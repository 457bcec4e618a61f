"""A study you can publish: intervals over seeds, paired comparisons with Holm's correction, cost per run, the
manifest that reruns a study, a study folder that moves, and the HTML report in a real headless Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from testkit import TINY, read_json, run_cli, tunefleet

from tunefleet.eval import statistics as stats

STUDY_BASE = {
    "model_name": "tunefleet/tiny-qwen2",
    "dataset": "tunefleet/tiny-ultrafeedback",
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "logging_steps": 10,
    "use_qlora": False,
}
# the demo's own settings for these two methods (sweeps/demo.yaml)
STUDY_METHODS = {
    "sft": {
        "split": "train_sft",
        "learning_rate": 5.0e-3,
        "max_steps": 200,
        "per_device_train_batch_size": 16,
        "assistant_only_loss": True,
    },
    "dpo": {"split": "train_prefs", "learning_rate": 3.0e-3, "max_steps": 60, "loss_type": ["sigmoid", "sft"]},
}


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ------------------------------------------------------------------ statistics against known values
def test_a_t_interval_is_scipys_and_the_textbook_value():
    from scipy import stats as scipy_stats

    found = stats.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, standard error sqrt(2.5 / 5), t(0.975, 4 df) = 2.776445
    assert found.mean == 3.0 and found.n == 5
    assert found.low == pytest.approx(3 - 2.776445 * 0.7071068, abs=1e-5)
    assert found.high == pytest.approx(3 + 2.776445 * 0.7071068, abs=1e-5)
    low, high = scipy_stats.t.interval(0.95, 4, loc=3.0, scale=scipy_stats.sem([1, 2, 3, 4, 5]))
    assert (found.low, found.high) == (pytest.approx(low), pytest.approx(high))
    one = stats.t_interval([0.7])
    assert one.record() == {"mean": 0.7, "ci95": None, "n": 1}  # one seed: no interval, said


def test_a_paired_comparison_is_scipys_bootstrap_and_permutation_test():
    from scipy import stats as scipy_stats

    data = np.random.default_rng(1)
    a, b = data.normal(1.0, 1.0, 60), data.normal(0.6, 1.0, 60)
    found = stats.compare("heldout_reward", "A", [list(a)], "B", [list(b)])
    rng = np.random.default_rng(stats.RANDOM_SEED)  # the same draws, in the same order
    boot = scipy_stats.bootstrap(
        (a, b), stats.mean_difference, paired=True, vectorized=True, method="percentile", n_resamples=9999, rng=rng
    )
    test = scipy_stats.permutation_test(
        (a, b), stats.mean_difference, permutation_type="samples", vectorized=True, n_resamples=9999, rng=rng
    )
    assert found.difference == pytest.approx(float(np.mean(a - b)))
    assert found.ci95 == [pytest.approx(boot.confidence_interval.low), pytest.approx(boot.confidence_interval.high)]
    assert found.p_value == pytest.approx(test.pvalue)
    assert found.units == found.prompts == 60 and found.note and "one seed on each side" in found.note


def test_holm_is_statsmodels_and_the_textbook_value():
    family = [
        stats.Comparison("m", str(i), "x", difference=0.1, p_value=p) for i, p in enumerate((0.01, 0.04, 0.03, 0.2))
    ]
    stats.holm(family)
    # sorted p x (m - rank): 0.01 x 4, 0.03 x 3, 0.04 x 2 (raised to the running max 0.09), 0.2 x 1
    assert [c.p_holm for c in family] == [pytest.approx(v) for v in (0.04, 0.09, 0.09, 0.2)]
    assert [c.holds for c in family] == [True, False, False, False]


def test_seeds_are_matched_in_order_and_a_single_row_meets_every_seed():
    x, y = stats.matched([[1, 2], [3, 4]], [[0, 0]])
    assert list(x) == [1, 2, 3, 4] and list(y) == [0, 0, 0, 0]
    x, y = stats.matched([[1, 2], [3, 4], [5, 6]], [[0, 1], [1, 1]])  # the third seed has no partner
    assert list(x) == [1, 2, 3, 4] and list(y) == [0, 1, 1, 1]


def test_one_prompt_or_no_scores_are_said_not_crashes():
    one_prompt = stats.compare("heldout_reward", "A", [[1.0]], "B", [[0.0]])
    assert one_prompt.ci95 is None and one_prompt.p_value is None and "one prompt" in (one_prompt.note or "")
    assert not one_prompt.holds
    missing = stats.compare("heldout_reward", "A", [], "B", [[0.0, 1.0]])
    assert missing.difference is None and "evaluate again" in (missing.note or "")
    same = stats.compare("win_vs_base", "A", [[1.0, 0.0, 1.0]], "B", [[1.0, 0.0, 1.0]])
    assert same.difference == 0.0 and same.ci95 == [0.0, 0.0] and same.p_value == 1.0 and not same.holds


# ------------------------------------------------------------------ cost: tokens as transformers counts them
def test_tokens_trained_equal_transformers_own_count(tmp_path, capsys, tiny_model):
    out = tmp_path / "sft"
    args = ["--method", "sft", *TINY, "--split", "train_sft", "--max_steps", "3", "--use_qlora", "false"]
    code, _, err = run_cli(
        capsys, "train", *args, "--output_dir", out, "--include_num_input_tokens_seen", "non_padding"
    )
    assert code == 0, err
    cost = read_json(out / "run.json")["cost"]
    assert cost["tokens_trained"] == read_json(out / "trainer_state.json")["num_input_tokens_seen"] > 0
    assert cost["train_seconds"] > 0 and cost["wall_seconds"] >= cost["train_seconds"]
    assert cost["tokens_per_second"] == pytest.approx(cost["tokens_trained"] / cost["train_seconds"], rel=0.01)
    assert cost["gpu_seconds"] == 0.0 and cost["peak_rss_mb"] > 0
    assert "energy_joules" not in cost  # no NVML on a CPU: absent, not zero


# ------------------------------------------------------------------ a real study on the embedded default
@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model):
    """SFT and DPO, two seeds each, with the demo's settings, evaluated (rewards: the right answer, friendliness)."""
    root = tmp_path_factory.mktemp("study")
    spec = {
        "name": "published",
        "runs_dir": str(root / "runs"),
        "base": STUDY_BASE,
        "grid": {"method": ["sft", "dpo"], "seed": [1, 2]},
        "methods": STUDY_METHODS,
        "eval": {"max_samples": 100, "max_generation_samples": 2, "reward_funcs": ["answer", "friendly"]},
    }
    path = write_spec(root / "study.yaml", spec)
    done = tunefleet("sweep", path, "--backend", "local", "--eval", timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "runs"


@pytest.mark.slow
def test_the_study_reports_intervals_comparisons_and_cost(study):
    results = read_json(study / "evaluation_results.json")
    runs = [n for n, e in results.items() if e["method"] in ("sft", "dpo")]
    assert len(runs) == 4
    for name in runs:
        kept = results[name]["per_prompt"]
        assert len(kept["reward:answer"]) == len(kept["heldout_reward"]) == 100 and len(kept["win_vs_base"]) == 100
        cost = results[name]["cost"]
        assert cost == read_json(study / name / "run.json")["cost"]
        assert cost["tokens_trained"] > 0 and cost["wall_seconds"] > 0 and "energy_joules" not in cost
    found = read_json(study / "evaluation_statistics.json")
    sft = found["intervals"]["sft"]["heldout_reward"]
    values = [results[n]["heldout_reward"] for n in runs if results[n]["method"] == "sft"]
    assert sft["n"] == 2 and sft["mean"] == pytest.approx(np.mean(values))
    assert sft["ci95"][0] <= sft["mean"] <= sft["ci95"][1]
    # a real difference: SFT gives the right answers the base does not, on the same prompts
    (real,) = [
        c for c in found["comparisons"] if c["metric"] == "reward:answer" and {c["a"], c["b"]} == {"base", "sft"}
    ]
    assert real["significant"] and real["p_holm"] < 0.05 and real["units"] == 200
    assert (real["difference"] > 0) == (real["a"] == "sft") and 0 not in real["ci95"]
    assert all(c["p_holm"] >= c["p_value"] for c in found["comparisons"] if c["p_value"] is not None)
    assert found["cost"]["total"]["runs"] == 4
    assert found["cost"]["total"]["tokens_trained"] == sum(results[n]["cost"]["tokens_trained"] for n in runs)
    report = (study / "evaluation_report.md").read_text()
    assert "## Summary" in report and "## Paired comparisons" in report and "## Cost" in report
    assert "| sft | 2 | " in report and f"[{sft['ci95'][0]:.4f}, {sft['ci95'][1]:.4f}]" in report


@pytest.mark.slow
def test_compare_names_what_holds_and_what_does_not(study, capsys):
    code, out, err = run_cli(capsys, "compare", "sft", "base", "--metric", "reward:answer", "--runs_dir", study)
    assert code == 0, err
    assert "sft (2 seeds) vs base (1 seed) on reward:answer, 100 prompts, 200 paired units" in out
    assert "the difference holds" in out
    # two seeds of one method: not a difference
    code, out, err = run_cli(
        capsys, "compare", "sft_tiny-qwen2_s1", "sft_tiny-qwen2_s2", "--metric", "reward:answer", "--runs_dir", study
    )
    assert code == 0, err
    assert "does not hold" in out and "one seed on each side" in out
    code, _, err = run_cli(capsys, "compare", "sft", "simpo", "--runs_dir", study)
    assert code == 2 and "'simpo' is not a method or a run" in err and "methods: " in err and "dpo" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "compare", "sft", "dpo", "--metric", "bleu", "--runs_dir", study)
    assert code == 2 and "no per-prompt scores of 'bleu'" in err and "reward:answer" in err
    code, _, err = run_cli(capsys, "compare", "sft", "dpo", "--runs_dir", study / "nothing")
    assert code == 2 and "not found" in err


@pytest.mark.slow
def test_status_and_report_give_the_cost_and_refuse_a_bad_price(study, capsys):
    code, out, _ = run_cli(capsys, "status", study, "--gpu_hour_price", "2.5")
    assert code == 0 and out.count("    cost: ") == 4 and "cost of 4 runs: " in out and "at 2.5 per GPU-hour" in out
    for bad, message in (("-1", "must be at least 0"), ("cheap", "expected a number")):
        for command in (("status", study), ("report", "--runs_dir", study)):
            code, _, err = run_cli(capsys, *command, "--gpu_hour_price", bad)
            assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run_cli(capsys, "report", "--runs_dir", study, "--gpu_hour_price", "3")
    assert code == 0, err
    assert read_json(study / "evaluation_statistics.json")["cost"]["gpu_hour_price"] == 3.0


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium on this machine: `make browser` installs Debian's (make test does)")
    return found


@pytest.mark.slow
def test_the_html_report_opens_sorts_and_draws_in_headless_chromium(study):
    from playwright.sync_api import sync_playwright

    page_file = study / "evaluation_report.html"
    text = page_file.read_text()
    assert "http://" not in text and "https://" not in text  # nothing to fetch: it opens offline
    results = read_json(study / "evaluation_results.json")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium(), args=[*flags, "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on(
                "request",
                lambda request: None if request.url.startswith(("file:", "data:")) else problems.append(request.url),
            )
            page.goto(page_file.as_uri())
            rows = page.eval_on_selector_all("#results tbody tr", "rows => rows.map(r => r.dataset.run)")
            assert sorted(rows) == sorted(results)  # every run's row, and the base's
            headers = page.eval_on_selector_all("#results thead th", "hs => hs.map(h => h.textContent)")
            column = headers.index("held-out reward")
            header = page.locator("#results thead th").nth(column)

            def shown() -> list[float]:
                cells = page.eval_on_selector_all(
                    f"#results tbody tr td:nth-child({column + 1})", "cs => cs.map(c => c.dataset.value)"
                )
                return [float(v) for v in cells if v]

            header.click()
            assert header.get_attribute("aria-sort") == "ascending" and shown() == sorted(shown())
            header.click()
            assert header.get_attribute("aria-sort") == "descending" and shown() == sorted(shown(), reverse=True)
            assert shown()[0] == max(
                e["heldout_reward"] for e in results.values() if e.get("heldout_reward") is not None
            )
            # the plots are drawn: every image decoded with a size
            sizes = page.eval_on_selector_all("#plots img", "is => is.map(i => [i.complete, i.naturalWidth])")
            assert len(sizes) >= 4 and all(done and width > 100 for done, width in sizes)
            comparisons = page.eval_on_selector_all("#comparisons tbody tr", "rs => rs.length")
            assert comparisons == len(read_json(study / "evaluation_statistics.json")["comparisons"])
            assert page.locator("#cost tbody tr").count() == 4
            assert "published" in page.locator("#manifest").inner_text()  # the study's manifest, inside the page
            assert not problems, problems
        finally:
            browser.close()


# ------------------------------------------------------------------ the manifest reruns a study
def small_spec(runs_dir: Path) -> dict:
    return {
        "name": "small",
        "runs_dir": str(runs_dir),
        "base": STUDY_BASE | {"max_steps": 6, "logging_steps": 2},
        "grid": {"method": ["sft", "dpo", "rm"], "seed": [1]},  # rm: its score head is drawn at load, seeded too
        "methods": {"sft": {"split": "train_sft"}, "dpo": {"split": "train_prefs"}, "rm": {"split": "train_prefs"}},
    }


def losses(run: Path) -> list[float]:
    return [e["loss"] for e in read_json(run / "trainer_state.json")["log_history"] if "loss" in e]


@pytest.mark.slow
def test_a_study_reruns_from_its_manifest_to_the_same_losses_and_names_any_drift(tmp_path, tiny_model):
    first = tmp_path / "first"
    tunefleet("sweep", write_spec(tmp_path / "small.yaml", small_spec(first)), "--max_parallel", "1")
    manifest = read_json(first / "study.json")
    assert manifest["spec"]["name"] == "small" and manifest["spec"]["resources"]["max_parallel"] == 1
    assert manifest["versions"]["trl"] and manifest["versions"]["scipy"] and "commit" in manifest["code"]
    assert manifest["data"]["tunefleet/tiny-ultrafeedback:train_sft"]["rows"] > 0
    assert manifest["models"]["tunefleet/tiny-qwen2"]["sha256"] and manifest["hardware"]["cpus"]

    again = tmp_path / "again"
    tunefleet("sweep", "--from", first / "study.json", "--runs_dir", again)
    for run in ("sft_tiny-qwen2_s1", "dpo_tiny-qwen2_s1", "rm_tiny-qwen2_s1"):
        assert losses(again / run) == losses(first / run) and losses(first / run)
    assert read_json(again / "study.json")["rerun_of"] == str(first / "study.json")

    drifted = manifest | {"versions": manifest["versions"] | {"trl": "0.9.0"}}
    drifted["data"] = {k: v | {"sha256": "0" * 16} for k, v in manifest["data"].items()}
    (tmp_path / "drifted.json").write_text(json.dumps(drifted))
    done = tunefleet("sweep", "--from", tmp_path / "drifted.json", "--runs_dir", tmp_path / "d", check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "trl 0.9.0 in the study" in done.stderr and "train_prefs" in done.stderr and "--allow_drift" in done.stderr
    assert not (tmp_path / "d" / "sft_tiny-qwen2_s1").exists()  # refused before training
    done = tunefleet("sweep", "--from", tmp_path / "drifted.json", "--runs_dir", tmp_path / "d", "--allow_drift")
    assert any("trl 0.9.0" in line for line in read_json(tmp_path / "d" / "study.json")["drift"])
    for args, message in (
        (("--from", tmp_path / "none.json"), "none.json not found"),
        ((tmp_path / "small.yaml", "--allow_drift"), "--allow_drift goes with --from"),
        ((), "give a sweep spec or --from study.json"),
    ):
        done = tunefleet("sweep", *args, check=False)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ a study folder that travels
@pytest.mark.slow
def test_a_moved_pipeline_study_evaluates_exports_and_its_child_loads_with_peft(tmp_path, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = small_spec(tmp_path / "old" / "runs")
    spec.pop("grid")
    spec["methods"].pop("rm")
    spec["stages"] = {
        "sft": {"grid": {"method": ["sft"], "seed": [1]}},
        "aligned": {"from": "sft", "grid": {"method": ["dpo"]}},
    }
    spec["eval"] = {"max_samples": 8, "max_generation_samples": 1}
    tunefleet("sweep", write_spec(tmp_path / "pipe.yaml", spec), "--eval")
    child = "sft_tiny-qwen2_s1-dpo"
    config = read_json(tmp_path / "old" / "runs" / child / "adapter_config.json")
    assert config["base_model_name_or_path"] == "../sft_tiny-qwen2_s1/merged"  # not the path it had here

    shutil.copytree(tmp_path / "old", tmp_path / "new")
    shutil.rmtree(tmp_path / "old")
    runs = tmp_path / "new" / "runs"
    tunefleet("eval", "--runs_dir", runs, "--force", "--max_samples", "8")
    results = read_json(runs / "evaluation_results.json")
    assert not any(e.get("error") for e in results.values()), results
    assert results[child]["win_rate_vs_parent"] is not None and "parent:sft_tiny-qwen2_s1" in results
    tunefleet("export", runs / child, "--output_dir", tmp_path / "served")
    assert (tmp_path / "served" / "model.safetensors").is_file()
    again = tunefleet("sweep", "--from", runs / "study.json", "--runs_dir", runs)  # the same study, where it is now
    assert again.stdout.count("skipped: finished before") == 2

    # as the README shows: the parent's merged model is the base, the child's folder the adapter
    base = AutoModelForCausalLM.from_pretrained(runs / "sft_tiny-qwen2_s1" / "merged")
    model = PeftModel.from_pretrained(base, runs / child).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "served").eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, exported(ids).logits, atol=1e-4)
