"""Score every run under a runs folder: discover -> plan shards -> score (local or Ray) -> merge -> write.

from tunefleet.eval.evaluate import evaluate
from tunefleet.eval.settings import EvalSettings
evaluate("runs", EvalSettings(backend="ray", shards=4))    # same numbers as shards=1
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.common.runlock import EVAL_LOCK_NAME, RunLock
from tunefleet.common.storage import Store, refuse_ray_job_temp
from tunefleet.common.tracking import Tracking, log_evaluation
from tunefleet.eval import metrics, plan, results
from tunefleet.eval.progress import shard_progress
from tunefleet.eval.settings import EvalData, EvalSettings
from tunefleet.eval.worker import ShardResult
from tunefleet.trainers.model import full_run_folder, read_chat_template, reward_model_path, root_model, run_folder


def base_key(model: str) -> str:
    """The row of the model a group of runs starts from: `base:<model>`, or `parent:<run>` for a run folder (a
    pipeline's runs start from their parent run, merged)."""
    folder = run_folder(model) or full_run_folder(model)
    return f"parent:{folder.resolve().name}" if folder is not None else f"base:{model}"


def evaluate(
    runs_dir: str = "runs",
    settings: EvalSettings | None = None,
    output: str | None = None,
    address: str | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate, merge into the results file, rebuild the report. Returns the whole results dict."""
    settings = settings or EvalSettings()
    refuse_ray_job_temp(runs_dir, "--runs_dir")
    if not Store(runs_dir).exists():
        raise TunefleetError(f"runs_dir {runs_dir} does not exist")
    # One evaluator writes a runs folder's results at a time; a second waits, then reuses what the first scored.
    with RunLock(Store(runs_dir), purpose="evaluation", name=EVAL_LOCK_NAME).acquire_waiting():
        return evaluate_held(runs_dir, settings, output, address, progress)


def evaluate_held(
    runs_dir: str, settings: EvalSettings, output: str | None, address: str | None, progress: bool
) -> dict:
    """evaluate's work once it holds the runs folder's evaluation lock."""
    out_path = results.results_path(runs_dir, output)
    methods = settings.methods
    found = results.discover(runs_dir)
    runs = [run for run in found if not methods or run.method in methods]
    if settings.runs is not None:
        runs = [run for run in runs if run.name in settings.runs]
    if not runs:
        raise TunefleetError(
            f"no runs with an adapter under {runs_dir}"
            + (f" for methods {methods}" if methods else "")
            + (f" among {', '.join(settings.runs)}" if settings.runs is not None else "")
        )
    existing = results.load_results(out_path)
    reward_funcs = tuple(settings.reward_funcs or results.grpo_rewards(runs) or ["length"])
    from tunefleet.eval.worker import EVAL_REWARD_MODEL_HINT
    from tunefleet.trainers.heldout import reward_scorers

    # a reward that cannot be loaded: one line now, not in every worker
    reward_scorers(list(reward_funcs), EVAL_REWARD_MODEL_HINT)
    reward_model = None
    if settings.reward_model:  # a path or hub id, or the name of an rm run under runs_dir (a sweep's own)
        named = next((str(run.path) for run in found if run.name == settings.reward_model), settings.reward_model)
        reward_model = reward_model_path(named, settings.trust_remote_code)
    if settings.tasks:
        from tunefleet.eval.benchmarks import check_tasks

        # lm-eval missing, an unknown task, unreachable data: one line now, before any model loads
        check_tasks(settings.benchmark_tasks(), settings.include_path)

    groups: dict[tuple[str, str, str | None], list] = {}  # one base model loaded per (base, dataset, chat template)
    updates = {}
    # reward models are scored on the pairs; the language models from their base, in groups
    updates.update(_evaluate_reward_models([run for run in runs if run.method == "rm"], settings, existing))
    full_runs = []  # each scored as a model of its own, after the bases it is compared with
    for run in (run for run in runs if run.method != "rm"):
        base = settings.base_model or run.base_model
        dataset = settings.dataset or run.dataset
        if base and dataset and run.full:
            groups.setdefault((root_model(base), dataset, None), [])  # the raw base's row: what it is compared with
            full_runs.append((run, dataset))
        elif base and dataset:
            # A run trained with its own chat template is scored with it (and so is its group's base row).
            template = (run.record.get("config") or {}).get("chat_template")
            groups.setdefault((base, dataset, read_chat_template(template) if template else None), []).append(run)
        else:
            updates[run.name] = results.empty_entry(run.name, run.location) | {
                "error": "base model or dataset unknown (no run.json): pass --base_model and --dataset"
            }
    try:
        # Runs from the raw base first: runs that start from a parent, and full runs, compare with its answers.
        jobs = [
            (base, dataset, members, template, None)
            for (base, dataset, template), members in sorted(
                groups.items(), key=lambda g: (run_folder(g[0][0]) is not None, g[0][2] is not None)
            )
        ]
        jobs += [(str(run.path), dataset, [], None, run) for run, dataset in full_runs]
        for base, dataset, members, template, full_run in jobs:
            updates.update(
                _evaluate_group(
                    base,
                    dataset,
                    members,
                    settings,
                    reward_funcs,
                    reward_model,
                    existing,
                    address,
                    progress,
                    {**existing, **updates},
                    full_run=full_run,
                    chat_template=template,
                )
            )
    finally:
        results.drop_fetched(runs_dir)
    merged = results.save_results(out_path, updates)
    log_to_trackers(runs, updates)
    from tunefleet.eval.report import write_report

    write_report(out_path, runs_dir, settings.gpu_hour_price)
    return merged


def _evaluate_reward_models(runs: list, settings: EvalSettings, existing: dict) -> dict:
    """A reward model (`--method rm` run) is scored on the test pairs: preference_accuracy is the share it scores
    the chosen reply above the rejected one (its other metrics are the language models')."""
    from tunefleet.trainers.heldout import load_pairs
    from tunefleet.trainers.model import load_reward_model
    from tunefleet.trainers.scoring import reward_model_scores

    updates = {}
    for run in runs:
        dataset = settings.dataset or run.dataset
        fp = run.fingerprint(
            {"pref_split": settings.pref_split, "max_samples": settings.max_samples, "dataset": dataset}
        )
        old = existing.get(run.name)
        if not settings.force and old and old.get("fingerprint") == fp and not old.get("error"):
            updates[run.name] = old
            continue
        entry = results.empty_entry(run.name, run.location) | results.training_metrics(run.path)
        entry |= metrics.perplexity_metrics(None) | metrics.preference_metrics(None) | metrics.reward_metrics(None)
        lineage = run.record.get("lineage") or {}
        entry.update(
            method=run.method,
            seed=run.seed,
            base_model=run.base_model,
            dataset=dataset,
            fingerprint=fp,
            stage=run.record.get("stage"),
            parent=lineage.get("parent_name"),
            error=None,
            cost=run.record.get("cost"),
        )
        t0 = time.time()
        try:
            if not dataset:
                raise TunefleetError("dataset unknown (no run.json): pass --dataset")
            pairs = load_pairs(dataset, settings.pref_split, settings.max_samples)
            scorer, tokenizer = load_reward_model(str(run.path), settings.trust_remote_code)
            scores = reward_model_scores(scorer, tokenizer, [c for pair in pairs for c in pair], settings.batch_size)
            ranked_right = [1.0 if scores[2 * i] > scores[2 * i + 1] else 0.0 for i in range(len(pairs))]
            correct = int(sum(ranked_right))
            entry["per_prompt"] = {"preference_correct": ranked_right}
            entry.update(
                preference_accuracy=correct / len(pairs), preference_correct=correct, preference_total=len(pairs)
            )
        except TunefleetError as exc:
            entry["error"] = str(exc)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {first_line(exc)}"
        entry["eval_seconds"] = round(time.time() - t0, 2)
        updates[run.name] = entry
    return updates


def log_to_trackers(runs: list, updates: dict) -> None:
    """Each scored run's metrics into the tracker runs it trained in (run.json `tracking`), as `eval/<metric>`."""
    for run in runs:
        tracked = Tracking.from_record(run.record.get("tracking"))
        entry = updates.get(run.name) or {}
        if tracked is None or entry.get("error"):
            continue
        metrics = {k: float(entry[k]) for k in results.BETTER if isinstance(entry.get(k), (int, float))}
        for group in ("heldout_rewards", "win_rates_vs_base"):
            for reward, value in (entry.get(group) or {}).items():
                metrics[f"{group}/{reward}"] = float(value)
        for task, numbers in (entry.get("benchmarks") or {}).items():
            metrics |= {f"benchmarks/{task}/{metric}": value for metric, value in numbers.items()}
        if not metrics:
            continue
        step = run.record.get("global_step") or 0
        for failure in log_evaluation(tracked, run.location, metrics, step):
            print(f"warning: {run.name}: evaluation not logged to {failure}", file=sys.stderr, flush=True)


def _evaluate_group(
    base: str,
    dataset: str,
    runs: list,
    settings: EvalSettings,
    reward_funcs: tuple[str, ...],
    reward_model: str | None,
    existing: dict,
    address: str | None,
    progress: bool,
    results_so_far: dict | None = None,
    full_run=None,
    chat_template: str | None = None,
) -> dict:
    """Score `runs` (adapters) on `base` loaded once, with the base's own row; `full_run`: a full fine-tuning run
    (base is its folder), scored alone as the group's model and compared with the raw base it started from;
    `chat_template`: the runs' own template (the base's row under it is named after it)."""
    fp_settings = settings.fingerprint_fields() | {"dataset": dataset, "base": base, "rewards": list(reward_funcs)}
    if chat_template:
        fp_settings["chat_template"] = chat_template
    fp_settings["reward_model_weights"] = weights_identity(reward_model)  # a retrained reward model judges anew
    todo, updates = [], {}
    for run in runs:
        fp = run.fingerprint(fp_settings)
        old = existing.get(run.name)
        if not settings.force and old and old.get("fingerprint") == fp and not old.get("error"):
            updates[run.name] = old  # unchanged adapter, same settings: reuse
        else:
            todo.append((run, fp))
    base_name = full_run.name if full_run else base_key(base)
    if chat_template and not full_run:
        base_name += f" @template-{hashlib.sha256(chat_template.encode()).hexdigest()[:8]}"
    base_fp = hashlib.sha256(repr(sorted(fp_settings.items())).encode()).hexdigest()[:16]
    if full_run:
        base_fp = full_run.fingerprint(fp_settings)
    base_old = existing.get(base_name)
    # The base row is always scored with the runs: reward_accuracy needs its per-pair values.
    if not todo and base_old and base_old.get("fingerprint") == base_fp and not settings.force:
        return updates | {base_name: base_old}

    data_spec = EvalData(
        dataset=dataset,
        sft_split=None if settings.skip_perplexity else settings.sft_split,
        pref_split=settings.pref_split,
        max_samples=settings.max_samples,
        max_generation_samples=settings.max_generation_samples,
        gen_split=settings.gen_split,
        reward_funcs=reward_funcs,
        max_new_tokens=settings.max_new_tokens,
        heldout_prompts=settings.heldout_prompts,
        reward_model=reward_model,
        tasks=tuple(settings.benchmark_tasks()),
        num_fewshot=settings.num_fewshot,
        limit=settings.limit,
        include_path=settings.include_path,
        chat_template=chat_template,
    )
    targets = {base_name: None} | {run.name: str(run.path) for run, _ in todo}
    from tunefleet.eval.worker import load_eval_data

    raw = load_eval_data(data_spec)  # validates splits/columns once, before any worker starts
    sizes = {metric: len(raw[metric]) for metric in plan.METRICS}
    work = plan.plan_shards(list(targets), sizes, settings.shards)

    t0 = time.time()
    try:
        if settings.backend == "ray":
            from tunefleet.eval.ray_backend import run_shards_ray

            shard_results = run_shards_ray(base, data_spec, settings, targets, work, address, progress)
        else:
            shard_results = _run_local(base, data_spec, settings, targets, work, progress, raw)
    except Exception as exc:  # the base model itself cannot be loaded: every run of this group gets the error
        reason = first_line(exc) if isinstance(exc, TunefleetError) else f"{type(exc).__name__}: {first_line(exc)}"
        reason = f"cannot load base model {base}: {reason}"
        shard_results = [ShardResult(errors=dict.fromkeys(targets, reason))]
    seconds = time.time() - t0

    pieces, errors, nodes = [], {}, {}
    for res in shard_results:
        pieces += res.results
        errors.update(res.errors)
        for task, _ in res.results:
            if res.node_id:
                nodes.setdefault(task.target, set()).add(res.node_id)
    merged = plan.merge([p for p in pieces if p[0].target not in errors])
    base_pref, base_gen = merged.get((base_name, "pref")), merged.get((base_name, "gen"))
    from_parent = base_name.startswith("parent:")
    root = root_model(base)
    root_answers = (
        ((results_so_far or {}).get(f"base:{root}") or {}).get("heldout_answers") if from_parent or full_run else None
    )
    root_row = (results_so_far or {}).get(f"base:{root}") or {}
    root_pairs = root_row.get("pair_losses") if full_run else None
    meta = {base_name: {"method": "parent" if from_parent else "base", "seed": None, "path": base, "fp": base_fp}}
    if full_run:
        meta = {
            base_name: {
                "method": full_run.method,
                "seed": full_run.seed,
                "path": full_run.location,
                "fp": base_fp,
                "run": full_run,
            }
        }
    meta |= {
        run.name: {"method": run.method, "seed": run.seed, "path": run.location, "fp": fp, "run": run}
        for run, fp in todo
    }
    for name, info in meta.items():
        entry = results.empty_entry(name, info["path"])
        if "run" in info:
            entry.update(results.training_metrics(info["run"].path))
        entry.update(
            method=info["method"],
            seed=info["seed"],
            base_model=full_run.base_model if full_run else base,
            dataset=dataset,
            fingerprint=info["fp"],
            eval_seconds=round(seconds, 2),
            error=errors.get(name),
            eval_nodes=sorted(nodes.get(name, ())),
        )
        if name not in errors:
            entry.update(metrics.perplexity_metrics(merged.get((name, "ppl"))))
            entry["benchmarks"] = dict(zip(settings.benchmark_tasks(), merged.get((name, "bench")) or [])) or None
            # a full fine-tuning run's implicit reward is against the raw base's per-pair losses (kept in its row)
            against = root_pairs if full_run else None if name == base_name else base_pref
            entry.update(metrics.preference_metrics(merged.get((name, "pref")), against))
            entry.update(
                metrics.reward_metrics(
                    merged.get((name, "gen")), None if name == base_name else base_gen, settings.max_generation_samples
                ),
                reward_funcs=list(reward_funcs),
            )
            entry["per_prompt"] = metrics.per_prompt(  # kept for paired comparisons (eval/statistics.py)
                merged.get((name, "gen")), None if name == base_name else base_gen, merged.get((name, "pref"))
            )
            if name == base_name:  # kept, so the runs of a later stage can be compared with this model's answers
                entry["heldout_answers"] = answers(merged.get((name, "gen")))
                entry["pair_losses"] = merged.get((name, "pref"))  # and full runs' implicit rewards with its losses
            if full_run or (from_parent and name != base_name):
                compare_with_root(entry, merged.get((name, "gen")), root_answers)
        if name == base_name and from_parent and not full_run:  # the parent's row stands with its runs' stage
            stages = {run.record.get("stage") for run, _ in todo}
            entry.update(stage=stages.pop() if len(stages) == 1 else None, parent=None)
        if "run" in info:
            entry["cost"] = info["run"].record.get("cost")  # what training it cost (run.json), for the report
            lineage = info["run"].record.get("lineage") or {}
            entry.update(stage=info["run"].record.get("stage"), parent=lineage.get("parent_name"))
        updates[name] = entry
    return updates


def weights_identity(path: str | None) -> list | None:
    """What changes when a model folder is written again: its weight files' names, sizes and modification times
    (hashing gigabytes at every evaluation would cost more than the scoring)."""
    if not path or not Path(path).is_dir():
        return None
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in Path(path).glob("*.safetensors"))


def answers(values: list | None) -> list[dict] | None:
    """Per held-out prompt: the reward of a base or parent model's answer (in all and per reward)."""
    return [{"reward": v["reward"], "rewards": v["rewards"], "rm": v.get("rm")} for v in values] if values else None


def compare_with_root(entry: dict, values: list | None, root: list | None) -> None:
    """A run that started from a parent: its win rate against that parent (the group's own base row, computed as
    win_rate_vs_base) moves to win_rate_vs_parent; win_rate_vs_base is against the raw base of the pipeline."""
    entry["win_rate_vs_parent"] = entry.pop("win_rate_vs_base", None)
    entry["win_rates_vs_parent"] = entry.pop("win_rates_vs_base", None)
    entry["win_rate_vs_base"] = entry["win_rates_vs_base"] = None
    if "rm_win_rate_vs_base" in entry:
        entry["rm_win_rate_vs_parent"] = entry.pop("rm_win_rate_vs_base")
        entry["rm_win_rate_vs_base"] = None
    per_prompt = entry.get("per_prompt") or {}
    if "win_vs_base" in per_prompt:
        per_prompt["win_vs_parent"] = per_prompt.pop("win_vs_base")
    if values and root and len(root) == len(values):
        entry["win_rate_vs_base"], entry["win_rates_vs_base"] = metrics.win_rates(values, root)
        per_prompt["win_vs_base"] = metrics.wins(values, root)
        if values[0].get("rm") is not None and root[0].get("rm") is not None:
            entry["rm_win_rate_vs_base"] = metrics.rm_win_rate(values, root)


def _run_local(
    base: str, data_spec: EvalData, settings: EvalSettings, targets: dict, work: list, progress: bool, raw: dict
) -> list[ShardResult]:
    from tunefleet.eval.worker import Scorer

    scorer = Scorer(base, data_spec, settings.batch_size, settings.trust_remote_code, raw)
    out = []
    with shard_progress(progress, len(work)) as advance:
        for shard in work:
            out.append(scorer.run(targets, shard))
            advance()
    return out
