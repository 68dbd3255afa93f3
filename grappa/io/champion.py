"""The champion a run may warm-start from: where the model registry lives, and the champion's state
bundle (what grappa/tracking/publisher.py logs beside every registered version) fetched into the
warm-start folder ``<out>/champion/bundle``.

The bundle mirrors ``out_dir``'s layout (``cluster/centroids_k<K>.npy``, ``cluster/k<K>.parquet``,
``adaptors/k<K>/adaptor.pt`` and ``classifier.pt``, ``fusion/fusion.pt``) plus ``params.yaml``, so
``Layout(bundle)`` names its files as ``layout(params)`` names a run's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from grappa.config import Params, tracking_enabled
from grappa.io.artifacts import read_json, read_table
from grappa.io.layout import CLUSTER_MODE, WARM_BUNDLE, Layout, layout
from grappa.io.storage import StorageError, redact_uri

CHAMPION = "champion"  # the registry alias of the version that serves
GENERATION_TAG = "grappa.generation"  # incremental runs since the version's last full ancestor
PARENT_TAG = "grappa.parent_version"  # the champion an incremental version started from
MODEL_SHA_TAG = "grappa.model_sha256"
RECIPE = ("backbone", "cluster", "adaptor", "fusion")  # what a warm start must share with its champion


def project_root() -> Path:
    """Where the default tracking DB lives: ``DVC_ROOT`` (set by dvc repro), the git work tree, or cwd."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        done = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10)
        top = done.stdout.strip() if done.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        top = ""
    return Path(top).resolve() if top else Path.cwd().resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``sqlite:///<project root>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{project_root() / 'mlflow.db'}"


def registry_uri() -> str:
    """``MLFLOW_REGISTRY_URI``, else the tracking URI. Passed explicitly: mlflow's own default is a
    module global that an earlier ``set_registry_uri`` in this process may have pointed elsewhere."""
    return os.environ.get("MLFLOW_REGISTRY_URI", "").strip() or tracking_uri()


def recipe(params: dict) -> dict:
    """The params sections (as a nested dict) that must equal the champion's for a warm start."""
    return {section: params.get(section) for section in RECIPE}


@dataclass(frozen=True)
class Champion:
    version: str
    run_id: str
    model_sha256: str
    generation: int
    params: dict | None  # the champion's params.yaml, None when its bundle has none
    bundle: Path  # its files, in out_dir's layout

    def has(self, ks: list[int]) -> bool:
        """The bundle holds every file a warm start at ``ks`` reads."""
        files = Layout(self.bundle)
        needed = [files.fusion] + [p for k in ks for p in (files.centroids(k), files.pseudo_labels(k),
                                                            files.adaptor(k), files.classifier(k))]
        return all(p.is_file() for p in needed)

    def trained_ids(self, ks: list[int]) -> pa.Array:
        """The image ids the champion's pseudo-labels (and so its training) covered."""
        return read_table(Layout(self.bundle).pseudo_labels(ks[0])).column("image_id").combine_chunks()


def fetch(params: Params, dest: Path) -> Champion | None:
    """The ``champion`` version of ``tracking.registered_model`` with its bundle downloaded into ``dest``
    (emptied first; empty when the version has none); None when tracking is off or no version is
    champion. A registry that cannot be reached is a StorageError, never "no champion": a full retrain
    must not start because a server was down."""
    if not tracking_enabled(params):
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client, name = MlflowClient(tracking_uri(), registry_uri()), params.tracking.registered_model
    staging = dest.parent / ".download"
    try:
        try:
            version = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no model, no alias
                return None
            raise
        shutil.rmtree(dest, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)  # what a killed download left
        if client.list_artifacts(version.run_id, "bundle"):  # none: registered before bundles existed
            client.download_artifacts(version.run_id, "bundle", str(staging))
            (staging / "bundle").rename(dest)
    except (MlflowException, OSError) as err:
        lines = str(err).strip().splitlines()
        raise StorageError(redact_uri(f"model registry at {tracking_uri()}: cannot read the champion of {name}: "
                                      f"{lines[0] if lines else type(err).__name__}")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    yaml_file = dest / "params.yaml"
    return Champion(str(version.version), version.run_id, version.tags.get(MODEL_SHA_TAG, ""),
                    int(version.tags.get(GENERATION_TAG, 0)),
                    yaml.safe_load(yaml_file.read_text()) if yaml_file.is_file() else None, dest)


def bundle(params: Params) -> Layout:
    """This run's copy of the champion's files (written by ``grappa warm-start``)."""
    return Layout(layout(params).path(WARM_BUNDLE))


def run_mode(params: Params) -> dict:
    """How this run adapts, as clustering settled it: ``mode`` (full | incremental), ``generation``,
    ``parent_version`` (``cluster/mode.json``; full when clustering predates it)."""
    path = layout(params).path(CLUSTER_MODE)
    return read_json(path) if path.is_file() else {"mode": "full", "generation": 0, "parent_version": None}


def training_rows(params: Params, ids: pa.Array) -> np.ndarray | None:
    """The pool positions an incremental run trains on: every new image and a seeded replay sample of
    at most ``adapt.replay`` old ones, sorted; None in a full run (the whole pool)."""
    from grappa.core.incremental import replay_sample

    if run_mode(params)["mode"] != "incremental":
        return None
    old, new = split_old_new(read_table(bundle(params).pseudo_labels(params.cluster.ks[0])).column("image_id"), ids)
    return np.sort(np.concatenate([new, old[replay_sample(len(old), params.adapt.replay, params.seed)]]))


def positions_in(champion_ids: pa.Array, ids: pa.Array) -> np.ndarray:
    """For each of ``ids``, its position among ``champion_ids``; -1 for an image the champion never saw."""
    import pyarrow.compute as pc

    return pc.index_in(ids, value_set=champion_ids).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def split_old_new(champion_ids: pa.Array, ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``ids`` of the images the champion trained on, and of the new ones."""
    known = positions_in(champion_ids, ids) >= 0
    return np.flatnonzero(known), np.flatnonzero(~known)
