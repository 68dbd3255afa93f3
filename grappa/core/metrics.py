"""Class-level retrieval metrics (Musgrave et al., "A Metric Learning Reality Check", 2020).

All-vs-all, leave-one-out: every image queries all the others of its set.
- R@1: the fraction of queries whose nearest other image shares their label.
- mAP@R: for a query with R relevant images, AP over the top-R results only,
  (1/R) * sum_{i<=R} P(i) * rel(i).
Queries whose class has no other member are left out of both (they have nothing to retrieve).
"""
from __future__ import annotations

import faiss
import numpy as np


def knn_search(vectors: np.ndarray, k: int, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product kNN with faiss (vectors are L2-normalised, so this is cosine)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    q = vectors if queries is None else np.ascontiguousarray(queries, dtype=np.float32)
    return index.search(q, min(k, vectors.shape[0]))


def leave_one_out_neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of each vector's k nearest *other* vectors (self removed by index, not rank)."""
    n = vectors.shape[0]
    _, idx = knn_search(vectors, min(k + 1, n))
    out = np.empty((n, min(k, n - 1)), dtype=np.int64)
    for i in range(n):
        row = idx[i][idx[i] != i]
        out[i] = row[: out.shape[1]]
    return out


def knn_graph(vectors: np.ndarray, k: int, exact_below: int, nprobe: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, k) leave-one-out neighbours and how they were found: exact below ``exact_below`` vectors,
    else through a faiss IVF index (4 sqrt(N) inverted lists, its k-means trained on a bounded sample,
    ``nprobe`` lists searched per query), whose search cost grows like N^1.5 instead of N^2."""
    n = vectors.shape[0]
    if n < exact_below:
        return leave_one_out_neighbours(vectors, k), "exact"
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    nlist = int(min(4 * np.sqrt(n), n / 39))  # faiss wants >= 39 training points per list
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed  # the sample faiss trains the coarse k-means on (256 points per list at most)
    index.train(x)
    index.add(x)
    index.nprobe = min(nprobe, nlist)
    _, idx = index.search(x, k + 1)
    out = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        row = idx[i][(idx[i] != i) & (idx[i] >= 0)]  # self removed; -1 where a probe found too few
        out[i] = np.resize(row, k) if len(row) else i  # (too few: repeat; none: itself, a no-op pair)
    return out, f"ivf{nlist},nprobe{index.nprobe}"


def knn_recall(vectors: np.ndarray, graph: np.ndarray, sample: int, seed: int = 0) -> float:
    """Recall of ``graph`` against the exact leave-one-out kNN, on ``sample`` random rows."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False)
    k = graph.shape[1]
    _, idx = knn_search(vectors, k + 1, queries=vectors[rows])
    found = [len(set(graph[r]) & set(idx[j][idx[j] != r][:k])) for j, r in enumerate(rows)]
    return float(np.sum(found) / (len(rows) * k))


def retrieval_metrics(vectors: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    relevant_counts = counts[inverse] - 1  # R per query
    valid = relevant_counts > 0
    if not valid.any():
        raise ValueError("no query has a relevant image: every class has a single member")
    max_r = int(relevant_counts.max())
    neighbours = leave_one_out_neighbours(vectors, max_r)
    hits = labels[neighbours] == labels[:, None]  # (N, max_r)
    ap_at_r = np.zeros(len(labels))
    for i in np.flatnonzero(valid):
        r = relevant_counts[i]
        h = hits[i, :r]
        precision = np.cumsum(h) / np.arange(1, r + 1)
        ap_at_r[i] = (precision * h).sum() / r
    return {
        "map_at_r": float(ap_at_r[valid].mean()),
        "recall_at_1": float(hits[valid, 0].mean()),
        "num_queries": int(valid.sum()),
    }
