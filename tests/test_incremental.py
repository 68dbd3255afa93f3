"""The pieces of an incremental run (grappa/core/incremental.py): which mode and why, k-means
warm-started from the champion's centroids, label persistence, the replay sample."""
from __future__ import annotations

import numpy as np
import pytest

from grappa.config import ConfigError
from grappa.core import kmeans
from grappa.core.incremental import choose_mode, label_persistence, recipe_diff, refine_centroids, replay_sample
from test_cluster import blobs

RECIPE = {"cluster": {"ks": [8, 32], "niter": 25}, "adaptor": {"epochs": 20}, "backbone": {"name": "b"}}


def test_auto_is_incremental_only_with_a_champion_of_the_same_recipe_and_little_new_data():
    fine = choose_mode("auto", RECIPE, RECIPE, new_share=0.1, max_new_share=0.2, generation=1, max_generations=5)
    assert fine.mode == "incremental" and "10% of the pool is new" in fine.reason and "run 2 of at most 5" in fine.reason
    changed = {**RECIPE, "cluster": {"ks": [8, 64], "niter": 25}}
    for decision, why in (
            (choose_mode("auto", None, RECIPE, 0.1, 0.2, 0, 5), "no champion to start from"),
            (choose_mode("auto", RECIPE, changed, 0.1, 0.2, 0, 5), "the recipe changed since the champion: cluster.ks"),
            (choose_mode("auto", RECIPE, RECIPE, 0.3, 0.2, 0, 5), "30% of the pool is new, above adapt.max_new_share 20%"),
            (choose_mode("auto", RECIPE, RECIPE, 0.0, 0.2, 0, 5), "no image of the pool is new to the champion"),
            (choose_mode("auto", RECIPE, RECIPE, 0.1, 0.2, 0, 5, known=0), "the champion was trained on other data"),
            (choose_mode("auto", RECIPE, RECIPE, 0.1, 0.2, 5, 5), "5 incremental runs since the last full one"),
            (choose_mode("full", RECIPE, RECIPE, 0.1, 0.2, 0, 5), "adapt.mode is full")):
        assert decision.mode == "full" and decision.reason.startswith(why), decision
    with pytest.raises(ConfigError, match="adapt.mode incremental: the recipe changed since the champion: cluster.ks"):
        choose_mode("incremental", RECIPE, changed, 0.1, 0.2, 0, 5)
    with pytest.raises(ConfigError, match="adapt.mode must be one of"):
        choose_mode("warm", RECIPE, RECIPE, 0.1, 0.2, 0, 5)
    assert recipe_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 0}) == ["a.c", "d"]


def test_warm_started_kmeans_keeps_the_champions_centroid_ids():
    x, _ = blobs(n_per=40, k=4, dim=16, seed=0)
    _, champion = kmeans.spherical_kmeans(x, 4, niter=20, nredo=1, seed=0)
    before = kmeans.assign(champion, x)
    grown, _ = blobs(n_per=44, k=4, dim=16, seed=0)  # the same blobs with a few more images each
    refined = refine_centroids(champion, grown, niter=3)
    assert np.allclose(np.linalg.norm(refined, axis=1), 1.0, atol=1e-5)
    after = kmeans.assign(refined, x)
    assert label_persistence(before, after) == 1.0  # every old image keeps its cluster id
    order = [2, 0, 3, 1]  # the ids follow the initial centroids, whatever their order
    assert np.array_equal(kmeans.assign(refine_centroids(champion[order], grown, niter=3), x),
                          np.argsort(order)[after])
    assert label_persistence(np.array([0, 1, 2, 3]), np.array([0, 1, 0, 0])) == 0.5
    with pytest.raises(ValueError, match="align them"):
        label_persistence(np.zeros(3), np.zeros(4))


def test_the_replay_sample_is_bounded_and_seeded():
    a, b = replay_sample(10_000, 500, seed=3), replay_sample(10_000, 500, seed=3)
    assert np.array_equal(a, b) and len(a) == 500 and len(set(a.tolist())) == 500 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, replay_sample(10_000, 500, seed=4))
    assert np.array_equal(replay_sample(30, 500, seed=3), np.arange(30))  # never more than the pool
    assert len(replay_sample(30, 0, seed=3)) == 0


def test_a_subset_keeps_naming_its_items_by_their_row_in_the_pool():
    """An incremental run trains on some rows of the pool; per-row tables (pseudo-labels, the attention
    bank) must index its batches exactly as they index the whole pool's."""
    import torch

    from grappa.core.samplers import ClusterBatchSampler, Subset
    from grappa.io.datasets import PrefixDataset, collate_usable

    pool = PrefixDataset(np.arange(20, dtype=np.float16)[:, None, None, None] * np.ones((20, 1, 1, 1), np.float16))
    rows = np.array([2, 5, 6, 11, 17, 19])
    pseudo = np.arange(20) % 3
    subset = Subset(pool, rows)
    assert len(subset) == 6 and [row for row, _, _ in subset.__getitems__([0, 3, 5])] == [2, 11, 19]
    sampler = ClusterBatchSampler(pseudo[rows], 4, 2, torch.Generator().manual_seed(0))
    for batch in sampler:
        named, x, _ = collate_usable(subset.__getitems__(batch))
        assert torch.equal(x[:, 0, 0, 0], named.float())  # each item's data is its pool row's
        assert set(named.tolist()) <= set(rows.tolist())
        labels = pseudo[named.numpy()]
        assert all((labels == c).sum() in (0, 2) for c in range(3))  # the sampler's clusters, by pool row
