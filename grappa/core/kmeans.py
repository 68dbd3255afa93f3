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
    centroids = train_centroids(x, k, niter, nredo, seed, max_points_per_centroid)
    return assign(centroids, x), centroids


def sample_size(n: int, k: int, max_points_per_centroid: int) -> int:
    """How many of ``n`` points the centroids of ``k`` clusters train on."""
    return min(n, k * max_points_per_centroid)


def train_centroids(sample: np.ndarray, k: int, niter: int, nredo: int, seed: int,
                    max_points_per_centroid: int = 256) -> np.ndarray:
    """L2-normalised centroids (k, D) of spherical k-means on ``sample`` (faiss subsamples it to
    ``k * max_points_per_centroid`` points with ``seed`` when it is larger)."""
    x = np.ascontiguousarray(sample, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, spherical=True, seed=seed, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max_points_per_centroid)
    km.train(x)
    return km.centroids / np.linalg.norm(km.centroids, axis=1, keepdims=True)


def assign(centroids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The nearest centroid (inner product) of each row of ``x``: (N,) int64."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64)


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
