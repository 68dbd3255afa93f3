"""Class-level retrieval metrics (Musgrave et al., "A Metric Learning Reality Check", 2020).

All-vs-all, leave-one-out: every image queries all the others of its set.
- R@1: the fraction of queries whose nearest other image shares their label.
- mAP@R: for a query with R relevant images, AP over the top-R results only,
  (1/R) * sum_{i<=R} P(i) * rel(i).
Queries whose class has no other member are left out of both (they have nothing to retrieve).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

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
    """(N, k) leave-one-out neighbours of vectors in memory, and how they were found: exact below
    ``exact_below`` vectors, else :func:`ivf_knn_graph` over the array."""
    n = vectors.shape[0]
    if n < exact_below:
        return leave_one_out_neighbours(vectors, k), "exact"
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    return ivf_knn_graph(lambda: [(np.arange(n), x)], x, n, k, nprobe, seed)


Chunks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def ivf_knn_graph(chunks: Chunks, sample: np.ndarray, n: int, k: int, nprobe: int, seed: int = 0,
                  code_bytes: int | None = None) -> tuple[np.ndarray, str]:
    """(N, k) int32 leave-one-out neighbours through a faiss IVF index, the vectors streamed twice
    from ``chunks()`` ((row numbers, vectors) pairs: once to add, once to search), never all held.

    4 sqrt(N) inverted lists (at most N/39), their k-means trained on ``sample``; ``nprobe`` lists
    searched per query, so the cost grows like N^1.5 instead of N^2. The index keeps the full
    vectors (IVF-Flat) unless ``code_bytes`` per vector is less than that: then product-quantised
    codes of at most ``code_bytes`` bytes (IVF-PQ), so its memory follows the budget, not N x D.
    """
    dim = sample.shape[1]
    nlist = max(1, int(min(4 * np.sqrt(n), n / 39)))  # faiss wants >= 39 training points per list
    quantizer = faiss.IndexFlatIP(dim)
    if code_bytes is None or code_bytes >= 4 * dim:
        index, name = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT), f"ivf{nlist}"
    else:
        m = max(d for d in range(1, min(code_bytes, dim) + 1) if dim % d == 0)  # PQ needs dim % m == 0
        index, name = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT), f"ivf{nlist},pq{m}"
    index.cp.seed = seed  # the sample faiss trains the coarse k-means on (256 points per list at most)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for rows, x in chunks():
        index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), rows.astype(np.int64))
    index.nprobe = min(nprobe, nlist)
    out = np.empty((n, k), dtype=np.int32)
    for rows, x in chunks():
        _, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), k + 1)
        out[rows] = drop_self(idx, rows, k)
    return out, f"{name},nprobe{index.nprobe}"


def drop_self(idx: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` results of each row other than itself and faiss' -1 (too few found: the found
    ones repeated; none: itself, a no-op pair)."""
    valid = (idx != rows[:, None]) & (idx >= 0)
    order = np.argsort(~valid, axis=1, kind="stable")  # valid results first, in rank order
    picked = np.take_along_axis(idx, order, axis=1)[:, :k]
    for r in np.flatnonzero(valid.sum(axis=1) < k):
        found = idx[r][valid[r]]
        picked[r] = np.resize(found, k) if len(found) else rows[r]
    return picked


def exact_neighbours(queries: np.ndarray, query_rows: np.ndarray, chunks: Chunks, k: int,
                     block_floats: int = 1 << 23) -> np.ndarray:
    """(Q, k) exact leave-one-out neighbours of ``queries`` (rows ``query_rows``) among every
    streamed vector: a running top-k over blocks of at most ``block_floats`` similarities (32 MB),
    so its memory does not follow the chunk size."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_sim = np.full((len(q), k + 1), -np.inf, np.float32)
    best_idx = np.full((len(q), k + 1), -1, np.int64)
    step = max(1, block_floats // max(len(q), 1))
    for rows, x in chunks():
        for start in range(0, len(rows), step):
            block_rows = rows[start:start + step]
            sims = q @ np.ascontiguousarray(x[start:start + step], dtype=np.float32).T
            sims[query_rows[:, None] == block_rows[None, :]] = -np.inf  # never itself
            sim = np.concatenate([best_sim, sims], axis=1)
            idx = np.concatenate([best_idx, np.broadcast_to(block_rows, sims.shape)], axis=1)
            top = np.argpartition(-sim, min(k, sim.shape[1] - 1), axis=1)[:, : k + 1]
            best_sim, best_idx = np.take_along_axis(sim, top, axis=1), np.take_along_axis(idx, top, axis=1)
    order = np.argsort(-best_sim, axis=1, kind="stable")
    return np.take_along_axis(best_idx, order, axis=1)[:, :k]


def knn_recall(vectors: np.ndarray | None, graph: np.ndarray, sample: int, seed: int = 0,
               chunks: Chunks | None = None, take=None) -> float:
    """Recall of ``graph`` against the exact leave-one-out kNN, on ``sample`` random rows (of
    ``vectors`` in memory, or of streamed ``chunks`` with ``take(rows)`` giving the sampled vectors)."""
    n, k = graph.shape
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    if chunks is None:
        chunks, take = (lambda: [(np.arange(n), vectors)]), (lambda r: vectors[r])
    exact = exact_neighbours(take(rows), rows, chunks, k)
    found = [len(set(graph[r].tolist()) & set(exact[j].tolist())) for j, r in enumerate(rows)]
    return float(np.sum(found) / (len(rows) * k))


def per_query_retrieval(vectors: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query, all-vs-all leave-one-out: AP@R, whether its first neighbour is relevant, and whether
    it has any relevant image at all (R > 0; the others count in neither metric)."""
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
    return ap_at_r, hits[:, 0], valid


def retrieval_metrics(vectors: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return summarize_queries(*per_query_retrieval(vectors, labels))


def summarize_queries(ap_at_r: np.ndarray, first_hit: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """mAP@R and R@1 over the queries that have a relevant image (what per_query_retrieval returns)."""
    return {
        "map_at_r": float(ap_at_r[valid].mean()),
        "recall_at_1": float(first_hit[valid].mean()),
        "num_queries": int(valid.sum()),
    }
