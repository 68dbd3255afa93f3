"""mAP@R and R@1 against hand-computed values; self-exclusion by index; singleton classes left out."""
from __future__ import annotations

import numpy as np
import pytest

from grappa.core.metrics import knn_graph, knn_recall, knn_search, leave_one_out_neighbours, retrieval_metrics


def on_circle(degrees: list[float]) -> np.ndarray:
    """Unit vectors at the given angles: cosine similarity orders neighbours by angular distance."""
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def test_map_at_r_and_recall_at_1_hand_computed():
    # idx:     0    1    2    3    4    5    6
    # angle:   0    8   20   30   45  100  200
    # label:   A    A    B    A    B    A    C
    # A = {0,1,3,5}: R = 3 each; B = {2,4}: R = 1 each; C = {6} is a singleton -> not a query.
    # AP@R = (1/R) * sum_{i<=R} P(i) * rel(i) over the R nearest other images:
    # q0 (0):   1(8) 2(20) 3(30)       -> hit miss hit  -> (1/1 + 2/3) / 3 = 5/9 ; R@1 hit
    # q1 (8):   0(8) 2(12) 3(22)       -> hit miss hit  -> (1/1 + 2/3) / 3 = 5/9 ; R@1 hit
    # q3 (30):  2(10) 4(15) 1(22)      -> miss miss hit -> (1/3) / 3     = 1/9 ; R@1 miss
    # q5 (100): 4(55) 3(70) 2(80)      -> miss hit miss -> (1/2) / 3     = 1/6 ; R@1 miss
    # q2 (20):  3(10)                  -> miss          -> 0             ; R@1 miss
    # q4 (45):  3(15)                  -> miss          -> 0             ; R@1 miss
    # mAP@R = (5/9 + 5/9 + 1/9 + 1/6 + 0 + 0) / 6 = (25/18) / 6 = 25/108 ; R@1 = 2/6 = 1/3
    vectors = on_circle([0, 8, 20, 30, 45, 100, 200])
    labels = np.array(["A", "A", "B", "A", "B", "A", "C"])
    result = retrieval_metrics(vectors, labels)
    assert result["num_queries"] == 6
    assert result["map_at_r"] == pytest.approx(25 / 108, abs=1e-9)
    assert result["recall_at_1"] == pytest.approx(1 / 3, abs=1e-9)


def test_perfect_and_worst_retrieval():
    # two tight, far-apart classes: everything right
    vectors = on_circle([0, 1, 2, 180, 181, 182])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert retrieval_metrics(vectors, labels) == {"map_at_r": 1.0, "recall_at_1": 1.0, "num_queries": 6}
    # alternating labels on a fine arc: each query's nearest images are of the other class
    vectors = on_circle([0, 1, 180, 181])
    labels = np.array([0, 1, 0, 1])
    result = retrieval_metrics(vectors, labels)
    assert result["map_at_r"] == 0.0 and result["recall_at_1"] == 0.0


def test_self_is_excluded_by_index_even_with_duplicate_vectors():
    # v, v (exact duplicates) with different labels, u, u likewise. Each query's single relevant image
    # sits at the *other* pair, and its exact duplicate (label mismatch) is nearer: R@1 = mAP@R = 0.
    # Dropping "the first result" instead of the query's own index could drop the duplicate and
    # keep the query itself, which would count as a hit.
    v, u = on_circle([0, 90])
    vectors = np.stack([v, v, u, u])
    labels = np.array(["A", "B", "A", "B"])
    result = retrieval_metrics(vectors, labels)
    assert result == {"map_at_r": 0.0, "recall_at_1": 0.0, "num_queries": 4}

    many = np.repeat(on_circle([0, 50, 120]), 4, axis=0)  # 12 vectors, groups of 4 exact duplicates
    neighbours = leave_one_out_neighbours(many, 5)
    assert neighbours.shape == (12, 5)
    for i in range(12):
        assert i not in neighbours[i]
        assert len(set(neighbours[i].tolist())) == 5
        group = set(range(i // 4 * 4, i // 4 * 4 + 4)) - {i}
        assert set(neighbours[i, :3].tolist()) == group  # the 3 other duplicates come first


def test_singleton_classes_are_excluded():
    vectors = on_circle([0, 5, 90, 180, 270])
    labels = np.array([0, 0, 1, 2, 3])  # only class 0 has a pair
    result = retrieval_metrics(vectors, labels)
    assert result == {"map_at_r": 1.0, "recall_at_1": 1.0, "num_queries": 2}
    with pytest.raises(ValueError, match="single member"):
        retrieval_metrics(on_circle([0, 90]), np.array([0, 1]))


def test_leave_one_out_with_k_at_least_n():
    vectors = on_circle([0, 10, 30])
    neighbours = leave_one_out_neighbours(vectors, 10)
    assert neighbours.tolist() == [[1, 2], [0, 2], [1, 0]]


def test_knn_search_inner_product_order():
    vectors = on_circle([0, 10, 30, 100])
    scores, idx = knn_search(vectors, 2, queries=on_circle([28]))
    assert idx.tolist() == [[2, 1]]
    assert scores[0, 0] == pytest.approx(np.cos(np.deg2rad(2)), abs=1e-6)


def test_metrics_agree_with_pytorch_metric_learning():
    """mAP@R and R@1 equal pytorch-metric-learning's AccuracyCalculator (an independent implementation)."""
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 12, size=300)
    centres = rng.normal(size=(12, 32))
    vectors = centres[labels] + 1.5 * rng.normal(size=(300, 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    ours = retrieval_metrics(vectors, labels)
    calc = AccuracyCalculator(include=("mean_average_precision_at_r", "precision_at_1"), device=torch.device("cpu"),
                              knn_func=None)
    theirs = calc.get_accuracy(torch.from_numpy(vectors), torch.from_numpy(labels), ref_includes_query=True)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["recall_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)


def _clustered(n: int, dim: int = 32, centres: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(centres, dim))[rng.integers(centres, size=n)] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_knn_graph_is_exact_below_the_threshold_and_ivf_above_with_high_recall():
    x = _clustered(6000)
    exact, method = knn_graph(x, 10, exact_below=10_000, nprobe=16)
    assert method == "exact" and np.array_equal(exact, leave_one_out_neighbours(x, 10))
    assert knn_recall(x, exact, sample=500) == 1.0

    approx, method = knn_graph(x, 10, exact_below=1000, nprobe=16)
    assert method == "ivf153,nprobe16" and approx.shape == (6000, 10)  # 6000 / 39 lists: faiss' minimum sample
    assert not (approx == np.arange(6000)[:, None]).any()  # never its own neighbour
    recall = knn_recall(x, approx, sample=500)
    assert recall >= 0.9, recall
    one_probe, _ = knn_graph(x, 10, exact_below=1000, nprobe=1)
    assert knn_recall(x, one_probe, sample=500) < recall  # fewer probes, fewer true neighbours found



def test_streamed_ivf_graph_holds_codes_within_the_budget_and_measures_its_recall():
    """Vectors fed in chunks (as the fusion step reads them from the store): the same graph as in
    memory with full vectors; with fewer code bytes than a float vector, product-quantised codes;
    the streamed exact search equals the in-memory one."""
    from grappa.core.metrics import exact_neighbours, ivf_knn_graph

    x = _clustered(6000)

    def chunks():
        return [(np.arange(s, min(s + 1000, len(x))), x[s:s + 1000]) for s in range(0, len(x), 1000)]

    in_memory, _ = knn_graph(x, 10, exact_below=1000, nprobe=16)
    streamed, method = ivf_knn_graph(chunks, x, len(x), 10, nprobe=16)
    assert method == "ivf153,nprobe16" and np.array_equal(streamed, in_memory)

    coded, method = ivf_knn_graph(chunks, x, len(x), 10, nprobe=16, code_bytes=16)  # 16 of 128 bytes
    assert method == "ivf153,pq16,nprobe16"
    assert not (coded == np.arange(6000)[:, None]).any()
    rows = np.arange(0, 6000, 37)
    assert np.array_equal(exact_neighbours(x[rows], rows, chunks, 10), leave_one_out_neighbours(x, 10)[rows])
    streamed_recall = knn_recall(None, coded, 500, chunks=chunks, take=lambda r: x[r])
    assert streamed_recall == knn_recall(x, coded, 500)
    assert 0.5 < streamed_recall < knn_recall(x, streamed, 500)  # coarser codes cost recall, measured
