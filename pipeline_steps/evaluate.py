"""Step 6 — ``grappa evaluate``: per-domain retrieval quality of every model variant.

Each domain's labelled ``query_db`` classes are split class-disjointly (``evaluate.val_share``,
``evaluate.split_seed``) into a validation and a test set; all-vs-all leave-one-out retrieval within
each (mAP@R, R@1) for: ``zero_shot`` (frozen backbone, from the float16 prefix cache as the others),
``single_k_<K>`` (backbone + adaptor set K), ``uniform`` (the mean of all adaptor sets), ``oracle_val`` (per
domain the single k best on validation), ``oracle_test`` (test set only: the k best on test itself,
an upper reference that uses the test labels) and ``grappa`` (the fused model). ``methods`` holds
the test figures, ``validation`` the validation ones, where the champion is chosen.

Writes ``<out>/evaluate/results.md``, ``plots/*.png`` and ``report.html`` (the tables and plots in one
self-contained page) and returns the metrics (the runner writes them to ``report.json``, and then
``champion.json``: the model that serves, this run's exported model or, with tracking on, whichever
version is ``champion`` after the equal-terms comparison of grappa/tracking/publisher.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from grappa.config import Params
from grappa.core.backbones import create_backbone
from grappa.core.evaluation import (SPLITS, TEST, VALIDATION, embedding_map, results_table, routing_metrics,
                                    routing_table, score_splits, split_mask)
from grappa.core.metrics import leave_one_out_neighbours
from grappa.core.model import FUSION, ZERO_SHOT, pick_device
from grappa.io import pages, servable
from grappa.io.artifacts import write_text
from grappa.io.assemble import assemble
from grappa.io.datasets import encode, load_inputs
from grappa.io.features import read_columns
from grappa.io.layout import layout
from grappa.io.pseudo_labels import pseudo_labels_for
from grappa.io.scoring import validation_classes


def protocol(params: Params, domains: np.ndarray, labels: np.ndarray, val_classes: dict[str, list[str]]) -> dict:
    """Where choices are made and where figures come from: the split's seed and classes per set."""
    test_classes = {d: sorted(set(labels[domains == d]) - set(val_classes[d])) for d in val_classes}
    images = {split: int(split_mask(domains, labels, val_classes, split).sum()) for split in SPLITS}
    return {"select": VALIDATION, "report": TEST, "val_share": params.evaluate.val_share,
            "split_seed": params.evaluate.split_seed, "val_classes": val_classes, "test_classes": test_classes,
            "images": images}


def run(params: Params) -> dict:
    t0 = time.perf_counter()
    out = layout(params)
    if params.evaluate.instance_tasks:  # a missing dataset must stop us before any work
        from grappa.io.instance_tasks import locate

        for task in params.evaluate.instance_tasks:
            locate(task)
    ks = params.cluster.ks
    backbone, preprocess, _ = create_backbone(params.backbone)
    model = assemble(params, backbone, with_fusion=True, load_fusion=True).to(pick_device())
    inputs = load_inputs(out, "query_db", preprocess, train=False,
                         min_side=params.data.min_side, max_pixels=params.data.max_pixels)
    labels = inputs.labels.astype(str)
    val_classes = validation_classes(params, inputs.domains, labels)
    embeddings: dict[str, np.ndarray] = {}
    attention = None
    for mode in model.modes():
        # zero_shot too starts from the cached float16 prefix: every row compares on one precision path
        embeddings[mode], alphas = encode(model, inputs.dataset, mode, params.evaluate.batch_size,
                                          num_workers=params.extract.num_workers, desc=f"evaluate {mode}")
        if mode == FUSION:
            attention = alphas
    scores = score_splits(embeddings, inputs.domains, labels, val_classes, ks)
    methods, validation = scores[TEST], scores[VALIDATION]
    for mode in validation:
        print(f"{mode}: mean mAP@R {validation[mode]['mean']['map_at_r']:.4f} validation, "
              f"{methods[mode]['mean']['map_at_r']:.4f} test")
    # what the float16 prefix cache costs the frozen backbone, measured on every run: extract's
    # features, computed from the image in float32, against zero_shot above
    fp32 = score_splits({ZERO_SHOT: inputs.zero_shot}, inputs.domains, labels, val_classes, [])
    precision = {"zero_shot_fp32_features": {split: fp32[split][ZERO_SHOT]["mean"]["map_at_r"] for split in SPLITS},
                 "zero_shot_fp16_prefix": {split: scores[split][ZERO_SHOT]["mean"]["map_at_r"] for split in SPLITS}}

    domains = sorted(set(inputs.domains))
    attention_by_domain = {d: attention[inputs.domains == d].mean(axis=0).tolist() for d in domains}
    table = (results_table(methods, "mAP@R / R@1 (%) on the test classes of each domain's query_db split, "
                                    "all-vs-all leave-one-out (oracle_val: the k best on validation; oracle_test: the "
                                    "k best on test, uses the test labels)")
             + "\n" + results_table(validation, "validation classes (where the oracle's k and the champion are chosen)"))
    routing = routing_metrics(attention, inputs.domains, list(range(model.start, model.start + attention.shape[1])))
    table += "\n" + routing_table(routing)
    result = {
        "protocol": protocol(params, inputs.domains, labels, val_classes),
        "methods": methods,  # test
        "validation": {"methods": validation},
        "oracle_choice": scores["oracle_choice"],  # per domain, the k best on validation
        "oracle_test_choice": scores["oracle_test_choice"],
        "precision_path": precision,
        "ks": ks,
        # (blocks, M) mean granularity attention of the fused model on each domain's images
        "attention_by_domain": attention_by_domain,
        "routing": routing,  # per adapted block: entropies, image-set mutual information, domains' JS divergence
        "timings_s": {},  # filled in last: the report pages are part of the step
    }
    if params.evaluate.instance_tasks:
        from grappa.io.instance_tasks import evaluate_instance_task, instance_table

        result["instance_tasks"] = {}
        for task in params.evaluate.instance_tasks:
            result["instance_tasks"][task.name] = evaluate_instance_task(
                model, task, preprocess, model.modes(), params.evaluate.batch_size, params.extract.num_workers)
            table += "\n" + instance_table(task.name, result["instance_tasks"][task.name])
    write_text(out.results, table)
    t_report = time.perf_counter()
    figures = _plot_all(out.plots, methods, attention_by_domain, ks)
    pictures = _pictures(params, inputs, labels, val_classes, embeddings[FUSION])
    _write_run_report(out.run_report, params, servable.read_config(out.model)["weights_sha256"], table, figures,
                      pictures)
    print(table)
    result["timings_s"].update(report=time.perf_counter() - t_report, total=time.perf_counter() - t0)
    return result


def _write_run_report(path: Path, params: Params, model_sha256: str, table: str, figures, pictures) -> None:
    subtitle = (f"model {model_sha256[:12]}, k = {params.cluster.ks}, backbone {params.backbone.name}; "
                "chosen on the validation classes, reported on the test classes")
    pages.write_page(path, pages.run_report("grappa evaluate", subtitle, table, figures, pictures))


def _plot_all(folder: Path, methods, attention_by_domain, ks) -> list[tuple[str, Path]]:
    """The plots, and (caption, file) of each for the run report."""
    from grappa.io import plots

    figures = [("mAP@R per domain and method, test classes", folder / "per_domain_map_at_r.png"),
               ("Granularity attention of the fused model, by domain", folder / "attention_by_domain.png")]
    plots.per_domain_bars(figures[0][1], methods, "map_at_r")
    plots.attention_heatmaps(figures[1][1], attention_by_domain, ks)
    return figures


GALLERY_TOP_K, CLUSTERS_SHOWN, MEMBERS_SHOWN = 5, 4, 6  # what the report shows: enough to judge, small to open


def _pictures(params: Params, inputs, labels: np.ndarray, val_classes: dict, vectors: np.ndarray) -> list[str]:
    """The report's sections of images: top-k galleries of the test classes, the embedding map, the
    clusters of every k."""
    def thumb(uri: str, size: int = pages.THUMB) -> str | None:
        return pages.thumbnail(uri, params.data.min_side, params.data.max_pixels, params.data.max_file_bytes, size)

    rng = np.random.default_rng(params.seed)
    return [_galleries(params, inputs, labels, val_classes, vectors, rng, thumb),
            _embedding_map(params, inputs, labels, vectors, thumb),
            _cluster_galleries(params, rng, thumb)]


def _galleries(params, inputs, labels, val_classes, vectors, rng, thumb) -> str:
    """Per domain, a few test queries beside their top-k among that domain's test images (the
    leave-one-out protocol of the metrics), with class, cosine score and a right/wrong mark."""
    test = split_mask(inputs.domains, labels, val_classes, TEST)
    body = []
    for domain in sorted(set(inputs.domains)):
        rows = np.flatnonzero(test & (inputs.domains == domain))
        if len(rows) < 2 or not params.evaluate.grid_queries:
            continue
        sub = vectors[rows]
        neighbours = leave_one_out_neighbours(sub, GALLERY_TOP_K)
        picks = np.sort(rng.choice(len(rows), size=min(params.evaluate.grid_queries, len(rows)), replace=False))
        body.append(pages.subheading(domain))
        for q in picks:
            query = {"thumb": thumb(inputs.uris[rows[q]]), "caption": [f"class {labels[rows[q]]}"]}
            hits = [{"rank": r + 1, "score": float(sub[q] @ sub[j]), "thumb": thumb(inputs.uris[rows[j]]),
                     "image_id": Path(inputs.uris[rows[j]]).name, "label": labels[rows[j]],
                     "correct": bool(labels[rows[j]] == labels[rows[q]])} for r, j in enumerate(neighbours[q])]
            body.append(pages.query_row(query, hits))
    return pages.section(f"Top-{GALLERY_TOP_K} retrievals of the fused model on the test classes",
                         "".join(body), "each domain's test images searched leave-one-out, as the metrics are; "
                                        "green: same class as the query")


def _embedding_map(params, inputs, labels, vectors, thumb) -> str:
    if min(params.evaluate.map_points, len(vectors)) < 4:  # t-SNE needs a few points; 0 turns the map off
        return ""
    rows, xy = embedding_map(vectors, params.evaluate.map_points, params.seed)
    return pages.section(
        f"The fused embedding in 2-D (t-SNE of {len(rows):,} of {len(vectors):,} query_db images)",
        pages.embedding_map(xy, [str(inputs.domains[i]) for i in rows],
                            [f"{inputs.domains[i]} / {labels[i]}" for i in rows],
                            [thumb(inputs.uris[i], pages.SMALL_THUMB) for i in rows]),
        "coloured by domain; hover a dot for its image")


def _cluster_galleries(params, rng, thumb) -> str:
    """A few clusters of every k, a few members each: what a pseudo-granularity groups together
    (unlabeled images: only their ids and domains are shown, no label is read)."""
    table = read_columns(layout(params), ["image_id", "uri", "domain", "split"])
    unlabeled = np.flatnonzero(pc.equal(table.column("split"), "unlabeled").to_numpy(zero_copy_only=False))
    if not len(unlabeled):
        return ""
    ids = table.column("image_id").take(unlabeled)
    body = []
    for k in params.cluster.ks:
        assigned = pseudo_labels_for(params, k, ids)
        sizes = np.bincount(assigned)
        shown = np.sort(rng.choice(np.flatnonzero(sizes), size=min(CLUSTERS_SHOWN, int((sizes > 0).sum())), replace=False))
        body.append(pages.subheading(f"k = {k}"))
        for cluster in shown:
            members = unlabeled[assigned == cluster]
            members = np.sort(rng.choice(members, size=min(MEMBERS_SHOWN, len(members)), replace=False))
            shown_rows = table.select(["uri", "domain"]).take(members).to_pylist()  # a few rows, not the pool
            body.append(pages.note(f"cluster {cluster}: {sizes[cluster]:,} images") + pages.image_strip(
                [thumb(row["uri"], pages.SMALL_THUMB) for row in shown_rows], [[row["domain"]] for row in shown_rows]))
    return pages.section("Clusters: what each pseudo-granularity groups together", "".join(body),
                         f"{CLUSTERS_SHOWN} clusters of every k drawn at random, {MEMBERS_SHOWN} members each; "
                         "the unlabeled pool, whose labels are never read")
