"""Step 6 — ``grappa evaluate``: per-domain retrieval quality of every model variant.

All-vs-all leave-one-out retrieval on each domain's labelled ``query_db`` split (mAP@R, R@1) for:
``zero_shot`` (frozen backbone), ``single_k_<K>`` (backbone + adaptor set K), ``uniform`` (the mean
of all adaptor sets), ``oracle`` (per domain the best single k: it uses the test labels to choose,
so it is an upper reference, not a model) and ``grappa`` (the fused model).

Writes ``<out>/evaluate/metrics.json``, ``results.md``, ``plots/*.png`` and ``champion.json`` (the
model that serves: this run's exported model, or with tracking on whichever version is ``champion``
after the equal-terms comparison of grappa/tracking/publisher.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from grappa.config import Params
from grappa.core.augment import image_transform
from grappa.core.backbones import create_backbone
from grappa.core.evaluation import ORACLE, method_order, oracle, per_domain_metrics, results_table
from grappa.core.metrics import leave_one_out_neighbours
from grappa.core.model import FUSION, ZERO_SHOT, pick_device
from grappa.io import servable
from grappa.io.artifacts import write_json, write_text
from grappa.io.assemble import assemble
from grappa.io.datasets import ImageDataset, encode, load_inputs
from grappa.io.layout import layout


def score_servable(model: servable.Servable, params: Params) -> float:
    """Mean mAP@R of a servable model on this run's query_db split (for the equal-terms comparison).

    Fed like the candidate was: the cached prefix activations when the model's frozen prefix is the
    one extracted here, else the images through the model's own preprocessing.
    """
    inputs = load_inputs(layout(params), "query_db", model.preprocess, train=False,
                         min_side=params.data.min_side, max_pixels=params.data.max_pixels)
    dataset = inputs.dataset
    if not dataset.is_images and not model.same_prefix_as(params):  # cached activations of another prefix
        dataset = ImageDataset(inputs.uris, image_transform(model.preprocess, train=False), params.data.min_side,
                               params.data.max_pixels)
    vectors, _ = encode(model.model.to(pick_device()), dataset, FUSION, params.evaluate.batch_size,
                        num_workers=params.extract.num_workers, desc="re-score champion")
    return per_domain_metrics(vectors, inputs.domains, inputs.labels.astype(str))["mean"]["map_at_r"]


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
    methods: dict[str, dict] = {}
    embeddings: dict[str, np.ndarray] = {}
    attention = None
    for mode in model.modes():
        if mode == ZERO_SHOT:
            vectors = inputs.zero_shot  # computed by extract with the same frozen backbone
        else:
            vectors, alphas = encode(model, inputs.dataset, mode, params.evaluate.batch_size,
                                     num_workers=params.extract.num_workers, desc=f"evaluate {mode}")
            if mode == FUSION:
                attention = alphas
        embeddings[mode] = vectors
        methods[mode] = per_domain_metrics(vectors, inputs.domains, labels)
        print(f"{mode}: mean mAP@R {methods[mode]['mean']['map_at_r']:.4f}")
    methods[ORACLE], oracle_choice = oracle(methods, ks)
    methods = {name: methods[name] for name in method_order(methods)}

    domains = sorted(set(inputs.domains))
    attention_by_domain = {d: attention[inputs.domains == d].mean(axis=0).tolist() for d in domains}
    table = results_table(methods)
    result = {
        "methods": methods,
        "oracle_choice": oracle_choice,
        "ks": ks,
        # (blocks, M) mean granularity attention of the fused model on each domain's images
        "attention_by_domain": attention_by_domain,
        "timings_s": {"evaluate": time.perf_counter() - t0},
    }
    if params.evaluate.instance_tasks:
        from grappa.io.instance_tasks import evaluate_instance_task, instance_table

        result["instance_tasks"] = {}
        for task in params.evaluate.instance_tasks:
            result["instance_tasks"][task.name] = evaluate_instance_task(
                model, task, preprocess, model.modes(), params.evaluate.batch_size, params.extract.num_workers)
            table += "\n" + instance_table(task.name, result["instance_tasks"][task.name])
    write_json(out.metrics, result)
    write_text(out.results, table)
    # Without a registry this run's model serves; the publisher rewrites this after its comparison.
    exported = servable.read_config(out.model)
    servable.write_champion(params, exported["weights_sha256"], str(out.model))
    _plot_all(out.plots, methods, attention_by_domain, ks, inputs, embeddings[FUSION], labels, params)
    print(table)
    return result


def _plot_all(folder: Path, methods, attention_by_domain, ks, inputs, vectors, labels, params: Params) -> None:
    from grappa.io import plots

    plots.per_domain_bars(folder / "per_domain_map_at_r.png", methods, "map_at_r")
    plots.attention_heatmaps(folder / "attention_by_domain.png", attention_by_domain, ks)
    rng = np.random.default_rng(params.seed)
    rows = []
    for domain in sorted(set(inputs.domains)):
        candidates = np.flatnonzero(inputs.domains == domain)
        rows += rng.choice(candidates, size=min(params.evaluate.grid_queries, len(candidates)), replace=False).tolist()
    if rows:
        neighbours = leave_one_out_neighbours(vectors, 5)
        plots.query_grid(folder / "top5_grappa.png", [inputs.uris[i] for i in rows],
                         [[inputs.uris[j] for j in neighbours[i]] for i in rows],
                         [[labels[j] == labels[i] for j in neighbours[i]] for i in rows])
