"""dvc.yaml: declared deps/params match the code, and `dvc repro` reruns exactly what changed.

The repro tests run the real stages on a tiny synthetic collection in a throw-away git repo that
holds a copy of dvc.yaml, .dvc/config and pipeline_steps/ (MLflow tracking off).
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_collection, tiny_params_dict

VENV_BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"
DVC = str(VENV_BIN / "dvc") if (VENV_BIN / "dvc").exists() else shutil.which("dvc")
PKG = REPO / "pipeline_steps"
# Record a finished step in MLflow; they never change an output, so editing them must not rerun.
SIDE_EFFECT_ONLY = {"tracking", "lineage"}
STEP_MODULE = {"extract": "extract", "cluster": "cluster", "train_adaptor": "train_adaptor",
               "train_fusion": "train_fusion", "evaluate": "evaluate"}

pytestmark = pytest.mark.skipif(DVC is None, reason="dvc is not installed")


def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_body(stage: dict) -> dict:
    return stage["do"] if "foreach" in stage else stage


def _relative_imports(module: str, top_level_only: bool) -> set[str]:
    tree = ast.parse((PKG / f"{module}.py").read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
    return found


def code_closure(step_module: str) -> set[str]:
    """Modules a `python -m pipeline_steps <step>` run executes: the CLI's module-level imports
    (its per-step imports are lazy) plus everything the step module imports, even lazily."""
    seen: set[str] = set()
    todo = [("__init__", False), ("__main__", False), ("cli", True), (step_module, False)]
    while todo:
        module, top_only = todo.pop()
        if module in seen or module in SIDE_EFFECT_ONLY:
            continue
        seen.add(module)
        todo += [(m, False) for m in _relative_imports(module, top_only)]
    return seen


def test_code_deps_are_each_steps_import_closure():
    stages = dvc_yaml()
    assert set(stages) == set(STEP_MODULE)
    problems = []
    for name, module in STEP_MODULE.items():
        declared = {d for d in stage_body(stages[name])["deps"] if d.startswith("pipeline_steps/")}
        expected = {f"pipeline_steps/{m}.py" for m in code_closure(module)}
        if declared != expected:
            problems.append(f"{name}: add {sorted(expected - declared)}, remove {sorted(declared - expected)}")
    assert not problems, "dvc.yaml code deps out of date:\n" + "\n".join(problems)


def test_params_exist_and_k_list_only_where_needed():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = dvc_yaml()
    for name, stage in stages.items():
        for dotted in stage_body(stage)["params"]:
            node = params
            for part in dotted.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: param {dotted} not in params.yaml"
                node = node[part]
    # A change of the k list must not rerun the adaptors of unchanged k.
    adaptor_params = stage_body(stages["train_adaptor"])["params"]
    assert not any(p == "cluster" or p.startswith("cluster.") for p in adaptor_params)
    assert stages["train_adaptor"]["foreach"] == "${cluster.ks}"
    # The feature cache and the resume checkpoints must survive DVC removing outs before a run.
    outs = [o if isinstance(o, str) else next(iter(o)) for s in stages.values()
            for key in ("outs", "metrics", "plots") for o in stage_body(s).get(key, [])]
    assert not any("checkpoints" in o or ".cache" in o for o in outs)
    assert {"${out_dir}/evaluate/metrics.json": {"cache": False}} in stages["evaluate"]["metrics"]


# -- end to end -------------------------------------------------------------------------------

def run_dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "GRAPPA_TRACKING": "0",
           "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([DVC, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def write_params(repo: Path, ks: list[int]) -> None:
    sources = sorted((repo.parent / "data").glob("*/manifest.csv"))
    raw = tiny_params_dict(repo, sources, cluster={"ks": ks}, backbone={"image_size": 32},
                           adaptor={"epochs": 1, "batch_size": 8}, fusion={"epochs": 1, "batch_size": 8, "knn": 3})
    raw["out_dir"], raw["extract"]["cache_dir"] = "outputs", ".cache/features"  # DVC outs live in the repo
    from pipeline_steps.config import parse_params

    # Every key the stages declare must be present in the file (DVC does not know the defaults).
    (repo / "params.yaml").write_text(yaml.safe_dump(parse_params(raw).model_dump(mode="json"), sort_keys=False))


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    return make_dvc_repo(tmp_path_factory.mktemp("dvc"))


def make_dvc_repo(root: Path) -> Path:
    repo = root / "repo"
    make_collection(root / "data", size=32)
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    (repo / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(REPO / ".dvc" / name, repo / ".dvc" / name)
    shutil.copytree(PKG, repo / "pipeline_steps", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(repo, [2, 4])
    # The committed default remote is a fixed path; a per-checkout override goes to config.local.
    run_dvc(repo, "remote", "modify", "--local", "local", "url", str(root / "remote"))
    return repo


@pytest.fixture(scope="module")
def reproduced(dvc_repo) -> str:
    return run_dvc(dvc_repo, "repro")


def test_repro_runs_every_stage_then_is_up_to_date(dvc_repo, reproduced):
    assert ran(reproduced) == {"extract", "cluster", "train_adaptor@2", "train_adaptor@4", "train_fusion", "evaluate"}
    assert "up to date" in run_dvc(dvc_repo, "status")
    out = dvc_repo / "outputs"
    for path in ("extract/features.parquet", "cluster/k4.parquet", "adaptors/k2/adaptor.pt",
                 "fusion/fusion.pt", "evaluate/metrics.json", "evaluate/results.md"):
        assert (out / path).is_file(), path
    assert (dvc_repo / ".cache" / "features").is_dir()  # the feature cache sits outside every out
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())["stages"]
    assert lock["train_adaptor@2"]["cmd"] == "python -m pipeline_steps train-adaptor --k 2"
    assert "cluster" not in lock["train_adaptor@2"]["params"]["params.yaml"]
    assert lock["evaluate"]["params"]["params.yaml"]["cluster.ks"] == [2, 4]


def test_changing_one_k_reruns_only_that_adaptor_and_downstream(dvc_repo, reproduced):
    write_params(dvc_repo, [2, 3])
    output = run_dvc(dvc_repo, "repro")
    # cluster reruns (it clusters every k) but writes a byte-identical k2 file, so k=2 is kept.
    assert ran(output) == {"cluster", "train_adaptor@3", "train_fusion", "evaluate"}
    assert "Stage 'train_adaptor@2' didn't change" in output
    assert "up to date" in run_dvc(dvc_repo, "status")


def test_push_to_local_remote(dvc_repo, reproduced):
    output = run_dvc(dvc_repo, "push")
    assert re.search(r"\d+ files? pushed", output), output
    remote = dvc_repo.parent / "remote"
    assert any(p.is_file() for p in remote.rglob("*"))
    assert "in sync" in run_dvc(dvc_repo, "status", "--cloud")


def test_dag_commands_leave_dvc_up_to_date(tmp_path, monkeypatch):
    """The local DAG runs each step through `dvc repro -s`, so `dvc repro` afterwards has nothing to do."""
    import subprocess as sp
    import sys

    sys.path.insert(0, str(REPO / "dags"))
    import runners

    repo = make_dvc_repo(tmp_path)
    monkeypatch.setattr(runners, "REPO", repo)
    monkeypatch.delenv("GRAPPA_PARAMS", raising=False)
    monkeypatch.setenv("GRAPPA_PYTHON", str(VENV_BIN / "python"))
    plan = runners.plan({}, "local")
    assert plan["ks"] == [2, 4] and "repro --single-item train_adaptor@4" in plan["train_adaptor"][1]
    env = {**os.environ, "GRAPPA_TRACKING": "0", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    for command in [plan["extract"], plan["cluster"], *plan["train_adaptor"], plan["train_fusion"], plan["evaluate"]]:
        done = sp.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "up to date" in run_dvc(repo, "status")
    assert ran(run_dvc(repo, "repro")) == set()
    # a run conf with overrides is not what params.yaml says: the steps are called directly
    assert "pipeline_steps" in runners.plan({"ks": [2, 3]}, "local")["train_adaptor"][0]
