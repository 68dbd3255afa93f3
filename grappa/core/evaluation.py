"""Per-domain retrieval quality of the model variants, the oracle reference and the results tables.

Each domain's labelled classes are split, class-disjoint and seed-fixed, into a validation share (where
anything is chosen) and the test rest (where figures are reported); retrieval is all-vs-all within
each set. A method is a model mode (``zero_shot``, ``single_k_<K>``, ``uniform``, ``grappa``:
grappa.core.model), ``oracle`` (per domain the single k that is best on validation, a fair baseline)
or ``oracle_test`` (per domain the k best on test itself: it uses the test labels, an upper
reference and not a model). Pure: vectors and labels in, dicts and markdown out.
"""
from __future__ import annotations

import zlib

import numpy as np

from grappa.core.metrics import retrieval_metrics
from grappa.core.model import FUSION, UNIFORM, ZERO_SHOT, single, single_k

METRICS = ("map_at_r", "recall_at_1")
ORACLE = "oracle"
ORACLE_TEST = "oracle_test"
VALIDATION, TEST = "val", "test"


def method_order(names) -> list[str]:
    """zero_shot, single_k_<K> by K, uniform, oracle, grappa (the order of the results table)."""
    rank = {ZERO_SHOT: (0, 0), UNIFORM: (2, 0), ORACLE: (3, 0), ORACLE_TEST: (3, 1), FUSION: (4, 0)}
    return sorted(names, key=lambda n: rank.get(n, (1, single_k(n) or 0)))


def _mean(per_domain: dict) -> dict:
    return {m: float(np.mean([d[m] for d in per_domain.values()])) for m in METRICS}


def class_split(domains: np.ndarray, labels: np.ndarray, share: float, seed: int) -> dict[str, list[str]]:
    """Per domain, the validation classes: ``share`` of its classes (rounded, at least one, and at
    least one left for test), drawn with ``seed`` and the domain's name, so a domain's split does not
    move when other domains are added. A domain with a single class has no validation classes."""
    val = {}
    for domain in sorted(set(domains)):
        classes = np.unique(labels[domains == domain])
        n = 0 if len(classes) < 2 else min(max(round(share * len(classes)), 1), len(classes) - 1)
        rng = np.random.default_rng([seed, zlib.crc32(str(domain).encode())])
        val[str(domain)] = sorted(str(c) for c in rng.choice(classes, n, replace=False))
    return val


def split_mask(domains: np.ndarray, labels: np.ndarray, val_classes: dict[str, list[str]], split: str) -> np.ndarray:
    """Rows of ``split`` (``VALIDATION`` or ``TEST``) under ``val_classes``."""
    in_val = np.array([str(c) in set(val_classes.get(str(d), ())) for d, c in zip(domains, labels)], bool)
    return in_val if split == VALIDATION else ~in_val


def per_domain_metrics(vectors: np.ndarray, domains: np.ndarray, labels: np.ndarray) -> dict:
    """{"per_domain": {domain: {metric: value}}, "mean": {metric: mean over domains}}."""
    per_domain = {}
    for domain in sorted(set(domains)):
        mask = domains == domain
        per_domain[domain] = retrieval_metrics(vectors[mask], labels[mask])
    return {"per_domain": per_domain, "mean": _mean(per_domain)}


def best_k(methods: dict, ks: list[int]) -> dict[str, int]:
    """Per domain, the k whose single-k model has the best mAP@R in ``methods``."""
    domains = methods[single(ks[0])]["per_domain"].keys()
    return {d: max(ks, key=lambda k: methods[single(k)]["per_domain"][d]["map_at_r"]) for d in domains}


def oracle(methods: dict, choice: dict[str, int]) -> dict:
    """The per-domain single-k models of ``choice`` (from best_k), scored by ``methods``."""
    per_domain = {d: methods[single(k)]["per_domain"][d] for d, k in choice.items()}
    return {"per_domain": per_domain, "mean": _mean(per_domain)}


def markdown_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """``title``, a blank line and a markdown table (every column left-aligned ``---``), newline-ended."""
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_table(methods: dict, title: str = "mAP@R / R@1 (%), all-vs-all leave-one-out on each domain's "
                                                 "query_db split") -> str:
    """mAP@R / R@1 (%) of every method per domain, and the mean in bold."""
    domains = list(next(iter(methods.values()))["per_domain"])

    def cell(res: dict, bold: bool = False) -> str:
        value = f"{100 * res['map_at_r']:.1f}"
        return f"{f'**{value}**' if bold else value} / {100 * res['recall_at_1']:.1f}"

    rows = [[name, *(cell(res["per_domain"][d]) for d in domains), cell(res["mean"], bold=True)]
            for name, res in methods.items()]
    return markdown_table(title, ["method", *domains, "mean"], rows)
