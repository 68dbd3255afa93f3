"""Per-domain retrieval quality of the model variants, the oracle reference and the results tables.

Each domain's labelled classes are split, class-disjoint and seed-fixed, into a validation share (where
anything is chosen) and the test rest (where figures are reported); retrieval is all-vs-all within
each set. A method is a model mode (``zero_shot``, ``single_k_<K>``, ``uniform``, ``grappa``:
grappa.core.model), ``oracle_val`` (per domain the single k that is best on validation, a fair baseline)
or ``oracle_test`` (per domain the k best on test itself: it uses the test labels, an upper
reference and not a model); a 2-D map of an embedding for the report. Pure: vectors and labels in,
dicts, arrays and markdown out.
"""
from __future__ import annotations

import zlib

import numpy as np

from grappa.core.metrics import per_query_retrieval, summarize_queries
from grappa.core.model import FUSION, UNIFORM, ZERO_SHOT, single, single_k

METRICS = ("map_at_r", "recall_at_1")
ORACLE = "oracle_val"
ORACLE_TEST = "oracle_test"
VALIDATION, TEST = "val", "test"
SPLITS = (VALIDATION, TEST)


def method_order(names) -> list[str]:
    """zero_shot, single_k_<K> by K, uniform, oracle_val, oracle_test, grappa (the order of the results table)."""
    rank = {ZERO_SHOT: (0, 0), UNIFORM: (2, 0), ORACLE: (3, 0), ORACLE_TEST: (3, 1), FUSION: (4, 0)}
    return sorted(names, key=lambda n: rank.get(n, (1, single_k(n) or 0)))


def _mean(per_domain: dict) -> dict:
    return {m: float(np.mean([d[m] for d in per_domain.values()])) for m in METRICS}


def class_split(domains: np.ndarray, labels: np.ndarray, share: float, seed: int) -> dict[str, list[str]]:
    """Per domain, the validation classes: ``share`` of its classes (rounded, at least one, and at
    least one left for test), stratified by class size: the classes in order of image count are cut
    into that many consecutive strata and one class is drawn from each, so both sets span small and
    large classes. Drawn with ``seed`` and the domain's name, so a domain's split does not move when
    other domains are added. A domain with a single class has no validation classes."""
    val = {}
    for domain in sorted(set(map(str, domains))):
        classes, counts = np.unique(labels[domains == domain], return_counts=True)
        n = 0 if len(classes) < 2 else min(max(int(np.floor(share * len(classes) + 0.5)), 1), len(classes) - 1)
        rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
        by_size = np.lexsort((rng.random(len(classes)), counts))  # equal sizes in a seeded order
        # one class per stratum for the smaller set, the rest to the other: every stratum has two or
        # more classes, so no class lands in one set for every seed
        smaller = min(n, len(classes) - n)
        drawn = {str(classes[rng.choice(stratum)]) for stratum in np.array_split(by_size, smaller)} if smaller else set()
        val[domain] = sorted(drawn if n <= len(classes) - n else set(map(str, classes)) - drawn)
    return val


def split_mask(domains: np.ndarray, labels: np.ndarray, val_classes: dict[str, list[str]], split: str) -> np.ndarray:
    """Rows of ``split`` (``VALIDATION`` or ``TEST``) under ``val_classes``."""
    val = {(d, c) for d, classes in val_classes.items() for c in classes}
    in_val = np.array([(str(d), str(c)) in val for d, c in zip(domains, labels)], bool)
    return in_val if split == VALIDATION else ~in_val


def score_splits(embeddings: dict[str, np.ndarray], domains: np.ndarray, labels: np.ndarray,
                 val_classes: dict[str, list[str]], ks: list[int]) -> dict:
    """Every mode's per-domain metrics on the validation and on the test classes, all-vs-all within
    each, and the oracles: ``oracle_val`` takes per domain the k best on validation (only validation
    labels choose it), ``oracle_test`` the k best on test (an upper reference). Returns
    {VALIDATION: {method: ...}, TEST: {method: ...}, "oracle_choice": {domain: k}, "oracle_test_choice": ...}."""
    scores = {}
    for split in SPLITS:
        rows = split_mask(domains, labels, val_classes, split)
        scores[split] = {mode: per_domain_metrics(vectors[rows], domains[rows], labels[rows])
                         for mode, vectors in embeddings.items()}
    choice = test_choice = None
    if ks:  # without single-k models (the frozen backbone alone) there is no oracle
        choice, test_choice = best_k(scores[VALIDATION], ks), best_k(scores[TEST], ks)
        scores[VALIDATION][ORACLE] = oracle(scores[VALIDATION], choice)
        scores[TEST][ORACLE] = oracle(scores[TEST], choice)
        scores[TEST][ORACLE_TEST] = oracle(scores[TEST], test_choice)
    return {**{split: {name: res[name] for name in method_order(res)} for split, res in scores.items()},
            "oracle_choice": choice, "oracle_test_choice": test_choice}


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (nats, at most log 2) between two distributions."""
    return float(_entropy((p + q) / 2) - (_entropy(p) + _entropy(q)) / 2)


def routing_metrics(alpha: np.ndarray, domains: np.ndarray, blocks: list[int]) -> dict:
    """How the fused model routes, per adapted block, from each image's (M,) granularity attention
    ``alpha`` (N, L, M). The entropy of the batch-mean attention is about log M both when every image
    mixes the sets evenly and when each image picks one set and the batch uses all of them, so it
    cannot show routing; the mean per-image entropy and their difference, the mutual information
    between image and set, can. Between domains: the Jensen-Shannon divergence of their mean
    attention (mean and largest over pairs; 0 when every domain gets the same mixture)."""
    names = sorted(set(map(str, domains)))
    out: dict = {"max_entropy": float(np.log(alpha.shape[-1]))}
    for i, block in enumerate(blocks):
        a = alpha[:, i].astype(np.float64)
        batch_mean, per_image = float(_entropy(a.mean(0))), float(_entropy(a).mean())
        by_domain = [a[domains == d].mean(0) for d in names]
        pairs = [js_divergence(p, q) for j, p in enumerate(by_domain) for q in by_domain[j + 1:]] or [0.0]
        out[f"block{block}"] = {"batch_mean_attn_entropy": batch_mean, "per_image_attn_entropy": per_image,
                                "mutual_information": batch_mean - per_image,
                                "domain_js_mean": float(np.mean(pairs)), "domain_js_max": float(np.max(pairs))}
    return out


def per_domain_metrics(vectors: np.ndarray, domains: np.ndarray, labels: np.ndarray) -> dict:
    """{"per_domain": {domain: {metric: value}}, "mean": {metric: mean over domains}}."""
    return per_domain_queries(vectors, domains, labels)[0]


def per_domain_queries(vectors: np.ndarray, domains: np.ndarray,
                       labels: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """:func:`per_domain_metrics`, with each query's AP@R and whether it counts (for a bootstrap),
    from one retrieval per domain."""
    ap_at_r, valid = np.zeros(len(labels)), np.zeros(len(labels), bool)
    per_domain = {}
    for domain in sorted(set(domains)):
        mask = domains == domain
        ap_at_r[mask], first_hit, valid[mask] = per_query_retrieval(vectors[mask], labels[mask])
        per_domain[domain] = summarize_queries(ap_at_r[mask], first_hit, valid[mask])
    return {"per_domain": per_domain, "mean": _mean(per_domain)}, ap_at_r, valid


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


def routing_table(routing: dict) -> str:
    """routing_metrics as a table, one row per adapted block."""
    columns = ("batch_mean_attn_entropy", "per_image_attn_entropy", "mutual_information", "domain_js_mean",
               "domain_js_max")
    rows = [[block, *(f"{values[c]:.3f}" for c in columns)] for block, values in routing.items() if block != "max_entropy"]
    return markdown_table(f"Routing of the fused model's granularity attention (nats; log M = {routing['max_entropy']:.3f})",
                          ["block", *columns], rows)


def embedding_map(vectors: np.ndarray, max_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, (n, 2) positions): a t-SNE map of at most ``max_points`` rows drawn at random (cosine
    distances, PCA start, seeded: the same run draws the same map)."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(vectors), size=min(max_points, len(vectors)), replace=False))
    perplexity = float(min(30.0, max(1.0, (len(rows) - 1) / 3)))  # t-SNE needs fewer neighbours than points
    tsne = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed)
    return rows, tsne.fit_transform(np.asarray(vectors[rows], dtype=np.float32))
