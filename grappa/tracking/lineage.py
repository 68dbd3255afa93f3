"""Lineage facts attached to every tracked run: code version, DVC lock hashes, orchestrator ids,
dataset digests, and the redaction applied to anything that might carry credentials.

Nothing here imports MLflow; every function is cheap and never raises for a missing git/DVC/Airflow
context (it just returns fewer tags).
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from grappa.io.storage import redact_uri  # noqa: F401  (tracking's name for it too)

# scheme://user:password@host or scheme://token@host (a password may hold an unencoded '/')
_TAG_KEY_UNSAFE = re.compile(r"[^\w./\- ]")

AIRFLOW_ENV = {
    "airflow.dag_id": "AIRFLOW_CTX_DAG_ID",
    "airflow.dag_run_id": "AIRFLOW_CTX_DAG_RUN_ID",
    "airflow.task_id": "AIRFLOW_CTX_TASK_ID",
    "airflow.map_index": "AIRFLOW_CTX_MAP_INDEX",
}
CODE_DIR = Path(__file__).resolve().parent


def redact(value: Any) -> Any:
    """``redact_uri`` applied to every string inside nested lists/dicts."""
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def safe_key(key: str) -> str:
    """An MLflow-valid param/metric/tag key (alphanumerics, _ - . / and space; at most 250 chars)."""
    return _TAG_KEY_UNSAFE.sub("_", key)[:250]


# --------------------------------------------------------------------------- code version


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# Inside an image there is no ``.git``: containers/build.sh records the same facts in these variables.
GIT_ENV = {"mlflow.source.git.commit": "GRAPPA_GIT_COMMIT", "mlflow.source.git.branch": "GRAPPA_GIT_BRANCH",
           "grappa.git.dirty": "GRAPPA_GIT_DIRTY"}


def git_tags(code_dir: Path = CODE_DIR) -> dict[str, str]:
    """Commit (and branch, dirty flag) of the repository holding the pipeline code, else of the
    checkout the image was built from (``GIT_ENV``)."""
    commit = _git(["rev-parse", "HEAD"], code_dir)
    if commit is None:
        return {tag: os.environ[env] for tag, env in GIT_ENV.items() if os.environ.get(env)}
    tags = {"mlflow.source.git.commit": commit}
    branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], code_dir)
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    status = _git(["status", "--porcelain", "--untracked-files=no", "--", "."], code_dir)
    if status is not None:
        tags["grappa.git.dirty"] = str(bool(status)).lower()
    return tags


# --------------------------------------------------------------------------- DVC


def dvc_stage_name(step: str, item=None) -> str:
    """The DVC stage this step runs as: ``DVC_STAGE`` (set by dvc repro), else the registry's
    stage name of the item of a mapped step (``cluster``, ``extract@0-of-2``, ``train_adaptor@<k>``)."""
    from grappa import registry

    if os.environ.get("DVC_STAGE"):
        return os.environ["DVC_STAGE"].rpartition(":")[2]  # "dvc.yaml:stage" -> "stage"
    return registry.step(step).stage_name(item)


def dvc_lock_path() -> Path:
    if os.environ.get("GRAPPA_DVC_LOCK"):
        return Path(os.environ["GRAPPA_DVC_LOCK"])
    root = Path(os.environ["DVC_ROOT"]) if os.environ.get("DVC_ROOT") else Path.cwd()
    return root / "dvc.lock"


def _entry_hash(entry: dict) -> str | None:
    for key in ("md5", "etag", "checksum"):
        if entry.get(key):
            return str(entry[key])
    return None


def dvc_lock_tags(stage: str, lock_path: Path | None = None) -> dict[str, str]:
    """Hashes that ``dvc.lock`` records for the stage's deps and outs, as run tags.

    While ``dvc repro`` runs a stage, its own lock entry still describes the *previous* run
    (DVC rewrites it after the command); deps produced by upstream stages are current.
    """
    lock_path = lock_path or dvc_lock_path()
    try:
        raw = lock_path.read_bytes()
        lock = yaml.safe_load(raw) or {}
    except (OSError, yaml.YAMLError):
        return {}
    tags = {"dvc.lock.md5": hashlib.md5(raw).hexdigest()}
    entry = (lock.get("stages") or {}).get(stage) if isinstance(lock, dict) else None
    if not isinstance(entry, dict):
        return tags
    for kind, prefix in (("deps", "dvc.dep."), ("outs", "dvc.out.")):
        for item in entry.get(kind) or []:
            if isinstance(item, dict) and item.get("path") and _entry_hash(item):
                tags[safe_key(prefix + str(item["path"]))] = _entry_hash(item)
    return tags


# --------------------------------------------------------------------------- orchestrator


def airflow_tags() -> dict[str, str]:
    tags = {tag: os.environ[var] for tag, var in AIRFLOW_ENV.items() if os.environ.get(var)}
    for var, tag in (("DVC_EXP_NAME", "dvc.exp_name"),):
        if os.environ.get(var):
            tags[tag] = os.environ[var]
    tags.update(trigger_tags())
    return tags


ENV_TRIGGER = "GRAPPA_TRIGGER"


def trigger_tags() -> dict[str, str]:
    """What started the run: the asset events (source, fingerprint) the DAG passes as JSON in GRAPPA_TRIGGER."""
    import json

    try:
        events = json.loads(os.environ.get(ENV_TRIGGER) or "[]")
    except ValueError:
        return {}
    if not isinstance(events, list):
        return {}
    tags = {}
    for field in ("source", "fingerprint"):
        values = [str(e[field]) for e in events if isinstance(e, dict) and e.get(field)]
        if values:
            tags[f"grappa.trigger.{field}"] = redact_uri(", ".join(values))[:5000]
    return tags


# --------------------------------------------------------------------------- datasets


def split_digest(features_path: str | Path, split: str) -> tuple[str, int]:
    """sha256 over the sorted (image_id, content_hash) pairs of one split of features.parquet."""
    import pyarrow.parquet as pq

    table = pq.read_table(features_path, columns=["image_id", "split", "content_hash"])
    pairs = sorted((i, h) for i, s, h in zip(table.column("image_id").to_pylist(), table.column("split").to_pylist(),
                                             table.column("content_hash").to_pylist()) if s == split)
    digest = hashlib.sha256()
    for image_id, content in pairs:
        digest.update(f"{image_id}\t{content}\n".encode())
    return digest.hexdigest(), len(pairs)
