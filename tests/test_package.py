"""The package's shape: one `tunefleet` namespace, imports that flow one way, and a wheel that works anywhere."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml
from testkit import ROOT, read_json

# What each layer may import: launcher -> trainers and eval -> common (eval also uses trainers' data and model
# loading). A layer missing from a set may not be imported at all, not even inside a function.
ALLOWED = {
    "common": set(),
    "trainers": {"common"},
    "eval": {"common", "trainers"},
    "launcher": {"common", "trainers", "eval"},
}


def package_dirs() -> dict[str, Path]:
    """`tunefleet.trainers` -> trainers/, ... as pyproject.toml maps them."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def package_sources() -> dict[str, str]:
    """Module name -> source of every module of the package."""
    sources = {}
    for package, folder in package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join([package, *parts])
            sources[name.removesuffix(".__init__")] = path.read_text()
    return sources


def imports(module: str, source: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in `source`, function-level ones included."""
    found = []
    # relative imports resolve against the module's package (a package's __init__ is its own package)
    package = module if module in package_dirs() else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "tunefleet" else None


def targets(imported: str, names: list[str], modules: set[str]) -> list[str]:
    """The package modules an import statement loads (`from tunefleet.trainers import data` -> ...trainers.data)."""
    hit = [f"{imported}.{n}" for n in names if f"{imported}.{n}" in modules]
    return hit or ([imported] if imported in modules else [])


def layer_violations(sources: dict[str, str]) -> list[str]:
    bad = []
    for module, source in sources.items():
        for imported, _, line in imports(module, source):
            own, other = layer(module), layer(imported)
            if other and other != own and other not in ALLOWED.get(own, set()):
                bad.append(f"{module}:{line} imports {imported} ({own} may not import {other})")
            if imported.split(".")[0] in ("trainers", "launcher", "eval", "common"):
                bad.append(f"{module}:{line} imports {imported} outside the tunefleet namespace")
    return bad


def private_imports(sources: dict[str, str]) -> list[str]:
    bad = []
    for module, source in sources.items():
        for imported, names, line in imports(module, source):
            for name in names:
                if name.startswith("_") and not name.startswith("__") and imported.startswith("tunefleet"):
                    bad.append(f"{module}:{line} imports the private name {name} from {imported}")
    return bad


def import_cycles(sources: dict[str, str]) -> list[list[str]]:
    """Strongly connected groups of modules (Tarjan): each group is an import circle."""
    modules = set(sources)
    graph = {
        m: {t for imported, names, _ in imports(m, s) for t in targets(imported, names, modules) if t != m}
        for m, s in sources.items()
    }
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


# ------------------------------------------------------------------ the rules, on the real package
def test_every_folder_is_in_the_namespace():
    dirs = package_dirs()
    assert set(dirs) == {f"tunefleet.{name}" for name in ("common", "trainers", "launcher", "eval", "cluster_configs")}
    sources = package_sources()
    assert "tunefleet.trainers.train" in sources and "tunefleet.launcher.cli" in sources


def test_imports_flow_one_way():
    assert layer_violations(package_sources()) == []


def test_no_import_circles():
    assert import_cycles(package_sources()) == []


def test_no_private_name_imported_across_modules():
    assert private_imports(package_sources()) == []


def test_the_checks_catch_what_they_look_for():
    bad = {
        "tunefleet.eval.a": "from tunefleet.launcher.b import x\nimport tunefleet.eval.c\n",
        "tunefleet.launcher.b": "def f():\n    from tunefleet.eval import a\n",
        "tunefleet.eval.c": "from tunefleet.eval.a import _helper\nfrom . import a\n",
        "tunefleet.trainers.d": "from trainers import config\n",
        "tunefleet.common.e": "from tunefleet.trainers.d import y\n",
    }
    violations = layer_violations(bad)
    assert any(
        "tunefleet.eval.a:1 imports tunefleet.launcher.b (eval may not import launcher)" in v for v in violations
    )
    assert any("outside the tunefleet namespace" in v for v in violations)
    assert any("common may not import trainers" in v for v in violations)
    assert private_imports(bad) == ["tunefleet.eval.c:1 imports the private name _helper from tunefleet.eval.a"]
    assert import_cycles(bad) == [["tunefleet.eval.a", "tunefleet.eval.c", "tunefleet.launcher.b"]]


# ------------------------------------------------------------------ one backend interface
BACKEND_NAMES = {"local", "ray", "slurm"}
ORCHESTRATION = "tunefleet.launcher.orchestrate"  # the one module that picks a backend by its name


def backend_name_dispatch(sources: dict[str, str]) -> list[str]:
    """Comparisons of something called `backend` with a backend's name (`a.backend == "slurm"`,
    `backend in ("ray", "local")`), outside the orchestration module."""

    def is_backend(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id == "backend") or (
            isinstance(node, ast.Attribute) and node.attr == "backend"
        )

    def names_a_backend(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in BACKEND_NAMES
        return isinstance(node, ast.Tuple | ast.List | ast.Set) and any(names_a_backend(e) for e in node.elts)

    bad = []
    for module, source in sources.items():
        if layer(module) != "launcher" or module == ORCHESTRATION:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(map(is_backend, sides)) and any(map(names_a_backend, sides)):
                    bad.append(f"{module}:{node.lineno} dispatches on a backend's name")
    return bad


def test_only_the_orchestration_dispatches_on_a_backends_name():
    assert backend_name_dispatch(package_sources()) == []
    planted = {"tunefleet.launcher.x": 'def f(a, backend):\n    return a.backend == "slurm" or backend in ("ray",)\n'}
    assert backend_name_dispatch(planted) == [
        "tunefleet.launcher.x:2 dispatches on a backend's name",
        "tunefleet.launcher.x:2 dispatches on a backend's name",
    ]


def test_every_backend_implements_the_interface():
    """Each backend of `--backend` is a `Backend` (attributes and methods), with the interface's signatures."""
    import inspect

    from tunefleet.launcher.backend import Backend, SweepOptions
    from tunefleet.launcher.orchestrate import BACKENDS, backend_for

    assert set(BACKENDS) == BACKEND_NAMES
    for name in BACKENDS:
        backend = backend_for(name, SweepOptions())
        assert isinstance(backend, Backend), f"{type(backend).__name__} lacks part of the Backend interface"
        assert backend.name == name and backend.eval_backend in ("local", "ray")
        for method in ("dry_run", "check_search", "prepare", "check_plan", "run", "search"):
            wanted = list(inspect.signature(getattr(Backend, method)).parameters)[1:]
            got = list(inspect.signature(getattr(backend, method)).parameters)
            assert got == wanted, f"{type(backend).__name__}.{method}{got} is not Backend.{method}{wanted}"
    classes = [
        node.name
        for module, source in package_sources().items()
        if layer(module) == "launcher"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef) and node.name.endswith("Backend") and node.name != "Backend"
    ]
    assert sorted(classes) == ["LocalBackend", "RayBackend", "SlurmBackend"], classes


def test_a_module_over_500_lines_says_at_its_top_why_it_is_one():
    long = {
        module: ast.get_docstring(ast.parse(source)) or ""
        for module, source in package_sources().items()
        if source.count("\n") > 500
    }
    unexplained = [module for module, doc in long.items() if "Why one module" not in doc]
    assert not unexplained, f"over 500 lines, with no reason at the top: {unexplained}"


def test_every_module_says_what_it_is_in_its_first_line():
    silent = [
        module
        for module, source in package_sources().items()
        if source.strip() and not (ast.get_docstring(ast.parse(source)) or "").strip()
    ]
    assert not silent, silent


def test_pre_commit_runs_what_make_check_runs():
    """`.pre-commit-config.yaml` is valid for pre-commit itself, and each hook is a command of `make check`."""
    from pre_commit.clientlib import load_config

    config = load_config(str(ROOT / ".pre-commit-config.yaml"))
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    make = (ROOT / "Makefile").read_text()
    check = make.split("\ncheck: setup\n", 1)[1].split("\n\n", 1)[0].replace("$(BIN)/", ".venv/bin/")
    commands = [line.strip() for line in check.splitlines()]
    for hook in hooks:
        assert any(command.startswith(hook["entry"]) for command in commands), (hook["id"], commands)
    assert len(hooks) == len(commands), "a command of make check has no hook (or a hook no command)"


def test_launched_modules_are_namespaced():
    """Every `python -m` the project runs or documents names a tunefleet module (never a bare trainers.x)."""
    files = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".sh", ".sbatch")]
    files = [p for p in files if ".venv" not in p.parts and "runs" not in p.parts and ".cache" not in p.parts]
    bare_module = re.compile(r"""-m\s+(trainers|launcher|eval|common)\.|["']-m["'],\s*["'](trainers|launcher|eval)""")
    bare = []
    for path in files:
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if bare_module.search(line):
                bare.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bare, "\n".join(bare)


def test_ruff_config_is_the_usual_one():
    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    assert ruff["line-length"] == 119


# ------------------------------------------------------------------ a wheel, installed elsewhere
@pytest.mark.slow
def test_wheel_installs_and_runs_from_a_folder_with_its_own_trainers_and_eval(tmp_path, tiny_model):
    """pip install of the wheel (not editable) into a fresh venv; from a folder whose own `trainers/` and `eval/`
    packages would break anything that imported them: train on 2 processes (ZeRO-2), a sweep, eval.

    The venv gets tunefleet from the wheel alone; its dependencies are this environment's own installed ones, made
    visible by a `.pth` line (a plain folder entry: that folder's own .pth files, the editable checkout's among them,
    are not processed), and `pip check` confirms the wheel's declared requirements are met by them."""
    wheels, venv, work, source = tmp_path / "wheels", tmp_path / "venv", tmp_path / "project", tmp_path / "source"

    def run(cmd, cwd=tmp_path, timeout=900, **env):
        proc = subprocess.run(
            [str(c) for c in cmd],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **env},
        )
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():  # built from what git holds, in a folder of its own (no build/ left here)
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, source])
    (wheel,) = wheels.glob("tunefleet-*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", venv])  # no packages of its own to shadow this one's
    py = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", py]
    run([*pip, "install", "-q", "--no-deps", wheel])
    here = sysconfig.get_paths()["purelib"]
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "dependencies.pth").write_text(here + "\n")
    run([*pip, "check"])
    origin = run([py, "-c", "import tunefleet.trainers as t; print(t.__file__)"]).stdout.strip()
    assert origin.startswith(str(site)), origin  # the wheel's copy, not the checkout
    assert not {"trainers", "launcher", "eval", "common", "cluster_configs"} & {p.name for p in site.iterdir()}
    assert (site / "tunefleet" / "cluster_configs" / "accelerate" / "zero2.yaml").is_file()
    assert (site / "tunefleet" / "trainers" / "assets" / "tiny-ultrafeedback" / "train_sft.jsonl").is_file()

    work.mkdir()
    for name in ("trainers", "eval", "launcher"):  # what a user's ML project may well hold
        (work / name).mkdir()
        (work / name / "__init__.py").write_text(f"raise ImportError('the user project own {name} was imported')\n")
    tunefleet = venv / "bin" / "tunefleet"
    tiny = [
        "--model_name",
        "tunefleet/tiny-qwen2",
        "--dataset",
        "tunefleet/tiny-ultrafeedback",
        "--split",
        "train_sft",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--use_qlora",
        "false",
    ]
    run(
        [
            tunefleet,
            "train",
            "--method",
            "sft",
            *tiny,
            "--output_dir",
            "runs/zero2",
            "--num_processes",
            "2",
            "--accelerate_config",
            "zero2",
        ],
        cwd=work,
    )
    record = read_json(work / "runs" / "zero2" / "run.json")
    assert record["status"] == "finished" and record["distributed_type"] == "DistributedType.DEEPSPEED"
    assert record["world_size"] == 2 and record["launch"]["accelerate_config"] == "zero2"

    spec = work / "sweep.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "w",
                "runs_dir": "runs/sweep",
                "base": {
                    "model_name": "tunefleet/tiny-qwen2",
                    "dataset": "tunefleet/tiny-ultrafeedback",
                    "max_steps": 2,
                    "per_device_train_batch_size": 2,
                    "gradient_accumulation_steps": 1,
                    "use_qlora": False,
                },
                "grid": {"method": ["sft", "dpo", "rm"]},
                "methods": {
                    "sft": {"split": "train_sft"},
                    "dpo": {"split": "train_prefs"},
                    "rm": {"split": "train_prefs"},
                },
            }
        )
    )
    out = run([tunefleet, "sweep", spec, "--backend", "local"], cwd=work).stdout
    assert "finished 3" in out
    judged = ["--reward_model", "rm_tiny-qwen2_s42", "--tasks", "tiny_world", "--limit", "8"]  # the shipped task
    run(
        [
            tunefleet,
            "eval",
            "--runs_dir",
            "runs/sweep",
            "--max_samples",
            "8",
            "--max_generation_samples",
            "1",
            *judged,
        ],
        cwd=work,
    )
    results = read_json(work / "runs" / "sweep" / "evaluation_results.json")
    assert {"sft_tiny-qwen2_s42", "dpo_tiny-qwen2_s42", "rm_tiny-qwen2_s42"} <= set(results)
    assert not any(entry.get("error") for entry in results.values())
    assert results["dpo_tiny-qwen2_s42"]["rm_score"] is not None
    assert results["sft_tiny-qwen2_s42"]["benchmarks"]["tiny_world"]["acc"] is not None
    # Every launched process ran tunefleet's modules, never the project's own packages.
    for log in (work / "runs" / "sweep").glob("*/train.log"):
        assert "-m tunefleet.trainers.train" in log.read_text() and "own trainers" not in log.read_text()


# ------------------------------------------------------------------ the type checker make test runs
def test_make_test_type_checks_the_checkout_and_the_checker_reports_a_wrong_call_across_a_typed_boundary(tmp_path):
    """`make test` runs basedpyright over the checkout (pyproject.toml) before the suite, and stops at an error: the
    suite does not run it again. Here: that target holds the check, and the checker, configured as it runs there,
    reports a file that passes a string where RunOutcome takes a RunStatus and a number as a RunPlan's name, so the
    check cannot pass vacuously (an unresolved import would make every type Unknown, hence quiet)."""
    target = re.search(r"^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert target, "Makefile has no test target"
    steps = [line.strip() for line in target.group(1).splitlines()]
    checks = [i for i, step in enumerate(steps) if step == "$(BIN)/basedpyright"]
    suite = [i for i, step in enumerate(steps) if "-m pytest" in step]
    assert checks and suite and checks[0] < suite[0], steps

    checker = Path(sys.executable).parent / "basedpyright"
    wrong = tmp_path / "wrong_call.py"
    wrong.write_text(
        "from tunefleet.launcher.records import RunOutcome, RunPlan\n"
        "from tunefleet.trainers.config import TrainConfig\n"
        "\n"
        "outcome = RunOutcome('run', 'finished', 'train.log')\n"
        "plan = RunPlan(3, TrainConfig())\n"
    )
    found = subprocess.run(
        [checker, "--project", ROOT / "pyproject.toml", wrong], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert found.returncode == 1, found.stdout
    assert '"Literal[\'finished\']" cannot be assigned to parameter "status" of type "RunStatus"' in found.stdout
    assert '"Literal[3]" cannot be assigned to parameter "name" of type "str"' in found.stdout
