"""What spanning nodes costs a run: the same 2-rank run as two "nodes" (two launchers, machine ranks 0 and 1, meeting
at torch's rendezvous, as each node of a gang starts them) against two processes under one launcher, side by side.

Both sides are tunefleet's own launch path (`execute.run_one` for rank 0's node, `execute.run_node` for the other,
exactly what a Ray gang's tasks and a SLURM job's tasks call), on this machine, with the same seed, data and
effective batch; rounds alternate. Step time = the trainer's own train_runtime / steps (start-up excluded); the
losses are checked equal.

    python bench/gang_cost.py                          # the 10M model, full fine-tuning: ~2 minutes on 2 cores
    python bench/gang_cost.py --model tiny --finetune lora --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
from pathlib import Path

from tunefleet.common.contract import GangSeat
from tunefleet.launcher import sweep as sweeps
from tunefleet.launcher.execute import run_node, run_one
from tunefleet.launcher.launch import free_port

BASE = {
    "model_name": "tunefleet/tiny-qwen2",
    "dataset": "tunefleet/tiny-ultrafeedback",
    "method": "sft",
    "split": "train_sft",
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "use_qlora": False,
    "logging_steps": 1,
    "save_steps": 10_000,
    "seed": 1,
}


def plan(root: Path, name: str, settings: dict) -> sweeps.RunPlan:
    spec = sweeps.parse_spec({"name": "bench", "runs_dir": str(root), "base": settings, "naming": name})
    return sweeps.expand(spec)[0]


def measured(folder: str) -> tuple[float, list[float]]:
    record = json.loads((Path(folder) / "run.json").read_text())
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    return record["train_runtime_s"] / record["global_step"], losses


def two_nodes(root: Path, settings: dict) -> tuple[float, list[float]]:
    run = plan(root, "nodes", {**settings, "num_nodes": 2})
    port = free_port("")
    seats = [GangSeat(f"bench{port}", m, 2, "127.0.0.1", port, f"node{m}", f"node{m}") for m in range(2)]
    ended: dict[int, object] = {}
    other = threading.Thread(target=lambda: ended.__setitem__(1, run_node(run, seats[1])))
    other.start()
    ended[0] = run_one(run, {}, seats[0])
    other.join()
    assert all(getattr(o, "ok", False) for o in ended.values()), ended
    return measured(run.output_dir)


def one_node(root: Path, settings: dict) -> tuple[float, list[float]]:
    run = plan(root, "one", {**settings, "num_processes": 2})
    outcome = run_one(run)
    assert outcome.ok, outcome
    return measured(run.output_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="10m", help="tiny (0.36M parameters), 10m (a random-init 9.6M Qwen2) or a path")
    p.add_argument("--finetune", default="full", help="full (every gradient all-reduced each step) or lora")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per rank on both sides
    model = a.model
    if model in ("tiny", "10m"):
        from train_throughput import build_models  # bench/: the same random-init models as the training comparison

        model = str(build_models(Path(tempfile.mkdtemp(prefix="tf-bench-models-")), [model], False)[model])
    settings = {**BASE, "model_name": model, "max_steps": a.steps, "finetune": a.finetune}
    settings.pop("use_qlora")
    gang, single = [], []
    for round_ in range(a.rounds):
        root = Path(tempfile.mkdtemp(prefix="tf-bench-gang-"))
        try:
            one_s, one_losses = one_node(root, settings)
            two_s, two_losses = two_nodes(root, settings)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        same = max(abs(x - y) for x, y in zip(one_losses, two_losses, strict=True))
        print(
            f"round {round_ + 1}: step {two_s * 1000:.1f} ms as 2 nodes vs {one_s * 1000:.1f} ms on one node "
            f"({two_s / one_s:.2f}x); losses differ by at most {same:.1e}",
            flush=True,
        )
        gang.append(two_s)
        single.append(one_s)
    ratio = statistics.median(gang) / statistics.median(single)
    print(
        f"{a.model} ({a.finetune}), {a.steps} steps, 2 ranks, median of {a.rounds}: 2 nodes {statistics.median(gang) * 1000:.1f} ms/step,"
        f" one node {statistics.median(single) * 1000:.1f} ms/step: {ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
