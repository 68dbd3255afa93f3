"""The evaluation protocol: class-disjoint validation/test split per domain, the k chosen on
validation, and the oracle that uses the test labels kept apart."""
from __future__ import annotations

import numpy as np
import pytest

from grappa.core.evaluation import (ORACLE, ORACLE_TEST, TEST, VALIDATION, best_k, class_split, method_order,
                                    oracle, routing_metrics, score_splits, split_mask)


def _pool(classes: dict[str, int], per_class=3) -> tuple[np.ndarray, np.ndarray]:
    """Images of ``classes[domain]`` classes per domain; ``per_class``: a count, or one per class index."""
    domains, labels = [], []
    for domain, n in classes.items():
        for c in range(n):
            size = per_class(c) if callable(per_class) else per_class
            domains += [domain] * size
            labels += [f"{domain}-{c}"] * size
    return np.array(domains), np.array(labels)


def test_split_is_class_disjoint_seed_fixed_and_a_share_of_each_domain():
    domains, labels = _pool({"birds": 100, "food": 10, "pair": 2})
    val = class_split(domains, labels, 1 / 3, seed=0)
    assert {d: len(c) for d, c in val.items()} == {"birds": 33, "food": 3, "pair": 1}
    assert val == class_split(domains, labels, 1 / 3, seed=0) and val != class_split(domains, labels, 1 / 3, seed=1)
    v, t = split_mask(domains, labels, val, VALIDATION), split_mask(domains, labels, val, TEST)
    assert (v ^ t).all(), "every image is in exactly one set"
    assert not set(labels[v]) & set(labels[t]), "no class is in both"
    assert set(domains[t]) == {"birds", "food", "pair"}, "every domain keeps test classes"


def test_a_domains_split_does_not_move_when_another_domain_is_added():
    domains, labels = _pool({"birds": 30, "food": 10})
    more_domains, more_labels = _pool({"birds": 30, "food": 10, "cars": 20})
    assert class_split(domains, labels, 1 / 3, 0)["birds"] == class_split(more_domains, more_labels, 1 / 3, 0)["birds"]


def _scores(best: dict[str, int]) -> dict:
    """single_k_<K> scores where ``best[domain]`` is the best k of each domain."""
    return {f"single_k_{k}": {"per_domain": {d: {"map_at_r": 0.5 + 0.1 * (k == b), "recall_at_1": 0.5}
                                             for d, b in best.items()}} for k in (8, 64)}


def test_oracle_takes_the_k_chosen_on_validation_and_scores_it_on_test():
    validation, test = _scores({"birds": 8, "food": 64}), _scores({"birds": 64, "food": 64})
    choice = best_k(validation, [8, 64])
    assert choice == {"birds": 8, "food": 64}
    fair, upper = oracle(test, choice), oracle(test, best_k(test, [8, 64]))
    assert fair["per_domain"]["birds"]["map_at_r"] == 0.5 and upper["per_domain"]["birds"]["map_at_r"] == 0.6
    assert fair["mean"]["map_at_r"] < upper["mean"]["map_at_r"]
    names = ["grappa", ORACLE_TEST, "single_k_64", ORACLE, "zero_shot", "uniform", "single_k_8"]
    assert method_order(names) == ["zero_shot", "single_k_8", "single_k_64", "uniform", ORACLE, ORACLE_TEST, "grappa"]


def test_halves_give_food_five_and_five_cover_every_class_and_stratify_by_size():
    domains, labels = _pool({"food": 10, "flowers": 40}, per_class=lambda c: 5 + 3 * c)  # sizes 5..122
    val = class_split(domains, labels, 0.5, seed=3)
    assert len(val["food"]) == 5 and len(val["flowers"]) == 20
    for domain in ("food", "flowers"):
        rows = domains == domain
        v = split_mask(domains, labels, val, VALIDATION) & rows
        t = split_mask(domains, labels, val, TEST) & rows
        assert set(labels[v]) | set(labels[t]) == set(labels[rows]), "every class is in a set"
        assert not set(labels[v]) & set(labels[t])
        # one class of each pair of neighbouring sizes in each set: the sets' mean class sizes differ
        # by less than one size step (3 images), where an unstratified draw can differ by far more
        size_v, size_t = v.sum() / len(set(labels[v])), t.sum() / len(set(labels[t]))
        assert abs(size_v - size_t) <= 3


def _embeddings(domains: np.ndarray, labels: np.ndarray, ks: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Noisy class-centred vectors for zero_shot and each single k (different noise per mode)."""
    rng = np.random.default_rng(seed)
    classes = {c: rng.normal(size=16) for c in sorted(set(labels))}
    centres = np.stack([classes[c] for c in labels])
    modes = ["zero_shot", *(f"single_k_{k}" for k in ks)]
    return {m: centres + rng.normal(scale=1.0 + 0.3 * i, size=centres.shape) for i, m in enumerate(modes)}


def test_oracle_val_and_the_validation_scores_never_read_the_test_labels():
    domains, labels = _pool({"birds": 12, "food": 10}, per_class=4)
    ks = [8, 64, 256]
    embeddings = _embeddings(domains, labels, ks)
    val = class_split(domains, labels, 0.5, seed=0)
    before = score_splits(embeddings, domains, labels, val, ks)
    test_rows = split_mask(domains, labels, val, TEST)
    shuffled = labels.copy()
    for domain in ("birds", "food"):  # test labels shuffled within each domain: same classes, wrong images
        rows = np.flatnonzero(test_rows & (domains == domain))
        shuffled[rows] = np.random.default_rng(1).permutation(labels[rows])
    after = score_splits(embeddings, domains, shuffled, val, ks)
    assert after["oracle_choice"] == before["oracle_choice"]
    assert after[VALIDATION] == before[VALIDATION]
    assert after[TEST]["zero_shot"] != before[TEST]["zero_shot"], "the shuffle did change the test scores"
    assert list(before[TEST]) == ["zero_shot", "single_k_8", "single_k_64", "single_k_256", ORACLE, ORACLE_TEST]
    assert ORACLE_TEST not in before[VALIDATION]


def test_routing_metrics_tell_routing_from_mixing():
    domains = np.array(["a"] * 50 + ["b"] * 50)
    routed = np.zeros((100, 1, 2))
    routed[:50, 0, 0] = routed[50:, 0, 1] = 1.0  # each domain picks its own set
    mixed = np.full((100, 1, 2), 0.5)  # every image mixes evenly
    r, m = routing_metrics(routed, domains, [7])["block7"], routing_metrics(mixed, domains, [7])["block7"]
    # the batch-mean entropy is log 2 for both: it cannot tell them apart
    assert r["batch_mean_attn_entropy"] == pytest.approx(np.log(2)) == m["batch_mean_attn_entropy"]
    assert r["per_image_attn_entropy"] == pytest.approx(0, abs=1e-9) and m["per_image_attn_entropy"] == pytest.approx(np.log(2))
    assert r["mutual_information"] == pytest.approx(np.log(2)) and m["mutual_information"] == pytest.approx(0, abs=1e-9)
    assert r["domain_js_mean"] == pytest.approx(np.log(2)) and m["domain_js_mean"] == pytest.approx(0, abs=1e-9)
