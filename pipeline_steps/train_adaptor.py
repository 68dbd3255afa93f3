"""Step 4 — ``grappa train-adaptor --k K``: one adaptor set trained on the k-means pseudo-labels.

Independent per k (the Airflow DAG maps it, ``dvc.yaml`` runs it as ``foreach``). The backbone is
frozen; bottleneck adaptors in blocks [adapt_from_block, end) and a cosine-softmax classifier
initialised from the k-means centroids are trained with cross-entropy on the pseudo-labels
(grappa.md section 4). The adaptor weights are published (``<out>/adaptors/k<K>/adaptor.pt``), the
classifier beside them for the fusion's pseudo-label objective (never part of the model). A
checkpoint after each epoch (``<out>/checkpoints/``, keyed by the inputs) lets a killed run resume.

Incremental run (``cluster/mode.json``): the adaptor set and the classifier (its rows follow the
centroids, whose ids persist) start from the champion's and train ``adapt.adaptor_epochs`` epochs on
the new images and a seeded replay sample of at most ``adapt.replay`` old ones, without warm-up.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from grappa.config import AdaptorParams, ConfigError, Params
from grappa.core.backbones import create_backbone
from grappa.core.losses import CosineClassifier
from grappa.core.model import pick_device, single
from grappa.core.objectives import adaptor_objective
from grappa.core.samplers import ClusterBatchSampler, NeighbourPairs, Subset
from grappa.core.training import adaptor_step, checkpoint_key, data_fingerprint, epoch_steps, fit
from grappa.io import champion as champions
from grappa.io.artifacts import TorchCheckpoint, load_torch, save_torch
from grappa.io.assemble import build_model
from grappa.io.datasets import collate_usable, load_inputs, loader
from grappa.io.layout import layout
from grappa.io.pseudo_labels import pseudo_labels_for


def epoch_batches(dataset, targets: np.ndarray, batch_size: int, hp: AdaptorParams, clustered: bool,
                  generator: torch.Generator, num_workers: int = 0) -> DataLoader:
    """One epoch of adaptor batches: P clusters x ``hp.images_per_cluster`` images when ``clustered``
    (a listwise term needs every anchor's positives in its batch), else shuffled full batches."""
    if clustered:
        sampler = ClusterBatchSampler(targets, batch_size, hp.images_per_cluster, generator)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_usable,
                          num_workers=num_workers if dataset.is_images else 0)
    return loader(dataset, batch_size, shuffle=True, generator=generator, drop_last=True, num_workers=num_workers)


def run(params: Params, k: int) -> dict:
    if k not in params.cluster.ks:
        raise ConfigError(f"--k {k} is not in cluster.ks {params.cluster.ks}")
    t0 = time.perf_counter()
    torch.manual_seed(params.seed)
    hp = params.adaptor
    backbone, preprocess, _ = create_backbone(params.backbone)
    inputs = load_inputs(layout(params), "unlabeled", preprocess, train=True,
                         min_side=params.data.min_side, max_pixels=params.data.max_pixels,
                         budget_mb=params.memory_budget_mb)
    pseudo = pseudo_labels_for(params, k, inputs.ids)
    centroids = torch.from_numpy(np.load(layout(params).centroids(k)))

    model = build_model(params, backbone, [k])
    classifier = CosineClassifier(centroids, hp.temperature)
    rows = champions.training_rows(params, inputs.ids)  # None: the whole pool, from scratch
    if rows is not None:
        bundle = champions.bundle(params)
        model.adaptor_set(k).load_state_dict(load_torch(bundle.adaptor(k))["state_dict"])
        classifier.weight.data.copy_(load_torch(bundle.classifier(k))["weight"])
        print(f"adaptor k={k}: from the champion's, on {len(rows)} of {len(inputs)} images (new + replay)")
    trainable = nn.ModuleDict({"adaptors": model.adaptors, "classifier": classifier})
    optimizer = torch.optim.AdamW(
        [{"params": model.adaptors.parameters(), "lr": hp.lr},
         {"params": classifier.parameters(), "lr": hp.classifier_lr}],
        weight_decay=hp.weight_decay,
    )
    mode = single(k)
    batch_size = min(hp.batch_size, len(inputs.dataset))
    device = pick_device()
    model.to(device)
    classifier.to(device)
    objective = adaptor_objective(hp, classifier, torch.from_numpy(pseudo).to(device))
    two_views = objective.ranks_batch and hp.ap_positives == "augmentation"
    if two_views and not inputs.dataset.is_images:
        raise ConfigError("adaptor.ap_positives: 'augmentation' needs image inputs; set backbone.adapt_from_block: 0")
    # Instance discrimination: the "neighbour" of every image is itself, under another augmentation.
    dataset = NeighbourPairs(inputs.dataset, np.arange(len(inputs.dataset))[:, None]) if two_views else inputs.dataset
    targets, epochs, warmup = pseudo, hp.epochs, hp.warmup_epochs
    if rows is not None:  # items keep their pool row: the pseudo-labels index them as before
        dataset, targets = Subset(dataset, rows), pseudo[rows]
        epochs, warmup = params.adapt.adaptor_epochs, 0.0
        batch_size = min(batch_size, len(dataset))

    def batches(generator):
        model.train()  # AP over pseudo-label positives: P clusters x K images per batch
        return epoch_batches(dataset, targets, batch_size, hp, objective.ranks_batch and not two_views,
                             generator, params.extract.num_workers)

    step = partial(adaptor_step, model, objective, mode, device, images=dataset.is_images, two_views=two_views,
                   augment_scale=hp.prefix_augment_scale)
    # an incremental run: its rows and the champion's weights it starts from are part of its inputs
    data = data_fingerprint(pseudo) if rows is None else data_fingerprint(pseudo, rows, modules=[trainable])
    key = checkpoint_key(params, hp.model_dump(), params.adapt.model_dump() if rows is not None else None, k, data)
    checkpoint = TorchCheckpoint(layout(params).checkpoint(f"adaptor_k{k}-{key}"))
    steps = epoch_steps(len(dataset), batch_size, hp.steps_per_epoch)
    history = fit(trainable, optimizer, epochs, steps, warmup, batches, step, checkpoint, params.seed,
                  desc=f"adaptor k={k}")
    # how to feed images travels with the weights (as timm's pretrained_cfg does)
    meta = {"k": k, "start": model.start, "reduction": hp.reduction, "backbone": params.backbone.model_dump(),
            "block_dims": backbone.block_dims[model.start:], "preprocess": asdict(preprocess)}
    model.cpu()
    save_torch(layout(params).adaptor(k), {"state_dict": model.adaptor_set(k).state_dict(), "meta": meta})
    # Kept beside the adaptors for the fusion step's pseudo-label objective; not part of the model.
    save_torch(layout(params).classifier(k), {"weight": classifier.weight.detach().cpu(), "temperature": hp.temperature})
    report = {"k": k, "images": len(inputs), "trained_on": len(dataset), "history": history, "final": history[-1],
              "timings_s": {"total": time.perf_counter() - t0}}
    checkpoint.clear()  # the published adaptor supersedes it
    return report
