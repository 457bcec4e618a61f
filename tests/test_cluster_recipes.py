"""The shipped Ray cluster recipes as a user runs them, and the plan check that stops a sweep before it trains when
a node lacks what the evaluation or the store needs.

For each config in cluster_configs/ray/: its `setup_commands` (and the head's) run as written in a fresh virtual
environment holding a copy of the checkout as ~/tunefleet; a Ray head starts from that environment (with the
config's token auth; `ray stop` and the autoscaler's bootstrap file, which only `ray up` makes, left out); then the
header's `ray job submit ... sweep sweeps/cluster_check.yaml --backend ray --eval` runs as written, from the
checkout, with only the bucket (a local S3 or GCS server) and the dashboard's port swapped. Training, the
evaluation with the sweep's reward model and the tiny_world benchmark, and every output land in the bucket.

The on-prem header's own recipe runs whole over SSH: `ray get-auth-token --generate`, `ray up`, `ray submit` of the
cluster check and `ray down`, as written, against a second host on this machine (tests/local_ssh.py: an SSH server on
loopback whose sessions have a PID namespace and a home of their own), with only the config's SSH user and key and
the bucket swapped. Where no such host can start (not root, no sshd) that test is skipped with its reason.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from cluster_venv import make_venv, set_up_node, shared_packages
from local_gcs import LocalGCS
from local_ray import LocalRayHead, pids_under
from local_s3 import LocalS3
from local_ssh import LocalSSHHost
from test_cluster_configs import commands
from testkit import ROOT

from tunefleet.common.errors import TunefleetError

pytestmark = pytest.mark.slow

CONFIGS = ROOT / "cluster_configs" / "ray"
CHECK_SPEC = "sweeps/cluster_check.yaml"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return shared_packages(tmp_path_factory.mktemp("shared") / "packages")


def config_setup(name: str) -> list[str]:
    """The commands `ray up` runs on the head of `name`: setup_commands, then head_setup_commands."""
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    return [*raw.get("setup_commands", []), *raw.get("head_setup_commands", [])]


def recipe(name: str) -> list[str]:
    """The header's `ray job submit` command for the cluster check, as written."""
    (job,) = [c for c in commands(CONFIGS / f"{name}.yaml", "ray job submit") if CHECK_SPEC in c]
    return shlex.split(job)


def head_ip() -> str:
    """The address Ray gives a node started on this host (it advertises the host's, not loopback)."""
    from ray.util import get_node_ip_address

    return get_node_ip_address()


def start_head(node, **env: str) -> LocalRayHead:
    """A Ray head from the node's venv with the config's token auth (the token made as the header's first step)."""
    node.run("ray get-auth-token --generate")
    return LocalRayHead(num_cpus=2, ray=str(node.bin / "ray"), env=node.env(RAY_AUTH_MODE="token", **env)).start()


@pytest.mark.ray
@pytest.mark.parametrize("name", ["aws", "gcp"])  # onprem: its own recipe, ray up over SSH, below
def test_a_config_setup_runs_its_readme_recipe_end_to_end(name, shared, tmp_path, monkeypatch):
    store = (LocalGCS() if name == "gcp" else LocalS3()).start()
    head = None
    try:
        bucket = store.make_bucket(f"tf-{name}")
        node = set_up_node(tmp_path, config_setup(name), shared)
        head = start_head(node, **store.env)
        argv = [
            arg.replace("http://127.0.0.1:8265", head.dashboard).replace(
                f"{'gs' if name == 'gcp' else 's3'}://YOUR-BUCKET", bucket
            )
            for arg in recipe(name)
        ]
        runs_dir = argv[argv.index("--runs_dir") + 1]
        assert runs_dir == f"{bucket}/cluster_check"
        started = time.time()
        while True:
            proc = subprocess.run(
                argv,
                cwd=node.checkout,  # "Run every command from the tunefleet repository root"
                env=node.env(RAY_AUTH_MODE="token", **store.env),
                capture_output=True,
                text=True,
                timeout=900,
            )
            out = proc.stdout + proc.stderr
            # a head just started may not have its job agent yet: Ray submits nothing and says to try again
            if "No available agent to submit job" not in out or time.time() - started > 120:
                break
            time.sleep(2)
        assert proc.returncode == 0 and "succeeded" in out, out[-5000:]
        print(f"{name}: the recipe took {time.time() - started:.0f} s")
        read_bucket_outputs(store, runs_dir, monkeypatch, out)
    finally:
        if head is not None:
            head.stop()
            assert not pids_under(head.temp_dir)
        store.stop()


def read_bucket_outputs(store, runs_dir: str, monkeypatch, said: str) -> None:
    """The cluster check's outputs in the bucket: both runs finished, the evaluation with the sweep's reward model
    and the benchmark, the report."""
    from tunefleet.common.storage import Store

    for key, value in store.env.items():
        monkeypatch.setenv(key, value)
    if isinstance(store, LocalS3):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # its cached client may point at an earlier test's server
    results = Store(runs_dir).read_json("evaluation_results.json")
    assert results, said[-3000:]
    sft = results["sft_tiny-qwen2_s1"]
    assert sft["rm_score"] is not None and sft["rm_win_rate_vs_base"] is not None  # the sweep's reward model
    assert sft["benchmarks"]["tiny_world"]["acc"] is not None  # lm-eval on the node
    state = Store(runs_dir).read_json("sweep.json")
    assert {r["status"] for r in state["runs"].values()} == {"finished"}
    for run in ("sft_tiny-qwen2_s1", "rm_tiny-qwen2_s1"):
        assert Store(f"{runs_dir}/{run}").exists("adapter_config.json")
    assert Store(runs_dir).exists("evaluation_report.md")


@pytest.mark.ray
def test_the_onprem_recipe_ray_up_ray_submit_ray_down_over_ssh(shared, tmp_path, monkeypatch):
    """onprem.yaml's header, command by command, from the checkout: the token, `ray up` (rsync of the checkout to
    ~/tunefleet, the setup commands, `ray stop` and the head's `ray start`, all over SSH), `ray submit` of the cluster
    check (the driver on the head, training, evaluation, outputs in the bucket), `ray down`. The host is a fresh
    venv on its login PATH (as the header asks: python3 on the login PATH) with the store's variables, as a
    machine's own settings give them; what the setup installs is the config's business."""
    unavailable = LocalSSHHost.unavailable()
    if unavailable:
        pytest.skip(f"the on-prem recipe needs an SSH host on loopback: {unavailable}")
    store = LocalS3().start()
    # Ray's files (sockets, the local provider's cluster state) in folders of their own, not a shared /tmp/ray
    ray_tmp = {side: tempfile.mkdtemp(prefix=f"tf{side}", dir="/tmp") for side in ("host", "here")}
    host = LocalSSHHost(tmp_path / "host", user_env={**store.env, "RAY_TMPDIR": ray_tmp["host"]})
    venv = make_venv(tmp_path / "host-venv", shared)
    host.home.mkdir(parents=True)
    (host.home / ".bashrc").write_text(f"source {venv}/bin/activate\n")
    config = tmp_path / "onprem.yaml"  # the shipped config, with only the SSH user and key changed
    raw = (CONFIGS / "onprem.yaml").read_text()
    raw = raw.replace("ssh_user: ubuntu", "ssh_user: root").replace("~/.ssh/id_ed25519", str(host.key))
    config.write_text(raw)
    here = tmp_path / "here"  # this side's home: the token the header makes first, ray's own client files
    here.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "TUNEFLEET_"))}
    env.update(HOME=str(here), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    env.update(RAY_TMPDIR=ray_tmp["here"], TMPDIR=ray_tmp["here"])  # `ray up`'s cached config goes there too
    bucket = store.make_bucket("tf-onprem")
    header = {c.split()[1]: c for c in commands(CONFIGS / "onprem.yaml", "ray ") if "five_methods" not in c}
    assert set(header) >= {"get-auth-token", "up", "submit", "down"}, header

    def run(command: str, timeout: float) -> str:
        argv = shlex.split(command.replace("cluster_configs/ray/onprem.yaml", str(config)))
        argv = [arg.replace("s3://YOUR-BUCKET", bucket) for arg in argv]
        if argv[1] in ("up", "down"):
            argv.insert(2, "--yes")  # the question `ray up` asks a person before it starts
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        said = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"`{command}` failed ({proc.returncode}):\n{said[-6000:]}"
        return said

    try:
        host.start()
        started = time.time()
        run(header["get-auth-token"], 60)
        assert (here / ".ray" / "auth_token").is_file()
        run(header["up"], 900)
        up = time.time() - started
        assert (host.home / "tunefleet" / "sweeps" / "cluster_check.yaml").is_file()  # the checkout, synced
        assert not (host.home / "tunefleet" / ".venv").exists()  # what .gitignore holds stays here
        assert (host.home / ".ray" / "auth_token").read_text() == (here / ".ray" / "auth_token").read_text()
        said = run(header["submit"], 900)
        submitted = time.time() - started - up
        runs_dir = f"{bucket}/cluster_check"
        read_bucket_outputs(store, runs_dir, monkeypatch, said)
        sessions = list(Path(ray_tmp["host"]).glob("ray/session_2*"))
        assert len(sessions) == 1, sessions  # the sweep ran on the Ray `ray up` started, not on one of its own
        assert any(b"raylet" in cmd for cmd in host.commands()), "the head's Ray runs on the host"
        run(header["down"], 300)
        # `ray down` stopped the head's Ray (its `ray stop` ran there): only the SSH server is left on the host
        left = host.commands()
        assert all(cmd.startswith(b"sshd") for cmd in left), left
        print(f"onprem: ray up {up:.0f} s, ray submit {submitted:.0f} s")
    finally:
        host.stop()
        store.stop()
        for folder in ray_tmp.values():
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.ray
def test_worker_nodes_without_lm_eval_refuse_the_evaluation_before_training(shared, tmp_path):
    """The story the extras fix: nodes set up by a plain `pip install -e ~/tunefleet` (no extras) and a driver that
    has everything. `--eval` with benchmark tasks is refused in one line naming the node and the extra, within
    seconds, and no run starts."""
    node = set_up_node(tmp_path, ["python -m pip install -q -e ~/tunefleet"], shared)
    head = start_head(node)
    try:
        runs_dir = tmp_path / "runs"
        started = time.time()
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "tunefleet"),
                "sweep",
                str(ROOT / CHECK_SPEC),
                "--backend",
                "ray",
                "--address",
                head.address,
                "--eval",
                "--runs_dir",
                str(runs_dir),
            ],
            env={**node.env(RAY_AUTH_MODE="token"), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        took = time.time() - started
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        said = "\n".join(lines)
        assert "Traceback" not in said
        assert f"error: the plan cannot run on Ray node {head_ip()} (host {socket.gethostname()}): " in said, said
        assert "eval.tasks (tiny_world)" in said and "pip install 'tunefleet[bench]'" in said, said
        assert not runs_dir.exists() or not any(runs_dir.iterdir())  # nothing trained, nothing written
        assert took < 120, took
        print(f"refused in {took:.1f} s:\n{said}")
    finally:
        head.stop()


def test_a_sweep_without_lm_eval_here_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """Locally (no cluster): lm-eval missing from the driver's Python is one line within seconds, no run folder."""
    from tunefleet.launcher.sweep_cli import cmd_sweep

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    started = time.time()
    with pytest.raises(TunefleetError) as refused:
        cmd_sweep([str(ROOT / CHECK_SPEC), "--eval", "--runs_dir", str(tmp_path / "runs")])
    assert str(refused.value).startswith("the plan cannot run on this machine")
    assert "pip install 'tunefleet[bench]'" in str(refused.value) and "\n" not in str(refused.value)
    assert time.time() - started < 30
    assert not (tmp_path / "runs").exists()


def test_check_spec_is_small_and_evaluates_with_its_own_reward_model():
    """The cluster check must stay a minute's job on CPU and cover what the issue's recipe missed: the reward model
    the sweep trains, a benchmark task, the store."""
    from tunefleet.launcher import sweep as sweeps
    from tunefleet.launcher.plan_check import plan_needs

    spec = sweeps.load_spec(str(ROOT / CHECK_SPEC))
    runs = sweeps.expand(spec)
    assert sorted(r.method for r in runs) == ["rm", "sft"]
    assert all(r.config.max_steps <= 40 for r in runs)
    assert spec.eval.reward_model in {r.name for r in runs}
    spec.runs_dir = "s3://bucket/x"
    needs = plan_needs(spec, runs, evaluate=True)
    assert needs.tasks == ("tiny_world",) and needs.store == "s3" and needs.reward_models == ()
    assert json.loads(needs.to_json())["tasks"] == ["tiny_world"]
