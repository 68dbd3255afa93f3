"""The loop across machines: Airflow's CeleryExecutor with workers that share no disk.

The controller runs the services: PostgreSQL (Airflow's metadata database and MLflow's store), Redis
(the Celery broker), an MLflow tracking server with proxied artifacts, a git server (the runs'
experiment refs), an S3 endpoint (the DVC remote), and Airflow's api-server, scheduler, dag-processor
and triggerer. Each worker host runs ``airflow celery worker`` in a clone of its own of the repo, with
``GRAPPA_WORKSPACE_MODE=own``: every task is ``grappa task`` there (grappa/experiments.py).

    python -m stack.celery controller --address 10.0.0.5 --home /srv/grappa
    python -m stack.celery worker --controller 10.0.0.5 --clone /srv/grappa-worker --name worker-1
    python -m stack.celery stop --home /srv/grappa

On one machine, tests/test_celery.py puts two workers on two network namespaces (test hosts). The S3
endpoint started here is moto's server, a stand-in for S3 (``AWS_ENDPOINT_URL`` points the DVC remote
at a real one). PostgreSQL and Redis are Debian's packages (``apt-get install postgresql redis-server``).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as `python -m stack.celery` or imported
from stack import local  # noqa: E402  (process handling shared with `make up`)

BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parents[1]
PORTS = {"postgres": 15432, "redis": 16379, "s3": 19000, "git": 19418, "mlflow": 15000, "api": 18080}
BUCKET = "grappa-dvc"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "grappa", "AWS_SECRET_ACCESS_KEY": "grappa-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def _postgres_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not versions:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    return versions[-1].parent


@dataclass
class Controller:
    """Where the services listen (``address``) and keep their state (``home``)."""

    address: str
    home: Path
    secret: str = field(default_factory=lambda: secrets.token_hex(16))

    def url(self, service: str) -> str:
        return {"postgres": f"postgresql+psycopg2://grappa@{self.address}:{PORTS['postgres']}",
                "redis": f"redis://{self.address}:{PORTS['redis']}/0",
                "s3": f"http://{self.address}:{PORTS['s3']}",
                "git": f"git://{self.address}:{PORTS['git']}/grappa.git",
                "mlflow": f"http://{self.address}:{PORTS['mlflow']}",
                "api": f"http://{self.address}:{PORTS['api']}"}[service]


def airflow_env(controller: Controller, airflow_home: Path, repo: Path) -> dict[str, str]:
    """The Airflow settings every process of the deployment shares (controller's and workers')."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_", "GRAPPA_"))}
    db = controller.url("postgres")
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
        "AIRFLOW_HOME": str(airflow_home), "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"{db}/airflow",
        "AIRFLOW__CELERY__BROKER_URL": controller.url("redis"),
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{db}/airflow",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",  # one workspace, one task at a time
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{controller.url('api')}/execution/",
        "AIRFLOW__API__BASE_URL": controller.url("api"), "AIRFLOW__API_AUTH__JWT_SECRET": controller.secret,
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        # a worker that stops heart-beating (killed, its host gone) has its task retried within a minute
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": os.environ.get("GRAPPA_HEARTBEAT_TIMEOUT_S", "60"),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        "GRAPPA_REPO": str(repo), "GRAPPA_RUNNER": "local", "GRAPPA_WORKSPACE_MODE": "own",
        "GRAPPA_WATCH_SCHEDULE": "", "MLFLOW_TRACKING_URI": controller.url("mlflow"),
        **CREDENTIALS, "AWS_ENDPOINT_URL": controller.url("s3"),
    })
    for key in ("GRAPPA_RETRY_DELAY_S", "GRAPPA_RETRIES"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _spawn(name: str, argv: list[str], home: Path, env: dict, cwd: Path, user: str | None = None) -> int:
    """:func:`stack.local.spawn`, as ``user`` when given (PostgreSQL refuses to run as root)."""
    return local.spawn(home, name, (["runuser", "-u", user, "--"] if user else []) + argv, env, cwd)


def _wait_for(check, what: str, home: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, subprocess.SubprocessError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f} s (logs in {home})")
        time.sleep(1)


def _http_ok(url: str) -> bool:
    return urllib.request.urlopen(url, timeout=5).status == 200


def _postgres(controller: Controller) -> None:
    home, pg = controller.home, _postgres_bin()
    data = home / "postgres"
    if not data.exists():
        if subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(home)]).returncode != 0:
            # the postgres user cannot reach home (a private temp folder): its cluster lives in /tmp, linked
            data.symlink_to(tempfile.mkdtemp(prefix="grappa-postgres-"))
        else:
            data.mkdir(parents=True)
        shutil.chown(data.resolve(), "postgres", "postgres")
        subprocess.run(["runuser", "-u", "postgres", "--", str(pg / "initdb"), "-D", str(data.resolve()), "-U", "grappa",
                        "-A", "trust"], check=True, capture_output=True)
        with open(data.resolve() / "pg_hba.conf", "a") as hba:  # the deployment's subnet (test hosts: the bridge's)
            hba.write(f"host all all {controller.address.rsplit('.', 1)[0]}.0/24 trust\n")
    data = data.resolve()
    _spawn("postgres", [str(pg / "postgres"), "-D", str(data), "-k", str(data), "-p", str(PORTS["postgres"]),
                        "-c", f"listen_addresses={controller.address}"], home, os.environ.copy(), data, "postgres")
    psql = [str(pg / "psql"), "-h", controller.address, "-p", str(PORTS["postgres"]), "-U", "grappa", "-d", "postgres"]
    _wait_for(lambda: subprocess.run([*psql, "-c", "select 1"], capture_output=True).returncode == 0,
              "PostgreSQL", home)
    for db in ("airflow", "mlflow"):
        subprocess.run([*psql, "-c", f"create database {db}"], capture_output=True)


def start_remotes(controller: Controller, origin: Path) -> None:
    """Where a run's state lives: the git server of ``origin`` (a bare repository named grappa.git)
    and the S3 endpoint with the DVC remote's bucket."""
    home = controller.home
    home.mkdir(parents=True, exist_ok=True)
    _spawn("s3", [str(BIN / "moto_server"), "-H", controller.address, "-p", str(PORTS["s3"])],
           home, os.environ.copy(), home)
    _spawn("git", ["git", "daemon", "--reuseaddr", f"--base-path={origin.parent}", "--export-all",
                   "--enable=receive-pack", f"--listen={controller.address}", f"--port={PORTS['git']}", str(origin.parent)],
           home, os.environ.copy(), home)
    _wait_for(lambda: _http_ok(controller.url("s3") + "/moto-api/"), "the S3 endpoint", home)
    import boto3

    keys = {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    boto3.client("s3", endpoint_url=controller.url("s3"), region_name="us-east-1", **keys).create_bucket(Bucket=BUCKET)


def start_controller(controller: Controller, repo: Path, origin: Path) -> dict:
    """Every service, listening on ``controller.address``; ``origin`` is the bare git repo it serves."""
    home = controller.home
    home.mkdir(parents=True, exist_ok=True)
    _postgres(controller)
    _spawn("redis", ["redis-server", "--bind", controller.address, "--port", str(PORTS["redis"]), "--save", "",
                     "--appendonly", "no", "--protected-mode", "no"], home, os.environ.copy(), home)
    start_remotes(controller, origin)
    env = airflow_env(controller, home / "airflow", repo)
    _spawn("mlflow", [str(BIN / "mlflow"), "server", "--host", controller.address, "--port", str(PORTS["mlflow"]),
                      "--backend-store-uri", f"{controller.url('postgres')}/mlflow",
                      "--artifacts-destination", (home / "mlartifacts").as_uri(), "--workers", "1"], home, env, home)
    migrated = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True,
                              timeout=900)
    if migrated.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed: {migrated.stderr.strip()[-1000:]}")
    for name, argv in {"api-server": ["api-server", "-H", controller.address, "-p", str(PORTS["api"])],
                       "scheduler": ["scheduler", "--skip-serve-logs"], "dag-processor": ["dag-processor"],
                       "triggerer": ["triggerer", "--skip-serve-logs"]}.items():
        _spawn(name, [str(BIN / "airflow"), *argv], home, env, repo)
    _wait_for(lambda: _http_ok(controller.url("mlflow") + "/health"), "MLflow", home)
    _wait_for(lambda: _http_ok(controller.url("api") + "/api/v2/monitor/health"), "the Airflow API", home)
    return json.loads((home / local.PIDS_FILE).read_text())


def prepare_clone(controller: Controller, clone: Path) -> Path:
    """A worker's workspace: a clone of the git server's repo whose DVC remote is the S3 endpoint."""
    if not (clone / ".git").is_dir():
        subprocess.run(["git", "clone", "-q", controller.url("git"), str(clone)], check=True)
    (clone / ".dvc" / "config.local").write_text(
        f"[core]\n    remote = s3\n['remote \"s3\"']\n    url = s3://{BUCKET}/cache\n"
        f"    endpointurl = {controller.url('s3')}\n")
    return clone


def start_worker(controller: Controller, clone: Path, name: str, home: Path, netns: str | None = None) -> int:
    """``airflow celery worker`` in ``clone`` (its own workspace), reporting as host ``name``; in the
    network namespace ``netns`` (a test host) when given. Its PID."""
    home.mkdir(parents=True, exist_ok=True)
    env = airflow_env(controller, home / "airflow", clone)
    argv = [str(BIN / "airflow"), "celery", "worker", "--skip-serve-logs", "--celery-hostname", f"{name}@%h"]
    if netns:  # a host of its own: its network namespace and hostname (Airflow records it per task)
        argv = ["ip", "netns", "exec", netns, "unshare", "--uts", "sh", "-c", f'hostname {name} && exec "$@"', "sh",
                *argv]
    return _spawn(name, argv, home, env, clone)


def stop(home: Path, grace_s: float = 30) -> list[str]:
    """Stop what ``home``'s pids.json lists, with every process it started."""
    return local.stop(local.Settings(home=home), grace_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.celery", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    ctl = sub.add_parser("controller", help="the services, on ADDRESS")
    ctl.add_argument("--address", required=True)
    ctl.add_argument("--home", type=Path, required=True)
    ctl.add_argument("--origin", type=Path, required=True, help="the bare git repository the workers clone")
    ctl.add_argument("--secret", default=None, help="the JWT secret every process shares (default: new)")
    wrk = sub.add_parser("worker", help="a Celery worker in a clone of its own")
    wrk.add_argument("--controller", required=True, help="the controller's address")
    wrk.add_argument("--secret", required=True, help="the controller's JWT secret")
    wrk.add_argument("--clone", type=Path, required=True)
    wrk.add_argument("--name", required=True)
    wrk.add_argument("--home", type=Path, required=True)
    stp = sub.add_parser("stop", help="stop what a controller or worker home started")
    stp.add_argument("--home", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.action == "controller":
            controller = Controller(args.address, args.home, args.secret or secrets.token_hex(16))
            start_controller(controller, REPO_ROOT, args.origin)
            print(f"Airflow {controller.url('api')}, MLflow {controller.url('mlflow')}; JWT secret {controller.secret}")
        elif args.action == "worker":
            controller = Controller(args.controller, args.home, args.secret)
            start_worker(controller, prepare_clone(controller, args.clone), args.name, args.home)
            print(f"worker {args.name} in {args.clone}")
        else:
            print(f"stopped: {', '.join(stop(args.home)) or 'nothing'}")
    except (RuntimeError, subprocess.CalledProcessError) as err:
        print(f"stack: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
