"""Step 3 — ``grappa cluster``: spherical k-means at every pseudo-granularity k.

Clusters the frozen features of the unlabeled union (task identity is never used). Writes
``<out>/cluster/k<K>.parquet`` (image_id, pseudo_label), ``centroids_k<K>.npy`` (L2-normalised) and
``report.json`` with cluster-size statistics per k.

The centroids train on a seeded sample of at most k x ``max_points_per_centroid`` images (and at
most half of ``memory_budget_mb``); then every image is assigned, reading the vectors chunk by chunk.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from grappa.config import ConfigError, Params
from grappa.core.kmeans import assign, sample_size, size_stats, train_centroids
from grappa.io.artifacts import save_npy, write_table
from grappa.io.features import iter_vectors, read_columns, split_rows, take_vectors, vector_dim
from grappa.io.layout import layout


def run(params: Params) -> dict:
    ks, hp = params.cluster.ks, params.cluster
    out = layout(params)
    rows = split_rows(out, "unlabeled")
    ids = read_columns(out, ["image_id"], rows).column("image_id")
    too_big = [k for k in ks if k > len(rows)]
    if too_big:
        raise ConfigError(f"cluster.ks: k={too_big[0]} is larger than the number of unlabeled images ({len(rows)})")
    fits = params.memory_budget_mb * (1 << 20) // 2 // (4 * vector_dim(out))
    report = {"per_k": {}, "timings_s": {}, "sample": {}}
    start = time.perf_counter()
    for k in ks:
        t0 = time.perf_counter()
        seed = params.seed * 100_003 + k
        n_sample = min(sample_size(len(rows), k, hp.max_points_per_centroid), max(fits, k), len(rows))
        picked = np.arange(len(rows)) if n_sample == len(rows) else \
            np.sort(np.random.default_rng(seed).choice(len(rows), n_sample, replace=False))
        centroids = train_centroids(take_vectors(out, rows[picked], params.memory_budget_mb), k, hp.niter,
                                    hp.nredo, seed=seed, max_points_per_centroid=hp.max_points_per_centroid)
        labels = np.empty(len(rows), np.int64)
        for positions, chunk in iter_vectors(out, rows, params.memory_budget_mb):
            labels[positions] = assign(centroids, chunk)
        save_npy(out.centroids(k), centroids.astype(np.float32))
        write_table(out.pseudo_labels(k), pa.table({"image_id": ids, "pseudo_label": labels}))
        report["per_k"][str(k)] = size_stats(labels, k)
        report["sample"][str(k)] = n_sample
        report["timings_s"][str(k)] = time.perf_counter() - t0
        print(f"cluster k={k}: {report['per_k'][str(k)]}")
    report["timings_s"]["total"] = time.perf_counter() - start
    return report
