"""Ray across nodes, for real on this machine: a head and a second raylet (each with 2 CPUs and 1 fake GPU).

Runs pack two to a GPU and spread over both nodes, the evaluator's shards run on both, and a node lost while a
run trains on it costs nothing: Ray re-runs the run on the other node, which resumes from its checkpoint in the
shared runs_dir. Also: what the local Ray listens on, and that a client without the cluster's token is refused.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_ray import LocalRayCluster, pids_under
from testkit import checkpoint_steps, pids_in_tree, read_json

from tunefleet.common.jsonfile import read_json as maybe_json
from tunefleet.common.storage import Store
from tunefleet.trainers import recovery
from tunefleet.trainers.config import from_dict

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY = {
    "model_name": "tunefleet/tiny-qwen2",
    "dataset": "tunefleet/tiny-ultrafeedback",
    "method": "sft",
    "split": "train_sft",
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "use_qlora": False,
    "logging_steps": 1,
}


@pytest.fixture(scope="module")
def cluster():
    nodes = LocalRayCluster(nodes=2, num_cpus=2, num_gpus=1).start()
    try:
        yield nodes
    finally:
        nodes.stop()
    assert not pids_under(nodes.temp_dir)


def node_ids(cluster) -> dict[str, str]:
    """Node name -> node id, from the head's own record of its nodes."""
    code = "import ray, json; ray.init(address='%s', logging_level='ERROR'); print(json.dumps({n['NodeName']: n['NodeID'] for n in ray.nodes() if n['Alive']}))"  # noqa: E501
    out = subprocess.run(
        [sys.executable, "-c", code % cluster.address],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
        check=True,
    )
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def test_packed_runs_spread_over_both_nodes_and_the_evaluator_too(cluster, tmp_path, tiny_model):
    runs_dir = tmp_path / "runs"
    spec = {
        "name": "pack",
        "runs_dir": str(runs_dir),
        "base": {**TINY, "max_steps": 200},  # long enough that all four overlap, warm or cold
        "grid": {"seed": [1, 2, 3, 4]},
        "resources": {"gpus_per_run": 0.5, "cpus_per_run": 1, "strategy": "spread"},
        "eval": {
            "backend": "ray",
            "shards": 2,
            "max_samples": 10,
            "max_generation_samples": 1,
            "skip_perplexity": True,
        },
    }
    done = cluster.sweep(spec, tmp_path / "s.yaml", "--eval")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    nodes = set(node_ids(cluster).values())
    on_node = {}  # node id -> (started, ended) of its runs
    for seed in (1, 2, 3, 4):
        run = runs_dir / f"sft_tiny-qwen2_s{seed}"
        launch, record = read_json(run / "launch.json"), read_json(run / "run.json")
        assert record["status"] == "finished" and record["placement"]["gpus"] == 0.5
        assert launch["cuda_visible_devices"] == "0"  # each node's one (fake) GPU, set by Ray
        assert launch["node_id"] in nodes and record["node_id"] == launch["node_id"]
        on_node.setdefault(launch["node_id"], []).append((launch["started_at"], record["ended_at"]))
    assert sorted(len(runs) for runs in on_node.values()) == [2, 2]  # two runs on each node's GPU
    for runs in on_node.values():  # ... at the same time (the nodes' Ray workers may start seconds apart)
        assert max(start for start, _ in runs) < min(end for _, end in runs), on_node
    state = read_json(runs_dir / "sweep.json")
    assert {r["node_id"] for r in state["runs"].values()} == nodes and state["lost_nodes"] == []
    results = read_json(runs_dir / "evaluation_results.json")
    assert set().union(*(e["eval_nodes"] for e in results.values())) == nodes  # shards scored on both nodes
    assert "finished 4" in done.stdout and "final loss" in done.stdout

    again = cluster.sweep(spec, tmp_path / "s.yaml")  # a rerun skips what finished
    assert again.returncode == 0 and again.stdout.count("skipped: finished before") == 4


def test_a_search_packs_its_trials_on_gpu_shares_of_both_nodes(cluster, tmp_path, tiny_model):
    runs_dir = tmp_path / "runs"
    base = {**TINY, "max_steps": 60, "eval_split": "test_sft", "max_eval_samples": 8, "eval_steps": 30}
    spec = {
        "name": "spread-search",
        "runs_dir": str(runs_dir),
        "base": base,
        "resources": {"gpus_per_run": 0.5, "cpus_per_run": 1},
        "search": {
            "scheduler": "fifo",
            "num_samples": 4,
            "space": {"sft": {"learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}}},
        },
    }
    done = cluster.sweep(spec, tmp_path / "s.yaml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = read_json(runs_dir / "search.json")["methods"]["sft"]["trials"]
    used: dict[str, int] = {}
    for trial in trials:
        launch, record = (
            read_json(Path(trial["output_dir"]) / "launch.json"),
            read_json(Path(trial["output_dir"]) / "run.json"),
        )
        assert record["status"] == "finished" and record["placement"]["gpus"] == 0.5
        assert launch["cuda_visible_devices"] == "0"  # the trial's share of its node's one (fake) GPU
        used[launch["node_id"]] = used.get(launch["node_id"], 0) + 1
    assert set(used) == set(node_ids(cluster).values()) and sorted(used.values()) == [2, 2]


def test_a_packed_run_out_of_memory_goes_again_alone(cluster, tmp_path, tiny_model):
    runs_dir = tmp_path / "runs"
    base = {
        **TINY,
        "method": "grpo",
        "split": "train_gen",
        "max_steps": 2,
        "num_generations": 2,
        "max_completion_length": 4,
        "reward_funcs": ["oom_when_shared:reward"],
    }
    spec = {"name": "oom", "runs_dir": str(runs_dir), "base": base, "resources": {"gpus_per_run": 0.5}}
    done = cluster.sweep(spec, tmp_path / "s.yaml", "--retries", "0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "out of memory: again with a whole GPU" in done.stdout
    run = runs_dir / "grpo_tiny-qwen2_s42"
    record = read_json(run / "run.json")
    assert record["status"] == "finished" and record["attempts"] == 2
    assert record["placement"]["gpus"] == 1.0 and "ran out of memory sharing a GPU" in record["placement"]["reason"]
    assert len(read_json(run / "launch.json")["attempts"]) == 2


def test_a_lost_node_costs_nothing(cluster, tmp_path, tiny_model):
    runs_dir = tmp_path / "runs"
    spec = {
        "name": "loss",
        "runs_dir": str(runs_dir),
        "base": {**TINY, "max_steps": 300, "save_steps": 10},
        "grid": {"seed": [1, 2]},
        "resources": {"gpus_per_run": 0.5, "cpus_per_run": 1, "strategy": "spread"},
    }
    names = node_ids(cluster)
    second = names["node1"]
    proc = cluster.sweep(spec, tmp_path / "s.yaml", "--retries", "0", wait=False)
    victim = None
    deadline = time.time() + 240
    while time.time() < deadline and victim is None:  # the run training on the second node, once it checkpointed
        for seed in (1, 2):
            run = runs_dir / f"sft_tiny-qwen2_s{seed}"
            if (maybe_json(run / "launch.json") or {}).get("node_id") == second and checkpoint_steps(run):
                victim = run
        time.sleep(0.3)
    assert victim is not None, "no run checkpointed on the second node"
    # This attempt had stepped down for memory (batch 4 x 1 -> checkpointing -> 2 x 2), as its own recovery records
    # it: the retry on the other node must go on with 2 x 2.
    asked = from_dict({**TINY, "output_dir": str(victim)})
    smaller = recovery.step_down(recovery.step_down(asked, False), True)
    recovery.record_step(Store(str(victim)), 1, "CUDA out of memory. Tried to allocate 2.00 GiB", smaller)
    cluster.kill_node(second)
    out = proc.output(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    record, launch = read_json(victim / "run.json"), read_json(victim / "launch.json")
    assert record["status"] == "finished" and record["global_step"] == 300
    assert [a["node_id"] for a in launch["attempts"]][0] == second and launch["node_id"] != second
    assert record["resumed_from"] and "resuming from" in (victim / "train.log").read_text()
    assert len(record["memory_steps"]) == 1 and record["effective_batch_size"] == 4
    assert (record["config"]["per_device_train_batch_size"], record["config"]["gradient_accumulation_steps"]) == (2, 2)
    assert "keeping the memory step-down of an earlier attempt" in (victim / "train.log").read_text()
    state = read_json(runs_dir / "sweep.json")
    assert [n["node_id"] for n in state["lost_nodes"]] == [second]
    attempts = state["runs"][victim.name]["attempts"]
    assert len(attempts) == 2 and attempts[0]["node_id"] == second != attempts[1]["node_id"]
    assert re.search(r"node \w+ \([\d.]+\) lost", out)


# ------------------------------------------------------------------ what the local Ray listens on
def sockets_of(pids: set[int]) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(listening (address, port), established (local, remote) addresses) of these processes (Linux /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    listening, established = [], []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] not in inodes:
                continue
            local, remote = (_address(c, family) for c in cols[1:3])
            if cols[3] == "0A":
                listening.append(local)
            elif cols[3] == "01":
                established.append((local[0], remote[0]))
    return listening, established


def _address(hex_addr: str, family) -> tuple[str, int]:
    ip, port = hex_addr.split(":")
    raw = bytes.fromhex(ip)
    if family == socket.AF_INET:
        raw = raw[::-1]
    else:  # four little-endian 32-bit words
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(family, raw).removeprefix("::ffff:"), int(port, 16)  # IPv4 as itself


def test_local_ray_is_guarded_by_its_token(tmp_path):
    """The Ray a sweep starts: every connection stays on this host, the open ports need the token, the dashboard
    does not run."""
    script = (
        "import ray, sys, time\n"
        "from tunefleet.common.raycluster import ensure_ray\n"
        "ensure_ray(num_cpus=1)\n"
        "print(ray.get_runtime_context().gcs_address, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        gcs = proc.stdout.readline().strip()
        assert gcs, "the local Ray did not start"
        port = int(gcs.rsplit(":", 1)[1])
        tree = pids_in_tree(proc.pid)
        listening, established = sockets_of(tree)
        own = {"127.0.0.1", "::1", gcs.rsplit(":", 1)[0]}  # loopback and this host's own address
        assert established and all(remote in own for _, remote in established), established  # no other host
        assert ("0.0.0.0", port) in listening or ("::", port) in listening  # GCS: all interfaces, so ...
        refused = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR')"],
            capture_output=True,
            text=True,
            timeout=120,
            env={
                **os.environ,
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": "0" * 64,
                "RAY_gcs_server_port_wait_time_s": "3",
            },  # give up after a few refusals
        )
        assert refused.returncode != 0 and "InvalidAuthToken" in refused.stderr  # ... the token guards it
        assert not any("dashboard.py" in _cmdline(p) and "--disable-frontend" not in _cmdline(p) for p in tree)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
