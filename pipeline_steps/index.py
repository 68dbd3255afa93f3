"""Step 7 — ``grappa index``: a faiss index of the catalogue, built with the model that serves
(the files and faiss verbs: grappa.io.catalogue; searching it: ``grappa search``, grappa.use).

The catalogue is ``index.sources`` (like ``data.sources``), or every image of the data snapshot when
that list is empty. The model is the champion (``<out>/evaluate/champion.json``). Writes
``<out>/index/``, a new version folder published by one atomic switch of index.json (grappa.io.catalogue):
- ``v-<digest>/catalogue.faiss``: ``index.factory`` over the L2-normalised embeddings, inner product;
  faiss id i is row i of
- ``v-<digest>/catalogue.parquet``: image_id, uri, domain, split, label, size, mtime_ns, etag, change_stamp,
  content_hash
- ``index.json``: the model it was built with (sha256, URI, version), factory, size, what this run did,
  its version folder and the sha256 of that folder's files

The folder persists between runs (a DVC ``persist`` output): with the same model and factory, new
catalogue images are embedded and added; a changed or removed image, another model or another
factory rebuilds it. Searching with a model other than the index's own is refused.
"""
from __future__ import annotations

import time

import numpy as np

from grappa.config import ConfigError, Params
from grappa.core.augment import image_transform
from grappa.core.model import FUSION
from grappa.io import catalogue, manifests, servable
from grappa.io.artifacts import read_table
from grappa.io.datasets import ImageDataset, PrefixDataset, encode
from grappa.io.features import open_prefix
from grappa.io.layout import layout
from grappa.io.sources import resolve_sources



# --------------------------------------------------------------------------- the model



def embed_rows(model: servable.Servable, rows: list[dict], params: Params) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Embeddings of catalogue rows, and (row, reason) of those that cannot be read.

    Images the extract step already holds (same content) are fed from its cached prefix activations
    when the model's frozen prefix is the one extracted; the others are read and preprocessed.
    """
    vectors = np.zeros((len(rows), model.config["embed_dim"]), np.float32)
    unreadable: list[tuple[int, str]] = []
    out = layout(params)
    cached: dict[int, int] = {}
    prefix = open_prefix(out) if model.same_prefix_as(params) and out.features.is_file() else None
    if prefix is not None:
        table = read_table(out.features).select(["image_id", "content_hash"])
        where = {(i, h): n for n, (i, h) in enumerate(zip(table.column("image_id").to_pylist(),
                                                          table.column("content_hash").to_pylist()))}
        cached = {r: where[(row["image_id"], row["content_hash"])] for r, row in enumerate(rows)
                  if (row["image_id"], row["content_hash"]) in where}
    batch = params.index.batch_size
    if cached:
        mine = sorted(cached)
        vectors[mine], _ = encode(model.model, PrefixDataset(prefix, np.array([cached[r] for r in mine])), FUSION,
                                  batch, desc="index (cached prefix)")
    rest = [r for r in range(len(rows)) if r not in cached]
    if rest:
        dataset = ImageDataset([rows[r]["uri"] for r in rest], image_transform(model.preprocess, train=False),
                               params.data.min_side, params.data.max_pixels, max_bytes=params.data.max_file_bytes)
        bad: list = []
        vectors[rest], _ = encode(model.model, dataset, FUSION, batch, num_workers=params.extract.num_workers,
                                  desc="index (images)", unreadable=bad)
        unreadable = [(rest[i], reason) for i, reason in bad]
    return vectors, unreadable


# --------------------------------------------------------------------------- faiss verbs



# --------------------------------------------------------------------------- the step


def catalogue_rows(params: Params, previous: list[dict]) -> tuple[list[dict], list[dict]]:
    """The catalogue as snapshot rows (sorted by image_id), and the records left out with reasons."""
    if not params.index.sources:
        path = layout(params).manifest
        if not path.is_file():
            raise ConfigError(f"data snapshot not found at {path}; run 'grappa snapshot' first")
        return read_table(path).to_pylist(), []
    records, skipped = resolve_sources(params.index.sources)
    rows, unreadable, _ = manifests.take_snapshot(records, manifests.hash_cache(previous), params.data.max_file_bytes)
    return rows, [{"image_id": s.image_id, "reason": s.reason} for s in skipped + unreadable]


def _plan(previous_meta: dict | None, previous: list[dict], rows: list[dict], model_sha: str, factory: str):
    """Rows to add to the existing index, or None with the reason it must be rebuilt."""
    if previous_meta is None:
        return None, "no index yet"
    if previous_meta.get("model_sha256") != model_sha:
        return None, (f"the index was built by model {catalogue.built_by(previous_meta)}, "
                      f"the champion is {model_sha[:12]}")
    if previous_meta.get("factory") != factory:
        return None, f"index.factory changed from {previous_meta.get('factory')!r} to {factory!r}"
    now = {(r["image_id"], r["content_hash"]) for r in rows}
    if any((r["image_id"], r["content_hash"]) not in now for r in previous):
        return None, "catalogue images were removed or changed"
    had = {(r["image_id"], r["content_hash"]) for r in previous}
    return [r for r in rows if (r["image_id"], r["content_hash"]) not in had], "same model and factory"


def run(params: Params) -> dict:
    t0 = time.perf_counter()
    folder = layout(params).index
    model, identity = servable.load_model(None, params)
    previous_meta = previous_rows = None
    if catalogue.exists(folder):
        try:
            previous_index, previous_rows, previous_meta = catalogue.read(folder)
        except ConfigError as err:  # not a set this step published: start over rather than add to it
            print(f"index: {err}; rebuilding")
    rows, skipped = catalogue_rows(params, previous_rows or [])
    to_add, reason = _plan(previous_meta, previous_rows or [], rows, model.digest, params.index.factory)
    todo = rows if to_add is None else to_add
    vectors, unreadable = embed_rows(model, todo, params)
    skipped += [{"image_id": todo[r]["image_id"], "reason": why} for r, why in unreadable]
    bad = {r for r, _ in unreadable}
    keep = [r for r in range(len(todo)) if r not in bad]
    todo, vectors = [todo[r] for r in keep], vectors[keep]
    if to_add is None:
        index, indexed = catalogue.build(params.index.factory, vectors), todo
        action = f"rebuilt ({reason})"
    else:
        index, indexed = previous_index, previous_rows + todo
        index.add(vectors)
        action = f"added {len(todo)} images ({reason})"
    meta = {
        "model_sha256": model.digest, "model_uri": identity["model_uri"], "model_version": identity["version"],
        "factory": params.index.factory, "dim": int(vectors.shape[1]), "count": int(index.ntotal),
        "action": action, "embedded": len(todo), "skipped": skipped,
        "timings_s": {"total": time.perf_counter() - t0},
    }
    if index.ntotal != len(indexed):
        raise RuntimeError(f"index holds {index.ntotal} vectors for {len(indexed)} catalogue rows")
    catalogue.write(folder, index, indexed, meta)
    print(f"index: {action}; {index.ntotal} images, model {model.digest[:12]}"
          + (f" (v{identity['version']})" if identity["version"] else ""))
    return meta


# --------------------------------------------------------------------------- user verbs


