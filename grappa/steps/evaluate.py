"""Step 5 — ``grappa evaluate``: per-domain retrieval quality of every model variant.

All-vs-all leave-one-out retrieval on each domain's labelled ``query_db`` split (mAP@R, R@1) for:
``zero_shot`` (frozen backbone), ``single_k_<K>`` (backbone + adaptor set K), ``uniform`` (the mean
of all adaptor sets), ``oracle`` (per domain the best single k: it uses the test labels to choose,
so it is an upper reference, not a model) and ``grappa`` (the fused model).

Writes ``<out>/evaluate/metrics.json``, ``results.md``, ``plots/*.png`` and ``champion.json`` (the
model that serves: this run's exported model, or with tracking on whichever version is ``champion``
after the equal-terms comparison of publish.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from grappa.io import servable
from grappa.io.artifacts import write_json, write_text
from grappa.io.assemble import assemble
from grappa.core.backbones import create_backbone
from grappa.config import Params
from grappa.io.datasets import ImageDataset, encode, image_transform, load_inputs
from grappa.core.metrics import leave_one_out_neighbours, retrieval_metrics
from grappa.core.model import FUSION, UNIFORM, ZERO_SHOT, pick_device, single

METRICS = ("map_at_r", "recall_at_1")


def method_name(mode: str, ks: list[int]) -> str:
    names = {ZERO_SHOT: "zero_shot", UNIFORM: "uniform", FUSION: "grappa"}
    names.update({single(k): f"single_k_{k}" for k in ks})
    return names[mode]


def per_domain_metrics(vectors: np.ndarray, domains: np.ndarray, labels: np.ndarray) -> dict:
    per_domain = {}
    for domain in sorted(set(domains)):
        mask = domains == domain
        per_domain[domain] = retrieval_metrics(vectors[mask], labels[mask])
    mean = {m: float(np.mean([d[m] for d in per_domain.values()])) for m in METRICS}
    return {"per_domain": per_domain, "mean": mean}


def score_servable(model: servable.Servable, params: Params) -> float:
    """Mean mAP@R of a servable model on this run's query_db split (for the equal-terms comparison).

    Fed like the candidate was: the cached prefix activations when the model's frozen prefix is the
    one extracted here, else the images through the model's own preprocessing.
    """
    inputs = load_inputs(Path(params.out_dir) / "extract", "query_db", model.preprocess, train=False,
                         min_side=params.data.min_side, max_pixels=params.data.max_pixels)
    dataset = inputs.dataset
    if not dataset.is_images and not model.same_prefix_as(params):  # cached activations of another prefix
        dataset = ImageDataset(inputs.uris, image_transform(model.preprocess, train=False), params.data.min_side,
                               params.data.max_pixels)
    vectors, _ = encode(model.model.to(pick_device()), dataset, FUSION, params.evaluate.batch_size,
                        num_workers=params.extract.num_workers, desc="re-score champion")
    return per_domain_metrics(vectors, inputs.domains, inputs.labels.astype(str))["mean"]["map_at_r"]


def oracle(methods: dict, ks: list[int]) -> tuple[dict, dict[str, int]]:
    """Per domain, the single-k model with the best mAP@R (task-label-aware upper reference)."""
    domains = methods[f"single_k_{ks[0]}"]["per_domain"].keys()
    per_domain, choice = {}, {}
    for domain in domains:
        best = max(ks, key=lambda k: methods[f"single_k_{k}"]["per_domain"][domain]["map_at_r"])
        per_domain[domain] = methods[f"single_k_{best}"]["per_domain"][domain]
        choice[domain] = best
    mean = {m: float(np.mean([d[m] for d in per_domain.values()])) for m in METRICS}
    return {"per_domain": per_domain, "mean": mean}, choice


def results_table(methods: dict) -> str:
    domains = list(next(iter(methods.values()))["per_domain"])
    head = "| method | " + " | ".join(domains) + " | mean |"
    lines = [
        "mAP@R / R@1 (%), all-vs-all leave-one-out on each domain's query_db split",
        "",
        head,
        "|" + "---|" * (len(domains) + 2),
    ]
    for name, res in methods.items():
        cells = [f"{100 * res['per_domain'][d]['map_at_r']:.1f} / {100 * res['per_domain'][d]['recall_at_1']:.1f}"
                 for d in domains]
        cells.append(f"**{100 * res['mean']['map_at_r']:.1f}** / {100 * res['mean']['recall_at_1']:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(params: Params) -> dict:
    t0 = time.perf_counter()
    out = Path(params.out_dir) / "evaluate"
    if params.evaluate.instance_tasks:  # a missing dataset must stop us before any work
        from grappa.io.instance_tasks import locate

        for task in params.evaluate.instance_tasks:
            locate(task)
    ks = params.cluster.ks
    backbone, preprocess, _ = create_backbone(params.backbone)
    model = assemble(params, backbone, with_fusion=True, load_fusion=True).to(pick_device())
    inputs = load_inputs(Path(params.out_dir) / "extract", "query_db", preprocess, train=False,
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
        name = method_name(mode, ks)
        embeddings[name] = vectors
        methods[name] = per_domain_metrics(vectors, inputs.domains, labels)
        print(f"{name}: mean mAP@R {methods[name]['mean']['map_at_r']:.4f}")
    methods["oracle"], oracle_choice = oracle(methods, ks)
    order = ["zero_shot", *[f"single_k_{k}" for k in ks], "uniform", "oracle", "grappa"]
    methods = {name: methods[name] for name in order}

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

        modes = {mode: method_name(mode, ks) for mode in model.modes()}
        result["instance_tasks"] = {}
        for task in params.evaluate.instance_tasks:
            result["instance_tasks"][task.name] = evaluate_instance_task(
                model, task, preprocess, modes, params.evaluate.batch_size, params.extract.num_workers)
            table += "\n" + instance_table(task.name, result["instance_tasks"][task.name])
    write_json(out / "metrics.json", result)
    write_text(out / "results.md", table)
    # Without a registry this run's model serves; publish.py rewrites this after its comparison.
    exported = servable.read_config(servable.model_dir(params))
    servable.write_champion(params, exported["weights_sha256"], str(servable.model_dir(params)))
    _plot_all(out / "plots", methods, attention_by_domain, ks, inputs, embeddings["grappa"], labels, params)
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
