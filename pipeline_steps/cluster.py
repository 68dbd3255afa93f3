"""Step 3 — ``grappa cluster``: spherical k-means at every pseudo-granularity k.

Clusters the frozen features of the unlabeled union (task identity is never used). Writes
``<out>/cluster/k<K>.parquet`` (image_id, pseudo_label), ``centroids_k<K>.npy`` (L2-normalised) and
``report.json`` with cluster-size statistics per k.

The centroids train on a seeded sample of at most k x ``max_points_per_centroid`` images (and at
most half of ``memory_budget_mb``); then every image is assigned, reading the vectors chunk by chunk.

Incremental run (``<out>/champion/bundle/source.json``, written by ``grappa warm-start``): the
champion's centroids start ``adapt.cluster_niter`` Lloyd iterations on the same sample, each centroid
keeping its id; the share of old images that keep their pseudo-label is reported per k, and above
``adapt.max_label_change`` the clustering is redone from scratch and the run becomes a full one.
``cluster/mode.json`` says which mode the training steps run in.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from grappa.config import ConfigError, Params
from grappa.core.incremental import label_change_reason, label_persistence, refine_centroids
from grappa.core.kmeans import assign, sample_size, size_stats, train_centroids
from grappa.io import champion as champions
from grappa.io.artifacts import read_json, read_table, save_npy, write_json, write_table
from grappa.io.features import iter_vectors, read_columns, split_rows, take_vectors, vector_dim
from grappa.io.layout import CLUSTER_MODE, layout


def _cluster(params: Params, rows: np.ndarray, k: int, start: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(centroids, the pseudo-label of every row, sample size) at ``k``: k-means from scratch, or
    Lloyd iterations from the champion's centroids ``start``."""
    out, hp = layout(params), params.cluster
    fits = params.memory_budget_mb * (1 << 20) // 2 // (4 * vector_dim(out))
    seed = params.seed * 100_003 + k
    n_sample = min(sample_size(len(rows), k, hp.max_points_per_centroid), max(fits, k), len(rows))
    picked = np.arange(len(rows)) if n_sample == len(rows) else \
        np.sort(np.random.default_rng(seed).choice(len(rows), n_sample, replace=False))
    sample = take_vectors(out, rows[picked], params.memory_budget_mb)
    if start is None:
        centroids = train_centroids(sample, k, hp.niter, hp.nredo, seed=seed,
                                    max_points_per_centroid=hp.max_points_per_centroid)
    else:
        centroids = refine_centroids(start, sample, params.adapt.cluster_niter)
    labels = np.empty(len(rows), np.int64)
    for positions, chunk in iter_vectors(out, rows, params.memory_budget_mb):
        labels[positions] = assign(centroids, chunk)
    return centroids, labels, n_sample


def _persistence(champion_labels, ids, labels: np.ndarray) -> float:
    """The share of the pool's images the champion clustered that keep their pseudo-label."""
    where = champions.positions_in(champion_labels.column("image_id"), ids)
    old = where >= 0
    return label_persistence(champion_labels.column("pseudo_label").to_numpy()[where[old]], labels[old])


def run(params: Params) -> dict:
    ks = params.cluster.ks
    out = layout(params)
    rows = split_rows(out, "unlabeled")
    ids = read_columns(out, ["image_id"], rows).column("image_id")
    too_big = [k for k in ks if k > len(rows)]
    if too_big:
        raise ConfigError(f"cluster.ks: k={too_big[0]} is larger than the number of unlabeled images ({len(rows)})")
    decided = champions.bundle(params).root / "source.json"
    source = read_json(decided) if decided.is_file() else {"mode": "full"}  # warm-start never ran: from scratch
    mode = {"mode": source["mode"], "generation": source.get("generation", 0), "parent_version": source.get("version")}
    report = {"per_k": {}, "timings_s": {}, "sample": {}}
    start = time.perf_counter()
    found = {}
    if mode["mode"] == "incremental":
        bundle = champions.bundle(params)
        persistence = {}
        for k in ks:
            t0 = time.perf_counter()
            found[k] = _cluster(params, rows, k, np.load(bundle.centroids(k)))
            persistence[k] = _persistence(read_table(bundle.pseudo_labels(k)), ids, found[k][1])
            report["timings_s"][str(k)] = time.perf_counter() - t0
            print(f"cluster k={k} from champion v{mode['parent_version']}: {persistence[k]:.1%} of the old images "
                  f"keep their pseudo-label")
        mode["label_persistence"] = {str(k): v for k, v in persistence.items()}
        if why := label_change_reason(persistence, params.adapt.max_label_change):
            print(f"cluster: a full run after all: {why}")
            mode = {"mode": "full", "generation": 0, "parent_version": None, "reason": why}
            found = {}
    for k in ks:
        if k not in found:
            t0 = time.perf_counter()
            found[k] = _cluster(params, rows, k, None)
            report["timings_s"][str(k)] = time.perf_counter() - t0
        centroids, labels, n_sample = found[k]
        save_npy(out.centroids(k), centroids.astype(np.float32))
        write_table(out.pseudo_labels(k), pa.table({"image_id": ids, "pseudo_label": labels}))
        report["per_k"][str(k)] = size_stats(labels, k)
        report["sample"][str(k)] = n_sample
        print(f"cluster k={k}: {report['per_k'][str(k)]}")
    write_json(out.path(CLUSTER_MODE), mode)
    report["mode"] = mode
    report["timings_s"]["total"] = time.perf_counter() - start
    return report
