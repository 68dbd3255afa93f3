"""The catalogue index on disk and its faiss verbs: build, read, write, search.

``<out>/index/`` holds ``catalogue.faiss`` (inner product over L2-normalised embeddings),
``catalogue.parquet`` (manifest rows: faiss id i is row i) and ``index.json`` (the model it was
built with, factory, size, and the sha256 of the other two); the three are renamed into place
together, and a reader refuses a set whose files do not match ``index.json`` (a writer interrupted
between renames, a file copied in from elsewhere).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from grappa.config import ConfigError
from grappa.io.artifacts import atomic_paths, file_sha256, read_json, read_table, write_table
from grappa.io.manifests import SCHEMA

INDEX_FILE, CATALOGUE_FILE, META_FILE = "catalogue.faiss", "catalogue.parquet", "index.json"


def build(factory: str, vectors: np.ndarray):
    """A trained, filled faiss index of ``factory`` (inner product over normalised vectors)."""
    import faiss

    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(vectors)
    except RuntimeError as err:
        raise ConfigError(f"index.factory: faiss cannot build '{factory}' over {len(vectors)} vectors "
                          f"({str(err).strip().splitlines()[-1][:160]})") from None
    index.add(vectors)
    return index


def read(folder: Path):
    """(faiss index, catalogue rows, meta) of a set ``write`` published; ConfigError for any other."""
    import faiss

    meta = read_json(folder / META_FILE)
    files = meta.get("files") or {}
    for name in (INDEX_FILE, CATALOGUE_FILE):  # before faiss parses a byte of it
        if files.get(name) != file_sha256(folder / name):
            raise ConfigError(f"the index at {folder} is not one set: {name} does not match {META_FILE}; "
                              "rebuild it with 'grappa index'")
    return faiss.read_index(str(folder / INDEX_FILE)), read_table(folder / CATALOGUE_FILE).to_pylist(), meta


def write(folder: Path, index, rows: list[dict], meta: dict) -> None:
    import faiss

    with atomic_paths(folder / INDEX_FILE, folder / CATALOGUE_FILE, folder / META_FILE) as (tmp_index, tmp_rows, tmp_meta):
        faiss.write_index(index, str(tmp_index))
        write_table(tmp_rows, pa.Table.from_pylist(rows, schema=SCHEMA))
        files = {INDEX_FILE: file_sha256(tmp_index), CATALOGUE_FILE: file_sha256(tmp_rows)}
        tmp_meta.write_text(json.dumps({**meta, "files": files}, indent=2, sort_keys=True) + "\n")


def search(index, queries: np.ndarray, top_k: int, search_params: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (Q, top_k); ids are -1 where the index holds fewer than top_k vectors."""
    import faiss

    if search_params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, search_params)
        except RuntimeError as err:
            raise ConfigError(f"index.search_params: '{search_params}' does not apply to this index "
                              f"({str(err).strip().splitlines()[-1][:120]})") from None
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), top_k)


def built_by(meta: dict) -> str:
    """'<sha prefix> (v<version>)' of the model an index was built with."""
    version = meta.get("model_version")
    return str(meta.get("model_sha256"))[:12] + (f" (v{version})" if version else "")
