"""The DAG across two Celery workers that share no workspace, on two test hosts.

stack/celery.py starts the controller's services on a bridge (10.231.0.1): PostgreSQL (Airflow's
metadata DB and MLflow's store), Redis (the broker), MLflow with proxied artifacts, a git server,
moto's S3 server (a stand-in for S3: the DVC remote) and Airflow with the CeleryExecutor; each worker
runs in a network namespace of its own with its own hostname and its own clone of the repo. The test
shows: one DAG run whose tasks ran on both workers gives the metrics of `grappa run` in one
workspace, although the worker running train_fusion is killed mid-task (the task is retried on the
other); a second run with no new data is skipped stage by stage on both workers; `dvc exp show` lists
both runs. Needs root (namespaces), PostgreSQL and Redis from Debian's packages.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, make_collection, make_workspace
from grappa.experiments import run_name
from test_experiments import same_metrics
from test_loop import api_call

sys.path.insert(0, str(REPO))
from stack import celery, local  # noqa: E402

VENV_BIN = Path(sys.executable).parent
BRIDGE, SUBNET = "grappa-br0", "10.231.0"
HOSTS = {"worker-1": f"{SUBNET}.11", "worker-2": f"{SUBNET}.12"}
PIPELINE = "grappa_pipeline"
STEPS = {"snapshot", "extract", "merge_features", "warm_start", "cluster", "train_adaptor", "train_fusion", "evaluate", "index"}


def _missing() -> str | None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 (network namespaces for the test hosts)"
    if shutil.which("redis-server") is None or not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        return "needs Debian's redis-server and postgresql (apt-get install redis-server postgresql)"
    try:
        import airflow.providers.celery  # noqa: F401
    except ImportError:
        return "needs apache-airflow-providers-celery (requirements.lock)"
    return None


pytestmark = [pytest.mark.integration, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


def ip(*args: str, netns: str | None = None) -> None:
    subprocess.run(["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args], check=True, capture_output=True)


def _hosts_down() -> None:
    for name in HOSTS:
        subprocess.run(["ip", "netns", "del", f"grappa-{name}"], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


@pytest.fixture(scope="module")
def hosts():
    """A bridge for the controller (10.231.0.1) and a network namespace per worker host."""
    _hosts_down()
    ip("link", "add", BRIDGE, "type", "bridge")
    ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")
    for name, address in HOSTS.items():
        ns = f"grappa-{name}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        ip("link", "add", f"veth-{name}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", f"veth-{name}", "master", BRIDGE, "up")
        ip("addr", "add", f"{address}/24", "dev", "eth0", netns=ns)
        ip("link", "set", "eth0", "up", netns=ns)
        ip("link", "set", "lo", "up", netns=ns)
    yield
    _hosts_down()


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def deployment(hosts, tmp_path_factory):
    root = tmp_path_factory.mktemp("celery")
    manifests = make_collection(root / "data")
    seed = make_workspace(root / "seed", manifests, tracking={"experiment": "grappa-celery",
                                                              "registered_model": "grappa-celery"})
    shutil.copytree(REPO / "dags", seed / "dags", ignore=shutil.ignore_patterns("__pycache__"))
    (seed / ".dvc" / "config.local").unlink()
    git(seed, "add", "-A")
    git(seed, "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "the project")
    origin = root / "git" / "grappa.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    git(seed, "push", "-q", str(origin), "HEAD:main")
    os.environ.update(GRAPPA_HEARTBEAT_TIMEOUT_S="20", GRAPPA_RETRY_DELAY_S="2")
    controller = celery.Controller(f"{SUBNET}.1", root / "controller")
    subprocess.run(["git", "clone", "-q", str(origin), str(root / "controller-repo")], check=True)
    try:
        celery.start_controller(controller, root / "controller-repo", origin)
        workers = {}
        for name in HOSTS:
            clone = celery.prepare_clone(controller, root / name)
            workers[name] = (clone, celery.start_worker(controller, clone, name, root / f"{name}-home",
                                                       netns=f"grappa-{name}"))
        yield root, controller, workers
    finally:
        for name in HOSTS:
            celery.stop(root / f"{name}-home")
        celery.stop(controller.home)
        shutil.rmtree((controller.home / "postgres").resolve(), ignore_errors=True)  # linked from /tmp


def _wait_run(api: str, run_id: str, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while (state := api_call(api, "GET", f"/api/v2/dags/{PIPELINE}/dagRuns/{run_id}")["state"]) not in ("success", "failed"):
        assert time.monotonic() < deadline, f"run {run_id} still {state} after {timeout} s"
        time.sleep(3)
    return state


def _task_instances(api: str, run_id: str) -> list[dict]:
    return api_call(api, "GET", f"/api/v2/dags/{PIPELINE}/dagRuns/{run_id}/taskInstances")["task_instances"]


def _running(pid: int, stage: str) -> bool:
    """Whether the worker ``pid`` runs ``grappa task ... STAGE`` now."""
    import psutil

    for proc in local._processes([pid]):
        try:
            argv = proc.cmdline()
        except psutil.Error:  # gone or a zombie meanwhile
            continue
        if "task" in argv and argv[-1] == stage:
            return True
    return False


def test_two_workers_one_killed_mid_task_give_the_local_metrics_and_a_second_run_is_skipped(deployment, reference_run):
    root, controller, workers = deployment
    api = controller.url("api")
    deadline = time.monotonic() + 180
    while not [d for d in api_call(api, "GET", "/api/v2/dags")["dags"] if d["dag_id"] == PIPELINE]:
        assert time.monotonic() < deadline, "the DAG processor did not load grappa_pipeline"
        time.sleep(3)
    first = api_call(api, "POST", f"/api/v2/dags/{PIPELINE}/dagRuns", {"logical_date": None})["dag_run_id"]
    killed = None
    deadline = time.monotonic() + 900
    while killed is None:  # kill the worker host that runs train_fusion, once its task is under way
        for name, (_, pid) in workers.items():
            if _running(pid, "train_fusion"):
                local._signal_groups(local._processes([pid]), signal.SIGKILL)
                killed = name
        assert time.monotonic() < deadline, "train_fusion never started"
        time.sleep(0.5)
    assert _wait_run(api, first) == "success"
    tis = _task_instances(api, first)
    by_task = {(t["task_id"], t["map_index"]): t for t in tis}
    ran_on = {t["hostname"] for t in tis if t["task_id"] in STEPS and t["state"] == "success"}
    assert ran_on == set(HOSTS), ran_on  # every step succeeded, on one host or the other: both served
    fusion = by_task[("train_fusion", -1)]
    assert fusion["try_number"] == 2 and fusion["hostname"] != killed  # retried on the survivor

    user = root / "user"  # a person's checkout: the run is an experiment on the git server
    subprocess.run(["git", "clone", "-q", controller.url("git"), str(user)], check=True)
    git(user, "fetch", "-q", "origin", "refs/exps/*:refs/exps/*")
    name = run_name(first)
    ref = [r for r in git(user, "for-each-ref", "--format=%(refname)", "refs/exps").split() if r.endswith(name)]
    assert ref, f"no experiment ref of {first}"
    metrics = json.loads(git(user, "show", f"{ref[0]}:outputs/evaluate/report.json"))
    assert same_metrics(metrics, reference_run.metrics)  # `grappa run` in one workspace, same images

    # the killed host comes back; a run with no new data is skipped stage by stage, on both hosts
    clone, _ = workers[killed]
    workers[killed] = (clone, celery.start_worker(controller, clone, killed, root / f"{killed}-home",
                                                  netns=f"grappa-{killed}"))
    second = api_call(api, "POST", f"/api/v2/dags/{PIPELINE}/dagRuns", {"logical_date": None})["dag_run_id"]
    assert _wait_run(api, second) == "success"
    steps = [t for t in _task_instances(api, second) if t["task_id"] in STEPS]
    assert {t["state"] for t in steps} == {"skipped"} and len(steps) == len(STEPS) + 1, [(t["task_id"], t["state"]) for t in steps]
    assert {t["hostname"] for t in steps} == set(HOSTS)

    git(user, "fetch", "-q", "origin", "refs/exps/*:refs/exps/*")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    shown = subprocess.run([str(VENV_BIN / "dvc"), "exp", "show", "--json"], cwd=user, env=env, capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode == 0 and name in shown.stdout and "map_at_r" in shown.stdout, shown.stderr[-2000:]
    assert run_name(second) in shown.stdout

    from mlflow.tracking import MlflowClient  # the steps were recorded on the MLflow server (PostgreSQL)

    client = MlflowClient(controller.url("mlflow"))
    experiment = client.get_experiment_by_name("grappa-celery").experiment_id
    (parent,) = client.search_runs([experiment], f"tags.`airflow.dag_run_id` = '{first}' and tags.`grappa.kind` = 'pipeline'")
    assert parent.info.status == "FINISHED"
