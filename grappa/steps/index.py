"""Step 7 — ``grappa index``: a faiss index of the catalogue, built with the model that serves.
Also the user verbs ``grappa embed`` (images -> Parquet of embeddings) and ``grappa search``.

The catalogue is ``index.sources`` (like ``data.sources``), or every image of the data snapshot when
that list is empty. The model is the champion (``<out>/evaluate/champion.json``). Writes
``<out>/index/``, all three files renamed into place together:
- ``catalogue.faiss``: ``index.factory`` over the L2-normalised embeddings, inner product; faiss id i
  is row i of
- ``catalogue.parquet``: image_id, uri, domain, split, label, size, mtime_ns, etag, content_hash
- ``index.json``: the model it was built with (sha256, URI, version), factory, size, what this run did

The folder persists between runs (a DVC ``persist`` output): with the same model and factory, new
catalogue images are embedded and added; a changed or removed image, another model or another
factory rebuilds it. Searching with a model other than the index's own is refused.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from grappa.config import ConfigError, Params
from grappa.core.augment import image_transform
from grappa.core.model import FUSION
from grappa.io import servable
from grappa.io.artifacts import atomic_paths, read_json, read_table, write_table
from grappa.io.datasets import ImageDataset, PrefixDataset, encode
from grappa.io.layout import layout
from grappa.io.sources import resolve_sources
from grappa.steps import snapshot

INDEX_FILE, CATALOGUE_FILE, META_FILE = "catalogue.faiss", "catalogue.parquet", "index.json"


# --------------------------------------------------------------------------- the model


def load_model(ref: str | None, params: Params) -> tuple[servable.Servable, dict]:
    """The model for ``ref`` (a servable folder or models:/ URI; None: the champion) and its identity."""
    if ref is None:
        champion = layout(params).champion
        if not champion.is_file():
            raise ConfigError(f"no champion recorded at {champion}; run the pipeline up to 'evaluate' first")
        return load_identity(read_json(champion), params)
    if ref.startswith("models:/"):
        return load_identity({"model_uri": ref, "version": None, "model_sha256": None}, params)
    return load_identity({"model_uri": ref, "version": None,
                          "model_sha256": servable.read_config(ref)["weights_sha256"]}, params)


def load_identity(identity: dict, params: Params) -> tuple[servable.Servable, dict]:
    """Load the model ``identity`` names (model_uri, version, model_sha256); this workspace's own copy
    when it has those weights, else from the registry or folder the URI names."""
    uri, local = identity["model_uri"], layout(params).model
    if identity["model_sha256"] and (local / servable.CONFIG).is_file() \
            and servable.read_config(local)["weights_sha256"] == identity["model_sha256"]:
        folder = local  # no download
    elif uri.startswith("models:/"):
        try:
            folder = servable.download(uri)
        except Exception as err:
            raise ConfigError(f"cannot load {uri} from the MLflow registry: {str(err).splitlines()[0][:200]}") from None
    else:
        folder = Path(uri)
    model = servable.load(folder)
    if identity["model_sha256"] and model.digest != identity["model_sha256"]:
        raise ConfigError(f"{uri} has weights {model.digest[:12]}, expected {identity['model_sha256'][:12]}")
    return model, {**identity, "model_sha256": model.digest}


def embed_rows(model: servable.Servable, rows: list[dict], params: Params) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Embeddings of catalogue rows, and (row, reason) of those that cannot be read.

    Images the extract step already holds (same content) are fed from its cached prefix activations
    when the model's frozen prefix is the one extracted; the others are read and preprocessed.
    """
    vectors = np.zeros((len(rows), model.config["embed_dim"]), np.float32)
    unreadable: list[tuple[int, str]] = []
    out = layout(params)
    cached: dict[int, int] = {}
    if model.same_prefix_as(params) and out.prefix.is_file():
        table = read_table(out.features).select(["image_id", "content_hash"])
        where = {(i, h): n for n, (i, h) in enumerate(zip(table.column("image_id").to_pylist(),
                                                          table.column("content_hash").to_pylist()))}
        cached = {r: where[(row["image_id"], row["content_hash"])] for r, row in enumerate(rows)
                  if (row["image_id"], row["content_hash"]) in where}
    batch = params.index.batch_size
    if cached:
        prefix = np.load(out.prefix, mmap_mode="r")
        mine = sorted(cached)
        vectors[mine], _ = encode(model.model, PrefixDataset(prefix, np.array([cached[r] for r in mine])), FUSION,
                                  batch, desc="index (cached prefix)")
    rest = [r for r in range(len(rows)) if r not in cached]
    if rest:
        dataset = ImageDataset([rows[r]["uri"] for r in rest], image_transform(model.preprocess, train=False),
                               params.data.min_side, params.data.max_pixels)
        bad: list = []
        vectors[rest], _ = encode(model.model, dataset, FUSION, batch, num_workers=params.extract.num_workers,
                                  desc="index (images)", unreadable=bad)
        unreadable = [(rest[i], reason) for i, reason in bad]
    return vectors, unreadable


# --------------------------------------------------------------------------- faiss verbs


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
    import faiss

    return faiss.read_index(str(folder / INDEX_FILE)), read_table(folder / CATALOGUE_FILE).to_pylist(), \
        read_json(folder / META_FILE)


def write(folder: Path, index, rows: list[dict], meta: dict) -> None:
    import faiss

    with atomic_paths(folder / INDEX_FILE, folder / CATALOGUE_FILE, folder / META_FILE) as (tmp_index, tmp_rows, tmp_meta):
        faiss.write_index(index, str(tmp_index))
        write_table(tmp_rows, pa.Table.from_pylist(rows, schema=snapshot.SCHEMA))
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


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


# --------------------------------------------------------------------------- the step


def catalogue_rows(params: Params, previous: list[dict]) -> tuple[list[dict], list[dict]]:
    """The catalogue as snapshot rows (sorted by image_id), and the records left out with reasons."""
    if not params.index.sources:
        path = layout(params).manifest
        if not path.is_file():
            raise ConfigError(f"data snapshot not found at {path}; run 'grappa snapshot' first")
        return read_table(path).to_pylist(), []
    records, skipped = resolve_sources(params.index.sources)
    rows, unreadable, _ = snapshot.take_snapshot(records, snapshot.hash_cache(previous))
    return rows, [{"image_id": s.image_id, "reason": s.reason} for s in skipped + unreadable]


def _plan(previous_meta: dict | None, previous: list[dict], rows: list[dict], model_sha: str, factory: str):
    """Rows to add to the existing index, or None with the reason it must be rebuilt."""
    if previous_meta is None:
        return None, "no index yet"
    if previous_meta.get("model_sha256") != model_sha:
        return None, (f"the index was built by model {_named(previous_meta)}, "
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
    model, identity = load_model(None, params)
    previous_meta = previous_rows = None
    if all((folder / name).is_file() for name in (INDEX_FILE, CATALOGUE_FILE, META_FILE)):
        previous_index, previous_rows, previous_meta = read(folder)
    rows, skipped = catalogue_rows(params, previous_rows or [])
    to_add, reason = _plan(previous_meta, previous_rows or [], rows, model.digest, params.index.factory)
    todo = rows if to_add is None else to_add
    vectors, unreadable = embed_rows(model, todo, params)
    skipped += [{"image_id": todo[r]["image_id"], "reason": why} for r, why in unreadable]
    bad = {r for r, _ in unreadable}
    keep = [r for r in range(len(todo)) if r not in bad]
    todo, vectors = [todo[r] for r in keep], vectors[keep]
    if to_add is None:
        index, indexed = build(params.index.factory, vectors), todo
        action = f"rebuilt ({reason})"
    else:
        index, indexed = previous_index, previous_rows + todo
        index.add(vectors)
        action = f"added {len(todo)} images ({reason})"
    meta = {
        "model_sha256": model.digest, "model_uri": identity["model_uri"], "model_version": identity["version"],
        "factory": params.index.factory, "dim": int(vectors.shape[1]), "count": int(index.ntotal),
        "action": action, "embedded": len(todo), "skipped": skipped,
        "seconds": time.perf_counter() - t0,
    }
    if index.ntotal != len(indexed):
        raise RuntimeError(f"index holds {index.ntotal} vectors for {len(indexed)} catalogue rows")
    write(folder, index, indexed, meta)
    print(f"index: {action}; {index.ntotal} images, model {model.digest[:12]}"
          + (f" (v{identity['version']})" if identity["version"] else ""))
    return meta


# --------------------------------------------------------------------------- user verbs


def embed_command(params: Params, sources: list[str], out: str, model_ref: str | None) -> None:
    """`grappa embed SOURCE... --out FILE`: one row per readable image (id, uri, domain, embedding)."""
    from grappa.io.artifacts import vectors_to_arrow

    model, identity = load_model(model_ref, params)
    records, skipped = resolve_sources(sources)
    if not records:
        raise ConfigError("embed: no images found in " + ", ".join(sources))
    dataset = ImageDataset([r.uri for r in records], image_transform(model.preprocess, train=False),
                           params.data.min_side, params.data.max_pixels)
    bad: list = []
    vectors, _ = encode(model.model, dataset, FUSION, params.index.batch_size,
                        num_workers=params.extract.num_workers, desc="embed", unreadable=bad)
    keep = sorted(set(range(len(records))) - {r for r, _ in bad})
    table = pa.table({"image_id": [records[r].image_id for r in keep], "uri": [records[r].uri for r in keep],
                      "domain": [records[r].domain for r in keep], "embedding": vectors_to_arrow(vectors[keep])})
    table = table.replace_schema_metadata({"grappa.model_sha256": model.digest,
                                           "grappa.model_uri": identity["model_uri"]})
    write_table(out, table)
    for record, reason in [(records[r], why) for r, why in bad] + [(s, s.reason) for s in skipped]:
        print(f"embed: skipped {record.image_id}: {reason}")
    print(f"embed: {len(keep)} embeddings (dim {vectors.shape[1]}) from model {model.digest[:12]} -> {out}")


def search_command(params: Params, images: list[str], top_k: int, folder: str | None, model_ref: str | None) -> None:
    """`grappa search IMAGE... --top-k N`: the nearest catalogue images of each query, with scores."""
    folder = Path(folder) if folder else layout(params).index
    if not (folder / META_FILE).is_file():
        raise ConfigError(f"no index at {folder}; build one with 'grappa index' (or dvc repro index)")
    index, rows, meta = read(folder)
    built_with = {"model_uri": meta["model_uri"], "version": meta["model_version"], "model_sha256": meta["model_sha256"]}
    model, _ = load_model(model_ref, params) if model_ref else load_identity(built_with, params)
    if model.digest != meta["model_sha256"]:
        raise ConfigError(f"the index at {folder} was built by model {_named(meta)}, not by "
                          f"{model.digest[:12]}: its embeddings are not "
                          "comparable; rebuild it with 'grappa index' or search without --model")
    try:
        queries = model.embed(images)
    except ValueError as err:
        raise ConfigError(f"search: {err}") from None
    scores, ids = search(index, queries, top_k, params.index.search_params)
    for q, image in enumerate(images):
        print(f"query {q + 1}: {image}")
        print(f"  {'rank':>4}  {'score':>7}  image_id  uri")
        for rank, (score, i) in enumerate(zip(scores[q], ids[q]), 1):
            if i >= 0:
                print(f"  {rank:>4}  {score:7.4f}  {rows[i]['image_id']}  {rows[i]['uri']}")


def _named(meta: dict) -> str:
    """'<sha prefix> (v<version>)' of the model an index was built with."""
    version = meta.get("model_version")
    return str(meta.get("model_sha256"))[:12] + (f" (v{version})" if version else "")
