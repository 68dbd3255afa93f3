"""The registered model as users serve it: images in, embeddings out, no checkout of this repository.

Uses the shared tracked run of test_tracking.py (its registry holds the champion).
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from grappa.io import servable
from test_tracking import _SCRUB, MODEL, tracked_run

VENV_BIN = Path(sys.executable).parent

LOAD_WITHOUT_REPO = """
import json, sys
# this checkout is importable in the test venv (editable install, tests/ on the path): take it away
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path = [p for p in sys.path if p and p.rstrip("/") not in ({repo!r}, {repo!r} + "/tests")]
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{name}@champion")
import grappa
images = {images!r}
from_bytes = model.predict(pd.DataFrame({{"image": [open(p, "rb").read() for p in images]}}))
from_paths = model.predict(pd.DataFrame({{"path": images}}))
print(json.dumps({{"code": grappa.__file__, "bytes": from_bytes.tolist(), "paths": from_paths.tolist()}}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    shared = tracked_run(tmp_path_factory)
    assert shared.rc == 0, shared.stderr[-3000:]
    return shared


def _images(run, n: int = 2) -> list[str]:
    return [str(p) for p in sorted((run.root / "data" / "shapes" / "images").glob("q_*.png"))[:n]]


def _env(run) -> dict:
    """A user's shell: only the tracking URI set (nothing that earlier tests left in this process)."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    return {**env, "MLFLOW_TRACKING_URI": run.uri, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": ""}


def test_registered_model_embeds_images_without_the_repository(run, tmp_path):
    images = _images(run)
    code = LOAD_WITHOUT_REPO.format(repo=str(REPO), name=MODEL, images=images)
    env = {**_env(run), "GRAPPA_SERVE_PATH_ROOTS": str(run.root / "data")}  # paths are read only below it
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["code"].startswith(str(REPO)) and "/code/grappa/" in result["code"]
    from_bytes, from_paths = np.array(result["bytes"]), np.array(result["paths"])
    assert from_bytes.shape == (2, 256) and np.allclose(np.linalg.norm(from_bytes, axis=1), 1.0, atol=1e-5)
    assert np.allclose(from_bytes, from_paths, atol=1e-6)
    # the preprocessing travels with the model: the same embeddings as the pipeline's own model
    local = servable.load(run.out_dir / "model").embed(images)
    assert np.allclose(from_bytes, local, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_mlflow_models_serve_answers_an_http_request_with_an_image(run, tmp_path):
    port = _free_port()
    server = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                               "-h", "127.0.0.1", "-p", str(port), "--env-manager", "local"],
                              cwd=tmp_path, env=_env(run), stdout=open(tmp_path / "serve.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "server not ready in 180 s"
                time.sleep(1)
        images = _images(run)
        encoded = [base64.b64encode(Path(p).read_bytes()).decode() for p in images]
        status, body = _post(port, {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}})
        assert status == 200, body
        served = np.array(body["predictions"], dtype=np.float32)
        assert served.shape == (2, 256)
        assert np.allclose(served, servable.load(run.out_dir / "model").embed(images), atol=1e-5)
        # by default the server reads no file a client names
        status, body = _post(port, {"dataframe_records": [{"path": images[0]}]})
        assert status >= 400 and "this server reads no paths" in json.dumps(body)
        status, body = _post(port, {"dataframe_records": [{"path": ""}]})
        assert status >= 400 and "give the image" in json.dumps(body)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def test_paths_are_read_only_inside_the_configured_roots_and_under_the_cap(tmp_path):
    from grappa.tracking.pyfunc_model import images_of

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.png").write_bytes(b"A" * 10)
    (outside / "secret").write_bytes(b"S" * 10)
    (root / "escape").symlink_to(outside / "secret")
    (root / "big").write_bytes(b"B" * 101)
    env = {"GRAPPA_SERVE_PATH_ROOTS": f"{root},s3://bucket/images/", "GRAPPA_SERVE_MAX_BYTES": "100"}
    assert images_of(pd.DataFrame({"path": [str(root / "sub" / "a.png")]}), env) == [b"A" * 10]
    assert images_of([b"raw"], env) == [b"raw"]
    refused = {
        str(outside / "secret"): "outside the folders", str(root / "sub" / ".." / ".." / "outside" / "secret"): "outside",
        str(root / "escape"): "outside", str(root) + "-sibling/x": "outside", "s3://bucket/other/x.png": "outside",
        "s3://bucket/images/../other/x": "outside", str(root / "big"): "above the server's cap of 100",
        str(root / "missing.png"): "cannot read", str(root / "fifo"): "not a regular file",
    }
    os.mkfifo(root / "fifo")  # would block a reader forever
    for path, reason in refused.items():
        with pytest.raises(ValueError, match=reason):
            images_of(pd.DataFrame({"path": [path]}), env)
    with pytest.raises(ValueError, match="names no bucket"):
        images_of(pd.DataFrame({"path": ["s3://b/x.png"]}), {"GRAPPA_SERVE_PATH_ROOTS": "s3://"})
    with pytest.raises(ValueError, match="row 0: this server reads no paths"):
        images_of(pd.DataFrame({"path": [str(root / "sub" / "a.png")]}), {})
