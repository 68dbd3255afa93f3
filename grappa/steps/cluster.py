"""Step 3 — ``grappa cluster``: spherical k-means at every pseudo-granularity k.

Clusters the frozen features of the unlabeled union (task identity is never used). Writes
``<out>/cluster/k<K>.parquet`` (image_id, pseudo_label), ``centroids_k<K>.npy`` (L2-normalised) and
``report.json`` with cluster-size statistics per k.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from grappa.config import ConfigError, Params
from grappa.core.kmeans import size_stats, spherical_kmeans
from grappa.io.artifacts import save_npy, write_json, write_table
from grappa.io.features import load_features
from grappa.io.layout import CLUSTER_REPORT, layout



def run(params: Params) -> dict:
    ks = params.cluster.ks
    out = layout(params)
    ids, _, vectors = load_features(layout(params), "unlabeled")
    too_big = [k for k in ks if k > len(ids)]
    if too_big:
        raise ConfigError(f"cluster.ks: k={too_big[0]} is larger than the number of unlabeled images ({len(ids)})")
    report = {"per_k": {}, "timings_s": {}}
    for k in ks:
        t0 = time.perf_counter()
        labels, centroids = spherical_kmeans(vectors, k, params.cluster.niter, params.cluster.nredo,
                                             seed=params.seed * 100_003 + k,
                                             max_points_per_centroid=params.cluster.max_points_per_centroid)
        save_npy(out.centroids(k), centroids.astype(np.float32))
        write_table(out.pseudo_labels(k), pa.table({"image_id": ids, "pseudo_label": labels}))
        report["per_k"][str(k)] = size_stats(labels, k)
        report["timings_s"][str(k)] = time.perf_counter() - t0
        print(f"cluster k={k}: {report['per_k'][str(k)]}")
    write_json(out.path(CLUSTER_REPORT), report)
    return report
