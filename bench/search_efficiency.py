"""What early stopping saves in a search, from one run of this script on a real local Ray Tune.

The same N trials (the same searcher seed samples the same learning rates in the same order) are searched
twice with `tunefleet sweep`: once with ASHA (reduction factor 3), once run to completion (fifo). Printed side by
side: training steps used, wall time, the best configuration each found and its metric. DPO's learning rate is
searched over a wide range at a fixed beta, compared by eval loss (comparable across trials at one beta; the tiny
model's pair accuracy reaches 1.0 for most rates, which leaves a scheduler nothing to rank).

    python bench/search_efficiency.py                 # N=9 DPO trials of 40 steps: ~4-5 minutes on 2 CPU cores
    python bench/search_efficiency.py --trials 12 --steps 60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BASE = {
    "model_name": "tunefleet/tiny-qwen2",
    "dataset": "tunefleet/tiny-ultrafeedback",
    "split": "train_prefs",
    "eval_split": "test_prefs",
    "max_eval_samples": 60,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "loss_type": ["sigmoid", "sft"],
    "beta": 0.1,
    "use_qlora": False,
}


def search(root: Path, scheduler: str, trials: int, steps: int, grace: int) -> tuple[dict, float]:
    spec = {
        "name": f"bench-{scheduler}",
        "runs_dir": str(root / scheduler),
        "base": {**BASE, "max_steps": steps, "eval_steps": grace, "logging_steps": grace, "save_steps": grace},
        "search": {
            "metric": "eval_loss",
            "num_samples": trials,
            "scheduler": scheduler,
            "grace_period": grace,
            "reduction_factor": 3,
            "max_concurrent": 2,
            "space": {"dpo": {"learning_rate": {"loguniform": [1.0e-5, 3.0e-2]}}},
        },
    }
    path = root / f"{scheduler}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    t0 = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "tunefleet.launcher.cli", "sweep", str(path), "--backend", "local"],
        capture_output=True,
        text=True,
    )
    wall = time.time() - t0
    if done.returncode != 0:
        raise SystemExit(f"{scheduler} search failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((root / scheduler / "search.json").read_text())["methods"]["dpo"], wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=9)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--grace", type=int, default=5, help="ASHA's grace period and the evaluation interval")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tf-bench-search-"))
    asha, asha_wall = search(root, "asha", a.trials, a.steps, a.grace)
    fifo, fifo_wall = search(root, "fifo", a.trials, a.steps, a.grace)

    def best(found: dict) -> str:
        b = found["best"]
        values = ", ".join(f"{k} {v:.3g}" for k, v in b["values"].items())
        return f"{b['metric']:.3f} ({values})"

    def spread(found: dict) -> str:
        scores = sorted(t["metric"] for t in found["trials"] if t["metric"] is not None)
        return ", ".join(f"{s:.3f}" for s in scores)

    rows = [
        ("training steps", str(asha["steps_used"]), str(fifo["steps_used"])),
        ("wall time (s)", f"{asha_wall:.0f}", f"{fifo_wall:.0f}"),
        ("trials stopped early", str(sum(t["status"] == "stopped" for t in asha["trials"])), "0"),
        ("best eval_loss", best(asha), best(fifo)),
        ("every trial's last metric", spread(asha), spread(fifo)),
    ]
    print(f"{a.trials} DPO trials of {a.steps} steps, the same samples (searcher seed 0), 2 at a time")
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'ASHA':<40}  run to completion")
    for name, left, right in rows:
        print(f"{name:<{width}}  {left:<40}  {right}")
    print(
        f"steps: {fifo['steps_used'] / asha['steps_used']:.2f}x fewer with ASHA; "
        f"wall: {fifo_wall / asha_wall:.2f}x faster; "
        f"same best trial: {asha['best']['values'] == fifo['best']['values']}"
    )


if __name__ == "__main__":
    main()
