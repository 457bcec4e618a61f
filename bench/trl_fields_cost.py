"""What reading TRL's options costs a process that checks a spec or plans a run, side by side in one run:

(a) importing TRL's config classes, the way to know their fields without tunefleet's table;
(b) building tunefleet's table of TRL fields (a child process imports TRL once per TRL version);
(c) a fresh interpreter reading the cached table and checking a TRL-form command line (what every later launcher,
    Ray task or SLURM task pays), with no torch imported.

  python bench/trl_fields_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

IMPORT_TRL = (
    "from trl import SFTConfig, DPOConfig, KTOConfig, GRPOConfig, RewardConfig, ModelConfig, ScriptArguments\n"
    "from trl.experimental.orpo import ORPOConfig\n"
)
PARSE = (
    "import sys\n"
    "from tunefleet.trainers import config\n"
    "cfg = config.parse_args(['--method', 'dpo', '--model_name_or_path', 'm', '--dataset_name', 'd', '--output_dir',"
    " 'o', '--lr_scheduler_type', 'cosine', '--warmup_ratio', '0.1', '--optim', 'paged_adamw_32bit', '--use_peft'])\n"
    "assert cfg.trl_args['lr_scheduler_type'] == 'cosine' and 'torch' not in sys.modules\n"
)


def timed(code: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {"(a) import TRL's config classes": [], "(b) build the table (cold)": [], "(c) cached table + parse": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TUNEFLEET_CACHE": cache, "TRL_EXPERIMENTAL_SILENCE": "1"}
            rows["(a) import TRL's config classes"].append(timed(IMPORT_TRL, env))
            rows["(b) build the table (cold)"].append(
                timed("from tunefleet.trainers import trl_fields\ntrl_fields.table()", env)
            )
            rows["(c) cached table + parse"].append(timed(PARSE, env))
    base = statistics.median(rows["(a) import TRL's config classes"])
    print(f"{'step':38} {'median s':>9} {'vs (a)':>8}")
    for name, times in rows.items():
        median = statistics.median(times)
        print(f"{name:38} {median:9.2f} {median / base:7.2f}x")


if __name__ == "__main__":
    main()
