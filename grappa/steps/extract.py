"""Step 2 — ``grappa extract``: frozen-backbone features of every image in the snapshot, cached by content hash.

Writes ``<out>/extract/``:
- ``features.parquet``: image_id, uri, domain, split, label (None for unlabeled), content_hash, vector
- ``prefix.npy``: float16 activations at ``adapt_from_block`` (only when > 0), row-aligned
- ``report.json``: counts, new vs cached, undecodable images with reasons (records the snapshot could not
  use are listed in its own report), timings

The cache (``extract.cache_dir/<fingerprint>/``) is keyed by the sha256 of each file's bytes and by
the backbone fingerprint, so a rerun after new images arrive computes only the new ones.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from grappa.config import ConfigError, Params
from grappa.core.augment import image_transform
from grappa.core.backbones import create_backbone
from grappa.core.model import GrappaModel, pick_device
from grappa.io.artifacts import atomic_paths, read_table, vectors_to_arrow, write_json, write_table
from grappa.io.assemble import build_model
from grappa.io.datasets import ImageDataset, loader
from grappa.io.features import FeatureCache
from grappa.io.layout import EXTRACT_REPORT, Layout, layout
from grappa.io.sources import ImageRecord, Skipped, counts



def snapshot_records(params: Params) -> list[tuple[ImageRecord, str]]:
    """(record, content hash) of every image in the data snapshot."""
    path = layout(params).manifest
    if not path.is_file():
        raise ConfigError(f"data snapshot not found at {path}; run 'grappa snapshot' first")
    return [(ImageRecord(r["image_id"], r["uri"], r["domain"], r["split"], r["label"]), r["content_hash"])
            for r in read_table(path).to_pylist()]


def run(params: Params) -> dict:
    t0 = time.perf_counter()
    out = layout(params)
    hashed, skipped = snapshot_records(params), []
    backbone, preprocess, fingerprint = create_backbone(params.backbone)
    start = params.backbone.adapt_from_block
    model = build_model(params, backbone, ks=[])  # the frozen backbone alone: prefix and zero-shot features
    cache = FeatureCache(Path(params.extract.cache_dir) / f"{fingerprint}-b{start}")

    cached = cache.load()
    todo = sorted({h: rec.uri for rec, h in hashed if h not in cached}.items())
    t_load = time.perf_counter()

    new_hashes, new_vectors, new_prefixes, broken = _compute(model, todo, params, preprocess, start, cache)
    for h, v, p in zip(new_hashes, new_vectors, new_prefixes):
        cached[h] = (v, p)

    rows = []
    for rec, h in hashed:
        if h in broken:
            skipped.append(Skipped(rec.image_id, broken[h]))
        else:
            rows.append((rec, h))
    if not rows:
        raise ConfigError("data.sources: none of the images could be decoded (see the skipped list)")
    _write_outputs(out, rows, cached, backbone.block_shapes[start - 1] if start > 0 else None)
    t_end = time.perf_counter()

    report = {
        "backbone_fingerprint": fingerprint,
        "images": len(rows),
        "by_split": counts(rec.split for rec, _ in rows),
        "by_domain": counts(rec.domain for rec, _ in rows),
        "computed": len(new_hashes),
        "from_cache": len({h for _, h in rows} - set(new_hashes)),
        "skipped": [{"image_id": s.image_id, "reason": s.reason} for s in skipped],
        "timings_s": {"cache_load": t_load - t0, "forward": t_end - t_load, "total": t_end - t0},
        "images_per_s": len(new_hashes) / max(t_end - t_load, 1e-9),
    }
    write_json(out.path(EXTRACT_REPORT), report)
    return report


FLUSH_EVERY = 1024  # images: a killed extraction keeps all but the last few hundred computed features


def _compute(model: GrappaModel, todo: list[tuple[str, str]], params: Params, preprocess, start: int,
             cache: FeatureCache):
    """Features (and prefix activations) of every image in ``todo``, appended to ``cache`` as they come."""
    hashes, vectors, prefixes, broken = [], [], [], {}
    flushed = 0

    def flush() -> None:
        nonlocal flushed
        if len(hashes) > flushed:
            cache.append(hashes[flushed:], np.stack(vectors[flushed:]), prefixes[flushed:])
            flushed = len(hashes)

    if not todo:
        return hashes, np.zeros((0, 1), np.float32), prefixes, broken
    dataset = ImageDataset([uri for _, uri in todo], image_transform(preprocess, train=False),
                           params.data.min_side, params.data.max_pixels)
    batches = loader(dataset, params.extract.batch_size, num_workers=params.extract.num_workers)
    device = pick_device()
    model.to(device)
    with torch.inference_mode():
        for rows, x, bad in tqdm(batches, desc="extract", unit="batch"):
            for i, reason in bad:
                broken[todo[i][0]] = reason
            if x is None:
                continue
            acts = model.forward_prefix(x.to(device))
            emb = model.forward_suffix(acts, "zero_shot")[0].cpu()
            acts = acts.to("cpu", torch.float16).contiguous()  # the cache holds NCHW bytes
            for j, i in enumerate(rows.tolist()):
                hashes.append(todo[i][0])
                vectors.append(emb[j].numpy())
                prefixes.append(acts[j].numpy().tobytes() if start > 0 else None)
            if len(hashes) - flushed >= FLUSH_EVERY:
                flush()
    flush()
    return hashes, np.stack(vectors) if vectors else np.zeros((0, 1), np.float32), prefixes, broken


def _write_outputs(out: Layout, rows, cached, prefix_shape) -> None:
    recs = [r for r, _ in rows]
    hashes = [h for _, h in rows]
    table = pa.table({
        "image_id": [r.image_id for r in recs],
        "uri": [r.uri for r in recs],
        "domain": [r.domain for r in recs],
        "split": [r.split for r in recs],
        "label": pa.array([r.label for r in recs], type=pa.string()),
        "content_hash": hashes,
        "vector": vectors_to_arrow(np.stack([cached[h][0] for h in hashes])),
    })
    if prefix_shape is not None:
        prefix = np.stack([np.frombuffer(cached[h][1], dtype=np.float16).reshape(prefix_shape) for h in hashes])
        # Row-aligned pair: both renames happen only once both files are complete, so a kill never
        # leaves a new prefix.npy next to an old features.parquet (or the reverse).
        with atomic_paths(out.prefix, out.features) as (tmp_prefix, tmp_features):
            with open(tmp_prefix, "wb") as fh:
                np.save(fh, prefix)
            pq.write_table(table, tmp_features)
    else:
        out.prefix.unlink(missing_ok=True)  # a stale cache from another setup must not be trusted
        write_table(out.features, table)
