"""Spherical k-means (faiss) on L2-normalised features: the pseudo-granularities of step 3."""
from __future__ import annotations

import faiss
import numpy as np


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
