"""The task contract across workspaces with no shared disk: a run started on a git remote, its stages
run alternately in two clones (two workers), each pulling its inputs from the DVC remote and
committing its dvc.lock entry on the run's experiment ref, gives the dvc.lock and metrics of
`grappa run` in one workspace; a second run with no new data is skipped stage by stage on both, and
`dvc exp show` lists both runs with their metrics.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import make_collection, make_workspace
from grappa.config import ConfigError
from grappa.experiments import run_name

VENV_BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python")
DVC = str(VENV_BIN / "dvc") if (VENV_BIN / "dvc").exists() else shutil.which("dvc")
ORDER = ["snapshot", "extract@0-of-1", "merge_features", "warm_start", "cluster", "train_adaptor@2", "train_adaptor@4",
         "train_fusion", "evaluate", "index"]
GIT_ID = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
          "GIT_COMMITTER_EMAIL": "t@localhost"}
ENV = {**os.environ, "GRAPPA_TRACKING": "0", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
       "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, env={**ENV, **GIT_ID}, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def grappa(cwd: Path, *args: str, check_rc: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    done = subprocess.run([PYTHON, "-m", "grappa", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode in check_rc, f"grappa {' '.join(args)} -> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def clone(origin: Path, where: Path, remote: Path) -> Path:
    """A worker's workspace: its own clone, sharing only the git and DVC remotes."""
    subprocess.run(["git", "clone", "-q", str(origin), str(where)], check=True)
    (where / ".dvc" / "config.local").write_text(f"['remote \"local\"']\n    url = {remote}\n")
    return where


def lock_shape(lock: dict) -> dict:
    """A dvc.lock but the hashes of step outputs (their reports hold timings): every stage's command,
    params, and the hashes of the code and data it read."""
    def read(entry):
        return {dep["path"]: dep.get("md5") for dep in entry.get("deps", []) if not dep["path"].startswith("outputs/")}

    return {stage: {"cmd": entry["cmd"], "params": entry.get("params"), "read": read(entry),
                    "deps": sorted(dep["path"] for dep in entry.get("deps", [])),
                    "outs": sorted(out["path"] for out in entry.get("outs", []))}
            for stage, entry in lock["stages"].items()}


def untimed(report: dict) -> dict:
    return {key: value for key, value in report.items() if key != "timings_s"}


def same_metrics(ours: dict, theirs: dict) -> bool:
    """Evaluate's reports agree: the retrieval metrics exactly, the attention statistics to float noise
    (a container's torch may sum with another thread count)."""
    import math

    def close(a, b) -> bool:
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(map(close, a, b))
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
        return a == b

    return ours["methods"] == theirs["methods"] and close(untimed(ours), untimed(theirs))


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    manifests = make_collection(root / "data")
    seed = make_workspace(root / "seed", manifests)
    git(seed, "add", "-A")
    git(seed, "commit", "-qm", "the project")
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(root / "origin.git")], check=True)
    git(seed, "push", "-q", str(root / "origin.git"), "HEAD:main")
    remote = root / "dvc-remote"
    return {name: clone(root / "origin.git", root / name, remote) for name in ("a", "b", "user")}


@pytest.mark.integration
def test_a_run_across_two_workspaces_is_the_local_run_and_a_dvc_experiment(workers, reference_run):
    a, b = workers["a"], workers["b"]
    started = grappa(a, "start-run", "manual__2026-12-06T22:17:12+00:00")
    name = "manual__2026-12-06T22-17-12-00-00"
    assert f"run {name}: started at refs/exps/" in started.stdout
    where = {}
    for i, stage in enumerate(ORDER):
        if stage == "train_adaptor@2":  # the two k at once, one per worker: both commit on the run's ref
            jobs = [subprocess.Popen([PYTHON, "-m", "grappa", "task", s, "--run", name], cwd=w, env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    for s, w in (("train_adaptor@2", a), ("train_adaptor@4", b))]
            for job in jobs:
                out, _ = job.communicate(timeout=900)
                assert job.returncode == 0, out[-3000:]
            where.update({"train_adaptor@2": "a", "train_adaptor@4": "b"})
            continue
        if stage == "train_adaptor@4":
            continue
        worker = (a, b)[i % 2]
        done = grappa(worker, "task", stage, "--run", name)
        assert f"Running stage '{stage}'" in done.stdout and f"{stage} recorded at" in done.stdout
        where[stage] = worker.name
    assert set(where.values()) == {"a", "b"}

    local_lock = reference_run.lock  # `grappa run` in one workspace on the same images and params
    ref = git(a, "ls-remote", "origin", f"refs/exps/*/{name}").split("\t")[1]
    git(a, "fetch", "-q", "origin", ref)
    run_lock = yaml.safe_load(git(a, "show", f"FETCH_HEAD:dvc.lock"))
    # the same stages on the same code, data and params, wherever each ran; the same model and metrics
    assert lock_shape(run_lock) == lock_shape(local_lock) and len(run_lock["stages"]) == len(ORDER)
    metrics = json.loads(git(a, "show", "FETCH_HEAD:outputs/evaluate/report.json"))
    assert untimed(metrics) == untimed(reference_run.metrics)
    assert 0 < metrics["methods"]["grappa"]["mean"]["map_at_r"] <= 1

    again = grappa(b, "start-run", name)  # a retried plan task: the run stays as it is, checked out here
    assert f"run {name}: already started at {ref}" in again.stdout
    assert git(b, "rev-parse", "HEAD") == git(a, "rev-parse", "FETCH_HEAD")

    # a second run with no new data: every stage is up to date, on either worker
    grappa(b, "start-run", "second")
    for i, stage in enumerate(ORDER):
        done = grappa((b, a)[i % 2], "task", stage, "--run", "second", check_rc=(99,))
        assert f"stage '{stage}' is up to date" in done.stdout, done.stdout[-2000:]

    user = workers["user"]  # a person's checkout: the runs are experiments of its HEAD
    git(user, "fetch", "-q", "origin", "refs/exps/*:refs/exps/*")
    shown = subprocess.run([DVC, "exp", "show", "--json"], cwd=user, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert name in shown.stdout and "second" in shown.stdout and "map_at_r" in shown.stdout
    assert git(user, "status", "--porcelain") == ""
    for args in (["pull", "-f", "origin", name], ["apply", name]):  # its outputs too, then the workspace
        done = subprocess.run([DVC, "exp", *args], cwd=user, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert untimed(json.loads((user / "outputs/evaluate/report.json").read_text())) == untimed(metrics)
    assert (user / "outputs/model").is_dir()
    assert yaml.safe_load((user / "dvc.lock").read_text()) == run_lock


def test_run_names_are_git_ref_names():
    assert run_name("manual__2026-12-06T22:17:12.5+00:00") == "manual__2026-12-06T22-17-12.5-00-00"
    assert run_name("scheduled..x.lock") == "scheduled.x-lock"
    with pytest.raises(ConfigError):
        run_name(":::")


@pytest.mark.integration
def test_a_task_refuses_a_checkout_with_changes_and_an_unknown_run(workers):
    user = workers["user"]
    git(user, "checkout", "-q", "-f", "main")
    done = grappa(user, "task", "cluster", "--run", "nope", check_rc=(2,))
    assert done.stderr.count("\n") == 1 and "no run 'nope' on git remote origin" in done.stderr
    params = user / "params.yaml"
    params.write_text(params.read_text() + "\n# an edit in progress\n")
    grappa(user, "start-run", "third", check_rc=(2,))
    assert params.read_text().endswith("# an edit in progress\n")  # nothing lost
    git(user, "checkout", "--", "params.yaml")


@pytest.mark.integration
def test_a_task_that_loses_the_race_to_the_ref_commits_on_the_new_tip_keeping_the_other_entry(workers, monkeypatch):
    """Two tasks of a run commit at once: the one whose push is rejected (here: another commit lands
    on the ref between its fetch and its push) redoes its commit on the new tip, so neither stage's
    dvc.lock entry is lost."""
    from grappa import experiments
    from grappa.config import load_params

    a, b = workers["a"], workers["b"]
    name = "manual__2026-12-06T22-17-12-00-00"  # the run of the first test, complete on the remote
    ref = experiments.checkout_run(a, name)
    experiments.checkout_run(b, name)
    lock = yaml.safe_load((b / "dvc.lock").read_text())
    lock["stages"]["index"]["cmd"] += "  # from the other task"
    other = experiments._commit(b, git(b, "rev-parse", "HEAD"), {"dvc.lock": yaml.safe_dump(lock).encode()},
                                "the other task")
    real_push, calls = experiments._push, []

    def push(root, commit, to, force=False):
        calls.append(to)
        if len(calls) == 1:  # the other task's commit lands first: ours is no longer a fast-forward
            assert real_push(b, other, to)
        return real_push(root, commit, to, force)

    monkeypatch.setattr(experiments, "_push", push)
    params = load_params(str(a / "params.yaml"), {})
    commit = experiments.publish(a, name, ref, "cluster", params, echo=lambda line: None)
    assert calls.count(ref) == 2  # rejected once, then pushed on the new tip
    assert git(a, "rev-parse", f"{commit}^") == other
    merged = yaml.safe_load(git(a, "show", f"{commit}:dvc.lock"))["stages"]
    assert merged["index"]["cmd"].endswith("# from the other task")  # the other task's entry is kept
    assert merged["cluster"] == yaml.safe_load((a / "dvc.lock").read_text())["stages"]["cluster"]
