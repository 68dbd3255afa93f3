"""Step 4 — ``grappa train-fusion``: one model for all tasks from the M frozen adaptor sets.

Backbone and adaptors are frozen; only the per-block fusion layers (W_Q, W_K, W_V) train. Writes
``<out>/fusion/`` (fusion.pt, knn.parquet, report.json) and ``<out>/model/``, the whole fused model
as one servable artifact (see servable.py).

Objective (per batch of B anchors i, each with one neighbour j(i) drawn uniformly from its k nearest
neighbours in the frozen feature space of the unlabeled union; f = fused, L2-normalised embedding,
alpha_l = the image's attention over the M granularities in block l):

    L = [L_pair] + [L_pseudo] + lambda_prop * L_prop + lambda_value * L_value - lambda_entropy * H
    L_pair   = symmetric InfoNCE of (f(x_i), f(x_j(i))) against the other 2B-2 batch images, temperature tau
               (fusion.objective contains "neighbour_pairs")
    L_pseudo = (1/M) sum_m CE(C_m(f(x_i)), y_i^m): the stage-1 cosine-softmax losses through the frozen
               classifiers C_m of all M levels, so the one fused embedding must serve every granularity
               (fusion.objective contains "pseudo_labels"; grappa.md 5.3, "alternative reading")
    L_prop  = 1/2 [KL(sg(alpha(x_j)) || alpha(x_i)) + KL(sg(alpha(x_i)) || alpha(x_j))], mean over pairs and blocks
    L_value = sum_l ||W_V^l - I||^2          (AdapterFusion's value regulariser)
    H       = entropy of the batch-mean attention (optional guard against collapse onto one adaptor set)

L_prop propagates each image's granularity attention to its neighbours: images that are close in
feature space (likely the same task) are pushed to pick the same granularities.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from grappa.io import servable
from grappa.io.artifacts import load_torch, save_torch, write_json, write_table
from grappa.io.assemble import assemble, fusion_path
from grappa.core.backbones import create_backbone
from grappa.config import Params
from grappa.io.datasets import NeighbourPairs, encode, load_inputs, loader
from grappa.core.losses import CosineClassifier, attention_propagation, batch_attention_entropy, neighbour_pair_infonce
from grappa.core.metrics import leave_one_out_neighbours
from grappa.core.model import FUSION, pick_device
from grappa.steps.train_adaptor import classifier_path, pseudo_labels_for
from grappa.core.training import data_fingerprint, fit, run_key


def run(params: Params) -> dict:
    torch.manual_seed(params.seed)
    hp = params.fusion
    t0 = time.perf_counter()
    backbone, preprocess, _ = create_backbone(params.backbone)
    model = assemble(params, backbone, with_fusion=True, load_fusion=False)
    model.fusion.requires_grad_(True)
    inputs = load_inputs(Path(params.out_dir) / "extract", "unlabeled", preprocess, train=True,
                         min_side=params.data.min_side, max_pixels=params.data.max_pixels)
    neighbours = leave_one_out_neighbours(inputs.zero_shot, hp.knn)
    write_table(Path(params.out_dir) / "fusion" / "knn.parquet",
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

    use_pairs = "neighbour_pairs" in hp.objective
    heads = []  # (classifier, pseudo-labels of every unlabeled row) per k, frozen
    if "pseudo_labels" in hp.objective:
        for k in params.cluster.ks:
            state = load_torch(classifier_path(params, k))
            head = CosineClassifier(state["weight"], state["temperature"]).requires_grad_(False).to(device)
            heads.append((head, torch.from_numpy(pseudo_labels_for(params, k, inputs.image_ids)).to(device)))

    def step(batch):
        rows, x, _ = batch
        rows, x = rows.to(device), x.to(device)
        x = torch.cat([x[:, 0], x[:, 1]])
        if pairs.is_images:
            x = model.forward_prefix(x)
        emb, alpha = model.forward_suffix(x, FUSION)
        b = emb.shape[0] // 2
        losses = {"prop": attention_propagation(alpha[:b], alpha[b:]),
                  "value": sum(layer.value_regulariser() for layer in model.fusion),
                  "attn_entropy": batch_attention_entropy(alpha)}
        loss = hp.lambda_prop * losses["prop"] + hp.lambda_value * losses["value"] - hp.lambda_entropy * losses["attn_entropy"]
        if use_pairs:
            losses["pair"] = neighbour_pair_infonce(emb[:b], emb[b:], hp.temperature)
            loss = loss + losses["pair"]
        if heads:  # mean over levels of the frozen stage-1 cosine-softmax losses, on the anchors
            losses["pseudo_ce"] = sum(F.cross_entropy(head(emb[:b]), labels[rows]) for head, labels in heads) / len(heads)
            loss = loss + losses["pseudo_ce"]
        losses["loss"] = loss
        return losses

    # the images, their neighbour graph and the adaptor sets' weights: other data, another checkpoint
    data = data_fingerprint(np.array(inputs.image_ids), neighbours, modules=model.adaptors.values())
    key = run_key(params, hp.model_dump(), params.adaptor.model_dump(), params.cluster.ks, data)
    checkpoint = Path(params.out_dir) / "checkpoints" / f"fusion-{key}.pt"
    history = fit(model.fusion, optimizer, hp.epochs, len(pairs) // batch_size, 0.0, batches, step,
                  checkpoint, params.seed, desc="fusion")
    _, alphas = encode(model, inputs.dataset, FUSION, params.evaluate.batch_size, desc="attention")
    model.cpu()
    save_torch(fusion_path(params), {"state_dict": model.fusion.state_dict(),
                                     "meta": {"ks": params.cluster.ks, "attn_dim": hp.attn_dim}})
    exported = servable.export(model, params, preprocess, servable.model_dir(params))
    report = {
        "images": len(inputs.image_ids),
        "history": history,
        "final": history[-1],
        # mean attention over granularities on the unlabeled pool, per adapted block
        "mean_attention_per_block": alphas.mean(axis=0).tolist(),
        "ks": params.cluster.ks,
        "model_sha256": exported["weights_sha256"],
        "seconds": time.perf_counter() - t0,
    }
    write_json(fusion_path(params).with_name("report.json"), report)
    checkpoint.unlink(missing_ok=True)
    return report
