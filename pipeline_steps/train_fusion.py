"""Step 5 — ``grappa train-fusion``: one model for all tasks from the M frozen adaptor sets.

Backbone and adaptors are frozen; only the per-block fusion layers train (W_Q, W_K, and W_V unless
``fusion.value`` is identity; under cosine attention also its per-block temperature). Writes
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
              (fusion.propagation: pairs), or, with propagation: bank (batches of anchors alone),
              KL(sharpen(mean_{j in kNN(i)} bank_j) || alpha(x_i)), bank_i <- m bank_i + (1 - m) alpha(x_i)
    L_value = sum_l ||W_V^l - I||^2          (AdapterFusion's value regulariser)
    H       = entropy of the batch-mean attention (optional guard against collapse onto one adaptor set)
    and, weighted -lambda_mi, the image-set mutual information of the attention (routing_mi)

L_prop propagates each image's granularity attention to its neighbours: images that are close in
feature space (likely the same task) are pushed to pick the same granularities.

Incremental run (``cluster/mode.json``): the fusion layers start from the champion's, the attention
bank from the champion's attention over the whole pool (one forward, no backward), and train
``adapt.fusion_epochs`` epochs on the new images and the same replay sample as the adaptor sets.
The terms and their weights are the registry's (grappa.core.objectives); the batch step is
grappa.core.training.fusion_step.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from grappa.config import Params
from grappa.core.backbones import create_backbone
from grappa.core.losses import AttentionBank, CosineClassifier
from grappa.core.metrics import ivf_knn_graph, knn_graph, knn_recall
from grappa.core.model import pick_device
from grappa.core.objectives import fusion_objective, fusion_terms
from grappa.core.samplers import NeighbourPairs, Subset
from grappa.core.training import checkpoint_key, data_fingerprint, epoch_steps, fit, fusion_step
from grappa.io import champion as champions
from grappa.io import servable
from grappa.io.artifacts import TorchCheckpoint, atomic_path, load_torch, save_torch
from grappa.io.assemble import assemble
from grappa.io.datasets import attention_of, load_inputs, loader, mean_attention
from grappa.io.features import iter_vectors, take_vectors, vector_dim
from grappa.io.layout import layout
from grappa.io.pseudo_labels import pseudo_labels_for


def neighbour_graph(params: Params, inputs) -> tuple[np.ndarray, dict]:
    """The kNN graph of the unlabeled pool's zero-shot vectors and how it was found: exact in memory
    below ``fusion.knn_exact_below`` images, else an IVF index fed chunk by chunk from the store, its
    code size set by ``memory_budget_mb`` (an eighth of it for the index); then its recall against
    exact on 1,000 images is measured and reported."""
    hp, n = params.fusion, len(inputs)
    if n < hp.knn_exact_below:
        neighbours, method = knn_graph(inputs.zero_shot, hp.knn, hp.knn_exact_below, hp.knn_nprobe, params.seed)
        return neighbours, {"method": method}
    out, budget = layout(params), params.memory_budget_mb

    def chunks():
        return iter_vectors(out, inputs.rows, budget)

    def take(positions):
        return take_vectors(out, inputs.rows[positions], budget)

    nlist = int(min(4 * np.sqrt(n), n / 39))
    fits = budget * (1 << 20) // 4 // (4 * vector_dim(out))
    picked = np.sort(np.random.default_rng(params.seed).choice(n, min(n, max(39 * nlist, 65536), fits), replace=False))
    neighbours, method = ivf_knn_graph(chunks, take(picked), n, hp.knn, hp.knn_nprobe, params.seed,
                                       code_bytes=budget * (1 << 20) // 8 // n)
    recall = knn_recall(None, neighbours, sample=1000, seed=params.seed, chunks=chunks, take=take)
    print(f"kNN graph: {method}, recall {recall:.3f} against exact on 1000 images")
    return neighbours, {"method": method, "recall_vs_exact": recall}


def write_neighbours(path, ids: pa.Array, neighbours: np.ndarray, chunk: int = 65536) -> None:
    """knn.parquet (image_id, the ids of its neighbours), a chunk of rows at a time, in Arrow."""
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, pa.schema([("image_id", pa.string()), ("neighbours", pa.list_(pa.string()))])) as writer:
            for start in range(0, len(ids), chunk):
                block = neighbours[start:start + chunk]
                flat = ids.take(pa.array(block.reshape(-1)))
                writer.write_table(pa.table({
                    "image_id": ids.slice(start, len(block)),
                    "neighbours": pa.FixedSizeListArray.from_arrays(flat, block.shape[1]).cast(pa.list_(pa.string()))}))


def run(params: Params) -> dict:
    torch.manual_seed(params.seed)
    hp = params.fusion
    t0 = time.perf_counter()
    backbone, preprocess, _ = create_backbone(params.backbone)
    model = assemble(params, backbone, with_fusion=True, load_fusion=False)
    model.fusion.requires_grad_(True)
    inputs = load_inputs(layout(params), "unlabeled", preprocess, train=True,
                         min_side=params.data.min_side, max_pixels=params.data.max_pixels,
                         budget_mb=params.memory_budget_mb)
    t_knn = time.perf_counter()
    neighbours, knn = neighbour_graph(params, inputs)
    t_knn = time.perf_counter() - t_knn
    write_neighbours(layout(params).knn, inputs.ids, neighbours)
    rows = champions.training_rows(params, inputs.ids)  # None: the whole pool, from scratch
    epochs = hp.epochs if rows is None else params.adapt.fusion_epochs
    if rows is not None:
        champion = load_torch(champions.bundle(params).fusion)
        model.fusion.load_state_dict(champion["state_dict"])
        print(f"fusion: from the champion's, on {len(rows)} of {len(inputs)} images (new + replay)")
    device = pick_device()
    model.to(device)
    bank = None
    if hp.propagation == "bank":  # anchors alone; their neighbours' attentions come from the bank
        items = inputs.dataset
        bank = AttentionBank(torch.from_numpy(neighbours), len(model.fusion), len(params.cluster.ks),
                             hp.bank_momentum, hp.bank_sharpen)
        if rows is not None:  # the neighbours of a new image hold the champion's attention, not a uniform one
            attention_of(model, inputs.dataset, params.evaluate.batch_size, into=bank.alpha)
    else:
        items = NeighbourPairs(inputs.dataset, neighbours)
    if rows is not None:  # items keep their pool row: the bank and the pseudo-labels index them as before
        items = Subset(items, rows)
    batch_size = min(hp.batch_size, len(items))
    # the attention (W_Q, W_K, the cosine temperature) at fusion.qk_lr; W_V, when it trains, at fusion.lr
    attention = [p for layer in model.fusion for p in layer.attention_parameters()]
    attention_ids = {id(p) for p in attention}
    rest = [p for p in model.fusion.parameters() if id(p) not in attention_ids]
    groups = [{"params": attention, "lr": hp.qk_lr or hp.lr}] + ([{"params": rest, "lr": hp.lr}] if rest else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)

    def batches(generator):
        model.train()
        return loader(items, batch_size, shuffle=True, generator=generator, drop_last=True,
                      num_workers=params.extract.num_workers)

    trainable = model.fusion if bank is None else nn.ModuleList([model.fusion, bank.to(device)])  # the checkpoint

    heads = []  # (classifier, pseudo-labels of every unlabeled row) per k, frozen
    if "pseudo_labels" in dict(fusion_terms(hp)):
        for k in params.cluster.ks:
            state = load_torch(layout(params).classifier(k))
            head = CosineClassifier(state["weight"], state["temperature"]).requires_grad_(False).to(device)
            heads.append((head, torch.from_numpy(pseudo_labels_for(params, k, inputs.ids)).to(device)))
    step = partial(fusion_step, model, fusion_objective(hp, model.fusion, heads, bank), device,
                   images=getattr(inputs.dataset, "is_images", False), augment_scale=hp.augment_scale,
                   pairs=bank is None)

    # the images, their neighbour graph and the adaptor sets' weights: other data, another checkpoint
    ids = np.concatenate([np.frombuffer(b, np.uint8) for b in inputs.ids.buffers() if b is not None])
    # (an incremental run: also its rows and the champion's fusion it starts from)
    data = data_fingerprint(ids, neighbours, *([] if rows is None else [rows]),
                            modules=[*model.adaptors.values(), *([] if rows is None else [model.fusion])])
    key = checkpoint_key(params, hp.model_dump(), params.adaptor.model_dump(), params.cluster.ks,
                         None if rows is None else params.adapt.model_dump(), data)
    checkpoint = TorchCheckpoint(layout(params).checkpoint(f"fusion-{key}"))
    steps = epoch_steps(len(items), batch_size, hp.steps_per_epoch)
    history = fit(trainable, optimizer, epochs, steps, 0.0, batches, step, checkpoint, params.seed, desc="fusion")
    attention = mean_attention(model, inputs.dataset, params.evaluate.batch_size)
    model.cpu()
    meta = {"ks": params.cluster.ks, "attn_dim": hp.attn_dim, "attention_scale": hp.attention_scale,
            "attention": hp.attention, "value": hp.value, "preprocess": asdict(preprocess)}
    save_torch(layout(params).fusion, {"state_dict": model.fusion.state_dict(), "meta": meta})
    exported = servable.export(model, params, preprocess, layout(params).model)
    report = {
        "images": len(inputs),
        "trained_on": len(items),
        "history": history,
        "final": history[-1],
        # mean attention over granularities on the unlabeled pool, per adapted block
        "mean_attention_per_block": attention.tolist(),
        "ks": params.cluster.ks,
        "knn_graph": knn,
        "model_sha256": exported["weights_sha256"],
        "timings_s": {"knn_graph": t_knn, "total": time.perf_counter() - t0},
    }
    checkpoint.clear()
    return report
