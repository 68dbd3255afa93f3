"""S3 sources and MLflow artifacts against a loopback moto server; endpoint faults and throttling."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import make_collection, tiny_params_dict
from grappa import tracking
from grappa.config import parse_params
from grappa.io import manifests
from grappa.io.layout import layout
from grappa.io.storage import read_bytes, s3_client
from test_tracking import _SCRUB, closed_port, error_lines, fresh_tracking_uri, run_cli

BUCKET = "grappa-data"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3_env(moto_endpoint, tmp_path_factory):
    """Fake credentials and the moto endpoint in the environment for the whole module."""
    home = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for key in (*_SCRUB, "AWS_PROFILE", "GRAPPA_S3_MAX_ATTEMPTS"):
            mp.delenv(key, raising=False)
        for key, value in FAKE_AWS.items():
            mp.setenv(key, value)
        mp.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
        mp.setenv("AWS_ENDPOINT_URL", moto_endpoint)
        mp.setenv(tracking.ENV_SWITCH, "0")
        s3_client.cache_clear()  # the client is cached with the endpoint/retries it was built with
        yield moto_endpoint
    s3_client.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_client():
    s3_client.cache_clear()
    yield
    s3_client.cache_clear()


@pytest.fixture(scope="module")
def uploaded(moto_endpoint, tmp_path_factory):
    """A synthetic collection in the bucket: manifests under coll/, a bare image folder under folder/dots/."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    root = tmp_path_factory.mktemp("s3data")
    make_collection(root / "coll")
    for path in sorted((root / "coll").rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"coll/{path.relative_to(root / 'coll').as_posix()}")
    for i, image in enumerate(sorted((root / "coll" / "shapes" / "images").glob("u_*.png"))[:8]):
        client.upload_file(str(image), BUCKET, f"folder/dots/img_{i}.png")
    client.put_object(Bucket=BUCKET, Key="folder/dots/notes.txt", Body=b"not an image")
    return root


def _params(root, sources, dest=None) -> str:
    """params.yaml for outputs under ``root`` (written to ``dest``, default ``root``)."""
    path = (dest or root) / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params_dict(root, sources)))
    return str(path)


@pytest.fixture(scope="module")
def extracted(s3_env, uploaded, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("s3extract")
    sources = [f"s3://{BUCKET}/folder/", f"s3://{BUCKET}/coll/shapes/manifest.csv",
               f"s3://{BUCKET}/coll/stripes/manifest.csv"]
    params = _params(tmp_path, sources)
    for step in ("snapshot", "extract", "merge-features"):
        rc, _, stderr = run_cli(["--params", params, step])
        assert rc == 0, stderr[-2000:]
    return tmp_path, params


def test_extract_from_s3_folder_and_manifests(extracted):
    tmp_path, _ = extracted
    table = pq.read_table(tmp_path / "outputs" / "extract" / "features.parquet").to_pylist()
    by = {}
    for row in table:
        by.setdefault((row["domain"], row["split"]), []).append(row)
    assert {key: len(rows) for key, rows in by.items()} == {
        ("dots", "unlabeled"): 8,  # folder form: every image unlabeled, domain = first sub-folder
        ("shapes", "query_db"): 16, ("shapes", "unlabeled"): 16,
        ("stripes", "query_db"): 16, ("stripes", "unlabeled"): 16,
    }
    assert all(row["uri"].startswith(f"s3://{BUCKET}/") for row in table)
    assert all(row["label"] is None for row in by[("shapes", "unlabeled")])
    assert {row["label"] for row in by[("stripes", "query_db")]} == {"0", "1", "2", "3"}


def test_mlflow_artifacts_land_in_s3(s3_env, extracted, tmp_path_factory, tmp_path, monkeypatch):
    import boto3

    out_dir, params = extracted
    monkeypatch.delenv(tracking.ENV_SWITCH)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_tracking_uri(tmp_path_factory, tmp_path / "tracking"))
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_env)
    monkeypatch.setenv(tracking.ENV_ARTIFACT_LOCATION, f"s3://{BUCKET}/mlflow")
    rc, _, stderr = run_cli(["--params", params, "cluster"])
    assert rc == 0, stderr[-2000:]
    objects = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="mlflow/").get("Contents", [])
    keys = [obj["Key"] for obj in objects]
    assert any(key.endswith("/artifacts/report.json") for key in keys), keys
    assert not (tmp_path / "tracking" / "mlruns").exists()


@pytest.mark.parametrize("source, message, code", [
    (f"s3://{BUCKET}/folder/", "cannot list", 3),
    (f"s3://{BUCKET}/coll/shapes/manifest.csv", "cannot read", 2),
])
def test_unreachable_endpoint_fails_cleanly(extracted, tmp_path, monkeypatch, source, message, code):
    """Endpoint down: bounded retries, one line, non-zero exit, the previous outputs untouched."""
    out_dir, _ = extracted
    outputs = [out_dir / "outputs" / "extract" / "features.parquet", out_dir / "outputs" / "snapshot" / "manifest.parquet"]
    before = [(path.read_bytes(), path.stat().st_mtime_ns) for path in outputs]
    params = _params(out_dir, [source], dest=tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("GRAPPA_S3_MAX_ATTEMPTS", "2")
    s3_client.cache_clear()
    rc, _, stderr = run_cli(["--params", params, "snapshot"])
    assert rc == code
    (line,) = error_lines(stderr)
    assert message in line and source in line
    assert "Traceback" not in stderr
    assert [(path.read_bytes(), path.stat().st_mtime_ns) for path in outputs] == before


def test_snapshot_reads_only_new_or_changed_objects(s3_env, uploaded, tmp_path, monkeypatch):
    """ETags from one listing tell unchanged objects apart: a rerun downloads only what changed."""
    import boto3

    from pipeline_steps import snapshot
    from grappa.io import storage

    client = boto3.client("s3")
    for i in range(3):
        client.copy_object(Bucket=BUCKET, Key=f"delta/dom/img_{i}.png",
                           CopySource={"Bucket": BUCKET, "Key": f"folder/dots/img_{i}.png"})
    params = parse_params(tiny_params_dict(tmp_path, [f"s3://{BUCKET}/delta/"]))
    reads = []
    real_read = storage.read_bytes
    monkeypatch.setattr(manifests, "read_bytes", lambda uri: reads.append(uri) or real_read(uri))
    first = snapshot.run(params)
    assert (first["images"], first["files_read"], len(reads)) == (3, 3, 3)
    manifest = layout(params).manifest.read_bytes()
    reads.clear()
    assert snapshot.run(params)["files_read"] == 0 and reads == []
    assert layout(params).manifest.read_bytes() == manifest  # unchanged data: byte-identical snapshot
    client.copy_object(Bucket=BUCKET, Key="delta/dom/img_3.png", CopySource={"Bucket": BUCKET, "Key": "folder/dots/img_3.png"})
    client.put_object(Bucket=BUCKET, Key="delta/dom/img_0.png", Body=real_read(f"s3://{BUCKET}/folder/dots/img_5.png"))
    third = snapshot.run(params)
    assert sorted(reads) == [f"s3://{BUCKET}/delta/dom/img_0.png", f"s3://{BUCKET}/delta/dom/img_3.png"]
    assert third["since_previous"] == {"new": 1, "changed": 1, "removed": 0, "unchanged": 2}
    rows = {r["image_id"]: r for r in pq.read_table(layout(params).manifest).to_pylist()}
    assert all(r["etag"] and r["mtime_ns"] is None for r in rows.values())


def test_throttling_is_retried(s3_env, uploaded):
    """Two SlowDown (503) answers, then success: the standard retry mode recovers transparently."""
    from botocore.awsrequest import AWSResponse

    class _Raw:
        def __init__(self, body: bytes):
            self.body = body

        def stream(self, **_):
            yield self.body

    calls = []

    def throttle(request, **_):
        calls.append(request.url)
        if len(calls) <= 2:
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            return AWSResponse(request.url, 503, {"Content-Type": "application/xml"}, _Raw(body))
        return None  # send for real

    client = s3_client()
    client.meta.events.register("before-send.s3.GetObject", throttle)
    data = read_bytes(f"s3://{BUCKET}/coll/shapes/manifest.csv")
    assert data.startswith(b"path,domain,class_id")
    assert len(calls) == 3
