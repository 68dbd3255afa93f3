"""Manifests: the snapshot's rows (one per image, with its content hash) and the hashing behind them.

A file is read to be hashed only when it is new or its size, mtime, inode or status-change time (ETag
on S3) changed: the previous manifest is the hash cache. The ctime catches a rewrite whose mtime was
set back, which size and mtime alone would take for the old file. Used by the ``snapshot`` step and by ``index`` for catalogues
of their own.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from grappa.io.artifacts import file_sha256, read_table
from grappa.io.sources import ImageRecord, Skipped, content_hash
from grappa.io.storage import ObjectStat, StorageError, is_s3, read_bytes, stat_many


SCHEMA = pa.schema([
    ("image_id", pa.string()), ("uri", pa.string()), ("domain", pa.string()), ("split", pa.string()),
    ("label", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("etag", pa.string()),
    ("change_stamp", pa.string()), ("content_hash", pa.string()),
])


def _version_key(uri: str, st: ObjectStat) -> tuple:
    return uri, st.size, st.mtime_ns, st.etag, st.change_stamp


def hash_cache(rows: list[dict]) -> dict[tuple, str]:
    """(uri, size, mtime_ns, etag, change_stamp) -> content hash of earlier manifest rows: a file whose
    key is here need not be read again (rows of manifests written before change_stamp: read once more)."""
    return {(r["uri"], r["size"], r["mtime_ns"], r["etag"], r.get("change_stamp")): r["content_hash"] for r in rows}


def previous_rows(path: Path) -> list[dict]:
    """The rows of an earlier manifest at ``path`` (none if there is none or it cannot be read)."""
    if not path.is_file():
        return []
    try:
        return read_table(path).to_pylist()
    except Exception:  # an unreadable cache only costs re-hashing
        return []


def hash_files(uris: list[str], workers: int = 8) -> tuple[dict[str, str], dict[str, str]]:
    """sha256 of each file's bytes (a local file streamed in chunks); returns (hashes, unreadable uri -> reason)."""
    def one(uri: str):
        try:
            return uri, content_hash(read_bytes(uri)) if is_s3(uri) else file_sha256(uri), None
        except StorageError as err:
            return uri, None, str(err)
        except OSError as err:  # removed or unreadable since it was listed
            return uri, None, f"cannot read {uri}: {err.strerror}"

    hashes, failed = {}, {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for uri, digest, err in tqdm(pool.map(one, uris), total=len(uris), desc="hash new images", unit="img"):
            if digest is None:
                failed[uri] = err
            else:
                hashes[uri] = digest
    return hashes, failed


def take_snapshot(records: list[ImageRecord], known: dict[tuple, str],
                  max_file_bytes: int | None = None) -> tuple[list[dict], list[Skipped], int]:
    """Manifest rows of ``records`` (sorted by image_id), what could not be read, and how many files
    were read. A file above ``max_file_bytes`` is skipped by its size, never read."""
    stats = stat_many([r.uri for r in records])
    skipped = [Skipped(r.image_id, f"missing file: {r.uri}") for r in records if r.uri not in stats]
    too_big = {r.uri for r in records if r.uri in stats and max_file_bytes and stats[r.uri].size > max_file_bytes}
    skipped += [Skipped(r.image_id, f"{stats[r.uri].size} bytes, above data.max_file_bytes ({max_file_bytes})")
                for r in records if r.uri in too_big]
    present = [r for r in records if r.uri in stats and r.uri not in too_big]
    todo = sorted({r.uri for r in present if _version_key(r.uri, stats[r.uri]) not in known})
    fresh, unreadable = hash_files(todo)
    rows = []
    for rec in sorted(present, key=lambda r: r.image_id):
        st = stats[rec.uri]
        digest = known.get(_version_key(rec.uri, st)) or fresh.get(rec.uri)
        if digest is None:
            skipped.append(Skipped(rec.image_id, unreadable[rec.uri]))
            continue
        rows.append({"image_id": rec.image_id, "uri": rec.uri, "domain": rec.domain, "split": rec.split,
                     "label": rec.label, "size": st.size, "mtime_ns": st.mtime_ns, "etag": st.etag,
                     "change_stamp": st.change_stamp, "content_hash": digest})
    return rows, skipped, len(todo)


def changes(previous: dict[str, str], current: dict[str, str]) -> dict[str, int]:
    """Counts of new, changed, removed and unchanged image ids between two {image_id: content_hash}."""
    return {
        "new": sum(i not in previous for i in current),
        "changed": sum(i in previous and previous[i] != h for i, h in current.items()),
        "removed": sum(i not in current for i in previous),
        "unchanged": sum(previous.get(i) == h for i, h in current.items()),
    }


def digest(rows: list[dict]) -> str:
    """sha256 over the sorted (image_id, split, content_hash) of a snapshot: the data version."""
    blob = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r["image_id"]):
        blob.update(f"{row['image_id']}\t{row['split']}\t{row['content_hash']}\n".encode())
    return blob.hexdigest()
