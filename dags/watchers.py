"""The watcher DAGs' side: fingerprints of the watched folders / S3 prefix, and the asset event
emitted when a listing has settled and differs from the one the last pipeline run started on.

Imported by the DAG processor on every parse: standard library + yaml at module level.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import yaml

import runners


def variable_key(source: str) -> str:
    """The Airflow Variable holding the fingerprint of ``source`` the last pipeline run started on."""
    return "grappa_watch_" + hashlib.sha1(source.encode()).hexdigest()[:12]


def watched_folders() -> list[str]:
    """GRAPPA_WATCH_DIR, else the local folders the workspace's params.yaml reads images from."""
    if os.environ.get("GRAPPA_WATCH_DIR"):
        return [os.environ["GRAPPA_WATCH_DIR"]]
    raw = yaml.safe_load((runners.REPO / "params.yaml").read_text()) or {}
    sources = (raw.get("data") or {}).get("sources") or []
    sources += (raw.get("index") or {}).get("sources") or []
    from grappa.workspace import data_roots  # at task time, on a worker holding the workspace

    return [str((runners.REPO / root).resolve()) for root in data_roots([str(s) for s in sources])
            if not root.startswith("s3://")]


def folder_fingerprint(folder: str | Path) -> str:
    """Hash of the listing (relative path, size, mtime) of every file under ``folder``."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"watched folder {root} does not exist")
    digest, unreadable = hashlib.sha256(), 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            try:
                st = path.stat()
            except OSError:  # a dangling symlink, a file removed since the walk listed it
                unreadable += 1
                st = None
            # bytes of the name as on disk: a name that is not UTF-8 must not stop the watcher
            digest.update(os.fsencode(path.relative_to(root)) + b"\0" +
                          (f"{st.st_size}\0{st.st_mtime_ns}" if st else "unreadable").encode() + b"\n")
    if unreadable:
        print(f"watcher: {root}: {unreadable} entries could not be read (dangling symlinks or files removed "
              "while listing); the snapshot lists them as skipped")
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
        reason = f"a {runners.PIPELINE_DAG} run is queued or running; next run looks again"
    elif Variable.get(variable_key(source), default=None) == fingerprint:
        reason = f"{source} unchanged since the last {runners.PIPELINE_DAG} run started"
    if reason is not None:
        # Airflow 3 keeps a skip's reason only as a field of its 'Skipping task.' record, which the
        # log view does not show: say it as a line of its own
        print(f"no event: {reason}")
        raise AirflowSkipException(reason)
    outlet_event.extra = {"source": source, "fingerprint": fingerprint}
    print(f"event: {source} changed (fingerprint {fingerprint})")
    return fingerprint


def pipeline_busy(ti) -> bool:
    return ti.get_dr_count(dag_id=runners.PIPELINE_DAG, states=["queued", "running"]) > 0
