"""Several processes through the real `accelerate launch` on CPU (gloo): DDP, DeepSpeed ZeRO-2, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from testkit import (
    FAST,
    ROOT,
    SPLIT,
    TINY,
    checkpoint_steps,
    kill_tree,
    read_json,
    run_cli,
    tunefleet,
    wait_for_checkpoint,
)

from tunefleet.common.contract import WARM_SWITCH_ENV
from tunefleet.launcher.launch import check_deepspeed, choose_config
from tunefleet.trainers.config import from_dict

pytestmark = pytest.mark.slow
GIB = 2**30


def train_args(method, out, *extra):
    return [
        "train",
        "--method",
        method,
        *TINY,
        "--split",
        SPLIT[method],
        "--output_dir",
        out,
        "--use_qlora",
        "false",
        "--num_processes",
        "2",
        *FAST,
        *extra,
    ]


def cli(*args, timeout=600, env=None):
    return tunefleet(*args, timeout=timeout, check=False, env=env)


def assert_written_once(out, steps):
    state = read_json(out / "trainer_state.json")
    logged = [e["step"] for e in state["log_history"] if "loss" in e]
    assert state["global_step"] == steps and logged == sorted(set(logged)), logged  # one writer, no duplicates
    assert len(list(out.glob("run.json*"))) == 1


# DPO here; SFT under DDP runs in the resume test below (and the out-of-memory relaunch in test_memory.py).
@pytest.mark.parametrize("method", ["dpo"])
def test_ddp_two_processes(method, tmp_path, tiny_model):
    out = tmp_path / method
    proc = cli(*train_args(method, out, "--max_steps", 4, "--save_steps", 2))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "launch: ddp (no GPU: data parallel over gloo on CPU processes)" in proc.stdout
    record = read_json(out / "run.json")
    assert record["status"] == "finished" and record["world_size"] == 2
    assert record["distributed_type"] == "DistributedType.MULTI_CPU"
    assert record["effective_batch_size"] == 4 * 1 * 2  # per device x accumulation x world
    assert record["launch"]["accelerate_config"] == "ddp" and "gloo" in record["launch"]["reason"]
    assert_written_once(out, 4)
    assert (out / "checkpoint-4" / "rng_state_1.pth").exists()  # both ranks checkpointed their RNG


# DPO: the reference is the adapter-disabled base under ZeRO. (SFT under ZeRO-2 runs in the wheel test.)
@pytest.mark.parametrize("method", ["dpo"])
def test_zero2_two_processes(method, tmp_path, tiny_model):
    out, extensions = tmp_path / "z2", tmp_path / "torch_extensions"
    args = train_args(method, out, "--max_steps", 4, "--save_steps", 2, "--accelerate_config", "zero2")
    proc = cli(*args, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = read_json(out / "run.json")
    assert record["world_size"] == 2 and record["distributed_type"] == "DistributedType.DEEPSPEED"
    assert (out / "checkpoint-4" / "global_step4").is_dir()  # DeepSpeed's own sharded checkpoint
    assert_written_once(out, 4)
    # In a fresh environment DeepSpeed's CPU backend compiled its inference-only shared-memory op first (30-70 s)
    assert not (extensions.exists() and any(extensions.rglob("*.so"))), list(extensions.rglob("*"))
    assert "deepspeed_shm_comm" not in proc.stdout + proc.stderr


def test_ddp_resume_after_kill(tmp_path, tiny_model):
    out = tmp_path / "r"
    args = [
        sys.executable,
        "-m",
        "tunefleet.launcher.cli",
        *map(str, train_args("sft", out, "--max_steps", 60, "--save_steps", 3)),
    ]
    cold = {**os.environ, WARM_SWITCH_ENV: "0"}  # ranks in the launcher's own process tree, to be killed with it
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cold)
    wait_for_checkpoint(out, 300)
    kill_tree(proc.pid)  # the launcher and both ranks, no clean shutdown
    proc.wait()
    done = checkpoint_steps(out)
    assert done and done[-1] < 60
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    record = read_json(out / "run.json")
    assert record["resumed_from"].endswith(f"checkpoint-{done[-1]}") and record["world_size"] == 2
    assert read_json(out / "trainer_state.json")["global_step"] == 60
    assert record["effective_batch_size"] == 4 * 1 * 2 and record["distributed_type"] == "DistributedType.MULTI_CPU"
    assert_written_once(out, 60)
    assert (out / "checkpoint-60" / "rng_state_1.pth").exists()  # both ranks checkpointed their RNG


def test_world_size_trap_is_refused():
    from tunefleet.common.errors import TunefleetError
    from tunefleet.trainers.life_cycle import check_world_size

    check_world_size(2, 2)
    with pytest.raises(TunefleetError, match="2 processes were launched but training sees a world of 1"):
        check_world_size(2, 1)


# ------------------------------------------------------------------ choices and bad input (no launch)
def test_auto_choice():
    assert choose_config("auto", 1, 10**9, 2, 80 * GIB).config is None
    assert choose_config("auto", 2, None, 4, None).config == "ddp"
    small = choose_config("auto", 4, 500_000_000, 2, 80 * GIB)
    assert small.config == "ddp" and "0.93 GiB" in small.reason
    big = choose_config("auto", 8, 70_000_000_000, 2, 80 * GIB)
    assert big.config == "zero3" and "130.4 GiB > 50% of one device's 80 GiB" in big.reason
    assert choose_config("zero2", 2, 1, 2, 80 * GIB).reason == "asked for with --accelerate_config zero2"


def test_a_one_process_run_is_planned_without_importing_torch():
    """The process that launches a run (a Ray worker, a SLURM task) forks it warm; importing torch there first
    would cost seconds of start-up per worker."""
    code = (
        "import json, sys\n"
        "from tunefleet.launcher.launch import plan_launch\n"
        "from tunefleet.trainers.config import from_dict\n"
        "cfg = from_dict({'method': 'sft', 'model_name': 'm', 'dataset': 'd', 'output_dir': 'o'})\n"
        "choice, env = plan_launch(cfg)\n"
        "print(json.dumps([choice.config, json.loads(env['TUNEFLEET_LAUNCH']), 'torch' in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    config, record, imported_torch = json.loads(done.stdout.strip().splitlines()[-1])
    assert config is None and not imported_torch
    assert record == {"accelerate_config": None, "reason": "one process: no distributed launch", "num_processes": 1}


def test_deepspeed_contradictions_are_named():
    cfg = from_dict(
        {
            "method": "dpo",
            "model_name": "m",
            "dataset": "d",
            "output_dir": "o",
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "use_qlora": True,
        }
    )
    ds = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": "auto",
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3},
    }
    problems = check_deepspeed(ds, cfg, bf16=False)
    assert (
        "train_micro_batch_size_per_gpu is 8 in the DeepSpeed config but --per_device_train_batch_size is 4"
        in problems
    )
    assert any(p.startswith("bf16.enabled is True") for p in problems)
    assert any("ZeRO-3 with QLoRA needs bf16 compute" in p for p in problems)
    assert (
        check_deepspeed(json.loads((ROOT / "cluster_configs/deepspeed/zero3.json").read_text()), cfg, bf16=True) == []
    )


def test_bad_launch_input(tmp_path, capsys, tiny_model):
    code, _, err = run_cli(capsys, *train_args("sft", tmp_path / "a", "--num_processes", 999))
    assert code == 2 and "--num_processes 999 but only" in err
    code, _, err = run_cli(
        capsys, *train_args("sft", tmp_path / "c", "--accelerate_config", "zero3", "--use_qlora", "true")
    )
    assert code == 2 and "ZeRO-3 with QLoRA needs bf16 compute" in err
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    acc = tmp_path / "acc.yaml"
    acc.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {ds}\n")
    code, _, err = run_cli(capsys, *train_args("sft", tmp_path / "d", "--accelerate_config", acc))
    assert (
        code == 2
        and "train_micro_batch_size_per_gpu is 16 in the DeepSpeed config but --per_device_train_batch_size is 4"
        in err
    )
    code, _, err = run_cli(capsys, *train_args("sft", tmp_path / "e", "--accelerate_config", "nosuch"))
    assert code == 2 and "accelerate config 'nosuch' not found; use one of ddp, single, zero2, zero3" in err
