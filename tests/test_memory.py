"""Memory-aware defaults and out-of-memory recovery: the choices (pure) and a real run under an address-space limit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit import ROOT, Started, pids_in_tree, read_json, sft_train, tunefleet, wait_for_checkpoint

from tunefleet.common.storage import Store
from tunefleet.launcher.placement import place
from tunefleet.trainers import memory, recovery
from tunefleet.trainers.config import from_dict
from tunefleet.trainers.speed import MEMORY_MARGIN, Choice, MemoryFit, checkpointing_choice

GIB = 2**30


def cfg(**kw):
    values = {"method": "sft", "model_name": "m", "dataset": "d", "output_dir": "o"}
    return from_dict(values | kw)


def test_checkpointing_is_off_only_when_the_estimate_fits_with_a_margin():
    assert checkpointing_choice(None, MemoryFit(int(7.9 * GIB), 10 * GIB, "GPU 0")).on is False
    over = checkpointing_choice(None, MemoryFit(int(8.1 * GIB), 10 * GIB, "GPU 0"))
    assert over.on is True and "estimated peak 8.10 GiB, GPU 0 10.0 GiB" in over.why
    unknown = checkpointing_choice(None, MemoryFit(None, 10 * GIB, "GPU 0"))
    assert unknown == Choice(True, "model size unknown: on, as TRL does")
    assert checkpointing_choice(None, MemoryFit(GIB, None, "free CPU memory")).on is True
    assert checkpointing_choice(False, MemoryFit(20 * GIB, GIB, "GPU 0")).why == "set by flag"
    assert MEMORY_MARGIN == 0.8


def test_a_7b_qlora_run_gets_checkpointing_where_plain_trl_would_fit():
    """Qwen2-7B-like shape, batch 4 x 1024 tokens: ~60 GiB of activations without checkpointing, so on a 24 GiB
    GPU tunefleet turns it on (as TRL does); a sweep packing for 80 GiB GPUs plans with the same choice."""
    shape = memory.ModelShape(7_600_000_000, 6_500_000_000, 3584, 28, 28, 512, 18944, 152064)
    run = cfg(per_device_train_batch_size=4, max_length=1024)
    peak = memory.estimate_run(run, shape, gradient_checkpointing=False).total
    assert checkpointing_choice(None, MemoryFit(peak, 24 * GIB, "GPU 0")).on is True
    small = cfg(per_device_train_batch_size=1, max_length=256)
    assert (
        checkpointing_choice(None, MemoryFit(memory.estimate_run(small, shape, False).total, 80 * GIB, "GPU 0")).on
        is False
    )
    placed = place(run, "auto", 24 * GIB, shape)
    assert placed.gpus == 1.0 and "with gradient checkpointing" in placed.reason
    forced_off = place(
        cfg(per_device_train_batch_size=4, max_length=1024, gradient_checkpointing=False), "auto", 24 * GIB, shape
    )
    assert "gradient checkpointing off by flag" in forced_off.reason


def test_steps_down_keep_the_effective_batch():
    run = cfg(per_device_train_batch_size=8, gradient_accumulation_steps=2)
    seen = []
    checkpointing = False
    while (run := recovery.step_down(run, checkpointing)) is not None:
        checkpointing = True
        seen.append((run.gradient_checkpointing, run.per_device_train_batch_size, run.gradient_accumulation_steps))
    assert seen == [(True, 8, 2), (True, 4, 4), (True, 2, 8), (True, 1, 16)]
    odd = recovery.step_down(cfg(per_device_train_batch_size=6, gradient_accumulation_steps=1), True)
    assert (odd.per_device_train_batch_size, odd.gradient_accumulation_steps) == (3, 2)
    three = recovery.step_down(odd, True)
    assert (three.per_device_train_batch_size, three.gradient_accumulation_steps) == (1, 6)


def test_a_run_that_starts_again_keeps_its_last_step_down_unless_asked_otherwise():
    asked = cfg(per_device_train_batch_size=8, gradient_accumulation_steps=2)
    smaller = recovery.step_down(recovery.step_down(asked, False), True)
    step = recovery.MemoryStep(12, "CUDA out of memory", True, 4, 4).record()
    kept = recovery.keep_earlier_step(asked, {"status": "interrupted", "memory_steps": [step]})
    assert kept == smaller and kept.gradient_checkpointing is True
    assert recovery.keep_earlier_step(asked, {"status": "running", "memory_steps": [step]}) == smaller  # node lost
    assert recovery.keep_earlier_step(asked, {"status": "finished", "memory_steps": [step]}) == asked
    assert (
        recovery.keep_earlier_step(
            cfg(per_device_train_batch_size=8, gradient_accumulation_steps=4),
            {"status": "failed", "memory_steps": [step]},
        ).per_device_train_batch_size
        == 8
    )  # another effective batch: the user changed it on purpose
    even_smaller = cfg(per_device_train_batch_size=2, gradient_accumulation_steps=8)
    assert recovery.keep_earlier_step(even_smaller, {"status": "failed", "memory_steps": [step]}) == even_smaller
    assert recovery.keep_earlier_step(
        cfg(per_device_train_batch_size=8, gradient_accumulation_steps=2, overwrite=True),
        {"status": "failed", "memory_steps": [step]},
    ).overwrite


def test_out_of_memory_errors_are_recognised():
    assert recovery.is_out_of_memory(MemoryError())
    assert recovery.is_out_of_memory(
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8")
    )
    assert recovery.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not recovery.is_out_of_memory(RuntimeError("shape mismatch"))


def long_completions(path: Path) -> Path:
    """64 SFT rows of ~1000 tokens: activations, not the libraries, decide the peak."""
    import random

    rng = random.Random(0)
    words = "snow is white and the sky is blue while grass grows green under a bright warm sun".split()
    with path.open("w") as fh:
        for i in range(64):
            text = " ".join(rng.choice(words) for _ in range(1500))
            fh.write(json.dumps({"prompt": f"Tell me a story {i}.", "completion": text}) + "\n")
    return path


def train_command(data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tunefleet.launcher.cli",
        "train",
        "--method",
        "sft",
        "--model_name",
        "tunefleet/tiny-qwen2",
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--max_length",
        "1024",
        "--per_device_train_batch_size",
        "8",
        "--gradient_accumulation_steps",
        "2",
        "--max_steps",
        "2",
        "--logging_steps",
        "1",
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}  # fewer threads and arenas: a steadier size


def tree_peak_address_space(cmd: list[str]) -> int:
    """The largest VmPeak (bytes) among a command's processes (the launcher and the ranks it starts), polled."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        for pid in pids_in_tree(proc.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                peak = max(peak, int(status.split("VmPeak:")[1].split()[0]) * 1024)
            except (OSError, IndexError, ValueError):
                pass
        time.sleep(0.1)
    assert proc.returncode == 0
    return peak


def peak_address_space_at_exit(cmd: list[str]) -> int:
    """VmPeak (bytes) of a one-process command, read by the process itself as it exits: exact, where polling from
    outside can miss a peak reached between two looks on a loaded machine."""
    python, _, module, *args = cmd
    report = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('VmPeak', open('/proc/self/status').read().split('VmPeak:')[1].split()[0], "
        "file=sys.stderr))\n"
        f"sys.argv = {[module, *args]!r}\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run([python, "-c", report], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("VmPeak ")]
    return int(line.split()[1]) * 1024


@pytest.mark.slow
def test_a_run_out_of_memory_finishes_with_a_smaller_batch_and_the_same_effective_batch(tmp_path, tiny_model):
    """An address-space limit (RLIMIT_AS) below what batch 8 needs: torch's CPU allocator fails in the first step;
    the run resumes with checkpointing on, then halves the batch until it fits, and finishes with batch x accumulation
    still 16. The limit is set from the same run's measured peak (below it by what checkpointing and one halving
    save on this data, ~300 MiB), so it holds on machines whose libraries take more or less room."""
    data = long_completions(tmp_path / "long.jsonl")
    unlimited = peak_address_space_at_exit(train_command(data, tmp_path / "measure"))
    limit = unlimited - 400 * 2**20
    out = tmp_path / "run"
    proc = subprocess.run(
        ["prlimit", f"--as={limit}", *train_command(data, out)], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = read_json(out / "run.json")
    steps = record["memory_steps"]
    assert record["status"] == "finished" and record["global_step"] == 2
    assert steps[0]["gradient_checkpointing"] is True and steps[0]["per_device_train_batch_size"] == 8
    assert "can't allocate memory" in steps[0]["error"]
    final = record["config"]
    assert final["per_device_train_batch_size"] < 8
    assert final["per_device_train_batch_size"] * final["gradient_accumulation_steps"] == 16
    assert record["effective_batch_size"] == 16
    assert "out of memory at step 0: resumed with batch 8 x accumulation 2, gradient checkpointing on" in proc.stderr
    state = read_json(out / "trainer_state.json")
    assert state["train_batch_size"] == final["per_device_train_batch_size"]


@pytest.mark.slow
def test_a_two_process_run_out_of_memory_is_relaunched_smaller(tmp_path, tiny_model):
    """The same limit on a DDP launch of 2 processes (each rank inherits RLIMIT_AS): whichever rank fails, the
    launcher sees it (run.json, or the rank's marker) and launches again with the next smaller set-up, until the
    run finishes with the same effective batch (per-device batch x accumulation x 2 processes = 32)."""
    data = long_completions(tmp_path / "long.jsonl")
    two = ["--num_processes", "2", "--save_steps", "1"]
    unlimited = tree_peak_address_space([*train_command(data, tmp_path / "measure"), *two])
    limit = unlimited - 400 * 2**20
    out = tmp_path / "run"
    proc = subprocess.run(
        ["prlimit", f"--as={limit}", *train_command(data, out), *two],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = read_json(out / "run.json")
    assert record["status"] == "finished" and record["world_size"] == 2 and record["memory_steps"]
    assert record["memory_steps"][0]["gradient_checkpointing"] is True
    final = record["config"]
    assert final["per_device_train_batch_size"] * final["gradient_accumulation_steps"] == 16
    assert record["effective_batch_size"] == 32
    assert proc.stdout.count("launch: ddp") == len(record["memory_steps"]) + 1
    assert not list(out.glob("out_of_memory-rank*"))  # the markers were consumed


@pytest.mark.slow
def test_a_rerun_resumes_with_the_step_down_of_the_attempt_that_ran_out_of_memory(tmp_path, tiny_model):
    """An attempt that stepped down (batch 8 x 2 -> checkpointing, then 4 x 4) and was stopped after a checkpoint:
    the same command again resumes with 4 x 4 and checkpointing, not the batch that ran out of memory."""
    out = tmp_path / "run"
    args = [
        *sft_train(out),
        "--use_qlora",
        "false",
        "--per_device_train_batch_size",
        "8",
        "--gradient_accumulation_steps",
        "2",
        "--max_steps",
        "60",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
    ]
    first = Started(*args)
    wait_for_checkpoint(out)
    first.send_signal(signal.SIGINT)  # as a SLURM preemption or a lost node would end it
    first.wait(120)
    asked = from_dict(
        {
            "method": "sft",
            "model_name": "tunefleet/tiny-qwen2",
            "dataset": "d",
            "output_dir": str(out),
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2,
        }
    )
    smaller = recovery.step_down(recovery.step_down(asked, False), True)
    # what the attempt's own recovery wrote when it ran out of memory (trainers.train.run)
    recovery.record_step(Store(str(out)), 2, "DefaultCPUAllocator: can't allocate memory", smaller)
    assert read_json(out / "run.json")["status"] == "interrupted"

    again = tunefleet(*args, timeout=300)  # the same command
    assert (
        "keeping the memory step-down of an earlier attempt: batch 4 x accumulation 4, gradient checkpointing on"
        in (again.stdout)
    )
    record = read_json(out / "run.json")
    assert record["status"] == "finished" and record["global_step"] == 60 and record["attempts"] == 2
    assert len(record["memory_steps"]) == 1 and record["resumed_from"]
    assert (
        record["config"]["per_device_train_batch_size"] == 4 and record["config"]["gradient_accumulation_steps"] == 4
    )
    assert record["fast_path"]["gradient_checkpointing"]["on"] is True and record["effective_batch_size"] == 16
    # (trainer_state.json keeps the batch its checkpoint recorded: transformers restores the state it resumed from)
