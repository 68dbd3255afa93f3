"""The verbs that use a model: ``grappa embed`` (images -> Parquet of embeddings) and ``grappa search``
(the nearest catalogue images of query images, with the model the index was built with)."""
from __future__ import annotations

from functools import lru_cache
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


class Searcher:
    """The catalogue index and the model it was built with, loaded once: ``grappa search`` and ``grappa serve``."""

    def __init__(self, params: Params, folder: str | None = None, model_ref: str | None = None):
        folder = Path(folder) if folder else layout(params).index
        if not catalogue.exists(folder):
            raise ConfigError(f"no index at {folder}; build one with 'grappa index' (or dvc repro index)")
        self.params = params
        self.index, self.rows, self.meta = catalogue.read(folder)
        built_with = {"model_uri": self.meta["model_uri"], "version": self.meta["model_version"],
                      "model_sha256": self.meta["model_sha256"]}
        self.model, _ = load_model(model_ref, params) if model_ref else load_identity(built_with, params)
        if self.model.digest != self.meta["model_sha256"]:
            raise ConfigError(f"the index at {folder} was built by model {catalogue.built_by(self.meta)}, not by "
                              f"{self.model.digest[:12]}: its embeddings are not "
                              "comparable; rebuild it with 'grappa index' or search without --model")
        self.built_by = catalogue.built_by(self.meta)

    def search(self, images: list, top_k: int) -> list[list[dict]]:
        """Per query (bytes, a path, an s3:// URI or a decoded PIL image) its hits: the catalogue row
        (image_id, uri, domain, label) with ``rank`` and ``score``. ConfigError for an image that
        cannot be read."""
        try:
            queries = self.model.embed(images)
        except ValueError as err:
            raise ConfigError(f"search: {err}") from None
        scores, ids = catalogue.search(self.index, queries, top_k, self.params.index.search_params)
        return [[{**self.rows[i], "rank": rank, "score": float(score)}
                 for rank, (score, i) in enumerate(zip(scores[q], ids[q]), 1) if i >= 0] for q in range(len(images))]

    def thumbnail(self, uri: str) -> str | None:
        """A catalogue image's thumbnail (a data: URI), read and shrunk once however often it is a hit."""
        data = self.params.data
        try:
            return _thumbnail(uri, data.min_side, data.max_pixels, data.max_file_bytes)
        except _Unreadable:
            return None


class _Unreadable(Exception):
    pass


@lru_cache(maxsize=4096)  # ~10 kB each: a served catalogue's hits stay in memory, bounded
def _thumbnail(uri: str, min_side: int, max_pixels: int, max_bytes: int) -> str:
    from grappa.io import pages

    thumb = pages.thumbnail(uri, min_side, max_pixels, max_bytes)
    if thumb is None:  # raised, so not cached: a read that failed (S3 away a moment) is tried again
        raise _Unreadable(uri)
    return thumb


def search_command(params: Params, images: list[str], top_k: int, folder: str | None, model_ref: str | None,
                   page: str | None = None) -> None:
    """`grappa search IMAGE... --top-k N`: the nearest catalogue images of each query, with scores;
    ``page``: also an HTML page of the queries and their neighbours as thumbnails."""
    searcher = Searcher(params, folder, model_ref)
    results = searcher.search(images, top_k)
    for q, (image, hits) in enumerate(zip(images, results), 1):
        print(f"query {q}: {image}")
        print(f"  {'rank':>4}  {'score':>7}  image_id  uri")
        for hit in hits:
            print(f"  {hit['rank']:>4}  {hit['score']:7.4f}  {hit['image_id']}  {hit['uri']}")
    if page:
        from grappa.io import pages

        queries = [{"uri": image, "thumb": searcher.thumbnail(image)} for image in images]
        results = [[{**hit, "thumb": searcher.thumbnail(hit["uri"])} for hit in hits] for hits in results]
        pages.write_page(page, pages.search_page("grappa search", f"{len(images)} queries, top {top_k} of "
                                                 f"{len(searcher.rows)} catalogue images, model {searcher.built_by}",
                                                 queries, results))
        print(f"search: page of the queries and their neighbours -> {page}")
