"""No credentials in the tracking store or the logs; checkpoints are data, never code."""
from __future__ import annotations

import pickle

import pytest
import torch
import yaml

from conftest import make_collection, tiny_params_dict
from grappa import tracking
from grappa.config import parse_params
from grappa.io.artifacts import load_torch
from grappa.tracking import lineage
from grappa.tracking.runs import params_yaml
from test_tracking import _SCRUB, error_lines, run_cli, tracked_run


def test_no_secret_in_tracking_store_or_logs(tmp_path_factory):
    """The shared tracked run had fake AWS/MLflow credentials in its environment: none may be recorded."""
    run = tracked_run(tmp_path_factory)
    assert run.rc == 0, run.stderr[-2000:]
    store = run.root / "tracking"
    files = [p for p in store.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "report.json" for p in files)
    texts = {"stdout": run.stdout.encode(), "stderr": run.stderr.encode()}
    texts.update({str(p): p.read_bytes() for p in files})  # DB (params, tags, inputs) + every artifact
    for name, secret in run.secrets.items():
        leaks = [where for where, blob in texts.items() if secret.encode() in blob]
        assert not leaks, f"{name} found in {leaks}"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(run.uri)
    experiment = client.get_experiment_by_name("grappa-test")
    for logged in client.search_runs([experiment.experiment_id]):
        values = [*logged.data.params.values(), *logged.data.tags.values()]
        assert not any(secret in value for value in values for secret in run.secrets.values())


@pytest.mark.parametrize("uri, safe", [
    ("s3://AKIAXYZ:abc/def+ghi@bucket/prefix/x.csv", "s3://bucket/prefix/x.csv"),
    ("http://user:p%40ss@mlflow.internal:5000/api", "http://mlflow.internal:5000/api"),
    ("https://ghp_token123@github.com/org/repo.git", "https://github.com/org/repo.git"),
    ("postgresql://mlflow:hunter2@db:5432/mlflow", "postgresql://db:5432/mlflow"),
    ("s3://bucket/stage@8/features.parquet", "s3://bucket/stage@8/features.parquet"),
    ("models:/grappa-fused@champion", "models:/grappa-fused@champion"),
    ("see http://a:b@h1/x and s3://c:d@h2/y", "see http://h1/x and s3://h2/y"),
])
def test_redact_uri(uri, safe):
    assert lineage.redact_uri(uri) == safe


def test_logged_params_never_hold_uri_credentials(tmp_path):
    raw = tiny_params_dict(tmp_path, ["s3://AKIAFAKE:very/secret@bucket/data/", "/data/local/manifest.csv"])
    params = parse_params(raw)
    flat = tracking.step_params(params)
    assert "very/secret" not in repr(flat) and "AKIAFAKE" not in repr(flat)
    assert "s3://bucket/data/" in flat["data.sources"]
    assert "very/secret" not in params_yaml(params)


def test_tracking_error_message_redacts_uri(tmp_path, monkeypatch):
    for key in _SCRUB:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://admin:s3cr3t-pw@127.0.0.1:1")
    tracker = tracking.Tracker(parse_params(tiny_params_dict(tmp_path, ["x.csv"])))
    assert tracker.safe_uri == "http://127.0.0.1:1"
    err = tracking.TrackingError
    with pytest.raises(err) as caught:
        with tracker._guard("test"):
            raise RuntimeError("failed for http://admin:s3cr3t-pw@127.0.0.1:1/api\nsecond line")
    assert "s3cr3t-pw" not in str(caught.value) and "\n" not in str(caught.value)


# --------------------------------------------------------------------------- weights_only loading


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _malicious_checkpoint(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    return path, marker


def test_load_torch_refuses_code_in_checkpoint(tmp_path):
    path, marker = _malicious_checkpoint(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        load_torch(path)
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_backbone_weights_pickle_refused(tmp_path, monkeypatch):
    path, marker = _malicious_checkpoint(tmp_path)
    manifests = make_collection(tmp_path / "data", classes=2, per_class=2, unlabeled=4)
    raw = tiny_params_dict(tmp_path, manifests, backbone={"weights": str(path)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv(tracking.ENV_SWITCH, "0")
    assert run_cli(["--params", str(tmp_path / "params.yaml"), "snapshot"])[0] == 0
    rc, _, stderr = run_cli(["--params", str(tmp_path / "params.yaml"), "extract"])
    assert rc == 2
    (line,) = error_lines(stderr)
    assert "backbone.weights" in line and "weights-only" in line
    assert "Traceback" not in stderr
    assert not marker.exists()
    assert not (tmp_path / "outputs" / "extract" / "features.parquet").exists()
