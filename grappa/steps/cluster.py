"""Step 2 — ``grappa cluster``: spherical k-means at every pseudo-granularity k.

Clusters the frozen features of the unlabeled union (task identity is never used). Writes
``<out>/cluster/k<K>.parquet`` (image_id, pseudo_label), ``centroids_k<K>.npy`` (L2-normalised) and
``report.json`` with cluster-size statistics per k.
"""
from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from grappa.io.artifacts import save_npy, write_json, write_table
from grappa.config import ConfigError, Params
from grappa.io.datasets import load_features


def spherical_kmeans(x: np.ndarray, k: int, niter: int, nredo: int, seed: int,
                     max_points_per_centroid: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels (N,) and L2-normalised centroids (k, D) of L2-normalised features.

    The centroids are trained on at most ``k * max_points_per_centroid`` points (faiss draws the
    sample with ``seed``), so training time and memory stop growing with N; every point is assigned.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, spherical=True, seed=seed, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max_points_per_centroid)
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels[:, 0].astype(np.int64), km.centroids / np.linalg.norm(km.centroids, axis=1, keepdims=True)


def size_stats(labels: np.ndarray, k: int) -> dict:
    sizes = np.bincount(labels, minlength=k)
    return {
        "k": k,
        "images": int(len(labels)),
        "mean_size": float(sizes.mean()),
        "min_size": int(sizes.min()),
        "median_size": float(np.median(sizes)),
        "max_size": int(sizes.max()),
        "empty": int((sizes == 0).sum()),
        "singletons": int((sizes == 1).sum()),
    }


def run(params: Params) -> dict:
    ks = params.cluster.ks
    out = Path(params.out_dir) / "cluster"
    ids, _, vectors = load_features(Path(params.out_dir) / "extract", "unlabeled")
    too_big = [k for k in ks if k > len(ids)]
    if too_big:
        raise ConfigError(f"cluster.ks: k={too_big[0]} is larger than the number of unlabeled images ({len(ids)})")
    report = {"per_k": {}, "timings_s": {}}
    for k in ks:
        t0 = time.perf_counter()
        labels, centroids = spherical_kmeans(vectors, k, params.cluster.niter, params.cluster.nredo,
                                             seed=params.seed * 100_003 + k,
                                             max_points_per_centroid=params.cluster.max_points_per_centroid)
        save_npy(out / f"centroids_k{k}.npy", centroids.astype(np.float32))
        write_table(out / f"k{k}.parquet", pa.table({"image_id": ids, "pseudo_label": labels}))
        report["per_k"][str(k)] = size_stats(labels, k)
        report["timings_s"][str(k)] = time.perf_counter() - t0
        print(f"cluster k={k}: {report['per_k'][str(k)]}")
    write_json(out / "report.json", report)
    return report
