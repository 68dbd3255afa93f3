"""Helpers for ``grappa_pipeline.py``: run planning, one operator factory for the three runners,
and source fingerprints for the watcher DAGs.

Imported by the DAG processor on every parse: stdlib + yaml only at module level; operator and
client libraries are imported inside the function that needs them, so a local-runner deployment
never loads the docker/kubernetes clients and no deployment loads torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import yaml

REPO = Path(os.environ.get("GRAPPA_REPO") or Path(__file__).resolve().parents[1])
if str(REPO) not in sys.path:  # the step registry lives in the repository's grappa/ package
    sys.path.insert(0, str(REPO))
from grappa import registry  # noqa: E402  (standard library only, like this module)

RUNNERS = ("local", "docker", "k8s")
STEPS = {step.stage: step.verb for step in registry.STEPS}  # task id (= dvc stage name) -> CLI verb
MAPPED = next(step.stage for step in registry.STEPS if step.per_k)  # one task instance per k
PIPELINE_DAG = "grappa_pipeline"
UP_TO_DATE_EXIT = 99  # `grappa repro` found the stage up to date: the task shows as skipped
WORKSPACE = "/workspace"  # containers: WORKDIR of the image, where the shared volume is mounted
# The operator field that receives the CLI arguments, and how the UI names a mapped instance.
COMMAND_FIELD = {"local": "bash_command", "docker": "command", "k8s": "arguments"}
MAP_INDEX_TEMPLATE = {
    "local": "k={{ task.bash_command.split()[-1].split('@')[-1] }}",  # '... repro train_adaptor@8'
    "docker": "k={{ task.command[-1] }}",
    "k8s": "k={{ task.arguments[-1] }}",
}
AIRFLOW_CONTEXT_ENV = {"AIRFLOW_CTX_DAG_ID": "{{ dag.dag_id }}", "AIRFLOW_CTX_TASK_ID": "{{ task.task_id }}",
                       "AIRFLOW_CTX_DAG_RUN_ID": "{{ run_id }}"}
# What started the run (asset events' source and fingerprint), handed to every step for its MLflow tags.
TRIGGER_TEMPLATE = "{{ ti.xcom_pull(task_ids='plan', key='trigger') or '[]' }}"
# Non-secret settings handed to step containers when set on the worker; credentials travel as
# Docker private_environment or a Kubernetes Secret, never in the DAG or the image.
PASSTHROUGH_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL",
                   "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def runner_name() -> str:
    runner = os.environ.get("GRAPPA_RUNNER", "local")
    if runner not in RUNNERS:
        raise ValueError(f"GRAPPA_RUNNER must be one of {RUNNERS}, got {runner!r}")
    return runner


def retry_kwargs() -> dict:
    """Every step retries with exponential back-off (transient: OOM kill, preempted node, S3 blip)."""
    return {
        "retries": env_int("GRAPPA_RETRIES", 2),
        "retry_delay": timedelta(seconds=env_int("GRAPPA_RETRY_DELAY_S", 60)),
        "retry_exponential_backoff": float(os.environ.get("GRAPPA_RETRY_BACKOFF", 2.0)),
        "max_retry_delay": timedelta(minutes=30),
    }


# -- planning ---------------------------------------------------------------------------------

def _params_file(conf: dict) -> str | None:
    """The run's params file: the conf's ``params_file``, else env GRAPPA_PARAMS, else none."""
    return conf.get("params_file") or os.environ.get("GRAPPA_PARAMS") or None


def override_args(conf: dict) -> list[str]:
    """The run conf as CLI options: ``params_file`` (else env GRAPPA_PARAMS), ``sources``, ``ks``."""
    argv = []
    params_file = _params_file(conf)
    if params_file:
        argv += ["--params", str(params_file)]
    if conf.get("sources"):
        argv += ["--set", "data.sources=" + json.dumps([str(s) for s in conf["sources"]])]
    if conf.get("ks"):
        argv += ["--set", "cluster.ks=" + json.dumps([int(k) for k in conf["ks"]])]
    return argv


def planned_ks(conf: dict) -> list[int]:
    ks = conf.get("ks")
    if not ks:
        path = REPO / (_params_file(conf) or "params.yaml")
        if not path.is_file():
            raise ValueError(f"{path} not readable from the Airflow worker: pass 'ks' in the run conf")
        ks = (yaml.safe_load(path.read_text()) or {}).get("cluster", {}).get("ks")
    ks = sorted(int(k) for k in ks or [])
    # Fail here, before any step starts, on what the CLI would reject anyway.
    if len(ks) < 2 or len(set(ks)) != len(ks) or ks[0] < 2:
        raise ValueError(f"cluster.ks must hold at least two distinct values >= 2, got {ks}")
    return ks


def plan(conf: dict, runner: str) -> dict:
    """The command of every step for this run, in the runner's format.

    Local runs go through DVC: ``prepare`` writes the run conf into the workspace's params.yaml
    (and the watched folders into dvc.yaml), then each task is ``grappa repro <stage>``, so dvc.lock
    records what the DAG computed. Containers run the step CLI with the conf as ``--set`` options
    (the image has no DVC workspace yet; see containers/README.md).
    """
    ks = planned_ks(conf)
    if runner == "local":
        commands = {task_id: render(runner, ["repro", task_id]) for task_id in STEPS}
        commands[MAPPED] = [render(runner, ["repro", registry.step(MAPPED).stage_name(k)]) for k in ks]
        return {"ks": ks, "prepare": render(runner, [*override_args(conf), "prepare"]),
                "close_run": render(runner, ["close-run"]), **commands}
    argv = override_args(conf)
    if "--params" not in argv:
        argv = ["--params", "params.yaml", *argv]
    commands = {task_id: render(runner, [*argv, step]) for task_id, step in STEPS.items()}
    commands[MAPPED] = [render(runner, [*argv, STEPS[MAPPED], "--k", str(k)]) for k in ks]
    return {"ks": ks, "prepare": None, "close_run": render(runner, [*argv, "close-run"]), **commands}


def render(runner: str, argv: list[str]) -> str | list[str]:
    if runner == "local":
        python = os.environ.get("GRAPPA_PYTHON") or sys.executable
        return shlex.join([python, "-m", "grappa", *argv])
    return argv  # the image's ENTRYPOINT is `python -m grappa`


def prepare_workspace(command: str) -> str:
    """Run ``grappa prepare`` in the repo (local runner); returns what it changed, or raises with its error."""
    done = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError((done.stderr or done.stdout).strip().splitlines()[-1])
    return done.stdout


def stale_stages(runner: str) -> list[str] | None:
    """The stages `dvc status` finds out of date in the workspace (local runner), None where DVC does
    not run the steps. An empty list: this run has nothing to do."""
    if runner != "local":
        return None
    dvc = Path(os.environ.get("GRAPPA_PYTHON") or sys.executable).parent / "dvc"
    done = subprocess.run([str(dvc) if dvc.exists() else "dvc", "status", "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"dvc status failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return sorted(json.loads(done.stdout or "{}"))


# -- triggers -----------------------------------------------------------------------------------

def trigger_events(triggering_asset_events) -> list[dict]:
    """(source, fingerprint) of every asset event that triggered this run (none for a manual run)."""
    events = []
    for asset_events in (triggering_asset_events or {}).values():
        for event in asset_events:
            extra = dict(getattr(event, "extra", None) or {})
            if extra.get("source"):
                events.append({"source": str(extra["source"]), "fingerprint": str(extra.get("fingerprint", ""))})
    return events


def _variable_key(source: str) -> str:
    return "grappa_watch_" + hashlib.sha1(source.encode()).hexdigest()[:12]


def record_started(events: list[dict]) -> None:
    """Remember, per source, the fingerprint a pipeline run has started on (watchers compare to it)."""
    from airflow.sdk import Variable

    for event in events:
        Variable.set(_variable_key(event["source"]), event["fingerprint"],
                     description=f"listing fingerprint of {event['source']} the last pipeline run started on")


# -- operators --------------------------------------------------------------------------------

def step_operator(task_id: str, command, runner: str, mapped: bool = False, **extra):
    """The operator running one step; with ``mapped`` one instance per element of ``command``."""
    cls, kwargs = _operator_spec(task_id, runner)
    kwargs.update(retry_kwargs(), do_xcom_push=False, skip_on_exit_code=UP_TO_DATE_EXIT, **extra)
    field = COMMAND_FIELD[runner]
    if not mapped:
        return cls(**kwargs, **{field: command})
    kwargs.update(
        map_index_template=MAP_INDEX_TEMPLATE[runner],
        max_active_tis_per_dagrun=parallel_k(runner),
    )
    return cls.partial(**kwargs).expand(**{field: command})


def parallel_k(runner: str) -> int:
    """How many adaptor sets train at once (GRAPPA_MAX_PARALLEL_K). A local one already uses every
    core of the worker (torch threads): on 2 cores, two at once took 831 s against 519 s one after
    the other, so locally one per 4 cores; a container or pod brings its own cores (or GPU)."""
    default = max(1, (os.cpu_count() or 1) // 4) if runner == "local" else 2
    return env_int("GRAPPA_MAX_PARALLEL_K", default)


def _operator_spec(task_id: str, runner: str) -> tuple[type, dict]:
    return OPERATOR_SPECS[runner](task_id)


def _container_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
    # The context Airflow gives a local step's subprocess, templated for a container: the steps of
    # one DAG run meet in one MLflow parent run keyed by the run id, tagged with DAG and task.
    env.update(AIRFLOW_CONTEXT_ENV)
    env["GRAPPA_TRIGGER"] = TRIGGER_TEMPLATE
    return env


def _image() -> str:
    return os.environ.get("GRAPPA_IMAGE", "grappa-pipeline:cpu")


def _gpu() -> bool:
    return os.environ.get("GRAPPA_GPU", "0") == "1"


def _local_spec(task_id: str) -> tuple[type, dict]:
    from airflow.providers.standard.operators.bash import BashOperator

    # Inherits the worker's environment (MLflow/AWS settings) and runs in the repo.
    return BashOperator, {"task_id": task_id, "cwd": str(REPO), "env": {"GRAPPA_TRIGGER": TRIGGER_TEMPLATE},
                          "append_env": True}


def _docker_spec(task_id: str) -> tuple[type, dict]:
    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.types import DeviceRequest, Mount

    # GRAPPA_WORKSPACE: a named volume or a host path holding params.yaml, outputs/, .cache/.
    source = os.environ.get("GRAPPA_WORKSPACE", str(REPO))
    mounts = [Mount(target=WORKSPACE, source=source, type="bind" if source.startswith("/") else "volume")]
    mounts += [Mount(target=target, source=src, type="bind", read_only=True)
               for src, target in data_mounts(os.environ.get("GRAPPA_DOCKER_MOUNTS", ""))]
    return DockerOperator, {
        "task_id": task_id,
        "image": _image(),
        "docker_url": os.environ.get("DOCKER_HOST", "unix://var/run/docker.sock"),
        "mounts": mounts,
        # host: the step reaches MLflow / S3 at the addresses the worker uses (127.0.0.1 included)
        "network_mode": os.environ.get("GRAPPA_DOCKER_NETWORK", "host"),
        "working_dir": WORKSPACE,
        "environment": _container_env(),
        "private_environment": {k: os.environ[k] for k in SECRET_ENV if k in os.environ},
        "device_requests": [DeviceRequest(count=-1, capabilities=[["gpu"]])] if _gpu() else None,
        "shm_size": 2 << 30,  # DataLoader workers share batches through /dev/shm
        "auto_remove": "success",
        "mount_tmp_dir": False,  # the daemon may be remote
    }


def _k8s_spec(task_id: str) -> tuple[type, dict]:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    secret = os.environ.get("GRAPPA_K8S_SECRET")  # holds AWS_* (and MLflow auth) for the steps
    return KubernetesPodOperator, {
        "task_id": task_id,
        "name": f"grappa-{task_id.replace('_', '-')}",
        "namespace": os.environ.get("GRAPPA_K8S_NAMESPACE", "grappa"),
        "image": _image(),
        "env_vars": _container_env(),
        "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret))] if secret else None,
        "volumes": [k8s.V1Volume(name="workspace", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=os.environ.get("GRAPPA_PVC", "grappa-workspace")))],
        "volume_mounts": [k8s.V1VolumeMount(name="workspace", mount_path=WORKSPACE)],
        "container_resources": k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}) if _gpu() else None,
        "security_context": k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=1000, fs_group=1000),
        "on_finish_action": "delete_succeeded_pod",  # keep failed pods for debugging
        "get_logs": True,
    }


OPERATOR_SPECS = {"local": _local_spec, "docker": _docker_spec, "k8s": _k8s_spec}


def data_mounts(spec: str) -> list[tuple[str, str]]:
    """``GRAPPA_DOCKER_MOUNTS`` (``/host/images:/data,/host/more:/more``) as (host, container) pairs,
    mounted read-only: the steps read images there and write only to the workspace."""
    pairs = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        src, sep, target = item.partition(":")
        if not sep or not src.startswith("/") or not target.startswith("/"):
            raise ValueError(f"GRAPPA_DOCKER_MOUNTS: {item!r} is not /host/path:/container/path")
        pairs.append((src, target))
    return pairs


# -- watchers ---------------------------------------------------------------------------------

def watched_folders() -> list[str]:
    """GRAPPA_WATCH_DIR, else the local folders the workspace's params.yaml reads images from."""
    if os.environ.get("GRAPPA_WATCH_DIR"):
        return [os.environ["GRAPPA_WATCH_DIR"]]
    raw = yaml.safe_load((REPO / "params.yaml").read_text()) or {}
    sources = (raw.get("data") or {}).get("sources") or []
    sources += (raw.get("index") or {}).get("sources") or []
    from grappa.workspace import data_roots  # at task time, on a worker holding the workspace

    return [str((REPO / root).resolve()) for root in data_roots([str(s) for s in sources])
            if not root.startswith("s3://")]


def folder_fingerprint(folder: str | Path) -> str:
    """Hash of the listing (relative path, size, mtime) of every file under ``folder``."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"watched folder {root} does not exist")
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            st = path.stat()
            digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def folders_fingerprint(folders: list[str]) -> str:
    return hashlib.sha256("\n".join(f"{f}\0{folder_fingerprint(f)}" for f in folders).encode()).hexdigest()


def s3_fingerprint(client, bucket: str, prefix: str) -> str:
    """Hash of the listing (key, size, ETag, last-modified) under ``s3://bucket/prefix``."""
    digest = hashlib.sha256()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            digest.update(f"{obj['Key']}\0{obj['Size']}\0{obj['ETag']}\0{obj['LastModified'].isoformat()}\n".encode())
    return digest.hexdigest()


def settled(fingerprint, settle_s: float) -> str | None:
    """The fingerprint if it stays the same for ``settle_s`` (an upload in progress is not new data)."""
    first = fingerprint()
    if settle_s > 0:
        time.sleep(settle_s)
    return first if fingerprint() == first else None


def emit_if_changed(source: str, fingerprint: str | None, outlet_event, pipeline_busy: bool) -> str:
    """Attach (source, fingerprint) to the asset event, or skip (no event) with the reason.

    No event while a pipeline run is queued or running (it looks at the data itself; the next poll
    after it compares again), nor when the listing is the one the last pipeline run started on.
    The watcher records nothing itself: the pipeline run records the fingerprint when it starts, so
    a fingerprint whose run never started is never taken for done.
    """
    from airflow.sdk import Variable
    from airflow.sdk.exceptions import AirflowSkipException

    reason = None
    if fingerprint is None:
        reason = f"{source} is still changing; next run looks again"
    elif pipeline_busy:
        reason = f"a {PIPELINE_DAG} run is queued or running; next run looks again"
    elif Variable.get(_variable_key(source), default=None) == fingerprint:
        reason = f"{source} unchanged since the last {PIPELINE_DAG} run started"
    if reason is not None:
        # Airflow 3 keeps a skip's reason only as a field of its 'Skipping task.' record, which the
        # log view does not show: say it as a line of its own
        print(f"no event: {reason}")
        raise AirflowSkipException(reason)
    outlet_event.extra = {"source": source, "fingerprint": fingerprint}
    print(f"event: {source} changed (fingerprint {fingerprint})")
    return fingerprint


def pipeline_busy(ti) -> bool:
    return ti.get_dr_count(dag_id=PIPELINE_DAG, states=["queued", "running"]) > 0
