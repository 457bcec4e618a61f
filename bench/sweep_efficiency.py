"""Sweep scheduling efficiency on a real local Ray, from one run of this script.

Runs N tiny runs one at a time (their summed wall times S), then the same N runs (fresh folders) as one
sweep on K slots (makespan M). Efficiency = (S / K) / M: 1.0 means no slot ever idled while runs waited.

    python bench/sweep_efficiency.py            # N=6, K=2: ~2 minutes on 2 CPU cores
    python bench/sweep_efficiency.py --runs 8 --slots 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from tunefleet.launcher import sweep as sweeps
from tunefleet.launcher.progress import SweepView

BASE = {
    "model_name": "tunefleet/tiny-qwen2",
    "dataset": "tunefleet/tiny-ultrafeedback",
    "max_steps": 8,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "use_qlora": False,
    "save_steps": 8,
}
METHOD_SPLITS = {"sft": {"split": "train_sft"}, "dpo": {"split": "train_prefs"}}


def plan(root: Path, n: int) -> list[sweeps.RunPlan]:
    spec = sweeps.parse_spec(
        {
            "name": "bench",
            "runs_dir": str(root),
            "base": BASE,
            "methods": METHOD_SPLITS,
            "grid": {"method": ["sft", "dpo"], "seed": list(range(1, (n + 1) // 2 + 1))},
        }
    )
    return sweeps.expand(spec)[:n]


def main() -> None:
    import ray

    from tunefleet.launcher.backends import run_ray
    from tunefleet.launcher.sweep import Resources

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--slots", type=int, default=2)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tf-bench-sweep-"))

    def sweep(runs: list[sweeps.RunPlan], slots: int) -> tuple[list, float]:
        # Same per-run resources (1 CPU: Ray sets OMP_NUM_THREADS=1) in both phases; only the slots differ.
        ray.init(
            num_cpus=slots,
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
        try:
            with SweepView(runs, live=False) as view:
                t0 = time.perf_counter()
                outcomes, _ = run_ray(runs, Resources(cpus_per_run=1), 0, view, None)
                return outcomes, time.perf_counter() - t0
        finally:
            ray.shutdown()

    try:
        outcomes, serial_total = sweep(plan(root / "solo", a.runs), 1)  # one slot: each run alone
        single = sum(o.wall_s for o in outcomes)
        outcomes, makespan = sweep(plan(root / "fleet", a.runs), a.slots)
        assert all(o.ok for o in outcomes), outcomes
        ideal = single / a.slots
        print(
            f"\n{a.runs} tiny runs; one at a time: sum of run wall times {single:.1f} s "
            f"(whole serial sweep {serial_total:.1f} s)"
        )
        print(f"sweep on {a.slots} slots: makespan {makespan:.1f} s; ideal (sum / {a.slots}) {ideal:.1f} s")
        print(f"efficiency (ideal / makespan) = {ideal / makespan:.2f}   (goal >= 0.85)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
