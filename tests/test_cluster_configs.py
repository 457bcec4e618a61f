"""Every file under cluster_configs/ is loaded and validated by the tool that will read it: accelerate's own
config loader and launch-argument processing, DeepSpeed's config parser (after the HF Trainer's "auto" filling),
and Ray's cluster-YAML schema + prepare_config/validate_config. Files are globbed, so a new file is covered (or,
if it is of a kind nobody validates, the catalogue test fails). All offline, no process is launched.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import os
import re
import shlex
import shutil
import types
from pathlib import Path
from unittest import mock

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO  # where repo-relative paths inside the configs resolve (a tmp copy in the mutant tests)
CONFIGS = REPO / "cluster_configs"
README = CONFIGS / "README.md"


def _files(pattern: str) -> list[Path]:
    return sorted(p for p in CONFIGS.glob(pattern) if p.is_file())


ALL_FILES = sorted(p for p in CONFIGS.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
ACCELERATE = _files("accelerate/*.yaml") + _files("accelerate/*.yml")
DEEPSPEED = _files("deepspeed/*.json")
RAY = _files("ray/*.yaml") + _files("ray/*.yml")
SLURM = _files("slurm/*.sbatch")  # validated by tests/test_slurm.py (bash -n, Ray's SLURM steps)
PACKAGE_MARKER = CONFIGS / "__init__.py"  # makes the catalogue package data; holds a docstring only
VALIDATED = set(ACCELERATE) | set(DEEPSPEED) | set(RAY) | set(SLURM) | {README, PACKAGE_MARKER}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def ids(paths):
    return [rel(p) for p in paths]


# ---------------------------------------------------------------- shared helpers


def header(path: Path) -> list[str]:
    """The leading comment block of a YAML file, '#' stripped."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def commands(path: Path, prefix: str) -> list[str]:
    """Commands in the header that start with `prefix`, joined across trailing-backslash continuations."""
    found, lines = [], header(path)
    for i, line in enumerate(lines):
        if line.startswith(prefix):
            cmd = line
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1].rstrip() + " " + lines[i]
            found.append(cmd.split("  #")[0].strip())
    return found


def load_json_strict(path: Path) -> dict:
    """json.load that also refuses duplicate keys (as DeepSpeed's own file loader does)."""

    def no_dupes(pairs):
        keys = [k for k, _ in pairs]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"{rel(path)}: duplicate keys {dupes}")
        return dict(pairs)

    return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_dupes)


def test_configs_exist():
    names = {rel(p) for p in ALL_FILES}
    for expected in [
        "accelerate/single.yaml",
        "accelerate/ddp.yaml",
        "accelerate/zero2.yaml",
        "accelerate/zero3.yaml",
        "deepspeed/zero2.json",
        "deepspeed/zero3.json",
        "ray/aws.yaml",
        "ray/gcp.yaml",
        "ray/onprem.yaml",
        "slurm/ray_cluster.sbatch",
        "README.md",
    ]:
        assert f"cluster_configs/{expected}" in names


def test_every_file_is_validated_and_catalogued():
    """A file of a kind no test below validates is an error, and README.md lists every file (and only real ones)."""
    unvalidated = [rel(p) for p in ALL_FILES if p not in VALIDATED]
    assert not unvalidated, f"no validator for {unvalidated}: put it in a known folder or extend this test"
    readme = README.read_text(encoding="utf-8")
    missing = [rel(p) for p in ALL_FILES if p not in (README, PACKAGE_MARKER) and rel(p) not in readme]
    assert not missing, f"cluster_configs/README.md has no catalogue line for {missing}"
    stale = [
        m for m in set(re.findall(r"cluster_configs/[\w./-]+\.(?:yaml|yml|json)", readme)) if not (ROOT / m).is_file()
    ]
    assert not stale, f"cluster_configs/README.md names files that do not exist: {stale}"


@pytest.mark.parametrize("path", ACCELERATE + RAY, ids=ids(ACCELERATE + RAY))
def test_yaml_starts_with_a_usage_comment(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), f"{rel(path)} must start with a comment block showing the command that uses it"
    block = "\n".join(header(path))
    assert rel(path) in block or path.stem in block, f"{rel(path)}: the usage comment must name the file"
    assert isinstance(yaml.safe_load(text), dict)


# ---------------------------------------------------------------- accelerate

EXPECTED_TYPE = {"single": "NO", "ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
# accelerate refuses these in the YAML when a deepspeed_config_file is given (DeepSpeedPlugin._deepspeed_config_checks)
DS_FILE_CONFLICTS = {
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_stage",
    "offload_optimizer_device",
    "offload_param_device",
    "offload_param_nvme_path",
    "offload_optimizer_nvme_path",
    "zero3_save_16bit_model",
}


def launch_env(argv: list[str]):
    """Run accelerate's own launch-argument processing (no process started); returns (args, config, env)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(argv)
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        # what launch_command() does right before deepspeed_launcher()
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return args, defaults, {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


def validate_accelerate(path: Path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    cfg = load_config_from_file(str(path))  # accelerate's loader: unknown keys and bad enum values raise
    assert isinstance(cfg, ClusterConfig), f"{rel(path)}: expected a local-machine config"
    if path.stem in EXPECTED_TYPE:
        assert cfg.distributed_type == DistributedType(EXPECTED_TYPE[path.stem]), (
            f"{rel(path)}: distributed_type {cfg.distributed_type} != {EXPECTED_TYPE[path.stem]}"
        )

    ds = cfg.deepspeed_config
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        ds_file = ds.get("deepspeed_config_file")
        assert ds_file, f"{rel(path)}: a DeepSpeed config here points at a JSON in cluster_configs/deepspeed/"
        assert not os.path.isabs(ds_file) and ds_file.startswith("cluster_configs/deepspeed/"), (
            f"{rel(path)}: deepspeed_config_file must be repo-root relative (cluster_configs/deepspeed/...)"
        )
        assert (ROOT / ds_file).is_file(), f"{rel(path)}: {ds_file} does not exist"
        conflicts = sorted(DS_FILE_CONFLICTS & set(ds))
        assert not conflicts, f"{rel(path)}: accelerate refuses {conflicts} next to a deepspeed_config_file"
        assert cfg.mixed_precision is None, (
            f"{rel(path)}: mixed_precision next to a deepspeed_config_file is refused by accelerate; the JSON has it"
        )
        stage = load_json_strict(ROOT / ds_file)["zero_optimization"]["stage"]
        if stage == 3:
            assert ds.get("zero3_init_flag") is True, f"{rel(path)}: ZeRO-3 (QLoRA-ready) needs zero3_init_flag: true"
        m = re.fullmatch(r"zero(\d)", path.stem)
        if m:
            assert stage == int(m.group(1)), f"{rel(path)} points at a stage-{stage} JSON"
    else:
        assert not ds, f"{rel(path)}: deepspeed_config in a {cfg.distributed_type} config"

    # The documented command, through accelerate's real argument processing, from the repo root.
    launches = commands(path, "accelerate launch")
    assert launches, f"{rel(path)}: the usage comment must show an `accelerate launch --config_file ...` command"
    argv = shlex.split(launches[0])[2:]
    assert argv[argv.index("--config_file") + 1] == rel(path)
    with contextlib.chdir(ROOT):
        args, _, env = launch_env(argv)
        if "--num_processes" in argv:  # the command line wins over the file
            assert args.num_processes == int(argv[argv.index("--num_processes") + 1])
        assert args.use_deepspeed == (cfg.distributed_type == DistributedType.DEEPSPEED)
        assert args.multi_gpu == (cfg.distributed_type == DistributedType.MULTI_GPU)
        if args.use_deepspeed:
            # What each training process builds from that environment (the JSON opened relative to the cwd).
            with mock.patch.dict(os.environ, env):
                plugin = DeepSpeedPlugin()
            stage = plugin.hf_ds_config.get_value("zero_optimization.stage")
            assert plugin.zero_stage == stage
            assert plugin.zero3_init_flag == bool(ds.get("zero3_init_flag")) and plugin.hf_ds_config.is_zero3() == (
                stage == 3
            )

    # `tunefleet train --accelerate_config <stem>` resolves to this catalogue entry.
    from tunefleet.launcher.launch import accelerate_config_path

    assert Path(accelerate_config_path(path.stem)).resolve() == (REPO / rel(path)).resolve()
    assert f"--accelerate_config {path.stem}" in "\n".join(header(path))


@pytest.mark.parametrize("path", ACCELERATE, ids=ids(ACCELERATE))
def test_accelerate_config(path):
    validate_accelerate(path)


def test_multi_process_configs_need_num_processes_on_the_command_line():
    path = CONFIGS / "accelerate" / "ddp.yaml"
    with contextlib.chdir(ROOT), pytest.raises(ValueError, match="num_processes"):
        launch_env(["--config_file", rel(path), "-m", "tunefleet.trainers.train"])


# ---------------------------------------------------------------- DeepSpeed

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def find_auto(node, where=""):
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in find_auto(v, f"{where}.{k}" if where else k)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in find_auto(v, f"{where}[{i}]")]
    return [where] if node == "auto" else []


def hf_filled(config: dict, precision: str, world_size: int = 1) -> dict:
    """The config after the HF Trainer's "auto" filling (transformers' own code, with run-config-like values)."""
    import transformers.integrations.deepspeed as hf_ds

    saved = (
        hf_ds._hf_deepspeed_config_weak_ref
    )  # the constructor registers itself globally (is_deepspeed_zero3_enabled)
    try:
        return _hf_filled(hf_ds.HfTrainerDeepSpeedConfig(copy.deepcopy(config)), precision, world_size)
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _hf_filled(hf, precision: str, world_size: int) -> dict:
    args = types.SimpleNamespace(
        world_size=world_size,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        learning_rate=2e-4,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        save_on_each_node=False,
        fp16=precision == "fp16",
        fp16_full_eval=False,
        bf16=precision == "bf16",
        bf16_full_eval=False,
        get_warmup_steps=lambda steps: 0,
    )
    hf.trainer_config_process(args)
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=64))
    hf.trainer_config_finalize(args, model, num_training_steps=10)
    return hf.config


def validate_deepspeed(path: Path) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_json_strict(path)
    assert isinstance(cfg.get("_usage"), str) and cfg["_usage"].strip(), (
        f'{rel(path)}: put the command that uses it in a top-level "_usage" string'
    )
    users = [
        p
        for p in ACCELERATE
        if (yaml.safe_load(p.read_text()).get("deepspeed_config") or {}).get("deepspeed_config_file") == rel(path)
    ]
    assert users, f"{rel(path)}: no accelerate config in cluster_configs/accelerate points at it"
    assert any(f"--accelerate_config {u.stem}" in cfg["_usage"] for u in users), (
        f"{rel(path)}: _usage must show the tunefleet command (--accelerate_config <name of the YAML using it>)"
    )

    for key in (*BATCH_KEYS, "gradient_clipping"):
        assert cfg.get(key) == "auto", f'{rel(path)}: {key} must be "auto" (the HF Trainer fills it from the run)'
    assert cfg.get("bf16", {}).get("enabled") == "auto", f'{rel(path)}: bf16.enabled must be "auto"'
    assert cfg.get("fp16", {}).get("enabled") == "auto", f'{rel(path)}: fp16.enabled must be "auto"'
    for block in ("optimizer", "scheduler"):  # optional; if present, the run's values must flow in
        for key, value in cfg.get(block, {}).get("params", {}).items():
            if key in ("lr", "warmup_max_lr", "total_num_steps", "warmup_num_steps"):
                assert value == "auto", f'{rel(path)}: {block}.params.{key} must be "auto"'

    zero = cfg["zero_optimization"]
    stage = zero["stage"]
    m = re.fullmatch(r"zero(\d)", path.stem)
    if m:
        assert stage == int(m.group(1)), f"{rel(path)}: zero_optimization.stage is {stage}"
    assert zero.get("overlap_comm") is True and zero.get("contiguous_gradients") is True
    if stage == 3:
        assert zero.get("stage3_gather_16bit_weights_on_model_save") is True, (
            f"{rel(path)}: ZeRO-3 must gather 16-bit weights on save (else the saved model is empty shards)"
        )

    # DeepSpeed's own parser, after the Trainer's filling, for each precision a run can ask for (world size 1,
    # no torch.distributed init: DeepSpeedConfig falls back to rank 0 / world size 1 when it is not initialised).
    for precision in ("bf16", "fp16", "fp32"):
        filled = hf_filled(cfg, precision)
        left = find_auto(filled)
        assert not left, (
            f'{rel(path)}: the HF Trainer leaves these "auto" unfilled, DeepSpeed would reject them: {left}'
        )
        ds = DeepSpeedConfig(filled)
        assert ds.world_size == 1
        assert ds.zero_optimization_stage == stage
        assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (8, 4, 2)
        assert ds.bfloat16_config.enabled == (precision == "bf16")
        assert ds.float16_config.enabled == (precision == "fp16")
        assert ds.gradient_clipping == 1.0
        if stage == 3:
            assert ds.zero_config.gather_16bit_weights_on_model_save is True


@pytest.mark.parametrize("path", DEEPSPEED, ids=ids(DEEPSPEED))
def test_deepspeed_config(path):
    validate_deepspeed(path)


# ---------------------------------------------------------------- Ray

# Ray's AWS/GCP defaults install these in head_setup_commands; a YAML that sets the key replaces the defaults.
HEAD_PACKAGES = {"aws": "boto3", "gcp": "google-api-python-client"}


def ray_schema_errors(cfg: dict) -> list[str]:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
        for e in sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path)))
    ]


def ray_start_args(command: str) -> list[str]:
    """The `ray start ...` part of a start command such as 'ulimit -n 65536; ray start --head ...'."""
    for part in command.split(";"):
        words = shlex.split(part)
        if words[:2] == ["ray", "start"]:
            return words[2:]
    return []


def validate_ray(path: Path) -> None:
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.dashboard.modules.job.cli import job_cli_group
    from ray.scripts.scripts import dashboard, start, submit, up

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = ray_schema_errors(raw)
    assert not errors, f"{rel(path)} fails ray-schema.json:\n  " + "\n  ".join(errors)
    cfg = prepare_config(copy.deepcopy(raw))  # merges the provider's defaults.yaml, as `ray up` does
    validate_config(cfg)
    provider = cfg["provider"]["type"]

    # tunefleet gets onto every node: the checkout is synced and installed.
    assert raw.get("file_mounts", {}).get("~/tunefleet") == ".", f"{rel(path)}: file_mounts must map ~/tunefleet: ."
    setup = " \n".join(raw.get("setup_commands", []))
    install = INSTALL.search(setup)
    assert install, f"{rel(path)}: setup must pip install -e ~/tunefleet"
    assert "torch" in setup, f"{rel(path)}: setup must install torch"
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(INSTALL.search(c) for c in cfg[key]), f"{rel(path)}: {key} lost the tunefleet install"
    if provider in HEAD_PACKAGES:
        assert any(re.search(rf"pip install.*{HEAD_PACKAGES[provider]}", c) for c in cfg["head_setup_commands"]), (
            f"{rel(path)}: head_setup_commands replaces Ray's defaults: keep installing {HEAD_PACKAGES[provider]}"
        )

    # Security default: dashboard/job API on loopback, in the config Ray will actually run (defaults merged).
    starts = [ray_start_args(c) for c in cfg["head_start_ray_commands"]]
    head = [a for a in starts if "--head" in a]
    assert head, f"{rel(path)}: head_start_ray_commands must run `ray start --head`"
    for argv in head + [ray_start_args(c) for c in cfg["worker_start_ray_commands"] if ray_start_args(c)]:
        start.make_context("start", list(argv))  # every flag is one `ray start` knows
    params = start.make_context("start", list(head[0])).params
    assert params["dashboard_host"] in ("127.0.0.1", "localhost", "::1"), (
        f"{rel(path)}: the head's dashboard must bind loopback (--dashboard-host=127.0.0.1), got {params['dashboard_host']}"
    )
    commands_text = json.dumps({k: v for k, v in cfg.items() if k.endswith("_commands")})
    assert "0.0.0.0" not in commands_text, f"{rel(path)}: a start/setup command binds 0.0.0.0"
    # Token authentication on every node, all sharing the token made locally (GCS and raylets listen beyond loopback)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starting = [c for c in cfg[key] if "ray start" in c]
        assert starting and all("RAY_AUTH_MODE=token" in c for c in starting), f"{rel(path)}: {key} without token auth"
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", (
        f"{rel(path)}: file_mounts must sync the local ~/.ray/auth_token to every node"
    )

    # The cluster's Ray must be the local Ray.
    docker = cfg.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if docker.get(key):
            assert f":{ray.__version__}-" in docker[key], (
                f"{rel(path)}: docker {key} {docker[key]} is not Ray {ray.__version__} (the version tunefleet pins)"
            )

    if provider == "local":
        hosts = [cfg["provider"]["head_ip"], *cfg["provider"].get("worker_ips", [])]
        for host in hosts:
            ip = ipaddress.ip_address(host)
            assert ip.is_loopback or ip.is_private, f"{rel(path)}: {host} is a public address; use placeholders"
    else:
        types_ = cfg["available_node_types"]
        assert types_[cfg["head_node_type"]]["resources"], f"{rel(path)}: declare the head's resources"
        gpu_types = [n for n, t in types_.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
        assert gpu_types, f"{rel(path)}: no worker node type declares GPU resources"

    # The documented commands parse with Ray's own CLI.
    text = "\n".join(header(path))
    ups = commands(path, "ray up")
    assert ups and up.make_context("up", shlex.split(ups[0])[2:]).params["cluster_config_file"] == rel(path)
    dashboards = commands(path, "ray dashboard")
    assert dashboards and dashboard.make_context("dashboard", shlex.split(dashboards[0])[2:]).params[
        "cluster_config_file"
    ] == rel(path)
    submits = commands(path, "ray submit")
    assert submits, f"{rel(path)}: show `ray submit {rel(path)} launcher/cli.py ...`"
    sp = submit.make_context("submit", shlex.split(submits[0])[2:]).params
    assert (sp["cluster_config_file"], sp["script"]) == (rel(path), "launcher/cli.py")
    assert sp["script_args"][:1] == ("sweep",) and "--backend" in sp["script_args"]
    assert 'if __name__ == "__main__":' in (REPO / sp["script"]).read_text(), f"{sp['script']} cannot run as a script"
    jobs = commands(path, "ray job submit")
    assert jobs, f"{rel(path)}: show the `ray job submit --address http://127.0.0.1:8265 ...` command"
    jp = job_cli_group.get_command(None, "submit").make_context("submit", shlex.split(jobs[0])[3:]).params
    assert jp["address"] == "http://127.0.0.1:8265" and jp["working_dir"] == "."
    assert jp["entrypoint"][:2] == ("tunefleet", "sweep") and "--backend" in jp["entrypoint"]
    runs_dir = jp["entrypoint"][jp["entrypoint"].index("--runs_dir") + 1]  # a relative one is refused in a job
    assert runs_dir.startswith(("s3://", "gs://", "/")), f"{rel(path)}: the job's --runs_dir must outlive the job"
    assert "ray down" in text

    # What the nodes install is what every recipe shown for them uses (the store's driver, lm-eval for benchmark
    # tasks, Optuna for a TPE search), as the sweep's own plan check derives it from the spec.
    installed = with_included(set(filter(None, (install.group(1) or "").split(","))))
    recipes = [list(submit.make_context("submit", shlex.split(c)[2:]).params["script_args"]) for c in submits]
    recipes += [
        list(
            job_cli_group.get_command(None, "submit").make_context("submit", shlex.split(c)[3:]).params["entrypoint"]
        )[1:]
        for c in jobs
    ]
    for argv in recipes:
        needed = extras_needed(argv)
        assert needed <= installed, (
            f"{rel(path)}: `{' '.join(argv)}` needs tunefleet[{','.join(sorted(needed - installed))}], which "
            f"setup_commands do not install (they install [{','.join(sorted(installed))}])"
        )


# `pip install ... -e ~/tunefleet` or `-e ~/"tunefleet[s3,bench]"`: the extras in group 1
INSTALL = re.compile(r"pip install[^\n]* -e ~/\"?tunefleet(?:\[([\w,]+)\])?\"?")


def with_included(extras: set[str]) -> set[str]:
    """Extras and those they include (`cluster = ["tunefleet[s3,gcs,bench,optuna]"]`), from pyproject.toml."""
    import tomllib

    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    found, todo = set(), list(extras)
    while todo:
        extra = todo.pop()
        assert extra in optional, f"tunefleet has no extra [{extra}]"
        found.add(extra)
        for requirement in optional[extra]:
            inner = re.fullmatch(r"tunefleet\[([\w,]+)\]", requirement)
            todo += [e for e in (inner.group(1).split(",") if inner else []) if e not in found]
    return found


def extras_needed(argv: list[str]) -> set[str]:
    """The extras a `sweep SPEC ...` command line needs on the nodes (tunefleet/ prefix: ray submit's synced copy)."""
    from tunefleet.common.storage import EXTRAS
    from tunefleet.launcher import sweep as sweeps
    from tunefleet.launcher.plan_check import plan_needs

    assert argv[0] == "sweep", argv
    spec = sweeps.load_spec(str(REPO / argv[1].removeprefix("tunefleet/")))
    if "--runs_dir" in argv:
        spec.runs_dir = argv[argv.index("--runs_dir") + 1]
    runs = sweeps.expand(spec) if spec.search is None else []
    needs = plan_needs(spec, runs, evaluate="--eval" in argv)
    return (
        ({EXTRAS[needs.store]} if needs.store else set())
        | ({"bench"} if needs.tasks else set())
        | ({"optuna"} if needs.optuna else set())
    )


@pytest.mark.parametrize("path", RAY, ids=ids(RAY))
def test_ray_cluster_config(path):
    validate_ray(path)


# ---------------------------------------------------------------- the validators catch broken files


def _mutate_text(old: str, new: str):
    def apply(text: str) -> str:
        assert old in text, f"mutation anchor {old!r} not found"
        return text.replace(old, new, 1)

    return apply


def _mutate_json(fn):
    def apply(text: str) -> str:
        cfg = json.loads(text)
        fn(cfg)
        return json.dumps(cfg)

    return apply


def _drop_line(prefix: str):
    def apply(text: str) -> str:
        lines = text.splitlines(keepends=True)
        kept = [line for line in lines if not line.startswith(prefix)]
        assert len(kept) < len(lines), f"mutation anchor {prefix!r} not found"
        return "".join(kept)

    return apply


# (file, validator, mutation, the error it must produce)
MUTANTS = [
    (
        "accelerate/zero3.yaml",
        validate_accelerate,
        _mutate_text("zero3_init_flag: true", "zero3_init_flag: false"),
        "zero3_init_flag: true",
    ),
    (
        "accelerate/zero3.yaml",
        validate_accelerate,
        _mutate_text("debug: false", "debug: false\nmixed_precision: bf16"),
        "mixed_precision next to",
    ),
    (
        "accelerate/zero2.yaml",
        validate_accelerate,
        _mutate_text("file: cluster_configs/deepspeed/zero2.json", "file: cluster_configs/deepspeed/missing.json"),
        "does not exist",
    ),
    (
        "accelerate/zero2.yaml",
        validate_accelerate,
        _mutate_text("zero3_init_flag: false", "zero_stage: 2"),
        "accelerate refuses",
    ),
    (
        "accelerate/ddp.yaml",
        validate_accelerate,
        _mutate_text("distributed_type: MULTI_GPU", "distributed_type: MULTI_GPUS"),
        "not a valid DistributedType",
    ),
    (
        "accelerate/ddp.yaml",
        validate_accelerate,
        _mutate_text("distributed_type: MULTI_GPU", "distributed_type: DEEPSPEED"),
        "distributed_type",
    ),
    (
        "accelerate/single.yaml",
        validate_accelerate,
        _mutate_text("debug: false", "debug: false\nnum_procs: 1"),
        "unknown keys",
    ),
    ("accelerate/single.yaml", validate_accelerate, _drop_line("#   accelerate launch"), "accelerate launch"),
    (
        "deepspeed/zero3.json",
        validate_deepspeed,
        _mutate_json(lambda c: c["zero_optimization"].update(stage=2)),
        "zero_optimization.stage is 2",
    ),
    (
        "deepspeed/zero3.json",
        validate_deepspeed,
        _mutate_json(lambda c: c["zero_optimization"].pop("stage3_gather_16bit_weights_on_model_save")),
        "16-bit",
    ),
    ("deepspeed/zero3.json", validate_deepspeed, _mutate_json(lambda c: c.pop("_usage")), "_usage"),
    (
        "deepspeed/zero2.json",
        validate_deepspeed,
        _mutate_json(lambda c: c.update(train_batch_size=16)),
        "train_batch_size must be",
    ),
    (
        "deepspeed/zero2.json",
        validate_deepspeed,
        _mutate_json(lambda c: c["zero_optimization"].update(typo_key=1)),
        "typo_key",
    ),
    (
        "deepspeed/zero2.json",
        validate_deepspeed,
        _mutate_json(lambda c: c["zero_optimization"].update(allgather_bucket_size="auto")),
        "unfilled",
    ),
    (
        "ray/aws.yaml",
        validate_ray,
        _mutate_text("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
        "must bind loopback",
    ),
    (
        "ray/gcp.yaml",
        validate_ray,
        _mutate_text("    export RAY_AUTH_MODE=token;\n    ray start --address", "    ray start --address"),
        "worker_start_ray_commands without token auth",
    ),
    (
        "ray/onprem.yaml",
        validate_ray,
        _mutate_text('  "~/.ray/auth_token": "~/.ray/auth_token"\n', ""),
        "must sync the local ~/.ray/auth_token",
    ),
    # without its own head_start_ray_commands the YAML inherits Ray's AWS default: --dashboard-host=0.0.0.0
    (
        "ray/aws.yaml",
        validate_ray,
        _mutate_text(
            "head_start_ray_commands:\n  - ray stop\n  - >-\n    ulimit -n 65536;\n"
            "    export RAY_AUTH_MODE=token;\n"
            "    ray start --head --port=6379 --object-manager-port=8076\n"
            "    --autoscaling-config=~/ray_bootstrap_config.yaml\n"
            "    --dashboard-host=127.0.0.1\n",
            "",
        ),
        "must bind loopback",
    ),
    (
        "ray/aws.yaml",
        validate_ray,
        _mutate_text('  - python -m pip install -q "boto3>=1.4.8"', "  - pip download boto3"),
        "keep installing boto3",
    ),
    (
        "ray/aws.yaml",
        validate_ray,
        _mutate_text("--dashboard-host=127.0.0.1", "--dashbord-host=127.0.0.1"),
        "No such option",
    ),
    ("ray/aws.yaml", validate_ray, _mutate_text("2.60.0-py311-gpu", "2.9.0-py311-gpu"), "is not Ray"),
    ("ray/gcp.yaml", validate_ray, _mutate_text("max_workers: 4\n", "max_workers: four\n"), "max_workers"),
    (
        "ray/gcp.yaml",
        validate_ray,
        _mutate_text('resources: {"CPU": 8, "GPU": 1, ', 'resources: {"CPU": 8, "GPU": 0.5, '),
        "is not of type 'integer'",
    ),
    ("ray/gcp.yaml", validate_ray, _drop_line("#   ray submit"), "ray submit"),
    (
        "ray/onprem.yaml",
        validate_ray,
        _mutate_text('pip install -q -e ~/"tunefleet[cluster]"', "pip install -q tunefleet"),
        "pip install -e ~/tunefleet",
    ),
    (  # a cluster whose nodes lack lm-eval: its evaluation used to stop after training
        "ray/aws.yaml",
        validate_ray,
        _mutate_text('-e ~/"tunefleet[s3,bench,optuna]"', "-e ~/tunefleet"),
        "needs tunefleet[bench,s3]",
    ),
    (
        "ray/gcp.yaml",
        validate_ray,
        _mutate_text('-e ~/"tunefleet[gcs,bench,optuna]"', '-e ~/"tunefleet[s3,bench,optuna]"'),
        "needs tunefleet[gcs]",
    ),
    ("ray/onprem.yaml", validate_ray, _mutate_text("head_ip: 127.0.0.1", "head_ip: 8.8.8.8"), "public address"),
    (
        "ray/onprem.yaml",
        validate_ray,
        _mutate_text("cluster_name: tunefleet-onprem", "cluster_name: tunefleet-onprem\nclustr: x"),
        "Additional properties",
    ),
]


@pytest.mark.parametrize("name,validator,mutate,error", MUTANTS, ids=[f"{m[0]}#{i}" for i, m in enumerate(MUTANTS)])
def test_validators_reject_broken_copies(name, validator, mutate, error, tmp_path):
    """A copy of cluster_configs/ with one file broken fails that file's validation, for the expected reason."""
    shutil.copytree(CONFIGS, tmp_path / "cluster_configs")
    target = tmp_path / "cluster_configs" / name
    target.write_text(mutate(target.read_text(encoding="utf-8")), encoding="utf-8")
    with mock.patch(f"{__name__}.ROOT", tmp_path), pytest.raises(Exception, match=re.escape(error)):
        validator(target)
