"""Airflow DAGs: clean import, structure in sync with dvc.yaml, container runner specs, a real
`dag.test()` run with the local runner, and the folder watcher's emit-on-change behaviour."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import yaml

from conftest import REPO

DAGS = REPO / "dags"
# Airflow reads its config when first imported: point it at a throw-away home and our DAG folder.
os.environ.update(
    AIRFLOW_HOME=os.environ.get("GRAPPA_TEST_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="grappa-airflow-"),
    AIRFLOW__CORE__LOAD_EXAMPLES="False",
    AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
    GRAPPA_WATCH_SETTLE_S="0",
)
pytest.importorskip("airflow.sdk")
sys.path.insert(0, str(DAGS))
import planning  # noqa: E402
import runners  # noqa: E402
import watchers  # noqa: E402

STEP_TASKS = {"snapshot", "extract", "merge_features", "warm_start", "cluster", "train_adaptor", "train_fusion", "evaluate", "index"}
# plan_<task>: hands plan's commands of a mapped task to it (mapping reads only a return value)
GLUE_TASKS = {"plan", "plan_extract", "plan_train_adaptor", "close_run"}
# the DAG processor reads the step registry (standard library only), nothing of the steps themselves
HEAVY = ("torch", "timm", "faiss", "grappa.core", "pipeline_steps", "grappa.tracking", "grappa.cli", "mlflow", "dvc",
         "pandas")


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag


@pytest.fixture(scope="module")
def pipeline(dagbag):
    return dagbag.dags["grappa_pipeline"]


@pytest.fixture(scope="module")
def airflow_db():
    from airflow.configuration import conf
    from airflow.utils import db

    # Guard: a test module that imported Airflow earlier with another home would make this
    # migrate (and dag.test write to) that home's database.
    assert conf.get("core", "dags_folder") == str(DAGS), "airflow was configured before tests/test_dag.py"
    db.initdb()


def test_dag_folder_parses_without_heavy_imports(tmp_path):
    # A deployed copy of dags/ outside the repo finds the repo through GRAPPA_REPO.
    folder = tmp_path / "dags"
    folder.mkdir()
    for name in (".airflowignore", "grappa_pipeline.py", "planning.py", "runners.py", "watchers.py"):
        (folder / name).write_text((DAGS / name).read_text())
    code = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(folder)!r})\n"
        f"print(json.dumps({{'errors': bag.import_errors, 'dags': sorted(bag.dag_ids),"
        f" 'repo': str(sys.modules['runners'].REPO), 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    env = {**os.environ, "GRAPPA_RUNNER": "local", "GRAPPA_REPO": str(REPO), "AIRFLOW__CORE__DAGS_FOLDER": str(folder)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"errors": {}, "dags": ["grappa_pipeline", "grappa_watch_folder", "grappa_watch_s3"],
                      "repo": str(REPO), "heavy": []}


def test_step_tasks_match_dvc_stages(pipeline):
    done = subprocess.run([str(REPO / ".venv" / "bin" / "dvc"), "stage", "list", "--name-only"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stages = {name.split("@")[0] for name in done.stdout.split()}
    assert stages == STEP_TASKS
    assert set(pipeline.task_ids) - GLUE_TASKS == stages


def test_pipeline_structure(pipeline, dagbag):
    up = {t.task_id: t.upstream_task_ids - {"plan"} for t in pipeline.tasks}
    assert up == {"plan": set(), "snapshot": set(), "plan_extract": set(), "extract": {"snapshot", "plan_extract"},
                  "merge_features": {"extract"}, "warm_start": {"merge_features"}, "cluster": {"warm_start"}, "plan_train_adaptor": set(),
                  "train_adaptor": {"cluster", "plan_train_adaptor"}, "train_fusion": {"train_adaptor"},
                  "evaluate": {"train_fusion"}, "index": {"evaluate"}, "close_run": {"index"}}
    for task_id in STEP_TASKS:
        task = pipeline.get_task(task_id)
        assert task.retries >= 1 and task.retry_exponential_backoff > 1, task_id
        # an up-to-date stage exits 99 and shows as skipped, without skipping the stages after it
        skip = task.partial_kwargs["skip_on_exit_code"] if task.is_mapped else task.skip_on_exit_code
        assert task.trigger_rule == "none_failed" and runners.UP_TO_DATE_EXIT in (
            skip if isinstance(skip, (list, tuple, set)) else [skip]), task_id
    assert pipeline.get_task("plan").retries == 0  # a bad run conf must fail at once
    assert pipeline.get_task("close_run").trigger_rule == "all_done"  # the MLflow parent is closed whatever happened
    adaptor = pipeline.get_task("train_adaptor")
    assert adaptor.is_mapped and adaptor.max_active_tis_per_dagrun == runners.parallel("k", "local")
    assert adaptor.map_index_template.startswith("k=")
    # one mapped axis per task: extract over the shards, with its own cap
    extract = pipeline.get_task("extract")
    assert extract.is_mapped and extract.max_active_tis_per_dagrun == runners.parallel("shard", "local")
    assert extract.map_index_template.startswith("shard=")
    assert set(extract.expand_input.value) == {"bash_command"} and set(adaptor.expand_input.value) == {"bash_command"}
    assert not pipeline.get_task("merge_features").is_mapped
    assert pipeline.max_active_runs == 1
    assert [a.name for a in pipeline.timetable.asset_condition.objects] == ["grappa_unlabeled"]
    for dag_id, task_id in (("grappa_watch_folder", "detect_folder_change"), ("grappa_watch_s3", "detect_s3_change")):
        assert [a.name for a in dagbag.dags[dag_id].get_task(task_id).outlets] == ["grappa_unlabeled"]
    assert dagbag.dags["grappa_watch_s3"].get_task("wait_for_objects").deferrable
    # no bucket configured here: the S3 watcher starts paused instead of failing every poll
    assert "GRAPPA_WATCH_BUCKET" not in os.environ and dagbag.dags["grappa_watch_s3"].is_paused_upon_creation


def test_adaptors_and_shards_in_parallel_fit_the_local_worker(monkeypatch):
    monkeypatch.delenv("GRAPPA_MAX_PARALLEL_K", raising=False)
    monkeypatch.delenv("GRAPPA_MAX_PARALLEL_SHARDS", raising=False)
    for cores, local in ((2, 1), (1, 1), (8, 2), (16, 4)):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        for axis in ("k", "shard"):
            assert (runners.parallel(axis, "local"), runners.parallel(axis, "k8s"),
                    runners.parallel(axis, "docker")) == (local, 2, 2), (cores, axis)
    monkeypatch.setenv("GRAPPA_MAX_PARALLEL_K", "3")
    monkeypatch.setenv("GRAPPA_MAX_PARALLEL_SHARDS", "5")
    assert (runners.parallel("k", "local"), runners.parallel("shard", "k8s")) == (3, 5)


def test_shard_cap_reaches_the_mapped_extract_task(monkeypatch):
    monkeypatch.setenv("GRAPPA_MAX_PARALLEL_SHARDS", "7")
    monkeypatch.setenv("GRAPPA_MAX_PARALLEL_K", "1")
    sys.modules.pop("grappa_pipeline", None)
    import grappa_pipeline

    dag = grappa_pipeline.build_pipeline("local")
    assert dag.get_task("extract").max_active_tis_per_dagrun == 7
    assert dag.get_task("train_adaptor").max_active_tis_per_dagrun == 1
    assert dag.params["shards"] is None  # a run conf may set it


@pytest.mark.parametrize("runner, command, shown", [
    ("local", {"bash_command": "/venv/bin/python -m grappa repro extract@1-of-3"}, "shard=1/3"),
    ("local", {"bash_command": "/venv/bin/python -m grappa repro train_adaptor@16"}, "k=16"),
    ("docker", {"command": ["--params", "params.yaml", "extract", "--shard", "2/3"]}, "shard=2/3"),
    ("k8s", {"arguments": ["--params", "params.yaml", "train-adaptor", "--k", "8"]}, "k=8"),
])
def test_map_index_names_the_item_as_the_cli_spells_it(runner, command, shown):
    import jinja2
    from types import SimpleNamespace

    task_id = "extract" if shown.startswith("shard") else "train_adaptor"
    [commands] = command.values()
    template = runners.step_operator(task_id, [commands], runner, mapped=True).map_index_template
    assert jinja2.Template(template).render(task=SimpleNamespace(**command)) == shown


def test_plan_turns_run_conf_into_cli_overrides(tmp_path, monkeypatch):
    monkeypatch.setattr(runners, "REPO", tmp_path)  # the workspace the conf's params_file must be in
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"cluster": {"ks": [8, 4]}}))
    plan = planning.plan({"params_file": str(params)}, "docker")
    assert plan["ks"] == [4, 8] and plan["shards"] == 1 and plan["prepare"] is None
    assert plan["extract"] == [["--params", str(params), "extract", "--shard", "0/1"]]  # extract.shards unset: 1
    assert plan["merge_features"] == ["--params", str(params), "merge-features"]
    assert plan["train_adaptor"][1] == ["--params", str(params), "train-adaptor", "--k", "8"]
    # local runs go through DVC: the conf is written into the workspace first, then each task is a stage
    plan = planning.plan({"params_file": str(params), "sources": ["s3://b/raw/"], "ks": [3, 2]}, "local")
    assert plan["prepare"].endswith("--params " + str(params) + " --set 'data.sources=[\"s3://b/raw/\"]' "
                                    "--set 'cluster.ks=[3, 2]' prepare")
    assert plan["prepare"].split()[:3] == [sys.executable, "-m", "grappa"]
    assert plan["cluster"] == shlex.join([sys.executable, "-m", "grappa", "repro", "cluster"])
    assert [c.split()[-1] for c in plan["train_adaptor"]] == ["train_adaptor@2", "train_adaptor@3"]
    assert [c.split()[-1] for c in plan["extract"]] == ["extract@0-of-1"]
    for bad in ({"ks": [4]}, {"ks": [1, 2]}, {"ks": [2, 2]}):
        with pytest.raises(ValueError, match="cluster.ks"):
            planning.plan(bad, "local")
    with pytest.raises(ValueError, match="pass 'ks'"):
        planning.plan({"params_file": "missing.yaml"}, "k8s")
    with pytest.raises(ValueError, match="pass 'shards'"):
        planning.plan({"params_file": "missing.yaml", "ks": [2, 4]}, "k8s")


def test_plan_refuses_a_conf_that_could_inject_or_escape(tmp_path, monkeypatch):
    """A run conf is untrusted: its sources enter params.yaml, dvc.yaml and a command line, its
    params_file is read by the worker."""
    monkeypatch.setattr(runners, "REPO", tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"cluster": {"ks": [2, 4]}}))
    for bad, match in ((["data/x\n  evil:\n    cmd: touch /tmp/pwned"], "control character"),
                       (["http://host/images"], "only local paths and s3://"), ("data/x", "must be a list"),
                       (["${HOME}"], "not allowed")):
        with pytest.raises(ValueError, match=match):
            planning.plan({"ks": [2, 4], "sources": bad}, "local")
    for escape in ("../outside.yaml", "/etc/passwd", "sub/../../outside.yaml"):
        with pytest.raises(ValueError, match="outside the workspace"):
            planning.plan({"params_file": escape, "ks": [2, 4]}, "local")
    assert planning.plan({"params_file": "p.yaml"}, "local")["ks"] == [2, 4]


def test_local_steps_are_pinned_to_the_params_their_run_wrote(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setattr(runners, "REPO", tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"cluster": {"ks": [2, 4]}}))
    digest = hashlib.sha256((tmp_path / "params.yaml").read_bytes()).hexdigest()
    output = f"params.yaml: cluster.ks: [2, 4] -> [2, 8]\nparams.yaml sha256: {digest}\n"  # what prepare prints
    pinned = planning.pin_params(planning.plan({}, "local"), planning.pinned_digest(output))
    assert pinned["cluster"].endswith(f"repro --params-sha256 {digest} cluster")
    assert [c.split()[-1] for c in pinned["train_adaptor"]] == ["train_adaptor@2", "train_adaptor@4"]
    # the mapped tasks' labels (the command's last word) still name the item, not the digest
    from types import SimpleNamespace

    labels = [eval(runners.MAP_INDEX_ITEM["local"], {}, {"task": SimpleNamespace(bash_command=c)})
              for c in pinned["train_adaptor"] + pinned["extract"]]
    assert labels == ["2", "4", "0/1"]
    assert "--params-sha256" not in pinned["prepare"] + pinned["close_run"]
    with pytest.raises(RuntimeError, match="did not report"):
        planning.pinned_digest("params.yaml: unchanged\n")


def test_own_workspaces_plan_a_run_started_on_the_git_remote_and_one_task_per_stage(tmp_path, monkeypatch):
    """GRAPPA_WORKSPACE_MODE=own (Celery workers with clones of their own): the plan starts the run as
    an experiment named after the Airflow run id, with the conf; every step is `grappa task --run`."""
    from types import SimpleNamespace

    monkeypatch.setattr(runners, "REPO", tmp_path)
    monkeypatch.setenv("GRAPPA_WORKSPACE_MODE", "own")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"cluster": {"ks": [2, 4]}}))
    plan = planning.plan({"ks": [2, 8]}, "local", "manual__2026-12-06T22:17:12+00:00")
    name = "manual__2026-12-06T22-17-12-00-00"
    assert plan["start"].endswith(f"--set 'cluster.ks=[2, 8]' start-run {name}") and plan["prepare"] is None
    assert plan["cluster"].endswith(f"task --run {name} cluster")
    assert [c.split()[-1] for c in plan["train_adaptor"]] == ["train_adaptor@2", "train_adaptor@8"]
    labels = [eval(runners.MAP_INDEX_ITEM["local"], {}, {"task": SimpleNamespace(bash_command=c)})
              for c in plan["train_adaptor"] + plan["extract"]]
    assert labels == ["2", "8", "0/1"]
    assert planning.stale_stages("local") is None  # each task finds out itself whether it is up to date
    # a container or pod: the same verb in the image's own workspace, no shared volume mounted
    assert planning.plan({}, "docker", "r")["train_adaptor"][1] == ["task", "--run", "r", "train_adaptor@4"]
    _, docker = runners._operator_spec("cluster", "docker")
    assert [m["Target"] for m in docker["mounts"]] == []
    _, pod = runners._operator_spec("cluster", "k8s")
    assert [m.mount_path for m in pod["volume_mounts"]] == ["/dev/shm"]
    monkeypatch.setenv("GRAPPA_WORKSPACE_MODE", "private")
    with pytest.raises(ValueError, match="GRAPPA_WORKSPACE_MODE must be one of"):
        planning.plan({}, "local", "r")


def test_plan_maps_extract_over_the_shards_of_the_run_conf(tmp_path, monkeypatch):
    """conf {"shards": 3}: three extract commands for every runner, the conf written as extract.shards."""
    monkeypatch.setattr(runners, "REPO", tmp_path)
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"cluster": {"ks": [2, 4]}, "extract": {"shards": 2}}))
    conf = {"params_file": str(params), "shards": 3}
    for runner in runners.RUNNERS:
        plan = planning.plan(conf, runner)
        assert plan["shards"] == 3 and len(plan["extract"]) == 3, runner
        if runner == "local":
            assert [c.split()[-1] for c in plan["extract"]] == ["extract@0-of-3", "extract@1-of-3", "extract@2-of-3"]
            assert plan["prepare"].endswith("--set extract.shards=3 prepare")
            assert plan["merge_features"].endswith("repro merge_features")
        else:
            assert plan["extract"] == [["--params", str(params), "--set", "extract.shards=3", "extract", "--shard",
                                        f"{i}/3"] for i in range(3)]
            assert plan["cluster"] == ["--params", str(params), "--set", "extract.shards=3", "cluster"]
    # without the conf key: the params file's extract.shards
    assert [c[-1] for c in planning.plan({"params_file": str(params)}, "k8s")["extract"]] == ["0/2", "1/2"]
    for bad in (0, -1, True, "2", 1.5):
        with pytest.raises(ValueError, match="extract.shards must be an integer >= 1"):
            planning.plan({**conf, "shards": bad}, "local")


def test_trigger_events_reach_the_steps():
    from types import SimpleNamespace

    events = {"grappa_unlabeled": [SimpleNamespace(extra={"source": "/data/in", "fingerprint": "abc"}),
                                   SimpleNamespace(extra={})]}
    assert planning.trigger_events(events) == [{"source": "/data/in", "fingerprint": "abc"}]
    assert planning.trigger_events(None) == []


@pytest.fixture
def container_env(monkeypatch):
    monkeypatch.setenv("GRAPPA_IMAGE", "registry.example/grappa:1.2")
    monkeypatch.setenv("GRAPPA_GPU", "1")
    monkeypatch.setenv("GRAPPA_K8S_SECRET", "grappa-aws")
    monkeypatch.setenv("GRAPPA_WORKSPACE", "grappa-workspace")
    monkeypatch.setenv("GRAPPA_DOCKER_MOUNTS", "/srv/images:/data, /srv/more:/more")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    monkeypatch.setenv("GRAPPA_STACK", "/srv/grappa/.stack")
    monkeypatch.delenv("GRAPPA_TRACKING")  # a deployment's worker: tracking on (the tests turn it off)
    return planning.plan({"ks": [2, 3]}, "docker")


def test_docker_runner_renders_container_args(container_env, dagbag):
    from airflow.providers.docker.operators.docker import DockerOperator

    op = runners.step_operator("merge_features", container_env["merge_features"], "docker")
    assert isinstance(op, DockerOperator)
    assert op.image == "registry.example/grappa:1.2"
    assert op.command == ["--params", "params.yaml", "--set", "cluster.ks=[2, 3]", "merge-features"]
    workspace, *data = op.mounts
    assert (workspace["Target"], workspace["Source"], workspace["Type"]) == ("/workspace", "grappa-workspace", "volume")
    assert not workspace.get("ReadOnly")
    # images come in read-only; the step containers share the worker's network (MLflow on 127.0.0.1)
    assert [(m["Source"], m["Target"], m["Type"], m["ReadOnly"]) for m in data] == [
        ("/srv/images", "/data", "bind", True), ("/srv/more", "/more", "bind", True)]
    assert op.network_mode == "host"
    assert op.device_requests[0].capabilities == [["gpu"]]
    # secrets only as private env; the Airflow run id (templated) joins the steps in one MLflow parent run
    assert op.environment == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", **runners.AIRFLOW_CONTEXT_ENV,
                              "GRAPPA_TRIGGER": runners.TRIGGER_TEMPLATE}
    assert runners.AIRFLOW_CONTEXT_ENV["AIRFLOW_CTX_DAG_RUN_ID"] == "{{ run_id }}"
    assert op._private_environment == {"AWS_SECRET_ACCESS_KEY": "not-a-real-secret"}
    assert op.retries >= 1 and not op.mount_tmp_dir and op.auto_remove == "success"
    assert op.labels == {"grappa.stack": "/srv/grappa/.stack"}  # how `make down` finds the containers in flight
    # Whole DAG with this runner: the mapped task expands the docker command over k.
    sys.modules.pop("grappa_pipeline", None)
    import grappa_pipeline

    dag = grappa_pipeline.build_pipeline("docker")
    mapped = dag.get_task("train_adaptor")
    assert mapped.operator_class is DockerOperator or mapped.operator_class.__name__ == "DockerOperator"
    assert set(mapped.expand_input.value) == {"command"}
    assert mapped.partial_kwargs["image"] == "registry.example/grappa:1.2"
    assert container_env["train_adaptor"] == [["--params", "params.yaml", "--set", "cluster.ks=[2, 3]",
                                               "train-adaptor", "--k", str(k)] for k in (2, 3)]
    # and extract over the shards (params.yaml's extract.shards)
    extract = dag.get_task("extract")
    assert extract.operator_class is DockerOperator or extract.operator_class.__name__ == "DockerOperator"
    assert set(extract.expand_input.value) == {"command"} and extract.map_index_template.startswith("shard=")
    assert container_env["extract"] == [["--params", "params.yaml", "--set", "cluster.ks=[2, 3]", "extract",
                                         "--shard", "0/1"]]


@pytest.mark.parametrize("spec", ["data:/data", "/srv/images", "/srv/images:data"])
def test_docker_mounts_must_be_absolute_pairs(spec):
    with pytest.raises(ValueError, match="GRAPPA_DOCKER_MOUNTS"):
        runners.data_mounts(spec)


def test_k8s_runner_renders_pod_spec(container_env):
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    op = runners.step_operator("train_fusion", container_env["train_fusion"], "k8s")
    # Building the pod asks the hook whether it runs in a cluster; no kube config is needed otherwise.
    with mock.patch.object(KubernetesHook, "is_in_cluster", new_callable=mock.PropertyMock, return_value=False):
        pod = op.build_pod_request_obj()
    [container] = pod.spec.containers
    assert pod.metadata.namespace == "grappa" and pod.metadata.name.startswith("grappa-train-fusion")
    assert container.image == "registry.example/grappa:1.2"
    assert not container.command  # the image ENTRYPOINT `python -m grappa` runs the args
    assert container.args == ["--params", "params.yaml", "--set", "cluster.ks=[2, 3]", "train-fusion"]
    # the registry's requests and memory limit for the step, the GPU where the steps use one
    assert container.resources.requests == {"cpu": "2", "memory": "3Gi"}
    assert container.resources.limits == {"memory": "4Gi", "nvidia.com/gpu": "1"}
    assert op.deferrable  # the triggerer watches the pod; no worker slot is held
    assert [(e.name, e.value) for e in container.env] == [("MLFLOW_TRACKING_URI", "http://mlflow:5000"),
                                                           *runners.AIRFLOW_CONTEXT_ENV.items(),
                                                           ("GRAPPA_TRIGGER", runners.TRIGGER_TEMPLATE)]
    assert container.env_from[0].secret_ref.name == "grappa-aws"
    assert [m.mount_path for m in container.volume_mounts] == ["/workspace", "/dev/shm"]
    assert pod.spec.volumes[1].empty_dir.medium == "Memory"  # as the docker runner's shm_size
    assert pod.spec.volumes[0].persistent_volume_claim.claim_name == "grappa-workspace"
    assert pod.spec.security_context.run_as_non_root
    assert op.retries >= 1


def _schema_errors(data, type_name: str, path: str = "pod") -> list[str]:
    """Where ``data`` (a manifest as JSON) leaves the Kubernetes schema of ``type_name``: unknown keys,
    wrong primitive types, missing required fields. The schema is the one the official Python
    client's models are generated from (their ``openapi_types`` and ``attribute_map``), strictly: the
    client itself ignores unknown keys, the API server rejects them."""
    import re

    from kubernetes import client

    primitives = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
                  "datetime": str, "date": str}
    if (m := re.fullmatch(r"list\[(.+)\]", type_name)):
        if not isinstance(data, list):
            return [f"{path}: a list expected, got {type(data).__name__}"]
        return [e for i, item in enumerate(data) for e in _schema_errors(item, m.group(1), f"{path}[{i}]")]
    if (m := re.fullmatch(r"dict[(\[]str, (.+)[)\]]", type_name)):  # dict(str, X) or dict[str, X]
        if not isinstance(data, dict):
            return [f"{path}: a map expected, got {type(data).__name__}"]
        return [e for key, item in data.items() for e in _schema_errors(item, m.group(1), f"{path}.{key}")]
    if type_name in primitives:
        ok = isinstance(data, primitives[type_name]) and not (type_name == "int" and isinstance(data, bool))
        return [] if ok else [f"{path}: {type_name} expected, got {data!r}"]
    model = getattr(client, type_name)
    if not isinstance(data, dict):
        return [f"{path}: a {type_name} object expected, got {type(data).__name__}"]
    by_json = {json_key: attr for attr, json_key in model.attribute_map.items()}
    errors = [f"{path}.{key}: not a field of {type_name}" for key in data if key not in by_json]
    for key, item in data.items():
        if key in by_json and item is not None:
            errors += _schema_errors(item, model.openapi_types[by_json[key]], f"{path}.{key}")
    try:  # the models' setters raise on a required field left out (client-side validation)
        model(**{by_json[k]: v for k, v in data.items() if k in by_json})
    except ValueError as err:
        errors.append(f"{path}: {err}")
    return errors


def test_every_k8s_pod_spec_is_valid_against_the_kubernetes_schema(container_env):
    """The pods of every step (mapped ones included) and of close_run, as the operator would send them,
    hold only fields of the Kubernetes schema with the right types and every required field."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import ApiClient

    from grappa import registry

    api = ApiClient()
    # the checker finds what it must: a misspelt field, a wrong type, a required field left out
    assert set(_schema_errors({"spec": {"containers": [{"name": "x", "imagePullPolicy": 3}], "nodeName": "n",
                                        "restartPolcy": "Never"}}, "V1Pod")) == {
        "pod.spec.restartPolcy: not a field of V1PodSpec", "pod.spec.containers[0].imagePullPolicy: str expected, got 3"}
    assert any("`name`" in e for e in _schema_errors({"spec": {"containers": [{"image": "x"}]}}, "V1Pod"))
    tasks = [*(step.stage for step in registry.STEPS), "close_run"]
    for task_id in tasks:
        commands = container_env[task_id]
        command = commands[0] if commands and isinstance(commands[0], list) else commands  # one instance
        op = runners.step_operator(task_id, command, "k8s")
        with mock.patch.object(KubernetesHook, "is_in_cluster", new_callable=mock.PropertyMock, return_value=False):
            manifest = api.sanitize_for_serialization(op.build_pod_request_obj())
        assert manifest["spec"]["containers"][0]["resources"]["limits"]["memory"], task_id
        assert _schema_errors(manifest, "V1Pod") == [], task_id


def test_every_k8s_pod_asks_for_what_its_step_needs(container_env):
    """Each step's pod (close_run too) requests CPU and memory and has a memory limit no lower than its
    request, in quantities Kubernetes parses; what a step reads at 1M images fits its limit."""
    from kubernetes.client import models as k8s
    from kubernetes.utils import parse_quantity

    from grappa import registry

    for task_id in (*(step.stage for step in registry.STEPS), "close_run"):
        resources = runners._k8s_resources(task_id, k8s)
        request, limit = (parse_quantity(resources.requests["memory"]), parse_quantity(resources.limits["memory"]))
        assert parse_quantity(resources.requests["cpu"]) > 0 and request <= limit, task_id
    with mock.patch.dict(os.environ, {"GRAPPA_K8S_MEMORY_FACTOR": "2", "GRAPPA_GPU": "1"}):
        scaled = runners._k8s_resources("train_fusion", k8s)
        assert scaled.requests == {"cpu": "2", "memory": "6144Mi"}
        assert scaled.limits == {"memory": "8192Mi", "nvidia.com/gpu": "1"}
        assert "nvidia.com/gpu" not in runners._k8s_resources("close_run", k8s).limits
    # the limits stand above the peaks benchmarks/scale.py measured at 1M images
    peaks = {"merge_features": 319, "cluster": 870, "train_adaptor": 1081, "train_fusion": 1707}  # MB
    for stage, peak_mb in peaks.items():
        assert parse_quantity(registry.step(stage).resources.memory_limit) > 1.5 * peak_mb * 2**20, stage


def test_a_refused_conf_ends_the_run_at_once(pipeline, airflow_db):
    """plan refuses {"ks": [8]}: the run fails now, close_run has no retries to hold it (and the
    watchers, which wait for it) for minutes."""
    import time

    assert pipeline.get_task("close_run").retries == 0
    started = time.monotonic()
    run = pipeline.test(run_conf={"ks": [8]})
    assert time.monotonic() - started < 120
    assert run.state == "failed"
    assert run.get_task_instance("plan").state == "failed"
    assert run.get_task_instance("close_run").state in ("failed", "upstream_failed", "skipped")


def test_folder_watcher_emits_until_a_pipeline_run_starts_on_the_change(dagbag, airflow_db, tmp_path):
    from airflow.models import Variable
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    watcher = dagbag.dags["grappa_watch_folder"]
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"x")

    def events() -> list[dict]:
        with create_session() as session:
            return [e.extra for e in session.scalars(select(AssetEvent)) if e.extra.get("source") == str(folder)]

    def poll() -> str:
        run = watcher.test(run_conf={"folders": [str(folder)]})
        return run.get_task_instance("detect_folder_change").state

    assert (poll(), len(events())) == ("success", 1)  # first sight of the folder
    # No pipeline run has started on it (nothing scheduled here): the watcher keeps asking, it never
    # takes an event for done by itself.
    assert (poll(), len(events())) == ("success", 2)
    fingerprint = events()[-1]["fingerprint"]
    assert fingerprint == watchers.folders_fingerprint([str(folder)])
    # what the pipeline's plan task records when a run starts on this event
    Variable.set(watchers.variable_key(str(folder)), fingerprint)
    assert (poll(), len(events())) == ("skipped", 2)  # unchanged since a run started: no event
    (folder / "b.png").write_bytes(b"yy")
    assert (poll(), len(events())) == ("success", 3)


def test_fingerprint_survives_odd_names_dangling_links_and_vanishing_files(tmp_path, capsys, monkeypatch):
    """Other people write the watched folder: nothing in it may stop every later poll."""
    (tmp_path / "a.png").write_bytes(b"1")
    (tmp_path / os.fsdecode(b"caf\xe9.png")).write_bytes(b"2")  # Latin-1 name: not UTF-8
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    first = watchers.folder_fingerprint(tmp_path)
    assert "1 entries could not be read" in capsys.readouterr().out
    (tmp_path / "nowhere.png").write_bytes(b"3")  # the link now resolves: a change
    assert watchers.folder_fingerprint(tmp_path) != first
    real_stat = Path.stat

    def vanishing(self, *args, **kwargs):  # a file removed between the walk and its stat
        if self.name == "a.png":
            raise FileNotFoundError(2, "No such file or directory", str(self))  # ENOENT, as the OS says it
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", vanishing)
    assert isinstance(watchers.folder_fingerprint(tmp_path), str)


def test_fingerprints(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"1")
    first = watchers.folder_fingerprint(tmp_path)
    assert watchers.folder_fingerprint(tmp_path) == first
    os.utime(tmp_path / "sub" / "a.png", ns=(1, 1))
    assert watchers.folder_fingerprint(tmp_path) != first
    (tmp_path / "other").mkdir()
    both = watchers.folders_fingerprint([str(tmp_path / "sub"), str(tmp_path / "other")])
    (tmp_path / "other" / "b.png").write_bytes(b"2")
    assert watchers.folders_fingerprint([str(tmp_path / "sub"), str(tmp_path / "other")]) != both
    values = iter(["a", "b"])
    assert watchers.settled(lambda: next(values), 0) is None  # still being written
    assert watchers.settled(lambda: "same", 0) == "same"


def test_s3_fingerprint_follows_the_listing():
    moto = pytest.importorskip("moto")
    import boto3

    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="data")
        client.put_object(Bucket="data", Key="raw/a.png", Body=b"1")
        client.put_object(Bucket="data", Key="other/x.png", Body=b"1")
        first = watchers.s3_fingerprint(client, "data", "raw/")
        client.put_object(Bucket="data", Key="other/y.png", Body=b"2")
        assert watchers.s3_fingerprint(client, "data", "raw/") == first  # outside the prefix
        client.put_object(Bucket="data", Key="raw/b.png", Body=b"2")
        assert watchers.s3_fingerprint(client, "data", "raw/") != first
