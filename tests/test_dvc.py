"""dvc.yaml: declared deps/params match the code, and every entry point reruns exactly what changed.

The repro tests run the real stages on a tiny synthetic collection in a throw-away workspace (git
repo with a copy of dvc.yaml, .dvc/config and grappa/; MLflow tracking off): `grappa run`,
the Airflow DAG's per-stage commands and a plain `dvc repro` share one dvc.lock.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from test_tracking import tracked_run

sys.path.insert(0, str(REPO / "dags"))
import planning  # noqa: E402
import runners  # noqa: E402

VENV_BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"
DVC = str(VENV_BIN / "dvc") if (VENV_BIN / "dvc").exists() else shutil.which("dvc")
ALL_STAGES = {"snapshot", "extract@0-of-1", "merge_features", "warm_start", "cluster", "train_adaptor@2", "train_adaptor@4",
              "train_fusion", "evaluate", "index"}

pytestmark = pytest.mark.skipif(DVC is None, reason="dvc is not installed")


def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_body(stage: dict) -> dict:
    return stage["do"] if "foreach" in stage else stage


def test_dvc_yaml_is_what_the_registry_generates():
    from grappa import registry
    from grappa.config import load_params
    from grappa.workspace import generated

    params = load_params(REPO / "params.yaml")
    assert (REPO / "dvc.yaml").read_text() == generated(params), "dvc.yaml is stale: run `grappa prepare`"
    stages = dvc_yaml()
    assert list(stages) == [step.stage for step in registry.STEPS]
    for step in registry.STEPS:
        body = stage_body(stages[step.stage])
        assert body["cmd"].split()[:4] == ["python", "-m", "grappa", step.verb]
        assert body["params"] == list(step.params)
        # a mapped step's stage is a foreach whose command names the item with the CLI option
        assert ("foreach" in stages[step.stage]) == (step.mapped is not None)
        if step.mapped:
            assert body["cmd"].split()[4:] == [f"--{step.mapped}", "${item}"]


def _runtime_imports(module: str) -> set[str]:
    """Files of grappa/ and pipeline_steps/ that importing ``module`` loads (module-level imports only)."""
    code = (f"import sys, json, {module}; print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() "
            "if n.split('.')[0] in ('grappa', 'pipeline_steps') and getattr(m, '__file__', None))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {str(Path(f).resolve().relative_to(REPO)) for f in json.loads(done.stdout)}


def test_code_deps_cover_what_each_step_really_imports_and_nothing_that_only_records():
    from grappa import registry
    from grappa.dvc_yaml import NOT_CODE_DEPS

    stages = dvc_yaml()
    for step in registry.STEPS:
        declared = {d for d in stage_body(stages[step.stage])["deps"] if d.startswith(("grappa/", "pipeline_steps/"))}
        loaded = {f for f in _runtime_imports(step.module)
                  if not any(f == x or (x.endswith("/") and f.startswith(x)) for x in NOT_CODE_DEPS)}
        # empty package markers (__init__.py of core/, io/, pipeline_steps/) hold no code
        loaded = {f for f in loaded if (REPO / f).read_text().strip()}
        assert loaded <= declared, f"{step.stage}: imports {sorted(loaded - declared)} without depending on them"
        assert f"pipeline_steps/{step.stage}.py" in declared
        # editing the CLI, the registry or tracking reruns nothing
        assert not declared & {"grappa/cli.py", "grappa/registry.py", "grappa/__main__.py"}, step.stage
        assert not any(d.startswith("grappa/tracking/") for d in declared), step.stage
    # the layers show in what reruns: k-means needs no backbone, plots only rerun evaluate
    cluster = set(stage_body(stages["cluster"])["deps"])
    assert not any("backbones" in d or "model" in d for d in cluster), sorted(cluster)
    assert [s for s in stages if "grappa/io/plots.py" in stage_body(stages[s])["deps"]] == ["evaluate"]


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
    # the parts of extract.shards (1 in params.yaml) are written out; the merge depends on each of them
    assert stages["extract"]["foreach"] == ["0-of-1"] and params["extract"].get("shards", 1) == 1
    assert "${out_dir}/extract/parts/0-of-1" in stages["merge_features"]["deps"]
    # The feature cache and the resume checkpoints must survive DVC removing outs before a run.
    outs = [o if isinstance(o, str) else next(iter(o)) for s in stages.values()
            for key in ("outs", "metrics", "plots") for o in stage_body(s).get(key, [])]
    assert not any("checkpoints" in o or ".cache" in o for o in outs)
    assert {"${out_dir}/evaluate/report.json": {"cache": False}} in stages["evaluate"]["metrics"]


def test_committed_dvc_yaml_watches_the_sources_of_params_yaml():
    from grappa.config import load_params
    from grappa.workspace import data_roots, drift

    params = load_params(REPO / "params.yaml")
    assert drift(REPO, params) is None
    assert "data/incoming" in data_roots(params.data.sources)  # the loop's drop folder
    snapshot_outs = stage_body(dvc_yaml()["snapshot"])["outs"]
    assert {"${out_dir}/snapshot": {"persist": True}} in snapshot_outs  # the previous manifest is the hash cache


# -- end to end -------------------------------------------------------------------------------

def run_dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "GRAPPA_TRACKING": "0",
           "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([DVC, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def run_grappa(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRAPPA_TRACKING": "0", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(VENV_BIN / "python"), "-m", "grappa", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def report(repo: Path, step: str) -> dict:
    return json.loads((repo / "outputs" / step / "report.json").read_text())


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """`grappa run` (the README's main command) in a workspace, shared with the tracking tests."""
    run = tracked_run(tmp_path_factory)
    assert run.rc == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def dvc_repo(tracked) -> Path:
    return tracked.repo


@pytest.fixture(scope="module")
def reproduced(tracked) -> str:
    return tracked.stdout


def test_grappa_run_goes_through_dvc_then_is_up_to_date(dvc_repo, reproduced):
    """After the main command, `dvc status` is up to date and running it again does nothing."""
    assert ran(reproduced) == ALL_STAGES
    assert "step timings (s): snapshot=" in reproduced
    assert "up to date" in run_dvc(dvc_repo, "status")
    out = dvc_repo / "outputs"
    for path in ("snapshot/manifest.parquet", "extract/features.parquet", "cluster/k4.parquet", "adaptors/k2/adaptor.pt",
                 "fusion/fusion.pt", "model/model.pt", "evaluate/report.json", "evaluate/champion.json",
                 "index/index.json"):
        assert (out / path).is_file(), path
    assert (dvc_repo / ".cache" / "features").is_dir()  # the feature cache sits outside every out
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())["stages"]
    assert lock["train_adaptor@2"]["cmd"] == "python -m grappa train-adaptor --k 2"
    assert "cluster" not in lock["train_adaptor@2"]["params"]["params.yaml"]
    assert lock["evaluate"]["params"]["params.yaml"]["cluster.ks"] == [2, 4]
    assert {"../drop", "../data/shapes"} <= {d["path"] for d in lock["snapshot"]["deps"]}  # the data roots

    again = run_grappa(dvc_repo, "run")
    assert again.returncode == 0 and ran(again.stdout) == set()
    assert "nothing to do" in again.stdout


def test_dag_commands_agree_with_grappa_run(dvc_repo, reproduced, monkeypatch):
    """The local DAG's tasks are `grappa repro <stage>`: after `grappa run` each one is up to date (exit 99)."""
    monkeypatch.setattr(runners, "REPO", dvc_repo)
    monkeypatch.delenv("GRAPPA_PARAMS", raising=False)
    monkeypatch.setenv("GRAPPA_PYTHON", str(VENV_BIN / "python"))
    plan = planning.plan({}, "local")
    assert plan["ks"] == [2, 4] and plan["train_adaptor"][1].endswith("repro train_adaptor@4")
    assert plan["shards"] == 1 and [c.split()[-1] for c in plan["extract"]] == ["extract@0-of-1"]
    prepared = planning.prepare_workspace(plan["prepare"])
    digest = hashlib.sha256((dvc_repo / "params.yaml").read_bytes()).hexdigest()
    assert prepared.splitlines() == [f"params.yaml sha256: {digest}"]  # params.yaml and dvc.yaml already say this run
    plan = planning.pin_params(plan, planning.pinned_digest(prepared))  # as the plan task does
    env = {**os.environ, "GRAPPA_TRACKING": "0", "DVC_NO_ANALYTICS": "1"}
    for command, stage in ((plan["extract"][0], "extract@0-of-1"), (plan["merge_features"], "merge_features")):
        done = subprocess.run(["bash", "-c", command], cwd=dvc_repo, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == runners.UP_TO_DATE_EXIT, done.stdout + done.stderr
        assert f"stage '{stage}' is up to date" in done.stdout


def test_override_is_written_where_dvc_sees_it(dvc_repo, reproduced):
    """`grappa run --set` records the override in params.yaml (comments kept), so dvc.lock holds it and a
    plain `dvc repro` afterwards has nothing to do; unchanged k keep their adaptors."""
    repo = dvc_repo.with_name("repo-override")  # a copy beside it (same relative sources): the shared run stays
    shutil.copytree(dvc_repo, repo, symlinks=True)
    params_text = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text("# the team's params\n" + params_text)
    done = run_grappa(repo, "run", "--set", "cluster.ks=[2, 3]")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "params.yaml: cluster.ks: [2, 4] -> [2, 3]" in done.stdout
    # warm-start re-decides (the recipe changed: full), cluster reruns (it clusters every k) but writes a
    # byte-identical k2 file, so k=2 is kept.
    assert ran(done.stdout) == {"warm_start", "cluster", "train_adaptor@3", "train_fusion", "evaluate", "index"}
    assert "Stage 'train_adaptor@2' didn't change" in done.stdout
    written = (repo / "params.yaml").read_text()
    assert written.startswith("# the team's params\n") and yaml.safe_load(written)["cluster"]["ks"] == [2, 3]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["cluster"]["params"]["params.yaml"]["cluster"]["ks"] == [2, 3]
    assert ran(run_dvc(repo, "repro")) == set()


def test_dvc_exp_run_set_takes_templated_params_and_refuses_the_others_in_one_line(dvc_repo):
    """`dvc exp run -S cluster.ks=...` is an experiment (DVC templates the k stages from params.yaml);
    extract.shards and data.sources are spelled out in dvc.yaml, so -S of those is refused by the
    first stage that would run, before any work, naming the commands that do it."""
    repo = dvc_repo.with_name("repo-exp")  # a copy beside it (same relative sources): the shared run stays
    shutil.copytree(dvc_repo, repo, symlinks=True)
    git = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost"}
    for args in (["add", "-A"], ["commit", "-q", "-m", "baseline"]):
        subprocess.run(["git", *args], cwd=repo, env={**os.environ, **git}, check=True, capture_output=True)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "GRAPPA_TRACKING": "0",
           "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", **git}
    for override in ("extract.shards=2", f"data.sources=[{yaml.safe_load((repo / 'params.yaml').read_text())['data']['sources'][0]}]"):
        done = subprocess.run([DVC, "exp", "run", "-S", override], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=600)
        lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("grappa: error:")]
        assert done.returncode != 0 and len(lines) == 1, done.stdout[-2000:] + done.stderr[-2000:]
        assert "`dvc exp run -S` cannot change this: run 'grappa run --set KEY=VALUE'" in lines[0]
        assert "Traceback" not in done.stdout + done.stderr
        assert not (repo / "outputs" / "extract" / "parts" / "0-of-2").exists()  # refused before any work
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=repo, check=True)
    done = subprocess.run([DVC, "exp", "run", "-n", "two-ks", "-S", "cluster.ks=[2,3]"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {"cluster", "train_adaptor@3", "train_fusion", "evaluate"} <= ran(done.stdout)
    shown = subprocess.run([DVC, "exp", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert "two-ks" in shown.stdout and "map_at_r" in shown.stdout  # the experiment, with evaluate's metrics


def test_push_to_local_remote(dvc_repo, reproduced):
    output = run_dvc(dvc_repo, "push")
    assert re.search(r"\d+ files? pushed", output), output
    remote = dvc_repo.parent / "dvc-remote"
    assert any(p.is_file() for p in remote.rglob("*"))
    assert "in sync" in run_dvc(dvc_repo, "status", "--cloud")
