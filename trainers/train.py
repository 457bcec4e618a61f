"""Per-process entry of one run: what `accelerate launch` (and every backend) runs.

    python -m tunefleet.trainers.train --method sft --model_name tunefleet/tiny-qwen2 \
      --dataset tunefleet/tiny-ultrafeedback --split train_sft --output_dir runs/sft_tiny --max_steps 10
    accelerate launch --multi_gpu --num_processes 2 -m tunefleet.trainers.train --config run.yaml
"""

from __future__ import annotations

import importlib
import sys

from tunefleet.common.errors import TunefleetError
from tunefleet.trainers.config import parse_args
from tunefleet.trainers.run import Preempted


def run(cfg) -> dict:
    """Train one method in this process; returns the run record."""
    trainer_module = importlib.import_module(f"tunefleet.trainers.{cfg.method}")  # sft.py ... grpo.py
    return trainer_module.train(cfg)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        run(cfg)
    except TunefleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        print(f"preempted: {exc}; rerun the same command to resume", file=sys.stderr)
        return 128 + exc.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
