"""The extracted features: ``features.parquet`` of a run, and the content-hash cache extraction fills."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from grappa.io.artifacts import arrow_to_vectors, read_table, vectors_to_arrow, write_table
from grappa.io.layout import Layout


def load_features(out: Layout, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """image_ids, labels (None for unlabeled) and zero-shot vectors of one split."""
    table = read_table(out.features)
    sub = table.filter(pc.equal(table.column("split"), split))
    return (sub.column("image_id").to_pylist(), np.array(sub.column("label").to_pylist(), dtype=object),
            arrow_to_vectors(sub.column("vector")))


class FeatureCache:
    """Append-only Parquet shards of (content_hash, vector, prefix bytes) for one backbone setup."""

    def __init__(self, root: Path):
        self.root = root

    def load(self) -> dict[str, tuple[np.ndarray, bytes | None]]:
        entries: dict[str, tuple[np.ndarray, bytes | None]] = {}
        for shard in sorted(self.root.glob("shard-*.parquet")):
            table = read_table(shard)
            vectors = arrow_to_vectors(table.column("vector"))
            prefixes = table.column("prefix").to_pylist()
            for h, v, p in zip(table.column("content_hash").to_pylist(), vectors, prefixes):
                entries[h] = (v, p)
        return entries

    def append(self, hashes: list[str], vectors: np.ndarray, prefixes: list[bytes | None]) -> None:
        if not hashes:
            return
        table = pa.table({"content_hash": hashes, "vector": vectors_to_arrow(vectors),
                          "prefix": pa.array(prefixes, type=pa.binary())})
        # unique name: concurrent extractions never overwrite each other's shards
        write_table(self.root / f"shard-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet", table)
