"""The feature store: what extraction writes and every later step reads, in bounded memory.

- :class:`RowFile`: an ``.npy`` file read by rows with ``pread`` (not ``mmap``: the pages a step
  reads stay in the page cache, not in its resident memory) and written chunk by chunk
  (:class:`RowFileWriter`), so no step holds a whole (N, C, H, W) array.
- The extract output: one part per shard (``features.parquet`` + ``prefix.npy``, row-aligned), and
  after ``merge-features`` the joined ``features.parquet`` plus ``prefix.json``, which lists the
  parts' prefix files in row order; :func:`open_prefix` reads them as one array (:class:`RowSet`).
- :func:`iter_vectors` / :func:`take_vectors`: zero-shot vectors of some rows, a chunk at a time.
- :class:`FeatureCache`: the content-hash cache extraction fills, as (Parquet, ``.npy``) shard pairs;
  its index holds 32 bytes per image, and :meth:`FeatureCache.compact` merges small shards.
"""
from __future__ import annotations

import fcntl
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grappa.config import ConfigError
from grappa.io.artifacts import arrow_to_vectors, fsync, read_json, vectors_to_arrow, write_json
from grappa.io.layout import Layout

MB = 1 << 20


def stream_parquet(path: str | Path) -> pq.ParquetFile:
    """A Parquet file to read batch by batch in bounded memory. With pyarrow's default pre-buffering
    the reader kept every column chunk it had read: merging a 1.1 GB part peaked at 1.3 GB RSS, and
    at 0.25 GB without it (1M rows, one run)."""
    return pq.ParquetFile(path, pre_buffer=False, buffer_size=MB)


def chunk_rows(row_bytes: int, budget_mb: int, share: float = 0.25) -> int:
    """Rows per streamed chunk: ``share`` of the memory budget, at least 64 rows."""
    return max(64, int(budget_mb * MB * share) // max(row_bytes, 1))


# --------------------------------------------------------------------------- row files


class RowFile:
    """A C-ordered ``.npy`` array read by row: ``read(start, stop)`` and ``take(rows)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None  # set first: close() runs even when the header below is unreadable
        with open(self.path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if fortran:
            raise ValueError(f"{self.path}: Fortran-ordered arrays are not row files")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):  # DataLoader workers open their own descriptor
        return {**self.__dict__, "_fd": None}

    @property
    def fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, start: int, stop: int) -> np.ndarray:
        count = max(stop - start, 0)
        data = os.pread(self.fd, count * self.row_bytes, self.offset + start * self.row_bytes)
        if len(data) != count * self.row_bytes:
            raise ConfigError(f"{self.path} is truncated; rerun 'grappa extract'")
        return np.frombuffer(data, self.dtype).reshape(count, *self.row_shape)

    def take(self, rows) -> np.ndarray:
        """Rows in the given order; adjacent rows are read in one call."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        for run in np.split(np.arange(len(rows)), breaks):
            first, last = sorted_rows[run[0]], sorted_rows[run[-1]]
            out[order[run]] = self.read(int(first), int(last) + 1)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close


class RowFileWriter:
    """Writes an (rows, *row_shape) ``.npy`` chunk by chunk; the file appears complete or not at all."""

    def __init__(self, path: str | Path, rows: int, row_shape: tuple[int, ...], dtype):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.rows, self.row_shape, self.dtype = rows, tuple(row_shape), np.dtype(dtype)
        self.fh = open(self.tmp, "wb")
        np.lib.format.write_array_header_2_0(
            self.fh, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": (rows, *self.row_shape)})
        self.written = 0

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        if chunk.shape[1:] != self.row_shape or self.written + len(chunk) > self.rows:
            raise ValueError(f"{self.path}: chunk {chunk.shape} does not fit ({self.rows}, {self.row_shape})")
        self.fh.write(chunk.tobytes())
        self.written += len(chunk)

    def close(self) -> None:
        if self.written != self.rows:
            self.abort()
            raise ValueError(f"{self.path}: {self.written} of {self.rows} rows written")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


class RowSet:
    """Several row files (the parts' prefix activations) as one array of rows, in order."""

    def __init__(self, files: list[RowFile]):
        if not files:
            raise ValueError("a row set needs at least one file")
        self.files = files
        self.starts = np.cumsum([0] + [len(f) for f in files])
        self.row_shape, self.dtype = files[0].row_shape, files[0].dtype
        self.row_bytes = files[0].row_bytes

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    def take(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        for p in np.unique(part):
            hit = part == p
            out[hit] = self.files[p].take(rows[hit] - self.starts[p])
        return out

    def __getitem__(self, row: int) -> np.ndarray:
        return self.take([row])[0]


# --------------------------------------------------------------------------- the extract output


def write_prefix_index(out: Layout, part_files: list[Path]) -> dict:
    """``prefix.json``: the parts' prefix files (relative to ``extract/``), rows and row shape."""
    files = [RowFile(p) for p in part_files]
    base = out.prefix_index.parent
    index = {"parts": [{"path": str(f.path.relative_to(base)), "rows": len(f)} for f in files],
             "row_shape": list(files[0].row_shape) if files else None,
             "dtype": str(files[0].dtype) if files else None}
    write_json(out.prefix_index, index)
    return index


def open_prefix(out: Layout, expected_rows: int | None = None) -> RowSet | None:
    """The prefix activations of ``features.parquet``'s rows, or None when the run keeps none."""
    if not out.prefix_index.is_file():
        return None
    index = read_json(out.prefix_index)
    if not index["parts"]:
        return None
    base = out.prefix_index.parent
    files = [RowFile(base / part["path"]) for part in index["parts"]]
    prefix = RowSet(files)
    if expected_rows is not None and len(prefix) != expected_rows:  # never train on other images' activations
        raise ConfigError(f"{out.prefix_index} lists {len(prefix)} rows but features.parquet has "
                          f"{expected_rows}; rerun 'grappa extract' and 'grappa merge-features'")
    return prefix


def split_rows(out: Layout, split: str) -> np.ndarray:
    """Row numbers of ``features.parquet`` in ``split``."""
    column = pq.read_table(out.features, columns=["split"]).column("split")
    return np.flatnonzero(pc.equal(column, split).to_numpy(zero_copy_only=False))


def read_columns(out: Layout, columns: list[str], rows: np.ndarray | None = None) -> pa.Table:
    """Some columns of ``features.parquet`` (never the vectors unless asked), optionally some rows."""
    table = pq.read_table(out.features, columns=columns)
    return table if rows is None else table.take(pa.array(rows))


def vector_dim(out: Layout) -> int:
    return pq.ParquetFile(out.features).schema_arrow.field("vector").type.list_size


def iter_vectors(out: Layout, rows: np.ndarray | None, budget_mb: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions within ``rows``, vectors) chunks of the zero-shot vectors of ``rows`` (all: None)."""
    parquet = stream_parquet(out.features)
    dim = vector_dim(out)
    wanted = None if rows is None else np.zeros(parquet.metadata.num_rows, bool)
    if wanted is not None:
        wanted[rows] = True
        position = np.cumsum(wanted) - 1
    start = 0
    # a sixteenth of the budget a chunk: Arrow's buffers and the float copies callers make come on top
    for batch in parquet.iter_batches(batch_size=chunk_rows(4 * dim, budget_mb, share=1 / 16), columns=["vector"]):
        stop = start + batch.num_rows
        vectors = arrow_to_vectors(batch.column(0))
        if wanted is None:
            yield np.arange(start, stop), vectors
        else:
            hit = np.flatnonzero(wanted[start:stop])
            if len(hit):
                yield position[start + hit], vectors[hit]
        start = stop


def take_vectors(out: Layout, rows: np.ndarray, budget_mb: int) -> np.ndarray:
    """The zero-shot vectors of ``rows`` (in that order), read chunk by chunk."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    vectors = None
    for positions, chunk in iter_vectors(out, rows[order], budget_mb):
        if vectors is None:
            vectors = np.empty((len(rows), chunk.shape[1]), np.float32)
        vectors[order[positions]] = chunk
    return vectors if vectors is not None else np.zeros((0, 1), np.float32)


# --------------------------------------------------------------------------- the content-hash cache


def _digests(hex_hashes) -> np.ndarray:
    """sha256 hex strings as 32-byte keys (a sortable numpy array, 32 bytes an image)."""
    return np.array([bytes.fromhex(h) for h in hex_hashes], dtype="S32")


class FeatureCache:
    """Append-only shards of (content_hash, vector) Parquet + row-aligned ``.npy`` prefix
    activations, for one backbone setup. Shards written by the previous format (prefix bytes in a
    Parquet column) are still read, and rewritten by :meth:`compact`."""

    def __init__(self, root: Path, row_shape: tuple[int, ...] | None = None):
        self.root = Path(root)
        self.row_shape = row_shape  # of the prefix activations: the previous format kept flat bytes
        self._keys = self._shard = self._row = None
        self._shards: list[Path] = []

    # -- locking: extractions share the cache; compaction needs it alone
    @contextmanager
    def shared(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH)
            try:
                yield self
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def shard_files(self) -> list[Path]:
        return sorted(self.root.glob("shard-*.parquet"))

    def _check_shard(self, path: Path) -> list[str] | None:
        """The content hashes of a sound shard; None for a damaged one (zero-byte or truncated
        Parquet, a vector column that is not the shard's rows, a missing or short ``.npy``)."""
        try:
            parquet = pq.ParquetFile(path)
            table = parquet.read(columns=["content_hash"])
            if parquet.metadata.num_rows != table.num_rows or "vector" not in parquet.schema_arrow.names:
                return None
            legacy = "prefix" in parquet.schema_arrow.names
            npy = path.with_suffix(".npy")
            if self.row_shape is not None and not legacy:
                rows = RowFile(npy)
                expected = os.path.getsize(npy) - rows.offset
                if len(rows) != table.num_rows or rows.row_shape != tuple(self.row_shape) or \
                        expected != len(rows) * rows.row_bytes:
                    return None
            return table.column("content_hash").to_pylist()
        except (OSError, ValueError, pa.ArrowException):
            return None

    def _quarantine(self, path: Path) -> None:
        """Move a damaged shard (table and array) aside, so its images are computed again."""
        folder = self.root / "quarantine"
        folder.mkdir(exist_ok=True)
        for file in (path, path.with_suffix(".npy")):
            try:
                os.replace(file, folder / file.name)
            except FileNotFoundError:  # absent, or another extraction moved it first
                pass
        warnings.warn(f"feature cache: {path.name} is damaged (empty, truncated or without its activations); "
                      f"moved to {folder} and its images will be computed again", stacklevel=3)

    def index(self) -> int:
        """Reads the content hashes of every shard (not the vectors); returns the entries held. A
        damaged shard is quarantined, never read."""
        keys, shard, row = [], [], []
        sound = []
        for path in self.shard_files():
            hashes = self._check_shard(path)
            if hashes is None:
                self._quarantine(path)
            else:
                sound.append((path, hashes))
        self._shards = [path for path, _ in sound]
        for s, (path, hashes) in enumerate(sound):
            keys.append(_digests(hashes))
            shard.append(np.full(len(hashes), s, np.int32))
            row.append(np.arange(len(hashes), dtype=np.int32))
        keys = np.concatenate(keys) if keys else np.zeros(0, "S32")
        # first occurrence wins (concurrent extractions may both have computed an image)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        first = np.ones(len(keys), bool)
        first[1:] = keys[1:] != keys[:-1]
        keep = order[first]
        self._keys = keys[first]
        self._shard = np.concatenate(shard)[keep] if shard else np.zeros(0, np.int32)
        self._row = np.concatenate(row)[keep] if row else np.zeros(0, np.int32)
        return len(self._keys)

    def locate(self, hashes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found, shard, row) of each hex hash (shard and row are meaningless where not found)."""
        if self._keys is None:
            self.index()
        keys = _digests(hashes)
        if not len(self._keys):
            nothing = np.zeros(len(keys), np.int64)
            return nothing.astype(bool), nothing, nothing
        pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        return self._keys[pos] == keys, self._shard[pos], self._row[pos]

    def contains(self, hashes) -> np.ndarray:
        return self.locate(hashes)[0]

    def gather(self, hashes) -> tuple[np.ndarray, np.ndarray | None]:
        """Vectors (n, D) and prefix activations (n, ...) or None of cached ``hashes``, in order."""
        found, shard, row = self.locate(hashes)
        if not found.all():
            raise KeyError(f"{int((~found).sum())} images are not in the feature cache {self.root}")
        vectors, prefixes = None, None
        for s in np.unique(shard):
            hit = np.flatnonzero(shard == s)
            v, p = self._read_shard(self._shards[s], row[hit])
            if vectors is None:
                vectors = np.empty((len(hashes), v.shape[1]), np.float32)
                prefixes = None if p is None else np.empty((len(hashes), *p.shape[1:]), p.dtype)
            vectors[hit] = v
            if prefixes is not None:
                prefixes[hit] = p
        return vectors, prefixes

    def _read_shard(self, path: Path, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        parquet = pq.ParquetFile(path)
        legacy = "prefix" in parquet.schema_arrow.names
        table = parquet.read(columns=["vector", "prefix"] if legacy else ["vector"]).take(pa.array(rows))
        vectors = arrow_to_vectors(table.column("vector"))
        npy = path.with_suffix(".npy")
        if legacy:
            blobs = table.column("prefix").to_pylist()
            if blobs[0] is None or self.row_shape is None:
                return vectors, None
            return vectors, np.stack([np.frombuffer(b, np.float16) for b in blobs]).reshape(len(rows), *self.row_shape)
        return vectors, (RowFile(npy).take(rows) if npy.is_file() else None)

    def append(self, hashes: list[str], vectors: np.ndarray, prefixes: np.ndarray | None,
               reindex: bool = True) -> None:
        """One new shard; the ``.npy`` is complete before its Parquet (the shard's marker) appears."""
        if not len(hashes):
            return
        stem = self.root / f"shard-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        if prefixes is not None:
            writer = RowFileWriter(stem.with_suffix(".npy"), len(prefixes), prefixes.shape[1:], prefixes.dtype)
            writer.write(prefixes)
            writer.close()
        table = pa.table({"content_hash": list(hashes), "vector": vectors_to_arrow(vectors)})
        tmp = stem.with_name(f".{stem.name}.tmp")
        # neither dictionary-encoded nor compressed: float vectors and distinct hashes gain nothing from
        # either, whose encoders took 0.6% of the extraction's CPU time (perf, 10,000 images)
        pq.write_table(table, tmp, use_dictionary=False, compression="none")
        fsync(tmp)  # on disk before the rename makes it the shard's marker (a crash leaves no empty shard)
        os.replace(tmp, stem.with_suffix(".parquet"))
        if reindex:
            self._keys = None  # re-index on the next lookup

    def needs_compaction(self, rows_per_shard: int) -> bool:
        """Many small shards (incremental runs each leave one), or shards of the previous format."""
        files = self.shard_files()
        small = sum(pq.ParquetFile(f).metadata.num_rows < rows_per_shard // 2 for f in files)
        legacy = any("prefix" in pq.ParquetFile(f).schema_arrow.names for f in files)
        return small >= 8 or legacy

    def compact(self, rows_per_shard: int) -> dict:
        """Rewrites the cache as shards of ``rows_per_shard`` distinct images, streaming; only when
        no extraction holds the cache (else returns ``{"skipped": ...}``). Old shards are removed
        after the new ones are complete, so a kill loses nothing."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return {"skipped": "another extraction is using the cache"}
            try:
                before = self.shard_files()
                entries = self.index()
                order = np.lexsort((self._row, self._shard))  # read each old shard once, in order
                hashes = self._hex_hashes(order)
                for start in range(0, entries, rows_per_shard):
                    chunk = hashes[start:start + rows_per_shard]
                    vectors, prefixes = self.gather(chunk)
                    self.append(chunk, vectors, prefixes, reindex=False)  # the old shards' index stays valid
                for path in before:  # the table (the shard's marker) first: never a table without its array
                    path.unlink(missing_ok=True)  # a damaged one was quarantined by index()
                    path.with_suffix(".npy").unlink(missing_ok=True)
                self._keys = None
                return {"shards_before": len(before), "shards_after": len(self.shard_files()), "images": entries}
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _hex_hashes(self, order: np.ndarray) -> list[str]:
        return [bytes(k).hex() for k in self._keys[order]]
