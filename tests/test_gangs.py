"""Runs over several nodes (num_nodes > 1) on a real local Ray of three raylets: one gang, reserved together (a
placement group strictly spread), rank 0's node known before any rank starts, each node's processes started by
accelerate launch and meeting at torch's rendezvous; the losses of the same run on one node; ZeRO-3 full
fine-tuning; a node lost mid-run, a node that never joins, and the refusals (too many nodes, a runs_dir one node
cannot see, the local backend). The pure parts (the launch command, the seats, the messages) are tested first.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from local_ray import LocalRayCluster, can_hide_folders, pids_under
from testkit import checkpoint_steps, read_json, run_cli, tunefleet

from tunefleet.common.contract import GangSeat
from tunefleet.common.errors import TunefleetError
from tunefleet.launcher import gang
from tunefleet.launcher import sweep as sweeps
from tunefleet.launcher.launch import launch_command
from tunefleet.launcher.progress import nodes_text
from tunefleet.trainers import world
from tunefleet.trainers.config import from_dict

TINY = {
    "model_name": "tunefleet/tiny-qwen2",
    "dataset": "tunefleet/tiny-ultrafeedback",
    "method": "sft",
    "split": "train_sft",
    "per_device_train_batch_size": 2,
    "logging_steps": 1,
    "seed": 1,
}


# ------------------------------------------------------------------ pure
def test_each_node_launches_its_machine_rank_at_the_head():
    seat = GangSeat("g1", 1, 2, "10.0.0.5", 29611, "n1", "node1")
    cmd = launch_command(["--config", "run.yaml"], 4, 12345, "zero3", python="py", seat=seat)
    at = {flag: cmd[cmd.index(flag) + 1] for flag in ("--num_processes", "--num_machines", "--machine_rank")}
    assert at == {"--num_processes": "4", "--num_machines": "2", "--machine_rank": "1"}
    assert (
        cmd[cmd.index("--main_process_ip") + 1] == "10.0.0.5" and cmd[cmd.index("--main_process_port") + 1] == "29611"
    )
    # DeepSpeed's own multi-node launcher wants ssh to every node: torchrun on each node instead
    assert cmd[cmd.index("--deepspeed_multinode_launcher") + 1] == "standard"
    ddp = launch_command(["--config", "run.yaml"], 2, 1, "auto", python="py", seat=seat)
    assert "--deepspeed_multinode_launcher" not in ddp and "--machine_rank" in ddp
    one = launch_command(["--config", "run.yaml"], 2, 1, "auto", python="py")
    assert one[one.index("--num_machines") + 1] == "1" and "--machine_rank" not in one


def test_a_runs_size_in_nodes_and_processes():
    cfg = from_dict({**TINY, "output_dir": "x", "num_nodes": 3, "processes_per_node": 2})
    assert (cfg.world_size, cfg.node_processes) == (6, 2)
    assert from_dict({**TINY, "output_dir": "x", "num_nodes": 2}).world_size == 2  # one process a node on CPU
    assert from_dict({**TINY, "output_dir": "x", "num_processes": 4}).world_size == 4
    with pytest.raises(TunefleetError, match="set processes_per_node"):
        from_dict({**TINY, "output_dir": "x", "num_nodes": 2, "num_processes": 3})
    with pytest.raises(TunefleetError, match="on one node use num_processes"):
        from_dict({**TINY, "output_dir": "x", "processes_per_node": 2})
    # in a sweep, a multi-node run's GPUs are each node's: one process per GPU of it
    spec = sweeps.parse_spec(
        {
            "name": "g",
            "base": TINY,
            "grid": {"num_nodes": [1, 2]},
            "naming": "n{num_nodes}",
            "resources": {"gpus_per_run": 4},
        }
    )
    runs = {r.name: r.config for r in sweeps.expand(spec)}
    assert (runs["n1"].num_processes, runs["n1"].world_size) == (4, 4)
    assert (runs["n2"].processes_per_node, runs["n2"].world_size) == (4, 8)


def test_the_nodes_that_did_not_join_are_named():
    seats = [GangSeat("g", m, 3, "10.0.0.1", 29500, f"{m}" * 40, f"host{m}") for m in range(3)]
    assert gang.missing_nodes(seats, {0, 1, 2}) == []
    assert [s.machine_rank for s in gang.missing_nodes(seats, {0})] == [1, 2]
    said = gang.rendezvous_error(seats, {0, 1}, 60)
    assert said.startswith(
        "rendezvous at 10.0.0.1:29500 did not complete in 60 s: node 2 (host2, Ray node 222222222222)"
    )
    assert "did not join (1 of 3 node(s)" in said and "\n" not in said and "host1" not in said
    assert "GLOO_SOCKET_IFNAME" in gang.rendezvous_error(seats, {0, 1, 2}, 60)  # all came, none met
    slurm_seat = GangSeat("g", 1, 2, "c1", 29500, "c2", "c2")
    assert "node 1 (c2, node id c2) did not join" in gang.rendezvous_error([seats[0], slurm_seat], {0}, 60)


def test_a_gang_needs_as_many_nodes_as_it_spans():
    nodes = [{"NodeID": str(i), "Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}} for i in range(3)]
    nodes.append({"NodeID": "3", "Alive": True, "Resources": {"CPU": 8.0}})  # no GPU: cannot hold a bundle
    spec = sweeps.parse_spec({"name": "g", "base": {**TINY, "num_nodes": 4}, "resources": {"gpus_per_run": 1}})
    plan = sweeps.place_runs(sweeps.expand(spec), spec)[0]
    with pytest.raises(TunefleetError, match=r"spans 4 nodes of 1 CPU, 1 GPU each, but the Ray cluster has 3 such"):
        gang.check_gang_fits(plan, nodes)
    gang.check_gang_fits(plan, [*nodes, {"NodeID": "4", "Alive": True, "Resources": {"CPU": 1.0, "GPU": 2.0}}])


def test_the_nodes_of_a_gang_in_one_record_and_one_line():
    ranks = [
        {"rank": r, "local_rank": r % 2, "machine_rank": r // 2, "host": f"h{r // 2}", "node_id": f"n{r // 2}"}
        for r in (3, 0, 2, 1)
    ]
    nodes = world.nodes_of(ranks)
    assert nodes == [
        {"machine_rank": 0, "host": "h0", "node_id": "n0", "ranks": [0, 1]},
        {"machine_rank": 1, "host": "h1", "node_id": "n1", "ranks": [2, 3]},
    ]
    assert nodes_text(nodes) == "h0 (ranks 0-1), h1 (ranks 2-3)"


def test_num_nodes_on_this_machine_is_one_line(tmp_path, capsys, tiny_model):
    spec = tmp_path / "s.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "g", "runs_dir": str(tmp_path / "runs"), "base": {**TINY, "num_nodes": 2}})
    )
    code, out, err = run_cli(capsys, "sweep", spec)
    assert code == 2 and err.count("\n") == 1 and "use --backend ray" in err and "num_processes" in err
    assert not (tmp_path / "runs").exists()
    code, out, err = run_cli(
        capsys, "train", *[f"--{k}={v}" for k, v in TINY.items()], "--num_nodes", "2", "--output_dir", tmp_path / "r"
    )
    assert code == 2 and err.count("\n") == 1 and "tunefleet sweep SPEC --backend ray" in err


# ------------------------------------------------------------------ on a local Ray of three raylets
@pytest.fixture(scope="module")
def cluster():
    nodes = LocalRayCluster(nodes=3, num_cpus=2, num_gpus=0, own_processes=True).start()
    try:
        yield nodes
    finally:
        nodes.stop()
    assert not pids_under(nodes.temp_dir)


def losses(run: Path) -> list[float]:
    return [e["loss"] for e in read_json(run / "trainer_state.json")["log_history"] if "loss" in e]


def one_node_losses(tmp_path: Path, settings: dict) -> list[float]:
    """The same run as two processes on this one machine: `tunefleet train --num_processes 2`."""
    out = tmp_path / "one_node"
    flags = [f"--{k}={v}" for k, v in settings.items()]
    done = tunefleet("train", *flags, "--num_processes", "2", "--output_dir", out, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return losses(out)


def gang_processes(run: Path) -> list[int]:
    """Processes started for a run (their command line names its folder): launchers and cold ranks."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(run).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
@pytest.mark.ray
def test_a_two_node_run_has_the_losses_of_one_node_while_small_runs_fill_the_third(cluster, tmp_path, tiny_model):
    runs_dir = tmp_path / "runs"
    settings = {**TINY, "use_qlora": False, "max_steps": 12}
    spec = {
        "name": "gang",
        "runs_dir": str(runs_dir),
        "base": settings,
        "stages": {  # num_nodes per stage: a two-node run beside a longer one-node run
            "big": {"base": {"num_nodes": 2}, "naming": "big_s{seed}"},
            "small": {"base": {"max_steps": 1200}, "naming": "small_s{seed}"},  # outlasts the gang's cold start
        },
        "resources": {"cpus_per_run": 2},  # a whole raylet per node of a run: two runs cannot share one
    }
    done = cluster.sweep(spec, tmp_path / "s.yaml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    gangs, singles = ["big_s1"], ["small_s1"]
    spans = {}
    for name in gangs + singles:
        record = read_json(runs_dir / name / "run.json")
        assert record["status"] == "finished" and record["global_step"] == (12 if name in gangs else 1200)
        # from its processes' launch (a gang's nodes are reserved before: its launch starts cold there) to its end
        started = read_json(runs_dir / name / "launch.json")["started_at"]
        spans[name] = (started, record["ended_at"], {n["node_id"] for n in record.get("nodes", [])})
        if name in gangs:
            assert record["world_size"] == 2 and record["num_nodes"] == 2 and record["launch"]["num_nodes"] == 2
            assert [n["ranks"] for n in record["nodes"]] == [[0], [1]] and len(spans[name][2]) == 2
            assert read_json(runs_dir / name / "gang.json")["nodes"] == record["nodes"]
            assert (runs_dir / name / "train.node1.log").exists()
            assert "--machine_rank 1" in (runs_dir / name / "train.node1.log").read_text()
        else:
            spans[name] = (*spans[name][:2], {read_json(runs_dir / name / "run.json")["node_id"]})
    # while a gang trains on two raylets, one-node runs train on the third
    overlapping = [
        (g, s) for g in gangs for s in singles if max(spans[g][0], spans[s][0]) < min(spans[g][1], spans[s][1])
    ]
    assert overlapping, (spans, done.stdout[-1500:], done.stderr[-1500:])
    for g, s in overlapping:
        assert not spans[g][2] & spans[s][2], spans
    # the same seed and effective batch on one node: the same losses
    two_nodes, one_node = losses(runs_dir / "big_s1"), one_node_losses(tmp_path, settings)
    batch = read_json(tmp_path / "one_node" / "run.json")["effective_batch_size"]
    assert read_json(runs_dir / "big_s1" / "run.json")["effective_batch_size"] == batch
    assert len(two_nodes) == 12 and max(abs(a - b) for a, b in zip(two_nodes, one_node, strict=True)) < 1e-5
    # one run with its nodes: the sweep's table, sweep.json and `tunefleet status`
    assert "nodes big_s1: node" in done.stdout and "(rank 0)" in done.stdout
    entry = read_json(runs_dir / "sweep.json")["runs"]["big_s1"]
    assert [n["machine_rank"] for n in entry["nodes"]] == [0, 1] and entry["attempts"][0]["gang"]["id"]
    status = tunefleet("status", runs_dir)
    assert status.stdout.count("2 nodes: node") == 1
    assert not any(gang_processes(runs_dir / name) for name in gangs)


@pytest.mark.slow
@pytest.mark.ray
def test_zero3_full_fine_tuning_over_two_nodes(cluster, tmp_path, tiny_model):
    runs_dir = tmp_path / "runs"
    settings = {**TINY, "finetune": "full", "accelerate_config": "zero3", "max_steps": 3}
    spec = {
        "name": "z3",
        "runs_dir": str(runs_dir),
        "base": {**settings, "num_nodes": 2},
        "resources": {"cpus_per_run": 1},
    }
    done = cluster.sweep(spec, tmp_path / "s.yaml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = runs_dir / "sft_tiny-qwen2_s1"
    record = read_json(run / "run.json")
    assert record["launch"]["accelerate_config"] == "zero3" and "DEEPSPEED" in record["distributed_type"]
    assert len({n["node_id"] for n in record["nodes"]}) == 2 and (run / "model.safetensors").exists()
    assert max(abs(a - b) for a, b in zip(losses(run), one_node_losses(tmp_path, settings), strict=True)) < 1e-5


@pytest.mark.slow
@pytest.mark.ray
def test_refusals_before_anything_trains(cluster, tmp_path, tiny_model):
    runs_dir = tmp_path / "runs"
    spec = {"name": "big", "runs_dir": str(runs_dir), "base": {**TINY, "num_nodes": 4, "max_steps": 2}}
    started = time.time()
    done = cluster.sweep(spec, tmp_path / "s.yaml", "--skip_data_check")
    assert done.returncode == 2 and time.time() - started < 60
    said = done.stderr.strip().splitlines()
    assert said == [
        "error: run sft_tiny-qwen2_s1 spans 4 nodes of 1 CPU each, but the Ray cluster has 3 such node(s) (of 3 "
        "alive): lower num_nodes or add nodes"
    ], done.stderr
    assert not (runs_dir / "sft_tiny-qwen2_s1").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_a_runs_dir_one_node_cannot_see_is_refused(tmp_path, tiny_model):
    if not can_hide_folders():
        pytest.skip("this machine does not let a process mount a folder in a namespace of its own")
    shared = tmp_path / "shared"
    shared.mkdir()
    nodes = LocalRayCluster(nodes=2, num_cpus=1, num_gpus=0, hidden={1: str(shared)}).start()
    try:
        spec = {"name": "hid", "runs_dir": str(shared / "runs"), "base": {**TINY, "num_nodes": 2, "max_steps": 2}}
        done = nodes.sweep(spec, tmp_path / "s.yaml", "--skip_data_check")
    finally:
        nodes.stop()
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: the plan cannot run on Ray node " in lines[0], done.stderr
    assert "(name node1, host " in lines[0] and "node0" not in lines[0]  # the one node that cannot see it
    assert f"runs_dir {shared / 'runs'} is not the folder the sweep's driver wrote" in lines[0]
    assert "every node mounts" in lines[0]
    assert not (shared / "runs" / "sft_tiny-qwen2_s1").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_a_node_that_never_joins_ends_the_gang_in_one_line(cluster, tmp_path, tiny_model):
    runs_dir = tmp_path / "runs"
    run = runs_dir / "sft_tiny-qwen2_s1"
    spec = {
        "name": "late",
        "runs_dir": str(runs_dir),
        "base": {**TINY, "use_qlora": False, "num_nodes": 2, "max_steps": 2, "rendezvous_timeout": 40},
    }
    proc = cluster.sweep(spec, tmp_path / "s.yaml", "--retries", "0", "--skip_data_check", wait=False)
    frozen: list[int] = []
    deadline = time.time() + 120
    while not frozen and time.time() < deadline:  # node 1 hangs as its launcher starts (before the head is up)
        for pid in gang_processes(run):
            with contextlib.suppress(OSError, ValueError, IndexError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"accelerate.commands.launch" in b" ".join(cmd) and cmd[cmd.index(b"--machine_rank") + 1] == b"1":
                    worker = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                    for hung in (worker, pid):  # node 1's Ray worker (its launch, its probe of the head) and launcher
                        os.kill(hung, signal.SIGSTOP)
                        frozen.append(hung)
        time.sleep(0.02)
    assert frozen, "node 1's launcher never started"
    try:
        out = proc.output(timeout=300)
    finally:
        for hung in frozen:
            with contextlib.suppress(ProcessLookupError):  # (unless it was killed outright)
                os.kill(hung, signal.SIGCONT)  # told to end meanwhile (its Ray worker is gone), it now can
    assert proc.returncode == 1, out[-3000:]
    failed = [line for line in out.splitlines() if line.startswith("failed sft_tiny-qwen2_s1:")]
    assert len(failed) == 1 and "rendezvous at" in failed[0] and "did not complete in 40 s" in failed[0], out[-3000:]
    assert "node 1 (node" in failed[0] and "did not join (1 of 2 node(s)" in failed[0]
    assert "node 0 (" not in failed[0]  # rank 0's node came
    deadline = time.time() + 60
    while gang_processes(run) and time.time() < deadline:
        time.sleep(0.5)
    assert not gang_processes(run), "a process of the gang was left"
    assert not (run / "gang").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_a_raylet_lost_mid_run_restarts_the_gang_from_its_checkpoint(cluster, tmp_path, tiny_model):
    """Last in this module: the cluster keeps two raylets after it."""
    runs_dir = tmp_path / "runs"
    run = runs_dir / "sft_tiny-qwen2_s1"
    spec = {
        "name": "lost",
        "runs_dir": str(runs_dir),
        "base": {**TINY, "use_qlora": False, "num_nodes": 2, "max_steps": 500, "save_steps": 10},
        "resources": {"cpus_per_run": 1},
    }
    proc = cluster.sweep(spec, tmp_path / "s.yaml", "--retries", "1", wait=False)
    met = None
    deadline = time.time() + 240
    while time.time() < deadline and not (met and checkpoint_steps(run)):
        met = json.loads((run / "gang.json").read_text()) if (run / "gang.json").exists() else None
        time.sleep(0.3)
    assert met and checkpoint_steps(run), "the gang never met and checkpointed"
    before = set(gang_processes(run))
    # a machine of the gang gone (its raylet and every process under it); not node0, whose raylet is the one this
    # sweep's driver is attached to (losing it is losing the driver's machine)
    lost = next(n for n in met["nodes"] if n["host"] != "node0")
    victim = lost["node_id"]
    cluster.lose_node(victim)
    out = proc.output(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    record = read_json(run / "run.json")
    assert record["status"] == "finished" and record["global_step"] == 500
    assert record["resumed_from"] and "resuming from" in (run / "train.log").read_text()
    again = {n["node_id"] for n in record["nodes"]}
    assert len(again) == 2 and victim not in again
    assert read_json(run / "gang.json")["id"] != met["id"]
    assert f"retry 1/1: node {lost['machine_rank']} ({lost['host']}, Ray node {victim[:12]}) lost" in out
    state = read_json(runs_dir / "sweep.json")
    assert [n["node_id"] for n in state["lost_nodes"]] == [victim]
    assert len(state["runs"]["sft_tiny-qwen2_s1"]["attempts"]) == 2
    deadline = time.time() + 60  # the first gang's launchers stop their ranks (torch elastic: SIGTERM, then KILL)
    while gang_processes(run) and time.time() < deadline:
        time.sleep(0.5)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:300] for pid in before & set(gang_processes(run))}
    assert not left, f"a process of the first gang was left: {left}"
    assert not gang_processes(run)


def test_the_readmes_multi_node_spec_expands_as_it_says():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = text.split("# big.yaml\n", 1)[1].split("```", 1)[0]
    spec = sweeps.parse_spec(yaml.safe_load(block))
    runs = {r.name: r.config for r in sweeps.expand(spec)}
    gangs = [c for c in runs.values() if c.num_nodes == 2]
    assert len(runs) == 4 and len(gangs) == 1
    assert (gangs[0].processes_per_node, gangs[0].world_size) == (8, 16)  # "2 nodes x 8 GPUs: 16 ranks"
    assert all(c.num_processes == 8 for c in runs.values() if c.num_nodes == 1)


def test_a_dry_run_shows_the_gang(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    base = {**TINY, "num_nodes": 2, "finetune": "full", "accelerate_config": "zero3"}
    spec.write_text(yaml.safe_dump({"name": "g", "runs_dir": str(tmp_path / "runs"), "base": base}))
    code, out, err = run_cli(capsys, "sweep", spec, "--backend", "ray", "--dry-run")
    assert code == 0, out + err
    assert "on each of 2 nodes, reserved together; 1 process(es) a node, world 2" in out
    assert "--num_machines 2 --machine_rank <I> --main_process_ip <rank 0's node>" in out
    assert "--main_process_port <port>" in out and not (tmp_path / "runs").exists()
