"""The loop as a user lives it, under a real Airflow 3 scheduler on loopback (not ``dag.test()``).

``stack/local.py`` (what ``make up`` runs) starts api-server (127.0.0.1), scheduler, dag-processor
and triggerer as separate processes on SQLite with the LocalExecutor, and an MLflow tracking server
beside them; the local runner works in a DVC workspace of tiny images. Images dropped into the watched folder go through the folder watcher, an asset
event and a ``grappa_pipeline`` run; the second drop must extract exactly the new images and
register a new model version; an event with nothing new must end as a visible no-op; ``dvc status``
must be up to date at the end. Everything is driven through the REST API, as a user's script would.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, draw_image, make_collection, make_workspace, write_step_params

sys.path.insert(0, str(REPO))
from stack import local  # noqa: E402  (the launcher `make up` runs)

VENV_BIN = Path(sys.executable).parent
PIPELINE, WATCHER = "grappa_pipeline", "grappa_watch_folder"
STEP_TASKS = {"snapshot", "extract", "merge_features", "warm_start", "cluster", "train_adaptor", "train_fusion", "evaluate", "index"}
GLUE_TASKS = {"plan", "plan_extract", "plan_train_adaptor", "close_run"}  # plan_<task>: a mapped task's commands
MODEL = "grappa-loop"

pytestmark = pytest.mark.skipif(not (VENV_BIN / "airflow").exists() or shutil.which("git") is None,
                                reason="needs the airflow CLI in the venv and git")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api_call(api: str, method: str, path: str, body: dict | None = None) -> dict:
    """One call of Airflow's REST API at ``api`` (no login: a token from /auth/token)."""
    token = json.loads(urllib.request.urlopen(f"{api}/auth/token", timeout=30).read())["access_token"]
    request = urllib.request.Request(f"{api}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"{}")


@dataclass
class Loop:
    """The running stack, seen through Airflow's REST API (as a user's script sees it)."""

    settings: local.Settings
    root: Path

    @property
    def repo(self) -> Path:
        return self.settings.workspace

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        return api_call(self.settings.api, method, path, body)

    def runs(self, dag_id: str) -> list[dict]:
        return self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]

    def tasks(self, dag_id: str, run_id: str) -> dict[tuple[str, int], str]:
        found = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {(t["task_id"], t["map_index"]): t["state"] for t in found}

    def log(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
        """The first try's log of a task (of one instance of a mapped task: ``map_index`` >= 0)."""
        query = f"?map_index={map_index}" if map_index >= 0 else ""
        content = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/1{query}")
        return "\n".join(str(line.get("event", "")) for line in content["content"])

    def wait(self, dag_id: str, run_id: str, timeout: float = 900) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                return state
            dead = set(local.SERVICES) - set(local.status(self.settings))
            assert not dead, f"{dead} died; logs in {self.settings.home}"
            assert time.monotonic() < deadline, f"{dag_id} {run_id} still {state} after {timeout} s"
            time.sleep(3)

    def mlflow(self):
        """A client of the stack's MLflow server (tracking and registry)."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.settings.mlflow, registry_uri=self.settings.mlflow)

    def pipeline_run(self, run_id: str):
        """The MLflow parent run of the DAG run ``run_id`` (experiment grappa-loop)."""
        client = self.mlflow()
        experiment = client.get_experiment_by_name("grappa-loop").experiment_id
        (parent,) = client.search_runs([experiment], f"tags.`airflow.dag_run_id` = '{run_id}' "
                                                     "and tags.`grappa.kind` = 'pipeline'")
        return parent

    def announce(self, source: str, fingerprint: str) -> None:
        """An event on the pipeline's asset, as a watcher or an uploader POSTs one."""
        (asset,) = [a for a in self.call("GET", "/api/v2/assets")["assets"] if a["name"] == "grappa_unlabeled"]
        self.call("POST", "/api/v2/assets/events", {"asset_id": asset["id"],
                                                   "extra": {"source": source, "fingerprint": fingerprint}})

    def trigger(self, dag_id: str) -> str:
        return self.call("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None})["dag_run_id"]

    def new_run(self, before: set[str], timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not (new := [r for r in self.runs(PIPELINE) if r["dag_run_id"] not in before]):
            assert time.monotonic() < deadline, "the asset event started no pipeline run"
            time.sleep(2)
        return new[0]["dag_run_id"]

    def poll_watcher(self) -> tuple[str, str | None, str]:
        """Run the folder watcher now; returns its task's state, the pipeline run it caused (if any) and its log."""
        before = {r["dag_run_id"] for r in self.runs(PIPELINE)}
        run_id = self.trigger(WATCHER)
        assert self.wait(WATCHER, run_id, timeout=300) == "success"
        state = self.tasks(WATCHER, run_id)[("detect_folder_change", -1)]
        log = self.log(WATCHER, run_id, "detect_folder_change")
        return state, (self.new_run(before) if state == "success" else None), log


def _drop(folder: Path, names: list[str], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        draw_image("shapes", i % 4, seed=seed + i, size=32).save(folder / name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    manifests = make_collection(root / "data", size=32, per_class=3, unlabeled=12)
    (root / "incoming").mkdir()
    repo = make_workspace(root / "repo", [*manifests, root / "incoming"], link_code=True, cluster={"ks": [2, 3]},
                          tracking={"experiment": "grappa-loop", "registered_model": MODEL})
    with running(repo, root, {}) as loop:
        yield loop


@contextlib.contextmanager
def running(repo: Path, root: Path, env: dict) -> Iterator[Loop]:
    """The stack on ``repo`` (state under ``root``), up until every DAG is parsed; stopped after."""
    settings = local.Settings(workspace=repo, home=root / "stack", api_port=_free_port(), mlflow_port=_free_port(),
                              watch_schedule="",  # the tests run the watcher themselves, once they have dropped images
                              env={"GRAPPA_RETRIES": "0", "GRAPPA_WATCH_SETTLE_S": "1", "OMP_NUM_THREADS": "1", **env})
    try:
        local.start(settings)
        loop = Loop(settings, root)
        deadline = time.monotonic() + 180
        while {PIPELINE, WATCHER} - {d["dag_id"] for d in loop.call("GET", "/api/v2/dags")["dags"]}:
            assert time.monotonic() < deadline, "DAGs not parsed in 180 s"
            time.sleep(2)
        yield loop
    finally:
        local.stop(settings)
        assert local.status(settings) == {}


def _report(stack: Loop, step: str) -> dict:
    return json.loads((stack.repo / "outputs" / step / "report.json").read_text())


def _versions(stack: Loop) -> list[int]:
    return sorted(int(v.version) for v in stack.mlflow().search_model_versions(f"name = '{MODEL}'"))


@pytest.fixture(scope="module")
def first_run(stack):
    _drop(stack.root / "incoming" / "shapes", [f"first{i}.png" for i in range(4)], seed=5000)
    state, run_id, log = stack.poll_watcher()
    assert state == "success" and run_id.startswith("asset_triggered__") and "event: " in log
    assert stack.wait(PIPELINE, run_id) == "success", stack.tasks(PIPELINE, run_id)
    return run_id


def test_dropped_images_start_a_pipeline_run_that_registers_a_model(stack, first_run):
    tasks = stack.tasks(PIPELINE, first_run)
    assert {task for task, _ in tasks} == STEP_TASKS | GLUE_TASKS
    assert set(tasks.values()) == {"success"}, tasks
    assert {index for task, index in tasks if task == "train_adaptor"} == {0, 1}  # one task per k
    assert _report(stack, "snapshot")["since_previous"]["new"] == 48 + 4  # the manifests' images and the drop
    assert _versions(stack) == [1]
    # the event's (source, fingerprint) reached the run: logged by plan, tagged on the MLflow parent run
    plan_log = stack.log(PIPELINE, first_run, "plan")
    (line,) = [line for line in plan_log.splitlines() if line.startswith("triggered by new data: source=")]
    assert str((stack.root / "incoming").resolve()) in line and str(stack.root / "data" / "shapes") in line
    parent = stack.pipeline_run(first_run)
    assert parent.info.status == "FINISHED" and parent.data.tags["grappa.trigger.fingerprint"] in plan_log
    index = json.loads((stack.repo / "outputs" / "index" / "index.json").read_text())
    assert index["model_version"] == "1" and index["count"] == 52


def test_new_images_are_the_only_ones_extracted_and_a_new_version_is_registered(stack, first_run):
    _drop(stack.root / "incoming" / "shapes", ["second0.png", "second1.png", "second2.png"], seed=6000)
    state, run_id, _ = stack.poll_watcher()
    assert state == "success"
    assert stack.wait(PIPELINE, run_id) == "success", stack.tasks(PIPELINE, run_id)
    assert _report(stack, "snapshot")["since_previous"] == {"new": 3, "changed": 0, "removed": 0, "unchanged": 52}
    assert _report(stack, "snapshot")["files_read"] == 3  # the others kept their hashes (size + mtime)
    extract = _report(stack, "extract")
    assert (extract["computed"], extract["from_cache"]) == (3, 52)
    assert _versions(stack) == [1, 2]
    assert "tracking: registered grappa-loop version 2" in stack.log(PIPELINE, run_id, "evaluate")


def test_nothing_new_is_a_visible_no_op(stack, first_run):
    # the watcher sees the listing the last run started on: no event, and it says why
    before = {r["dag_run_id"] for r in stack.runs(PIPELINE)}
    state, run_id, log = stack.poll_watcher()
    assert (state, run_id) == ("skipped", None) and {r["dag_run_id"] for r in stack.runs(PIPELINE)} == before
    assert "no event: " in log and f"{(stack.root / 'incoming').resolve()} unchanged since the last {PIPELINE} run" in log
    # an asset event anyway (e.g. an uploader POSTing one): every step is skipped, each log says why
    stack.announce("api", "x")
    run_id = stack.new_run(before)
    assert stack.wait(PIPELINE, run_id) == "success"
    tasks = stack.tasks(PIPELINE, run_id)
    assert tasks.pop(("plan", -1)) == "success"
    assert set(tasks.values()) == {"skipped"}, tasks
    assert "nothing to do: the data, params and code are those dvc.lock recorded" in stack.log(PIPELINE, run_id, "plan")
    assert _versions(stack) == [1, 2]  # nothing registered


def test_dvc_status_is_up_to_date_at_the_end(stack, first_run):
    done = subprocess.run([str(VENV_BIN / "dvc"), "status"], cwd=stack.repo, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 0 and "Data and pipelines are up to date." in done.stdout, done.stdout + done.stderr


# -- the same loop with the docker runner: every step in a container of the step image ---------

def lineage(loop: Loop, run_id: str) -> dict:
    """What MLflow holds of one pipeline run, by name: the parent run and each step run (status, the
    keys of params, metrics and tags, dataset inputs, artifacts) and the model versions it made."""
    client, parent = loop.mlflow(), loop.pipeline_run(run_id)
    steps = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")

    def artifacts(run_id: str, path: str | None = None) -> list[str]:
        return sorted(p for f in client.list_artifacts(run_id, path)
                      for p in (artifacts(run_id, f.path) if f.is_dir else [f.path]))

    def facts(run) -> dict:
        # dvc.* tags come from dvc.lock: the local runner runs `dvc repro`, a container the step CLI
        tags = sorted(k for k in run.data.tags if not k.startswith("dvc."))
        return {"status": run.info.status, "params": sorted(run.data.params), "metrics": sorted(run.data.metrics),
                "tags": tags, "datasets": sorted(d.dataset.name for d in run.inputs.dataset_inputs),
                "artifacts": artifacts(run.info.run_id)}

    made = {run.info.run_id: run.info.run_name for run in steps}
    versions = client.search_model_versions(f"name = '{MODEL}'")
    return {"pipeline": facts(parent), "steps": {run.info.run_name: facts(run) for run in steps},
            "versions": sorted((v.version, made[v.run_id]) for v in versions if v.run_id in made)}


def _differences(left: dict, right: dict, path: str = "") -> list[str]:
    """Where two lineage dicts differ, one line each (what only the left / only the right holds)."""
    if isinstance(left, dict) and isinstance(right, dict):
        return [line for key in sorted(set(left) | set(right), key=str)
                for line in _differences(left.get(key), right.get(key), f"{path}/{key}")]
    if isinstance(left, list) and isinstance(right, list) and left != right:
        only_left, only_right = [x for x in left if x not in right], [x for x in right if x not in left]
        return [f"{path}: only in containers {only_left}, only local {only_right}"]
    return [] if left == right else [f"{path}: {left!r} != {right!r}"]


@pytest.fixture(scope="module")
def docker_stack(tmp_path_factory, step_image):
    root = tmp_path_factory.mktemp("docker-loop")
    manifests = make_collection(root / "data", size=32, per_class=3, unlabeled=12)
    repo = root / "repo"
    repo.mkdir()
    write_step_params(repo, manifests, cluster={"ks": [2, 3]},
                      tracking={"experiment": "grappa-loop", "registered_model": MODEL})
    os.chown(repo, 1000, 1000)  # the workspace the step containers (uid 1000) write to
    env = {"GRAPPA_RUNNER": "docker", "GRAPPA_IMAGE": step_image, "GRAPPA_DOCKER_MOUNTS": f"{root / 'data'}:/data"}
    with running(repo, root, env) as loop:
        yield loop


def test_the_docker_runner_runs_each_step_in_its_container_with_the_local_runners_lineage(stack, first_run,
                                                                                           docker_stack):
    # new data announced as a watcher or an uploader announces it: an asset event with its source
    before = {r["dag_run_id"] for r in docker_stack.runs(PIPELINE)}
    docker_stack.announce(str(docker_stack.root / "data"), "f1")
    run_id = docker_stack.new_run(before)
    assert docker_stack.wait(PIPELINE, run_id) == "success", docker_stack.tasks(PIPELINE, run_id)
    tasks = docker_stack.tasks(PIPELINE, run_id)
    assert {task for task, _ in tasks} == STEP_TASKS | GLUE_TASKS
    assert set(tasks.values()) == {"success"}, tasks
    # each step ran in a container of the image, as the image's user, and wrote to the workspace
    extract_log = docker_stack.log(PIPELINE, run_id, "extract", map_index=0)  # mapped over the shards
    assert f"Starting docker container from image {docker_stack.settings.env['GRAPPA_IMAGE']}" in extract_log
    outputs = docker_stack.repo / "outputs"
    assert {p.stat().st_uid for p in outputs.rglob("*")} == {1000}
    assert json.loads((outputs / "index" / "index.json").read_text())["model_version"] == "1"
    assert "tracking: registered grappa-loop version 1" in docker_stack.log(PIPELINE, run_id, "evaluate")
    assert docker_stack.mlflow().get_model_version_by_alias(MODEL, "champion").version == "1"
    # MLflow holds the same lineage as for the local runner's run: the same runs, keys, datasets, artifacts
    in_containers, local_runner = lineage(docker_stack, run_id), lineage(stack, first_run)
    assert in_containers == local_runner, _differences(in_containers, local_runner)
