"""Step 1 — ``grappa snapshot``: the images the pipeline runs on, as one versioned manifest.

Resolves ``data.sources`` (manifests, folders, ``s3://`` prefixes), applies the per-domain caps and
writes ``<out>/snapshot/``:
- ``manifest.parquet``: image_id, uri, domain, split, label (None for unlabeled), size, mtime_ns
  and change_stamp (local: inode and ctime) or etag (s3), content_hash (sha256 of the bytes), sorted by image_id
- ``report.json``: counts, what changed since the previous snapshot, skipped records with reasons

``extract`` depends on the manifest, so new, changed or removed images change exactly what DVC
reruns, and an unchanged collection gives a byte-identical manifest (nothing downstream reruns).
A file is read to be hashed only when it is new or its size, mtime, inode or ctime (ETag on S3) changed: the
previous manifest (a DVC ``persist`` output) is the hash cache.
"""
from __future__ import annotations

import time

import pyarrow as pa

from grappa.config import ConfigError, Params
from grappa.io import manifests
from grappa.io.artifacts import write_table
from grappa.io.layout import layout
from grappa.io.sources import ImageRecord, Skipped, cap_per_domain, counts, resolve_sources


def select_records(params: Params) -> tuple[list[ImageRecord], list[Skipped]]:
    """The records of data.sources, each source capped on its own (images dropped into one source
    never displace another's), and the ones left out with reasons."""
    data = params.data
    return resolve_sources(data.sources, select=lambda found: cap_per_domain(
        found, data.max_unlabeled_per_domain, data.max_query_db_per_domain, params.seed))


def run(params: Params) -> dict:
    t0 = time.perf_counter()
    path = layout(params).manifest
    records, skipped = select_records(params)
    if not records:
        raise ConfigError("data.sources: no images found in " + ", ".join(params.data.sources))
    previous = manifests.previous_rows(path)
    rows, unreadable, hashed = manifests.take_snapshot(records, manifests.hash_cache(previous),
                                                       params.data.max_file_bytes)
    skipped += unreadable
    if not rows:
        raise ConfigError("data.sources: none of the listed images could be read (see the skipped list)")
    write_table(path, pa.Table.from_pylist(rows, schema=manifests.SCHEMA))
    report = {
        "images": len(rows),
        "digest": manifests.digest(rows),
        "by_split": counts(r["split"] for r in rows),
        "by_domain": counts(r["domain"] for r in rows),
        "since_previous": manifests.changes({r["image_id"]: r["content_hash"] for r in previous},
                                  {r["image_id"]: r["content_hash"] for r in rows}),
        "files_read": hashed,  # new or modified files; the others kept the hash of the previous snapshot
        "skipped": [{"image_id": s.image_id, "reason": s.reason} for s in skipped],
        "timings_s": {"total": time.perf_counter() - t0},
    }
    since = report["since_previous"]
    print(f"snapshot: {len(rows)} images ({', '.join(f'{v} {k}' for k, v in since.items())}); "
          f"{hashed} files read, {len(skipped)} skipped")
    return report
