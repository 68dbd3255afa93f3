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

from grappa.config import Params
from grappa.core.backbones import create_backbone
from grappa.core.evaluation import (SPLITS, TEST, VALIDATION, results_table, routing_metrics, routing_table,
                                    score_splits, split_mask)
from grappa.core.metrics import leave_one_out_neighbours
from grappa.core.model import FUSION, ZERO_SHOT, pick_device
from grappa.io import servable
from grappa.io.artifacts import write_text
from grappa.io.assemble import assemble
from grappa.io.datasets import encode, load_inputs
from grappa.io.layout import layout
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
        "timings_s": {"total": time.perf_counter() - t0},
    }
    if params.evaluate.instance_tasks:
        from grappa.io.instance_tasks import evaluate_instance_task, instance_table

        result["instance_tasks"] = {}
        for task in params.evaluate.instance_tasks:
            result["instance_tasks"][task.name] = evaluate_instance_task(
                model, task, preprocess, model.modes(), params.evaluate.batch_size, params.extract.num_workers)
            table += "\n" + instance_table(task.name, result["instance_tasks"][task.name])
    write_text(out.results, table)
    figures = _plot_all(out.plots, methods, attention_by_domain, ks, inputs, embeddings[FUSION], labels, params)
    _write_run_report(out.run_report, params, servable.read_config(out.model)["weights_sha256"], table, figures)
    print(table)
    return result


def _write_run_report(path: Path, params: Params, model_sha256: str, table: str, figures) -> None:
    from grappa.io import pages

    subtitle = (f"model {model_sha256[:12]}, k = {params.cluster.ks}, backbone {params.backbone.name}; "
                "chosen on the validation classes, reported on the test classes")
    pages.write_page(path, pages.run_report("grappa evaluate", subtitle, table, figures))


def _plot_all(folder: Path, methods, attention_by_domain, ks, inputs, vectors, labels,
              params: Params) -> list[tuple[str, Path]]:
    """The plots, and (caption, file) of each for the run report."""
    from grappa.io import plots

    figures = [("mAP@R per domain and method, test classes", folder / "per_domain_map_at_r.png"),
               ("Granularity attention of the fused model, by domain", folder / "attention_by_domain.png"),
               ("Top-5 retrievals of the fused model (green: same class)", folder / "top5_grappa.png")]
    plots.per_domain_bars(figures[0][1], methods, "map_at_r")
    plots.attention_heatmaps(figures[1][1], attention_by_domain, ks)
    rng = np.random.default_rng(params.seed)
    rows = []
    for domain in sorted(set(inputs.domains)):
        candidates = np.flatnonzero(inputs.domains == domain)
        rows += rng.choice(candidates, size=min(params.evaluate.grid_queries, len(candidates)), replace=False).tolist()
    if rows:
        neighbours = leave_one_out_neighbours(vectors, 5)
        plots.query_grid(figures[2][1], [inputs.uris[i] for i in rows],
                         [[inputs.uris[j] for j in neighbours[i]] for i in rows],
                         [[labels[j] == labels[i] for j in neighbours[i]] for i in rows])
    return figures
