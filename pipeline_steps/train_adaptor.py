"""Step 3 — ``grappa train-adaptor --k K``: one adaptor set trained on the k-means pseudo-labels.

Independent per k (the Airflow DAG maps it, ``dvc.yaml`` runs it as ``foreach``). The backbone is
frozen; bottleneck adaptors in blocks [adapt_from_block, end) and a cosine-softmax classifier
initialised from the k-means centroids are trained with cross-entropy on the pseudo-labels
(grappa.md section 4). Only the adaptor weights are published (``<out>/adaptors/k<K>/adaptor.pt``);
the classifier is discarded. A checkpoint after each epoch (``<out>/checkpoints/``, keyed by the
inputs) lets a killed run resume.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import read_table, save_torch, write_json
from .backbones import create_backbone
from .config import ConfigError, Params
from .inputs import load_inputs, loader
from .losses import CosineClassifier
from .model import GrappaModel, single
from .training import fit


def adaptor_path(params: Params, k: int) -> Path:
    return Path(params.out_dir) / "adaptors" / f"k{k}" / "adaptor.pt"


def run_key(params: Params, *parts: object) -> str:
    """Identifies a training run's inputs, so a checkpoint is only resumed by the same run."""
    blob = json.dumps([params.seed, params.backbone.model_dump(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pseudo_labels_for(params: Params, k: int, image_ids: list[str]) -> np.ndarray:
    table = read_table(Path(params.out_dir) / "cluster" / f"k{k}.parquet")
    lookup = dict(zip(table.column("image_id").to_pylist(), table.column("pseudo_label").to_pylist()))
    missing = [i for i in image_ids if i not in lookup]
    if missing:
        raise ConfigError(f"cluster output for k={k} is stale ({len(missing)} images unassigned); rerun 'grappa cluster'")
    return np.array([lookup[i] for i in image_ids], dtype=np.int64)


def run(params: Params, k: int) -> dict:
    if k not in params.cluster.ks:
        raise ConfigError(f"--k {k} is not in cluster.ks {params.cluster.ks}")
    torch.manual_seed(params.seed)
    hp = params.adaptor
    backbone, preprocess, _ = create_backbone(params.backbone)
    inputs = load_inputs(Path(params.out_dir) / "extract", "unlabeled", preprocess, train=True,
                         min_side=params.data.min_side, max_pixels=params.data.max_pixels)
    targets = torch.from_numpy(pseudo_labels_for(params, k, inputs.image_ids))
    centroids = torch.from_numpy(np.load(Path(params.out_dir) / "cluster" / f"centroids_k{k}.npy"))

    model = GrappaModel(backbone, params.backbone.adapt_from_block, [k], hp.reduction)
    classifier = CosineClassifier(centroids, hp.temperature)
    trainable = nn.ModuleDict({"adaptors": model.adaptors, "classifier": classifier})
    optimizer = torch.optim.AdamW(
        [{"params": model.adaptors.parameters(), "lr": hp.lr},
         {"params": classifier.parameters(), "lr": hp.classifier_lr}],
        weight_decay=hp.weight_decay,
    )
    mode = single(k)
    batch_size = min(hp.batch_size, len(inputs.dataset))

    def batches(generator):
        return loader(inputs.dataset, batch_size, shuffle=True, generator=generator, drop_last=True,
                      num_workers=params.extract.num_workers)

    def step(batch):
        rows, x, _ = batch
        if inputs.dataset.is_images:
            x = model.forward_prefix(x)
        model.train()
        emb, _ = model.forward_suffix(x, mode)
        logits = classifier(emb)
        y = targets[rows]
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "accuracy": (logits.argmax(1) == y).float().mean()}

    key = run_key(params, hp.model_dump(), k, hashlib.md5(targets.numpy().tobytes()).hexdigest())
    checkpoint = Path(params.out_dir) / "checkpoints" / f"adaptor_k{k}-{key}.pt"
    history = fit(trainable, optimizer, hp.epochs, len(inputs.dataset) // batch_size, hp.warmup_epochs,
                  batches, step, checkpoint, params.seed, desc=f"adaptor k={k}")
    meta = {"k": k, "start": model.start, "reduction": hp.reduction, "backbone": params.backbone.model_dump(),
            "block_dims": backbone.block_dims[model.start:]}
    save_torch(adaptor_path(params, k), {"state_dict": model.adaptors[mode].state_dict(), "meta": meta})
    report = {"k": k, "images": len(inputs.image_ids), "history": history, "final": history[-1]}
    write_json(adaptor_path(params, k).with_name("metrics.json"), report)
    checkpoint.unlink(missing_ok=True)  # the published adaptor supersedes it
    return report
