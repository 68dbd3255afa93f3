"""Step 3 — ``grappa train-adaptor --k K``: one adaptor set trained on the k-means pseudo-labels.

Independent per k (the Airflow DAG maps it, ``dvc.yaml`` runs it as ``foreach``). The backbone is
frozen; bottleneck adaptors in blocks [adapt_from_block, end) and a cosine-softmax classifier
initialised from the k-means centroids are trained with cross-entropy on the pseudo-labels
(grappa.md section 4). Only the adaptor weights are published (``<out>/adaptors/k<K>/adaptor.pt``);
the classifier is discarded. A checkpoint after each epoch (``<out>/checkpoints/``, keyed by the
inputs) lets a killed run resume.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from grappa.io.artifacts import read_table, save_torch, write_json
from grappa.core.backbones import create_backbone
from grappa.core.ap_loss import build_ap_loss
from grappa.config import AdaptorParams, ConfigError, Params
from grappa.io.datasets import NeighbourPairs, collate_usable, load_inputs, loader
from grappa.core.losses import CosineClassifier
from grappa.core.model import GrappaModel, pick_device, single
from grappa.core.training import data_fingerprint, fit, run_key


def adaptor_path(params: Params, k: int) -> Path:
    return Path(params.out_dir) / "adaptors" / f"k{k}" / "adaptor.pt"


def classifier_path(params: Params, k: int) -> Path:
    return adaptor_path(params, k).with_name("classifier.pt")


def pseudo_labels_for(params: Params, k: int, image_ids: list[str]) -> np.ndarray:
    table = read_table(Path(params.out_dir) / "cluster" / f"k{k}.parquet")
    lookup = dict(zip(table.column("image_id").to_pylist(), table.column("pseudo_label").to_pylist()))
    missing = [i for i in image_ids if i not in lookup]
    if missing:
        raise ConfigError(f"cluster output for k={k} is stale ({len(missing)} images unassigned); rerun 'grappa cluster'")
    return np.array([lookup[i] for i in image_ids], dtype=np.int64)


def augment_feature_maps(x: torch.Tensor, min_scale: float) -> torch.Tensor:
    """Random horizontal flip and random resized crop of cached (B, C, H, W) prefix activations.

    Without images there are no pixel augmentations; jittering the cached maps stands in for them so
    the pseudo-label task is not solved trivially by the features the clusters came from.
    """
    b, _, h, w = x.shape
    flip = torch.rand(b) < 0.5  # drawn on the CPU generator: identical on every device
    scale = min_scale + (1 - min_scale) * torch.rand(b)
    side = scale.sqrt()
    cx, cy = (1 - side) * (2 * torch.rand(b) - 1), (1 - side) * (2 * torch.rand(b) - 1)
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = side, side, cx, cy
    grid = F.affine_grid(theta.to(x.device), (b, x.shape[1], h, w), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", align_corners=False)


class AdaptorObjective:
    """Cosine softmax on pseudo-labels (Grappa), a listwise AP loss (instance-retrieval note), or both."""

    def __init__(self, hp: AdaptorParams, classifier: CosineClassifier):
        self.use_ce = hp.objective.startswith("cosine_softmax")
        self.uses_ap = hp.objective != "cosine_softmax"
        self.classifier = classifier
        self.ap_weight = hp.ap_weight
        self.positives = hp.ap_positives
        if self.uses_ap:
            name = hp.objective.split("+")[-1]
            self.ap_loss = build_ap_loss(name, **({"num_bins": hp.ap_bins} if name == "histogram_ap" else {}))

    def __call__(self, emb: torch.Tensor, pseudo: torch.Tensor, instance_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        total = emb.new_zeros(())
        if self.use_ce:
            logits = self.classifier(emb)
            losses["cross_entropy"] = F.cross_entropy(logits, pseudo)
            losses["accuracy"] = (logits.argmax(1) == pseudo).float().mean()
            total = total + losses["cross_entropy"]
        if self.uses_ap:
            labels = instance_ids if self.positives == "augmentation" else pseudo
            losses["ap_loss"] = self.ap_loss(emb, labels)  # 1 - AP: falls as ranking improves
            total = total + (self.ap_weight if self.use_ce else 1.0) * losses["ap_loss"]
        losses["loss"] = total
        return losses


class ClusterBatchSampler:
    """Batches of P pseudo-classes x K images each, so every image has positives in its batch.

    Clusters with a single member carry no positive and are never drawn. One epoch has as many
    batches as plain shuffling would (N // batch_size).
    """

    def __init__(self, labels: np.ndarray, batch_size: int, per_cluster: int, generator: torch.Generator):
        self.members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self.members = [m for m in self.members if len(m) >= 2]
        if not self.members:
            raise ConfigError("adaptor.objective: AP needs clusters with at least two images; lower k")
        self.per_cluster = min(per_cluster, batch_size)
        self.clusters_per_batch = max(batch_size // self.per_cluster, 1)
        self.num_batches = max(len(labels) // batch_size, 1)
        self.generator = generator

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for _ in range(self.num_batches):
            picks = torch.randperm(len(self.members), generator=self.generator)[: self.clusters_per_batch]
            batch = []
            for c in picks.tolist():
                members = self.members[c]
                # sample without replacement when the cluster is big enough, else repeat members
                order = torch.randperm(len(members), generator=self.generator).numpy()
                batch += members[np.resize(order, self.per_cluster)].tolist()
            yield batch


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
    objective = AdaptorObjective(hp, classifier)
    two_views = objective.uses_ap and hp.ap_positives == "augmentation"
    if two_views and not inputs.dataset.is_images:
        raise ConfigError("adaptor.ap_positives: 'augmentation' needs image inputs; set backbone.adapt_from_block: 0")
    # Instance discrimination: the "neighbour" of every image is itself, under another augmentation.
    dataset = NeighbourPairs(inputs.dataset, np.arange(len(inputs.dataset))[:, None]) if two_views else inputs.dataset

    def batches(generator):
        model.train()
        if objective.uses_ap and not two_views:  # AP needs positives in the batch: P clusters x K images
            sampler = ClusterBatchSampler(targets.cpu().numpy(), batch_size, hp.images_per_cluster, generator)
            return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_usable,
                              num_workers=params.extract.num_workers if dataset.is_images else 0)
        return loader(dataset, batch_size, shuffle=True, generator=generator, drop_last=True,
                      num_workers=params.extract.num_workers)

    device = pick_device()
    model.to(device)
    classifier.to(device)
    targets = targets.to(device)

    def step(batch):
        rows, x, _ = batch
        rows, x = rows.to(device), x.to(device)
        if two_views:
            x, rows = torch.cat([x[:, 0], x[:, 1]]), torch.cat([rows, rows])
        if dataset.is_images:
            x = model.forward_prefix(x)
        elif hp.prefix_augment_scale < 1.0 and x.dim() == 4:
            x = augment_feature_maps(x, hp.prefix_augment_scale)
        emb, _ = model.forward_suffix(x, mode)
        return objective(emb, targets[rows], instance_ids=rows)

    key = run_key(params, hp.model_dump(), k, data_fingerprint(targets.cpu().numpy()))
    checkpoint = Path(params.out_dir) / "checkpoints" / f"adaptor_k{k}-{key}.pt"
    history = fit(trainable, optimizer, hp.epochs, len(inputs.dataset) // batch_size, hp.warmup_epochs,
                  batches, step, checkpoint, params.seed, desc=f"adaptor k={k}")
    meta = {"k": k, "start": model.start, "reduction": hp.reduction, "backbone": params.backbone.model_dump(),
            "block_dims": backbone.block_dims[model.start:]}
    model.cpu()
    save_torch(adaptor_path(params, k), {"state_dict": model.adaptors[mode].state_dict(), "meta": meta})
    # Kept beside the adaptors for the fusion step's pseudo-label objective; not part of the model.
    save_torch(classifier_path(params, k), {"weight": classifier.weight.detach().cpu(), "temperature": hp.temperature})
    report = {"k": k, "images": len(inputs.image_ids), "history": history, "final": history[-1]}
    write_json(adaptor_path(params, k).with_name("metrics.json"), report)
    checkpoint.unlink(missing_ok=True)  # the published adaptor supersedes it
    return report
