"""stack.local, the loop's services on this machine: `make down` ends what `make up` started."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from stack import local

pytestmark = pytest.mark.timeout(60)

# A stand-in for the scheduler: it starts a task in a session of its own (as Airflow's subprocess hook
# does) that ignores SIGTERM, like a step busy in native code, then idles.
SERVICE = """
import subprocess, sys, time
task = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); open(sys.argv[1], 'w').write('up'); time.sleep(600)"
subprocess.Popen([sys.executable, "-c", task, sys.argv[1]], start_new_session=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, waiting for its reaper
    except psutil.NoSuchProcess:
        return True


def test_stop_ends_the_services_and_the_tasks_in_flight_within_its_timeout(tmp_path):
    settings = local.Settings(workspace=tmp_path, home=tmp_path / ".stack")
    settings.home.mkdir()
    marker = tmp_path / "task-started"
    service = subprocess.Popen([sys.executable, "-c", SERVICE, str(marker)], start_new_session=True)
    (settings.home / "pids.json").write_text(json.dumps({"scheduler": service.pid}))
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    (task,) = psutil.Process(service.pid).children()
    assert task.pid != service.pid and task.as_dict(["pid"]) and psutil.Process(task.pid).is_running()

    started = time.monotonic()
    assert local.stop(settings, grace_s=2) == ["scheduler"]
    assert time.monotonic() - started < 2 + 6  # the grace, then SIGKILL and a short wait
    assert _gone(service.pid) and _gone(task.pid), "a task in flight outlived make down"
    assert not (settings.home / "pids.json").exists() and local.status(settings) == {}
