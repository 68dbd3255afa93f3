"""Step 2: spherical k-means is deterministic, centroids are unit vectors, the report matches the labels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import make_collection, snapshot_and_extract, tiny_params_dict
from grappa.cli import run_step
from grappa.config import ConfigError, parse_params
from grappa.core import kmeans
from grappa.io.artifacts import read_table, vectors_to_arrow, write_table
from pipeline_steps import cluster


def blobs(n_per: int = 30, k: int = 4, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    x = np.concatenate([c + 0.05 * rng.standard_normal((n_per, dim)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


def test_spherical_kmeans_deterministic_normalised_and_recovers_blobs():
    x, truth = blobs()
    labels, centroids = kmeans.spherical_kmeans(x, 4, niter=20, nredo=2, seed=7)
    labels2, centroids2 = kmeans.spherical_kmeans(x, 4, niter=20, nredo=2, seed=7)
    assert np.array_equal(labels, labels2)
    assert np.array_equal(centroids, centroids2)
    assert labels.dtype == np.int64 and labels.shape == (len(x),)
    assert centroids.shape == (4, x.shape[1])
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    # well separated blobs: the partition is the truth up to a permutation of cluster ids
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 4 and len({t for t, _ in pairs}) == 4 and len({c for _, c in pairs}) == 4
    # every point is assigned to its most similar centroid (cosine)
    assert np.array_equal(labels, np.argmax(x @ centroids.T, axis=1))


def test_kmeans_trains_on_a_bounded_sample_and_assigns_every_point():
    x, truth = blobs(n_per=200)  # 800 points, k=4: at most 4 x 20 = 80 train the centroids
    labels, centroids = kmeans.spherical_kmeans(x, 4, niter=20, nredo=2, seed=7, max_points_per_centroid=20)
    full_labels, full_centroids = kmeans.spherical_kmeans(x, 4, niter=20, nredo=2, seed=7)
    assert labels.shape == (800,) and np.array_equal(labels, np.argmax(x @ centroids.T, axis=1))
    pairs = set(zip(truth.tolist(), labels.tolist()))  # still the truth up to a permutation
    assert len(pairs) == 4 and len({c for _, c in pairs}) == 4
    assert not np.array_equal(centroids, full_centroids), "the sample must be what trained the centroids"
    # below the bound (800 < 4 x 256) the default trains on every point: the same as no bound at all
    unbounded, _ = kmeans.spherical_kmeans(x, 4, niter=20, nredo=2, seed=7, max_points_per_centroid=1 << 30)
    assert np.array_equal(full_labels, unbounded)


def test_size_stats_by_hand():
    labels = np.array([0, 0, 0, 1, 3, 3])  # sizes 3, 1, 0, 2 for k=4
    assert kmeans.size_stats(labels, 4) == {
        "k": 4, "images": 6, "mean_size": 1.5, "min_size": 0, "median_size": 1.5, "max_size": 3,
        "empty": 1, "singletons": 1,
    }


def _fake_extract(out_dir: Path, vectors: np.ndarray, n_query: int = 3) -> list[str]:
    """features.parquet as extract writes it: unlabeled rows to cluster plus query_db rows to ignore."""
    n = len(vectors)
    ids = [f"d/u{i}" for i in range(n)] + [f"d/q{i}" for i in range(n_query)]
    rng = np.random.default_rng(1)
    query = rng.standard_normal((n_query, vectors.shape[1])).astype(np.float32)
    write_table(out_dir / "extract" / "features.parquet", pa.table({
        "image_id": ids,
        "uri": ids,
        "domain": ["d"] * len(ids),
        "split": ["unlabeled"] * n + ["query_db"] * n_query,
        "label": pa.array([None] * n + ["0"] * n_query, type=pa.string()),
        "content_hash": ids,
        "vector": vectors_to_arrow(np.concatenate([vectors, query])),
    }))
    return ids[:n]


def test_cluster_run_outputs_and_report(tmp_path):
    x, _ = blobs(n_per=10, k=3)
    raw = tiny_params_dict(tmp_path, [tmp_path / "unused"], cluster={"ks": [2, 3, 5], "niter": 10, "nredo": 1})
    params = parse_params(raw)
    ids = _fake_extract(Path(params.out_dir), x)
    report = run_step("cluster", params)
    out = Path(params.out_dir) / "cluster"
    assert json.loads((out / "report.json").read_text())["per_k"] == report["per_k"]
    for k in (2, 3, 5):
        table = read_table(out / f"k{k}.parquet")
        assert table.column("image_id").to_pylist() == ids  # unlabeled only, in extract order
        labels = np.array(table.column("pseudo_label").to_pylist())
        assert labels.min() >= 0 and labels.max() < k
        sizes = np.bincount(labels, minlength=k)
        stats = report["per_k"][str(k)]
        assert stats["images"] == len(ids) == sizes.sum()
        assert (stats["min_size"], stats["max_size"], stats["empty"]) == (sizes.min(), sizes.max(), (sizes == 0).sum())
        assert stats["mean_size"] == pytest.approx(len(ids) / k)
        centroids = np.load(out / f"centroids_k{k}.npy")
        assert centroids.shape == (k, x.shape[1]) and centroids.dtype == np.float32
        assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert list(out.glob("*.tmp")) == []

    labels_k3 = read_table(out / "k3.parquet").column("pseudo_label").to_pylist()
    cluster.run(params)  # same params, same labels
    assert read_table(out / "k3.parquet").column("pseudo_label").to_pylist() == labels_k3


def test_cluster_k_larger_than_pool(tmp_path):
    x, _ = blobs(n_per=2, k=3)  # 6 unlabeled images
    params = parse_params(tiny_params_dict(tmp_path, [tmp_path / "unused"], cluster={"ks": [2, 7]}))
    _fake_extract(Path(params.out_dir), x)
    with pytest.raises(ConfigError, match=r"cluster.ks: k=7 .*\(6\)"):
        cluster.run(params)
    assert not (Path(params.out_dir) / "cluster" / "k2.parquet").exists()


def test_extract_then_cluster_is_deterministic(tmp_path):
    """Two independent extract+cluster runs (separate caches) give identical features and pseudo-labels."""
    manifests = make_collection(tmp_path / "data", classes=3, per_class=2, unlabeled=10, size=40)
    runs = []
    for name in ("a", "b"):
        raw = tiny_params_dict(tmp_path / name, manifests, cluster={"ks": [2, 5], "niter": 10, "nredo": 2})
        params = parse_params(raw)
        snapshot_and_extract(params)
        cluster.run(params)
        out = Path(params.out_dir)
        runs.append({
            "features": read_table(out / "extract" / "features.parquet").column("vector").to_pylist(),
            **{k: read_table(out / "cluster" / f"k{k}.parquet").to_pylist() for k in (2, 5)},
            **{f"c{k}": np.load(out / "cluster" / f"centroids_k{k}.npy") for k in (2, 5)},
        })
    a, b = runs
    assert a["features"] == b["features"]
    assert a[2] == b[2] and a[5] == b[5]
    assert len({row["pseudo_label"] for row in a[5]}) > 1
    assert np.array_equal(a["c2"], b["c2"]) and np.array_equal(a["c5"], b["c5"])


def test_cluster_streams_the_vectors_and_bounds_its_sample_by_the_memory_budget(tmp_path, monkeypatch):
    """Chunks of 7 vectors (as a million-image store is read): the labels of the in-memory k-means.
    A budget that fits fewer vectors than k x max_points_per_centroid shrinks the sample, reported."""
    from grappa.io import features

    x, _ = blobs(n_per=100, k=4)
    params = parse_params(tiny_params_dict(tmp_path, [tmp_path / "unused"], cluster={"ks": [2, 4], "niter": 10, "nredo": 1}))
    _fake_extract(Path(params.out_dir), x)
    monkeypatch.setattr(features, "chunk_rows", lambda row_bytes, budget_mb, share=0.25: 7)
    report = cluster.run(params)
    for k in (2, 4):
        in_memory, _ = kmeans.spherical_kmeans(x, k, 10, 1, seed=params.seed * 100_003 + k)
        streamed = read_table(Path(params.out_dir) / "cluster" / f"k{k}.parquet").column("pseudo_label").to_numpy()
        assert np.array_equal(streamed, in_memory)
        assert report["sample"][str(k)] == 400  # the whole pool: 400 < k x 256

    # as if each vector took 1 MB: half of a 64 MB budget holds 32 of them
    monkeypatch.setattr(cluster, "vector_dim", lambda out: 1 << 18)
    small = params.model_copy(update={"memory_budget_mb": 64})
    assert cluster.run(small)["sample"] == {"2": 32, "4": 32}
