"""Several runs per GPU: the memory estimate, the packing, and how each backend hands out GPU shares (pure)."""

from __future__ import annotations

import json

import pytest
from testkit import ROOT, run_cli

from tunefleet.common.errors import TunefleetError
from tunefleet.common.status import RunStatus
from tunefleet.launcher import sweep as sweeps
from tunefleet.launcher.backends import Retries, check_ray_resources
from tunefleet.launcher.placement import Allocator, Placement, parse_gpus, place, slurm_groups
from tunefleet.launcher.records import RunOutcome
from tunefleet.launcher.sweep import Resources
from tunefleet.trainers import config, memory

GIB = 2**30


def qwen05b() -> memory.ModelShape:
    from transformers import Qwen2Config

    return memory.ModelShape.from_config(
        Qwen2Config(**json.loads((ROOT / "bench" / "qwen2_0.5b_config.json").read_text()))
    )


def cfg(method="sft", **kw):
    return config.from_dict({"method": method, "model_name": "m", "dataset": "d", "output_dir": "o", **kw})


def test_gpus_per_run_takes_shares_whole_gpus_and_auto():
    assert parse_gpus("auto") == "auto" and parse_gpus(0.25) == 0.25 and parse_gpus("2") == 2.0
    for bad in ("1.5", -1, "lots"):
        with pytest.raises(ValueError):
            parse_gpus(bad)
    spec = sweeps.parse_spec({"name": "x", "resources": {"gpus_per_run": 0.5}})
    assert spec.resources.gpus_per_run == 0.5
    with pytest.raises(TunefleetError, match="bad value for 'resources.gpus_per_run': expected auto, a share"):
        sweeps.parse_spec({"name": "x", "resources": {"gpus_per_run": 1.5}})


def test_estimate_parts_move_the_right_way():
    shape = qwen05b()
    assert shape.params == pytest.approx(494_032_768, rel=0.01)  # Qwen2-0.5B's published size
    sft = memory.estimate(shape, "sft", batch=4, seq_len=512)
    assert memory.estimate(shape, "sft", 4, 512, qlora=False).weights > 2 * sft.weights  # 4-bit linears
    assert memory.estimate(shape, "sft", 4, 512, gradient_checkpointing=True).activations < sft.activations / 5
    dpo = memory.estimate(shape, "dpo", 4, 512)  # chosen + rejected: twice the tokens
    assert dpo.activations > 1.4 * sft.activations and dpo.logits == 2 * sft.logits
    tile = 4096 * 32768 * 4  # TRL's LM head never holds the full logits: two tiles on a GPU
    assert memory.estimate(shape, "sft", 64, 1024).logits == 2 * tile
    assert memory.estimate(shape, "orpo", 4, 512).logits == 2 * 4 * 512 * shape.vocab * 14  # ORPO does
    assert memory.estimate(shape, "grpo", 4, 512).generation > 0 and sft.generation == 0
    assert sft.adapter == 16 * 16 * shape.lora_in_out * shape.layers  # r 16, fp32 params + grad + 2 Adam moments


def test_auto_packs_as_many_as_fit_under_the_margin():
    shape = qwen05b()
    small = cfg(per_device_train_batch_size=2, max_length=256)
    p = place(small, "auto", 80 * GIB, shape)
    peak = memory.estimate(shape, "sft", 2, 256).total
    assert p.runs_per_gpu == min(8, int(0.8 * 80 * GIB // peak)) and p.runs_per_gpu > 1
    assert p.gpus == pytest.approx(1 / p.runs_per_gpu, abs=1e-4) and p.gpus * p.runs_per_gpu <= 1
    assert "runs fit in 80% of 80 GiB" in p.reason and p.estimate_gb == pytest.approx(peak / GIB, abs=0.01)
    big = place(cfg(per_device_train_batch_size=16, max_length=4096), "auto", 24 * GIB, shape)
    assert big.gpus == 1.0 and "gradient checkpointing" in big.reason
    assert place(small, "auto", 80 * GIB, None).gpus == 1.0  # size unknown: a whole GPU
    assert place(small, 0.5, None, None) == Placement(0.5, "resources.gpus_per_run in the spec")
    with pytest.raises(TunefleetError, match="set resources.gpu_memory_gb"):
        place(small, "auto", None, shape)


def test_local_allocator_packs_or_spreads_shares():
    pack = Allocator(["0", "1"], "pack")
    assert [pack.take(0.5), pack.take(0.5), pack.take(0.5), pack.take(0.5)] == [["0"], ["0"], ["1"], ["1"]]
    assert pack.take(0.5) is None  # both full: wait
    pack.give(["1"], 0.5)
    assert pack.take(1.0) is None and pack.take(0.5) == ["1"]
    spread = Allocator(["0", "1"], "spread")
    assert [spread.take(0.5), spread.take(0.5)] == [["0"], ["1"]]
    whole = Allocator(["0", "1", "2"])
    assert whole.take(2) == ["0", "1"] and whole.take(2) is None and whole.take(1) == ["2"]
    assert not Allocator([]).can_ever_fit(0.5) and Allocator([]).take(0) == []


def test_slurm_groups_share_a_gpu_only_while_shares_fit():
    half, quarter, whole = Placement(0.5, ""), Placement(0.25, ""), Placement(1.0, "")
    assert slurm_groups([half, half, half]) == [[0, 1], [2]]
    assert slurm_groups([quarter] * 5) == [[0, 1, 2, 3], [4]]
    assert slurm_groups([whole, half, whole, half]) == [[0], [1, 3], [2]]


def test_out_of_memory_while_sharing_is_retried_once_alone():
    tries = Retries(0)
    plan = sweeps.RunPlan("r", cfg(), Placement(0.5, "packed"))
    oom = RunOutcome("r", RunStatus.FAILED, "log", error="OutOfMemoryError: CUDA out of memory", out_of_memory=True)
    tries.started("r")
    again, why = tries.again(plan, oom)
    assert again.placement.gpus == 1.0 and "whole GPU" in why
    tries.started("r")
    assert tries.again(again, oom) is None  # alone already, no retries left
    assert Retries(1).again(plan, RunOutcome("r", RunStatus.FINISHED, "log")) is None


def test_ray_refuses_a_run_no_node_holds():
    nodes = [{"Alive": True, "Resources": {"CPU": 8, "GPU": 4}}, {"Alive": True, "Resources": {"CPU": 2}}]
    runs = [sweeps.RunPlan("a", cfg(), Placement(4.0, ""))]
    check_ray_resources(runs, Resources(cpus_per_run=2), nodes)
    with pytest.raises(TunefleetError, match="largest Ray node has 4"):
        check_ray_resources([sweeps.RunPlan("a", cfg(), Placement(8.0, ""))], Resources(), nodes)


def test_dry_run_prints_the_estimate_and_the_packing(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "name: pack\nbase: {model_name: tunefleet/tiny-qwen2, dataset: tunefleet/tiny-ultrafeedback, "
        "split: train_sft, method: sft}\ngrid: {seed: [1, 2]}\nresources: {gpus_per_run: auto, gpu_memory_gb: 24}\n"
    )
    code, out, err = run_cli(capsys, "sweep", spec, "--dry-run")
    assert code == 0, err
    assert "placement: 0.125 GPU (8 per GPU), estimated" in out and "runs fit in 80% of 24 GiB" in out
