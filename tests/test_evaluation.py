"""The evaluation protocol: class-disjoint validation/test split per domain, the k chosen on
validation, and the oracle that uses the test labels kept apart."""
from __future__ import annotations

import numpy as np

from grappa.core.evaluation import (ORACLE, ORACLE_TEST, TEST, VALIDATION, best_k, class_split, method_order,
                                    oracle, split_mask)


def _pool(classes: dict[str, int], per_class: int = 3) -> tuple[np.ndarray, np.ndarray]:
    domains, labels = [], []
    for domain, n in classes.items():
        for c in range(n):
            domains += [domain] * per_class
            labels += [f"{domain}-{c}"] * per_class
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
