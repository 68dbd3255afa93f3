"""The verbs that use a model: ``grappa embed`` (images -> Parquet of embeddings) and ``grappa search``
(the nearest catalogue images of query images, with the model the index was built with)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from grappa.config import ConfigError, Params
from grappa.core.augment import image_transform
from grappa.core.model import FUSION
from grappa.io import catalogue
from grappa.io.artifacts import write_table
from grappa.io.datasets import ImageDataset, encode
from grappa.io.layout import layout
from grappa.io.servable import load_identity, load_model
from grappa.io.sources import resolve_sources


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


def search_command(params: Params, images: list[str], top_k: int, folder: str | None, model_ref: str | None,
                   page: str | None = None) -> None:
    """`grappa search IMAGE... --top-k N`: the nearest catalogue images of each query, with scores;
    ``page``: also an HTML page of the queries and their neighbours as thumbnails."""
    folder = Path(folder) if folder else layout(params).index
    if not catalogue.exists(folder):
        raise ConfigError(f"no index at {folder}; build one with 'grappa index' (or dvc repro index)")
    index, rows, meta = catalogue.read(folder)
    built_with = {"model_uri": meta["model_uri"], "version": meta["model_version"], "model_sha256": meta["model_sha256"]}
    model, _ = load_model(model_ref, params) if model_ref else load_identity(built_with, params)
    if model.digest != meta["model_sha256"]:
        raise ConfigError(f"the index at {folder} was built by model {catalogue.built_by(meta)}, not by "
                          f"{model.digest[:12]}: its embeddings are not "
                          "comparable; rebuild it with 'grappa index' or search without --model")
    try:
        queries = model.embed(images)
    except ValueError as err:
        raise ConfigError(f"search: {err}") from None
    scores, ids = catalogue.search(index, queries, top_k, params.index.search_params)
    for q, image in enumerate(images):
        print(f"query {q + 1}: {image}")
        print(f"  {'rank':>4}  {'score':>7}  image_id  uri")
        for rank, (score, i) in enumerate(zip(scores[q], ids[q]), 1):
            if i >= 0:
                print(f"  {rank:>4}  {score:7.4f}  {rows[i]['image_id']}  {rows[i]['uri']}")
    if page:
        _write_search_page(page, params, images, rows, scores, ids, f"{catalogue.built_by(meta)}")


def _write_search_page(path: str, params: Params, images: list[str], rows: list[dict], scores, ids,
                       model: str) -> None:
    from functools import cache

    from grappa.io import pages

    @cache  # a catalogue image in several queries' neighbours is read and shrunk once
    def thumb(uri: str) -> str | None:
        return pages.thumbnail(uri, params.data.min_side, params.data.max_pixels, params.data.max_file_bytes)

    queries = [{"uri": image, "thumb": thumb(image)} for image in images]
    results = [[{**rows[i], "rank": rank, "score": float(score), "thumb": thumb(rows[i]["uri"])}
                for rank, (score, i) in enumerate(zip(scores[q], ids[q]), 1) if i >= 0] for q in range(len(images))]
    pages.write_page(path, pages.search_page("grappa search", f"{len(images)} queries, top {scores.shape[1]} of "
                                             f"{len(rows)} catalogue images, model {model}", queries, results))
    print(f"search: page of the queries and their neighbours -> {path}")
