"""The catalogue index on disk and its faiss verbs: build, read, write, search.

``<out>/index/`` holds ``index.json`` (the model the index was built with, factory, size, the name of
its version folder and the sha256 of that folder's files) and version folders ``v-<digest>/`` with
``catalogue.faiss`` (inner product over L2-normalised embeddings) and ``catalogue.parquet`` (manifest
rows: faiss id i is row i). A writer fills a new version folder, renames it into place, and then
switches ``index.json`` in one atomic rename; the version before stays, so a reader that read the
previous ``index.json`` still finds its files. A reader refuses a set whose files do not match
``index.json`` (a file copied in, a damaged disk) before faiss parses a byte of it.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from grappa.config import ConfigError
from grappa.io.artifacts import file_sha256, fsync, read_json, read_table, write_json, write_table
from grappa.io.manifests import SCHEMA

INDEX_FILE, CATALOGUE_FILE, META_FILE = "catalogue.faiss", "catalogue.parquet", "index.json"


def _reason(err: RuntimeError, width: int = 160) -> str:
    """What a faiss error says, without the C++ function and source line it names first."""
    text = str(err).strip().splitlines()[-1]
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)  # "Error in <signature> at <file>:<line>: "
    text = re.sub(r"^(Error: '.*?' failed: |\w+::\w+:)", "", text)  # an assert's condition, a method's name
    return text[:width]


def _apply_search_params(index, search_params: str) -> None:
    import faiss

    try:
        faiss.ParameterSpace().set_index_parameters(index, search_params)
    except RuntimeError as err:
        raise ConfigError(f"index.search_params: '{search_params}' does not apply to this index "
                          f"({_reason(err, 120)})") from None


def check(factory: str, search_params: str, dim: int) -> None:
    """A ConfigError now, not after a whole run, for a factory faiss cannot make at ``dim`` dimensions
    or search params that do not apply to it (what ``grappa check`` asks)."""
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ConfigError(f"index.factory: faiss cannot make '{factory}' for {dim}-d embeddings ({_reason(err)})") from None
    if search_params:
        _apply_search_params(index, search_params)


def build(factory: str, vectors: np.ndarray):
    """A trained, filled faiss index of ``factory`` (inner product over normalised vectors)."""
    import faiss

    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(vectors)
    except RuntimeError as err:
        raise ConfigError(f"index.factory: faiss cannot build '{factory}' over {len(vectors)} vectors "
                          f"({_reason(err)})") from None
    index.add(vectors)
    return index


def exists(folder: Path) -> bool:
    """Whether ``folder`` has a published index (its ``index.json``)."""
    return (folder / META_FILE).is_file()


def read_meta(folder: Path) -> dict:
    """``index.json`` of ``folder``; ConfigError when it is not a JSON object (truncated, overwritten)."""
    try:
        meta = read_json(folder / META_FILE)
    except (OSError, ValueError) as err:
        raise ConfigError(f"the index at {folder} is not one set: {META_FILE} cannot be read ({type(err).__name__}); "
                          "rebuild it with 'grappa index'") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"the index at {folder} is not one set: {META_FILE} is not an object; "
                          "rebuild it with 'grappa index'")
    return meta


def version_folder(folder: Path, meta: dict) -> Path:
    """The folder of the set ``meta`` (an ``index.json``) names; ConfigError for a name outside ``folder``."""
    version = str(meta.get("version") or "")
    if not version.startswith("v-") or not version[2:].isalnum():
        raise ConfigError(f"the index at {folder} is not one set: {META_FILE} names no version folder; "
                          "rebuild it with 'grappa index'")
    return folder / version


def read(folder: Path):
    """(faiss index, catalogue rows, meta) of a set ``write`` published; ConfigError for any other."""
    import faiss

    meta = read_meta(folder)
    base, files = version_folder(folder, meta), meta.get("files") or {}
    for name in (INDEX_FILE, CATALOGUE_FILE):  # before faiss parses a byte of it
        if not (base / name).is_file() or files.get(name) != file_sha256(base / name):
            raise ConfigError(f"the index at {folder} is not one set: {name} does not match {META_FILE}; "
                              "rebuild it with 'grappa index'")
    return faiss.read_index(str(base / INDEX_FILE)), read_table(base / CATALOGUE_FILE).to_pylist(), meta


def write(folder: Path, index, rows: list[dict], meta: dict) -> None:
    """Publish a set: a new version folder, then one atomic switch of ``index.json``; versions older
    than the one it replaces are removed."""
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    try:  # the set it replaces stays until the next write; an unreadable index.json names none
        previous = read_meta(folder).get("version") if exists(folder) else None
    except ConfigError:
        previous = None
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        faiss.write_index(index, str(staging / INDEX_FILE))
        write_table(staging / CATALOGUE_FILE, pa.Table.from_pylist(rows, schema=SCHEMA))
        files = {name: file_sha256(staging / name) for name in (INDEX_FILE, CATALOGUE_FILE)}
        version = "v-" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
        for name in files:
            fsync(staging / name)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the index from the other users of a shared store
        target = folder / version
        intact = target.is_dir() and all((target / n).is_file() and file_sha256(target / n) == h for n, h in files.items())
        if not intact:  # else these very files are published already
            shutil.rmtree(target, ignore_errors=True)  # a damaged copy of this set
            staging.rename(target)
            fsync(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json(folder / META_FILE, {**meta, "version": version, "files": files})  # the switch
    for old in folder.iterdir():  # older versions, files of the unversioned layout, abandoned staging
        ours = old.name.startswith(("v-", ".staging-")) or old.name in (INDEX_FILE, CATALOGUE_FILE)
        if ours and old.name not in (version, previous):  # the step's report.json beside them stays
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)


def search(index, queries: np.ndarray, top_k: int, search_params: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (Q, top_k); ids are -1 where the index holds fewer than top_k vectors."""
    import faiss

    if search_params:
        _apply_search_params(index, search_params)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), top_k)


def built_by(meta: dict) -> str:
    """'<sha prefix> (v<version>)' of the model an index was built with."""
    version = meta.get("model_version")
    return str(meta.get("model_sha256"))[:12] + (f" (v{version})" if version else "")
