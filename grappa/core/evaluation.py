"""Per-domain retrieval quality of the model variants, the oracle reference and the results tables.

A method is a model mode (``zero_shot``, ``single_k_<K>``, ``uniform``, ``grappa``: grappa.core.model)
or ``oracle``: per domain the best single k, chosen with the test labels, so an upper reference and
not a model. Pure: vectors and labels in, dicts and markdown out.
"""
from __future__ import annotations

import numpy as np

from grappa.core.metrics import retrieval_metrics
from grappa.core.model import FUSION, UNIFORM, ZERO_SHOT, single, single_k

METRICS = ("map_at_r", "recall_at_1")
ORACLE = "oracle"


def method_order(names) -> list[str]:
    """zero_shot, single_k_<K> by K, uniform, oracle, grappa (the order of the results table)."""
    rank = {ZERO_SHOT: (0, 0), UNIFORM: (2, 0), ORACLE: (3, 0), FUSION: (4, 0)}
    return sorted(names, key=lambda n: rank.get(n, (1, single_k(n) or 0)))


def _mean(per_domain: dict) -> dict:
    return {m: float(np.mean([d[m] for d in per_domain.values()])) for m in METRICS}


def per_domain_metrics(vectors: np.ndarray, domains: np.ndarray, labels: np.ndarray) -> dict:
    """{"per_domain": {domain: {metric: value}}, "mean": {metric: mean over domains}}."""
    per_domain = {}
    for domain in sorted(set(domains)):
        mask = domains == domain
        per_domain[domain] = retrieval_metrics(vectors[mask], labels[mask])
    return {"per_domain": per_domain, "mean": _mean(per_domain)}


def oracle(methods: dict, ks: list[int]) -> tuple[dict, dict[str, int]]:
    """Per domain, the single-k model with the best mAP@R (task-label-aware upper reference)."""
    domains = methods[single(ks[0])]["per_domain"].keys()
    per_domain, choice = {}, {}
    for domain in domains:
        best = max(ks, key=lambda k: methods[single(k)]["per_domain"][domain]["map_at_r"])
        per_domain[domain] = methods[single(best)]["per_domain"][domain]
        choice[domain] = best
    return {"per_domain": per_domain, "mean": _mean(per_domain)}, choice


def markdown_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """``title``, a blank line and a markdown table (every column left-aligned ``---``), newline-ended."""
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_table(methods: dict) -> str:
    """results.md: mAP@R / R@1 (%) of every method per domain, and the mean in bold."""
    domains = list(next(iter(methods.values()))["per_domain"])

    def cell(res: dict, bold: bool = False) -> str:
        value = f"{100 * res['map_at_r']:.1f}"
        return f"{f'**{value}**' if bold else value} / {100 * res['recall_at_1']:.1f}"

    rows = [[name, *(cell(res["per_domain"][d]) for d in domains), cell(res["mean"], bold=True)]
            for name, res in methods.items()]
    return markdown_table("mAP@R / R@1 (%), all-vs-all leave-one-out on each domain's query_db split",
                          ["method", *domains, "mean"], rows)
