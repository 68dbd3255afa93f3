"""Step 2 — ``grappa extract --shard I/N``: frozen-backbone features of one part of the snapshot.

Shard I of N (``extract.shards``) is a contiguous slice of the snapshot's rows, so the parts joined
in order by ``merge-features`` are the snapshot's order whatever N is. Writes
``<out>/extract/parts/<I>-of-<N>/``:
- ``features.parquet``: image_id, uri, domain, split, label (None for unlabeled), content_hash, vector
- ``prefix.npy``: float16 activations at ``adapt_from_block`` (only when > 0), row-aligned
- ``report.json``: counts, new vs cached, undecodable images with reasons (records the snapshot could not
  use are listed in its own report), timings, the runtime the forward ran on (``extract.runtime``)

The cache (``extract.cache_dir/<fingerprint>/``) is keyed by the sha256 of each file's bytes and by
the backbone fingerprint, so a rerun after new images arrive computes only the new ones; shards of
one run share it. Both the part and the computation stream in chunks sized by ``memory_budget_mb``.
"""
from __future__ import annotations

import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from grappa.config import ConfigError, Params
from grappa.core.augment import CentreCrop
from grappa.core.backbones import create_backbone
from grappa.core.model import GrappaModel, pick_device
from grappa.core.runtimes import frozen_forward
from grappa.io.artifacts import file_sha256, read_table, vectors_to_arrow
from grappa.io.assemble import build_model
from grappa.io.datasets import ImageDataset, loader, prefetched
from grappa.io.features import FeatureCache, RowFileWriter, chunk_rows
from grappa.io.layout import PART_FEATURES, PART_PREFIX, Shard, layout
from grappa.io.sources import DECODE_VERSION, counts

FLUSH_EVERY = 1024  # images: a killed extraction keeps all but the last few hundred computed features
COLUMNS = ["image_id", "uri", "domain", "split", "label", "content_hash"]


def shard_rows(params: Params, shard: Shard) -> pa.Table:
    """The snapshot rows of ``shard`` (metadata columns only)."""
    if shard.count != params.extract.shards:
        raise ConfigError(f"--shard {shard}: extract.shards is {params.extract.shards}; "
                          f"use --shard I/{params.extract.shards}")
    path = layout(params).manifest
    if not path.is_file():
        raise ConfigError(f"data snapshot not found at {path}; run 'grappa snapshot' first")
    table = read_table(path).select(COLUMNS)
    rows = shard.rows(table.num_rows)
    return table.slice(rows.start, len(rows))


def run(params: Params, shard: Shard) -> dict:
    t0 = time.perf_counter()
    snapshot = file_sha256(layout(params).manifest) if layout(params).manifest.is_file() else None
    rows = shard_rows(params, shard)  # (a snapshot landing from here on is told apart by merge-features)
    backbone, preprocess, fingerprint = create_backbone(params.backbone)
    start = params.backbone.adapt_from_block
    prefix_shape = tuple(backbone.block_shapes[start - 1]) if start > 0 else None
    model = build_model(params, backbone, ks=[])  # the frozen backbone alone: prefix and zero-shot features
    cache = FeatureCache(Path(params.extract.cache_dir) / f"{fingerprint}-b{start}-d{DECODE_VERSION}", prefix_shape)
    hashes = rows.column("content_hash").to_pylist()
    with cache.shared():
        cache.index()
        missing = ~cache.contains(hashes)
        uris = rows.column("uri").to_pylist()
        todo = sorted({hashes[i]: uris[i] for i in np.flatnonzero(missing)}.items())
        t_load = time.perf_counter()
        computed, broken, runtime = _compute(model, todo, params, preprocess, cache)
        t_forward = time.perf_counter()
        usable = np.array([h not in broken for h in hashes], dtype=bool)
        if not usable.any():
            raise ConfigError(f"data.sources: none of the images could be decoded (shard {shard}; see the skipped list)")
        row_bytes = 4 * backbone.embed_dim + (2 * int(np.prod(prefix_shape)) if prefix_shape else 0)
        _write_part(layout(params).part(shard), rows.filter(pa.array(usable)), cache, prefix_shape,
                    chunk_rows(row_bytes, params.memory_budget_mb))
    compaction = None
    rows_per_shard = chunk_rows(row_bytes, params.memory_budget_mb)
    if cache.needs_compaction(rows_per_shard):
        compaction = cache.compact(rows_per_shard)
    t_end = time.perf_counter()
    image_ids = rows.column("image_id").to_pylist()
    kept = rows.filter(pa.array(usable))
    report = {
        "shard": str(shard),
        # which snapshot this part was cut from: merge-features joins only parts of the current one
        "snapshot_sha256": snapshot,
        "backbone_fingerprint": fingerprint,
        "cache_dir": str(cache.root),
        "images": kept.num_rows,
        "by_split": counts(kept.column("split").to_pylist()),
        "by_domain": counts(kept.column("domain").to_pylist()),
        "computed": len(computed),
        "from_cache": pc.count_distinct(kept.column("content_hash")).as_py() - len(computed),
        "skipped": [{"image_id": image_ids[i], "reason": broken[hashes[i]]} for i in np.flatnonzero(~usable)],
        "cache_compaction": compaction,
        "timings_s": {"cache_index": t_load - t0, "forward": t_forward - t_load, "write": t_end - t_forward,
                      "total": t_end - t0},
        "images_per_s": len(computed) / max(t_forward - t_load, 1e-9),
        "runtime": runtime,  # where the forward ran (extract.runtime); None when every image was cached
    }
    return report


def _compute(model: GrappaModel, todo: list[tuple[str, str]], params: Params, preprocess,
             cache: FeatureCache) -> tuple[list[str], dict[str, str], dict | None]:
    """Features (and prefix activations) of every image in ``todo``, appended to ``cache`` every
    FLUSH_EVERY images; returns the hashes computed, {hash: reason} of undecodable images and the
    runtime the forward ran on (None when ``todo`` is empty)."""
    computed, broken = [], {}
    pending: tuple[list, list, list] = ([], [], [])
    # a chunk's files are written (and fsynced) by a thread while the next chunk's forwards run: the
    # forward had stopped for 0.2 s every 1,024 images. One append at a time, in order: each is waited
    # for before the next is handed over, so an append's error stops the loop with nothing after it written
    appends, writing = ThreadPoolExecutor(1, thread_name_prefix="cache-append"), []

    def flush() -> None:
        while writing:
            future, hashes = writing.pop()
            future.result()
            computed.extend(hashes)
        if pending[0]:
            hashes = list(pending[0])
            writing.append((appends.submit(cache.append, hashes, np.concatenate(pending[1]),
                                           np.concatenate(pending[2]) if pending[2] else None), hashes))
            for buffer in pending:
                buffer.clear()

    if not todo:
        return computed, broken, None
    # the features are stored under the hash of the bytes decoded: a file rewritten since the snapshot is skipped
    crop = CentreCrop(preprocess)  # 8-bit crops: the forward normalises them
    dataset = ImageDataset([uri for _, uri in todo], crop.pixels, params.data.min_side, params.data.max_pixels,
                           hashes=[digest for digest, _ in todo], max_bytes=params.data.max_file_bytes)
    forward, runtime = frozen_forward(model, crop, params.extract.runtime, pick_device(), len(todo))
    # With OpenVINO the images are decoded by one thread beside its streams (a loader's worker
    # processes preempted its threads: 2 cores, Lite0, 2,000 images, 119 and 111 img/s with 2 workers
    # against 125 and 119 in-process, when it ran one 2-thread stream); the thread decodes the next
    # batches while a forward runs
    runtime["loader_workers"] = 0 if runtime["name"] == "openvino" else params.extract.num_workers
    batches = loader(dataset, params.extract.batch_size, num_workers=runtime["loader_workers"])
    total = len(batches)
    if runtime["name"] == "openvino":
        batches, runtime["decode"] = prefetched(batches), "prefetch thread"

    def usable(batches):
        for rows, x, bad in batches:
            for i, reason in bad:
                broken[todo[i][0]] = reason
            if x is not None:
                yield rows, x

    try:
        for rows, acts, emb in forward(usable(tqdm(batches, desc="extract", unit="batch", total=total))):
            pending[0].extend(todo[i][0] for i in rows.tolist())
            pending[1].append(emb.numpy())
            if acts is not None:
                pending[2].append(acts.to(torch.float16).contiguous().numpy())  # the cache holds NCHW float16
            if len(pending[0]) >= FLUSH_EVERY:
                flush()
        flush()
        flush()  # waits for the last append
    finally:
        appends.shutdown(wait=True)  # an append under way completes: a kill loses only what was never handed over
    return computed, broken, runtime


def _write_part(folder: Path, rows: pa.Table, cache: FeatureCache, prefix_shape, step: int) -> None:
    """The part's features.parquet and prefix.npy, chunk by chunk from the cache; the folder is
    replaced in one rename, so a kill leaves the previous part (or none), never half of one."""
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        writer = None
        prefix = RowFileWriter(tmp / Path(PART_PREFIX).name, rows.num_rows, prefix_shape, np.float16) \
            if prefix_shape else None
        for begin in range(0, rows.num_rows, step):
            chunk = rows.slice(begin, step)
            vectors, prefixes = cache.gather(chunk.column("content_hash").to_pylist())
            table = pa.table({**{c: chunk.column(c) for c in COLUMNS[:4]},
                              "label": chunk.column("label").cast(pa.string()),
                              "content_hash": chunk.column("content_hash"), "vector": vectors_to_arrow(vectors)})
            if writer is None:
                writer = pq.ParquetWriter(tmp / Path(PART_FEATURES).name, table.schema)
            writer.write_table(table)
            if prefix is not None:
                prefix.write(prefixes)
        writer.close()
        if prefix is not None:
            prefix.close()
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
