"""The loop's services on this machine, loopback only: an MLflow tracking server and Airflow 3
(api-server, scheduler, dag-processor, triggerer; LocalExecutor on SQLite) running the DAGs of
``dags/`` with the local runner in this workspace (``--runner docker``: each step in a container of
``GRAPPA_IMAGE``, see containers/README.md).

    python -m stack.local start      # make up: UIs at http://127.0.0.1:8080 (Airflow), :5000 (MLflow)
    python -m stack.local status
    python -m stack.local stop       # make down: every process it started, tasks in flight included

MLflow keeps the store ``grappa run`` writes without a server (``mlflow.db`` and ``mlruns/`` in the
workspace), so the demo's runs and registry are there too. State (Airflow home, PIDs, logs) lives
in ``.stack/``. The log servers of the scheduler and triggerer, which would listen on every
interface, are not started; task logs are read from disk. No login (local use only).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVICES = ("mlflow", "api-server", "scheduler", "dag-processor", "triggerer")
# The docker runner's settings (containers/README.md) that `start --runner docker` hands to the tasks.
RUNNER_ENV = ("GRAPPA_IMAGE", "GRAPPA_WORKSPACE", "GRAPPA_DOCKER_MOUNTS", "GRAPPA_DOCKER_NETWORK")


@dataclass
class Settings:
    workspace: Path = REPO
    home: Path = REPO / ".stack"
    api_port: int = 8080
    mlflow_port: int = 5000
    watch_schedule: str = "*/2 * * * *"  # the folder watcher's poll; "" = only when triggered
    env: dict = field(default_factory=dict)  # more settings for the tasks (GRAPPA_*, ...)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def mlflow(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"


def environment(settings: Settings) -> dict[str, str]:
    """The services' environment: this interpreter's tools first, nothing inherited about Airflow or MLflow."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_", "GRAPPA_"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
        "AIRFLOW_HOME": str(settings.home / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{settings.api}/execution/", "AIRFLOW__API__BASE_URL": settings.api,
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        "GRAPPA_REPO": str(settings.workspace), "GRAPPA_RUNNER": "local", "GRAPPA_WATCH_SCHEDULE": settings.watch_schedule,
        "MLFLOW_TRACKING_URI": settings.mlflow,
        # the docker runner labels each step's container with it, so `stop` finds the ones in flight
        "GRAPPA_STACK": str(settings.home.resolve()),
    })
    env.update(settings.env)
    return env


def _commands(settings: Settings) -> dict[str, list[str]]:
    store = settings.workspace
    # Steps in containers do not see the worker's disk: the server stores their artifacts itself
    # (mlflow-artifacts:/ URIs), in the same mlruns/. Local steps write there directly.
    in_containers = settings.env.get("GRAPPA_RUNNER", "local") != "local"
    artifacts = ["--artifacts-destination" if in_containers else "--default-artifact-root", (store / "mlruns").as_uri()]
    return {
        "mlflow": [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(settings.mlflow_port),
                   "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", *artifacts, "--workers", "1"],
        "api-server": [str(BIN / "airflow"), "api-server", "-H", "127.0.0.1", "-p", str(settings.api_port)],
        "scheduler": [str(BIN / "airflow"), "scheduler", "--skip-serve-logs"],
        "dag-processor": [str(BIN / "airflow"), "dag-processor"],
        "triggerer": [str(BIN / "airflow"), "triggerer", "--skip-serve-logs"],
    }


PIDS_FILE = "pids.json"  # in the stack's home: name -> PID of each service it started


def _pids_file(settings: Settings) -> Path:
    return settings.home / PIDS_FILE


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child (same process started it): reaped now
            return False
    except ChildProcessError:
        pass  # started by another process (`make up`, then `make down`)
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def status(settings: Settings) -> dict[str, int]:
    """The services this stack started that are still running (name -> PID)."""
    path = _pids_file(settings)
    pids = json.loads(path.read_text()) if path.is_file() else {}
    return {name: pid for name, pid in pids.items() if _alive(pid)}


def spawn(home: Path, name: str, argv: list[str], env: dict, cwd: Path) -> int:
    """Start service ``name`` (log ``home/<name>.log``) and add its PID to ``home``'s PIDS_FILE, which
    :func:`status` and :func:`stop` read; its PID."""
    with open(home / f"{name}.log", "a") as log:
        # a session of its own: `stop` ends the service with every process it forked
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    path = home / PIDS_FILE
    pids = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**pids, name: proc.pid}))
    return proc.pid


def _wait(url: str, settings: Settings, pids: dict[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except (urllib.error.URLError, OSError):
            dead = [name for name, pid in pids.items() if not _alive(pid)]
            if dead:
                log = (settings.home / f"{dead[0]}.log").read_text()[-2000:]
                raise RuntimeError(f"{dead[0]} stopped while starting; the end of its log:\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:.0f} s (logs in {settings.home})")
            time.sleep(1)


def start(settings: Settings, timeout: float = 240) -> dict[str, int]:
    """Start every service (after `airflow db migrate`), wait until MLflow and the API answer; name -> PID."""
    running = status(settings)
    if running:
        raise RuntimeError(f"already running ({', '.join(running)}); stop it first")
    settings.home.mkdir(parents=True, exist_ok=True)
    env = environment(settings)
    # every service signs and checks the same task tokens
    env.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_hex(16))
    done = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed: {done.stderr.strip()[-1000:]}")
    _pids_file(settings).unlink(missing_ok=True)  # PIDs of a stack that died are not ours any more
    pids: dict[str, int] = {}
    for name, argv in _commands(settings).items():
        pids[name] = spawn(settings.home, name, argv, env, settings.workspace)
    try:
        _wait(f"{settings.mlflow}/health", settings, pids, timeout)
        _wait(f"{settings.api}/api/v2/monitor/health", settings, pids, timeout)
    except BaseException:
        stop(settings)
        raise
    return pids


def _processes(pids) -> list:
    """Each process of ``pids`` and every process it started, found before any is signalled."""
    import psutil

    found = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in (root, *root.children(recursive=True)):
                found[proc.pid] = proc
        except psutil.Error:
            pass
    return list(found.values())


def _signal_groups(procs, sig: int) -> None:
    """``sig`` to the process group of each of ``procs`` (never to our own) and to each process."""
    own = os.getpgrp()
    for proc in procs:
        for send in (lambda: os.killpg(os.getpgid(proc.pid), sig) if os.getpgid(proc.pid) != own else None,
                     lambda: os.kill(proc.pid, sig)):
            try:
                send()
            except OSError:
                pass


def _stop_containers(settings: Settings, timeout: float) -> None:
    """Kill the step containers the docker runner started for this stack (label grappa.stack)."""
    import shutil

    if not shutil.which("docker"):
        return
    try:
        listed = subprocess.run(["docker", "ps", "-q", "--filter", f"label=grappa.stack={settings.home.resolve()}"],
                                capture_output=True, text=True, timeout=timeout)
        ids = listed.stdout.split()
        if ids:
            subprocess.run(["docker", "kill", *ids], capture_output=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        pass  # no daemon: no container of ours either


def stop(settings: Settings, grace_s: float = 30) -> list[str]:
    """Stop the services this stack started and every process they started, within about ``grace_s``:
    SIGTERM, then SIGKILL to what is left. A task runs in a session of its own (Airflow's subprocess
    hook calls setsid), so the services' process groups do not hold it, and once its worker is gone it
    is re-parented where it cannot be found: the whole tree is listed before anything is signalled."""
    import psutil

    running = status(settings)
    procs = _processes(running.values())
    _signal_groups(procs, signal.SIGTERM)
    _stop_containers(settings, timeout=grace_s / 2)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    if alive:
        _signal_groups(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
    _pids_file(settings).unlink(missing_ok=True)
    return sorted(running)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.local", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "status", "stop"])
    parser.add_argument("--runner", choices=["local", "docker"], default="local",
                        help="how the DAG runs each step: in this venv (local) or one container per step "
                             "(docker: image GRAPPA_IMAGE, built by containers/build.sh)")
    args = parser.parse_args(argv)
    settings = Settings(env={"GRAPPA_RUNNER": args.runner, **{k: os.environ[k] for k in RUNNER_ENV if k in os.environ}})
    try:
        if args.action == "start":
            start(settings)
            print(f"Airflow {settings.api} (no login), MLflow {settings.mlflow}; logs in {settings.home}")
        elif args.action == "status":
            running = status(settings)
            print(", ".join(f"{name} (pid {pid})" for name, pid in running.items()) or "not running")
        else:
            stopped = stop(settings)
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    except RuntimeError as err:
        print(f"stack: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
