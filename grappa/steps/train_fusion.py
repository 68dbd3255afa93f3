"""Step 5 — ``grappa train-fusion``: one model for all tasks from the M frozen adaptor sets.

Backbone and adaptors are frozen; only the per-block fusion layers (W_Q, W_K, W_V) train. Writes
``<out>/fusion/`` (fusion.pt, knn.parquet, report.json) and ``<out>/model/``, the whole fused model
as one servable artifact (see grappa/io/servable.py).

Objective (per batch of B anchors i, each with one neighbour j(i) drawn uniformly from its k nearest
neighbours in the frozen feature space of the unlabeled union; f = fused, L2-normalised embedding,
alpha_l = the image's attention over the M granularities in block l):

    L = [L_pair] + [L_pseudo] + lambda_prop * L_prop + lambda_value * L_value - lambda_entropy * H
    L_pair   = symmetric InfoNCE of (f(x_i), f(x_j(i))) against the other 2B-2 batch images, temperature tau
               (fusion.objective names "neighbour_pairs")
    L_pseudo = (1/M) sum_m CE(C_m(f(x_i)), y_i^m): the stage-1 cosine-softmax losses through the frozen
               classifiers C_m of all M levels, so the one fused embedding must serve every granularity
               (fusion.objective names "pseudo_labels"; grappa.md 5.3, "alternative reading")
    L_prop  = 1/2 [KL(sg(alpha(x_j)) || alpha(x_i)) + KL(sg(alpha(x_i)) || alpha(x_j))], mean over pairs and blocks
    L_value = sum_l ||W_V^l - I||^2          (AdapterFusion's value regulariser)
    H       = entropy of the batch-mean attention (optional guard against collapse onto one adaptor set)

L_prop propagates each image's granularity attention to its neighbours: images that are close in
feature space (likely the same task) are pushed to pick the same granularities.
The terms and their weights are the registry's (grappa.core.objectives); the batch step is
grappa.core.training.fusion_step.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial

import numpy as np
import pyarrow as pa
import torch

from grappa.config import Params
from grappa.core.backbones import create_backbone
from grappa.core.losses import CosineClassifier
from grappa.core.metrics import knn_graph, knn_recall
from grappa.core.model import FUSION, pick_device
from grappa.core.objectives import fusion_objective, fusion_terms
from grappa.core.samplers import NeighbourPairs
from grappa.core.training import data_fingerprint, fit, fusion_step, run_key
from grappa.io import servable
from grappa.io.artifacts import load_torch, save_torch, write_json, write_table
from grappa.io.assemble import assemble
from grappa.io.datasets import encode, load_inputs, loader
from grappa.io.layout import FUSION_REPORT, layout
from grappa.steps.train_adaptor import pseudo_labels_for


def run(params: Params) -> dict:
    torch.manual_seed(params.seed)
    hp = params.fusion
    t0 = time.perf_counter()
    backbone, preprocess, _ = create_backbone(params.backbone)
    model = assemble(params, backbone, with_fusion=True, load_fusion=False)
    model.fusion.requires_grad_(True)
    inputs = load_inputs(layout(params), "unlabeled", preprocess, train=True,
                         min_side=params.data.min_side, max_pixels=params.data.max_pixels)
    neighbours, knn_method = knn_graph(inputs.zero_shot, hp.knn, hp.knn_exact_below, hp.knn_nprobe, params.seed)
    knn = {"method": knn_method}
    if knn_method != "exact":  # what the approximation costs, measured on this pool
        knn["recall_vs_exact"] = knn_recall(inputs.zero_shot, neighbours, sample=1000, seed=params.seed)
        print(f"kNN graph: {knn_method}, recall {knn['recall_vs_exact']:.3f} against exact on 1000 images")
    write_table(layout(params).knn,
                pa.table({"image_id": inputs.image_ids,
                          "neighbours": [[inputs.image_ids[j] for j in row] for row in neighbours]}))
    pairs = NeighbourPairs(inputs.dataset, neighbours)
    batch_size = min(hp.batch_size, len(pairs))
    optimizer = torch.optim.AdamW(model.fusion.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)

    def batches(generator):
        model.train()
        return loader(pairs, batch_size, shuffle=True, generator=generator, drop_last=True,
                      num_workers=params.extract.num_workers)

    device = pick_device()
    model.to(device)

    heads = []  # (classifier, pseudo-labels of every unlabeled row) per k, frozen
    if "pseudo_labels" in dict(fusion_terms(hp)):
        for k in params.cluster.ks:
            state = load_torch(layout(params).classifier(k))
            head = CosineClassifier(state["weight"], state["temperature"]).requires_grad_(False).to(device)
            heads.append((head, torch.from_numpy(pseudo_labels_for(params, k, inputs.image_ids)).to(device)))
    step = partial(fusion_step, model, fusion_objective(hp, model.fusion, heads), device, images=pairs.is_images)

    # the images, their neighbour graph and the adaptor sets' weights: other data, another checkpoint
    data = data_fingerprint(np.array(inputs.image_ids), neighbours, modules=model.adaptors.values())
    key = run_key(params, hp.model_dump(), params.adaptor.model_dump(), params.cluster.ks, data)
    checkpoint = layout(params).checkpoint(f"fusion-{key}")
    history = fit(model.fusion, optimizer, hp.epochs, len(pairs) // batch_size, 0.0, batches, step,
                  checkpoint, params.seed, desc="fusion")
    _, alphas = encode(model, inputs.dataset, FUSION, params.evaluate.batch_size, desc="attention")
    model.cpu()
    meta = {"ks": params.cluster.ks, "attn_dim": hp.attn_dim, "preprocess": asdict(preprocess)}
    save_torch(layout(params).fusion, {"state_dict": model.fusion.state_dict(), "meta": meta})
    exported = servable.export(model, params, preprocess, layout(params).model)
    report = {
        "images": len(inputs.image_ids),
        "history": history,
        "final": history[-1],
        # mean attention over granularities on the unlabeled pool, per adapted block
        "mean_attention_per_block": alphas.mean(axis=0).tolist(),
        "ks": params.cluster.ks,
        "knn_graph": knn,
        "model_sha256": exported["weights_sha256"],
        "seconds": time.perf_counter() - t0,
    }
    write_json(layout(params).path(FUSION_REPORT), report)
    checkpoint.unlink(missing_ok=True)
    return report
