"""Where the steps of ``grappa_pipeline.py`` run: the operator of a step for each runner (local
subprocess, Docker, Kubernetes), with retries, and the constants the DAG modules share. Planning a
run is in ``planning.py``, the watcher DAGs' fingerprints in ``watchers.py``.

Imported by the DAG processor on every parse: stdlib + yaml only at module level; operator and
client libraries are imported inside the function that needs them, so a local-runner deployment
never loads the docker/kubernetes clients and no deployment loads torch.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

REPO = Path(os.environ.get("GRAPPA_REPO") or Path(__file__).resolve().parents[1])
if str(REPO) not in sys.path:  # the step registry lives in the repository's grappa/ package
    sys.path.insert(0, str(REPO))
from grappa import registry  # noqa: E402  (standard library only, like this module)

RUNNERS = ("local", "docker", "k8s")
# shared: every task in the one workspace GRAPPA_REPO (`grappa prepare` then `grappa repro STAGE`);
# own: each worker runs its tasks in a clone of its own (its GRAPPA_REPO), each container or pod in
# the image's own workspace, and a run's state travels through the git and DVC remotes
# (`grappa start-run`, then `grappa task STAGE`: grappa/experiments.py).
WORKSPACE_MODES = ("shared", "own")
VERBS = {step.stage: step.verb for step in registry.STEPS}  # task id (= dvc stage name) -> CLI verb
# mapped task id -> its one axis: extract one instance per shard, train_adaptor one per k
MAPPED = {step.stage: step.mapped for step in registry.STEPS if step.mapped}
PIPELINE_DAG = "grappa_pipeline"
UP_TO_DATE_EXIT = 99  # `grappa repro` found the stage up to date: the task shows as skipped
WORKSPACE = "/workspace"  # containers: WORKDIR of the image, where the shared volume is mounted
# The operator field that receives the CLI arguments, and where a mapped instance's item is in it:
# the last argument ('... train-adaptor --k 8', '... extract --shard 0/2'), or the stage's label
# ('... repro train_adaptor@8', '... repro extract@0-of-2', shown as 0/2 like the CLI spells it).
COMMAND_FIELD = {"local": "bash_command", "docker": "command", "k8s": "arguments"}
_ITEM = ".split('@')[-1].replace('-of-', '/')"  # '8', '0/2', 'train_adaptor@8', 'extract@0-of-2' -> '8', '0/2'
MAP_INDEX_ITEM = {
    "local": "task.bash_command.split()[-1]" + _ITEM,
    "docker": "task.command[-1]" + _ITEM,
    "k8s": "task.arguments[-1]" + _ITEM,
}
# How many instances of a mapped task run at once, by axis.
PARALLEL_ENV = {"k": "GRAPPA_MAX_PARALLEL_K", "shard": "GRAPPA_MAX_PARALLEL_SHARDS"}
AIRFLOW_CONTEXT_ENV = {"AIRFLOW_CTX_DAG_ID": "{{ dag.dag_id }}", "AIRFLOW_CTX_TASK_ID": "{{ task.task_id }}",
                       "AIRFLOW_CTX_DAG_RUN_ID": "{{ run_id }}"}
# What started the run (asset events' source and fingerprint), handed to every step for its MLflow tags.
TRIGGER_TEMPLATE = "{{ ti.xcom_pull(task_ids='plan', key='trigger') or '[]' }}"
# Non-secret settings handed to step containers when set on the worker; credentials travel as
# Docker private_environment or a Kubernetes Secret, never in the DAG or the image.
PASSTHROUGH_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL",
                   "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                   # own workspaces: where a container's task fetches its run and pulls and pushes its data
                   "GRAPPA_GIT_REMOTE", "GRAPPA_DVC_REMOTE", "GRAPPA_TRACKING")  # GRAPPA_TRACKING=0: no MLflow
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def runner_name() -> str:
    runner = os.environ.get("GRAPPA_RUNNER", "local")
    if runner not in RUNNERS:
        raise ValueError(f"GRAPPA_RUNNER must be one of {RUNNERS}, got {runner!r}")
    return runner


def workspace_mode(runner: str) -> str:
    mode = os.environ.get("GRAPPA_WORKSPACE_MODE", "shared")
    if mode not in WORKSPACE_MODES:
        raise ValueError(f"GRAPPA_WORKSPACE_MODE must be one of {WORKSPACE_MODES}, got {mode!r}")
    return mode


def retry_kwargs() -> dict:
    """Every step retries with exponential back-off (transient: OOM kill, preempted node, S3 blip)."""
    return {
        "retries": env_int("GRAPPA_RETRIES", 2),
        "retry_delay": timedelta(seconds=env_int("GRAPPA_RETRY_DELAY_S", 60)),
        "retry_exponential_backoff": float(os.environ.get("GRAPPA_RETRY_BACKOFF", 2.0)),
        "max_retry_delay": timedelta(minutes=30),
    }


def step_operator(task_id: str, command, runner: str, mapped: bool = False, **extra):
    """The operator running one step; with ``mapped`` one instance per element of ``command``, over
    the step's one axis (``MAPPED``): named ``k=8`` / ``shard=0/2`` in the UI, at most
    :func:`parallel` of them at once."""
    cls, kwargs = _operator_spec(task_id, runner)
    kwargs.update(retry_kwargs(), do_xcom_push=False, skip_on_exit_code=UP_TO_DATE_EXIT, **extra)
    field = COMMAND_FIELD[runner]
    if not mapped:
        return cls(**kwargs, **{field: command})
    axis = MAPPED[task_id]
    kwargs.update(
        map_index_template=f"{axis}={{{{ {MAP_INDEX_ITEM[runner]} }}}}",
        max_active_tis_per_dagrun=parallel(axis, runner),
    )
    return cls.partial(**kwargs).expand(**{field: command})


def parallel(axis: str, runner: str) -> int:
    """How many instances of a task mapped over ``axis`` run at once (GRAPPA_MAX_PARALLEL_K,
    GRAPPA_MAX_PARALLEL_SHARDS). A local adaptor set or extraction already uses every core of the
    worker (torch threads): on 2 cores, two adaptor sets at once took 831 s against 519 s one after
    the other, so locally one per 4 cores; a container or pod brings its own cores (or GPU)."""
    default = max(1, (os.cpu_count() or 1) // 4) if runner == "local" else 2
    return env_int(PARALLEL_ENV[axis], default)


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

    # GRAPPA_WORKSPACE: a named volume or a host path holding params.yaml, outputs/, .cache/; none
    # with own workspaces (the image's /workspace, filled by the task from the git and DVC remotes)
    source = os.environ.get("GRAPPA_WORKSPACE", str(REPO))
    own = workspace_mode("docker") == "own"
    mounts = [] if own else [Mount(target=WORKSPACE, source=source, type="bind" if source.startswith("/") else "volume")]
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
        # `make down` (stack.local stop) kills the containers in flight of its stack by this label
        "labels": {"grappa.stack": os.environ.get("GRAPPA_STACK", "")},
        "mount_tmp_dir": False,  # the daemon may be remote
    }


def _k8s_spec(task_id: str) -> tuple[type, dict]:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    secret = os.environ.get("GRAPPA_K8S_SECRET")  # holds AWS_* (and MLflow auth) for the steps
    # DataLoader workers share batches through /dev/shm (64 MB by default in a pod)
    volumes = [k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit="2Gi"))]
    mounts = [k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")]
    if workspace_mode("k8s") == "shared":  # own: the image's /workspace, filled from the git and DVC remotes
        volumes.insert(0, k8s.V1Volume(name="workspace", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=os.environ.get("GRAPPA_PVC", "grappa-workspace"))))
        mounts.insert(0, k8s.V1VolumeMount(name="workspace", mount_path=WORKSPACE))
    return KubernetesPodOperator, {
        "task_id": task_id,
        "name": f"grappa-{task_id.replace('_', '-')}",
        "namespace": os.environ.get("GRAPPA_K8S_NAMESPACE", "grappa"),
        "image": _image(),
        "env_vars": _container_env(),
        "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret))] if secret else None,
        "volumes": volumes,
        "volume_mounts": mounts,
        "container_resources": _k8s_resources(task_id, k8s),
        # the triggerer watches the pod: no worker slot is held while it runs (0 where no triggerer runs)
        "deferrable": os.environ.get("GRAPPA_DEFERRABLE", "1") == "1",
        "security_context": k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=1000, fs_group=1000),
        "on_finish_action": "delete_succeeded_pod",  # keep failed pods for debugging
        "get_logs": True,
    }


CLOSE_RUN_RESOURCES = registry.Resources("250m", "512Mi", "1Gi")  # close_run: a few MLflow calls


def _k8s_resources(task_id: str, k8s):
    """The step's requests and memory limit from the registry (a CPU limit would only throttle), and a
    GPU where the steps use one."""
    from kubernetes.utils import parse_quantity

    step = registry.BY_STAGE.get(task_id)
    need = step.resources if step else CLOSE_RUN_RESOURCES
    # the registry's figures were measured up to 1M images with a small backbone: scale them for more
    factor = Decimal(os.environ.get("GRAPPA_K8S_MEMORY_FACTOR", "1"))  # parse_quantity gives Decimals

    def memory(quantity: str) -> str:
        return quantity if factor == 1 else f"{int(parse_quantity(quantity) * factor) >> 20}Mi"

    limits = {"memory": memory(need.memory_limit), **({"nvidia.com/gpu": "1"} if _gpu() and step is not None else {})}
    return k8s.V1ResourceRequirements(requests={"cpu": need.cpu, "memory": memory(need.memory)}, limits=limits)


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
