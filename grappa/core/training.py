"""The epoch loop shared by both training steps: AdamW + warm-up/cosine, checkpoint and resume.

Every epoch re-seeds torch from ``seed + epoch`` (data order and augmentations), and a checkpoint is
written atomically after each epoch, so a run killed mid-epoch and restarted resumes from the last
finished epoch and ends with the same weights as an uninterrupted run.

The batch steps of both stages are module functions too (:func:`adaptor_step`, :func:`fusion_step`:
a batch through the model into its :class:`~grappa.core.objectives.Objective`), bound to a run with
``functools.partial`` by the pipeline steps and by ``benchmarks/speed.py``, which times them.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from grappa.core.augment import augment_feature_maps
from grappa.core.model import FUSION, GrappaModel
from grappa.core.objectives import EmbeddedBatch, Objective

Losses = dict[str, torch.Tensor]


class Checkpoint(Protocol):
    """Where ``fit`` keeps its state between epochs (the steps hand it a file: grappa.io.artifacts)."""

    def load(self) -> dict | None: ...  # None: nothing saved yet

    def save(self, state: dict) -> None: ...  # atomically: a kill mid-save leaves the previous state


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adaptor_step(model: GrappaModel, objective: Objective, mode: str, device, batch, *, images: bool,
                 two_views: bool = False, augment_scale: float = 1.0) -> Losses:
    """Stage 1: a batch ``(rows, inputs, _)`` through adaptor set ``mode`` -> the objective's losses.

    ``images``: the inputs are images, run through the frozen prefix; else cached prefix activations,
    jittered by :func:`augment_feature_maps` when ``augment_scale`` < 1. ``two_views``: the inputs
    are (B, 2, ...) augmentations of one image each, both views anchors with the row as instance id.
    """
    rows, x, _ = batch
    rows, x = rows.to(device), x.to(device)
    if two_views:
        x, rows = torch.cat([x[:, 0], x[:, 1]]), torch.cat([rows, rows])
    if images:
        x = model.forward_prefix(x)
    elif augment_scale < 1.0 and x.dim() == 4:
        x = augment_feature_maps(x, augment_scale)
    emb, _ = model.forward_suffix(x, mode)
    return objective(EmbeddedBatch(emb, rows))


def fusion_step(model: GrappaModel, objective: Objective, device, batch, *, images: bool,
                augment_scale: float = 1.0, pairs: bool = True) -> Losses:
    """Stage 2: a batch ``(rows, inputs, _)`` through the fusion -> losses (cached maps jittered as in
    :func:`adaptor_step` when ``augment_scale`` < 1). ``pairs``: the inputs are (B, 2, ...) anchors and
    their neighbours (propagation over pairs), else (B, ...) anchors alone (the attention bank)."""
    rows, x, _ = batch
    x = x.to(device)
    if pairs:
        x = torch.cat([x[:, 0], x[:, 1]])  # the B anchors, then their B neighbours
    if images:
        x = model.forward_prefix(x)
    elif augment_scale < 1.0 and x.dim() == 4:
        x = augment_feature_maps(x, augment_scale)
    emb, alpha = model.forward_suffix(x, FUSION)
    return objective(EmbeddedBatch(emb, rows.to(device), alpha))


def train_on_batch(step: Callable[[object], Losses], batch, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler) -> Losses:
    """One optimisation step: ``step``'s named losses, backward of "loss", optimizer and schedule."""
    losses = step(batch)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    scheduler.step()
    return losses


def epoch_steps(items: int, batch_size: int, cap: int | None) -> int:
    """Batches per epoch: every full batch of ``items``, at most ``cap`` (``steps_per_epoch``)."""
    full = items // batch_size
    return full if cap is None else min(full, cap)


def fit(
    trainable: nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float,
    batches: Callable[[torch.Generator], Iterable],
    step: Callable[[object], Losses],
    checkpoint: Checkpoint,
    seed: int,
    desc: str,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``trainable`` (the parameters to checkpoint); ``step`` returns named losses incl. "loss"."""
    scheduler = warmup_cosine(optimizer, epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch))
    history: list[dict[str, float]] = []
    first_epoch = 0
    state = checkpoint.load()
    if state is not None:
        trainable.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, first_epoch = state["history"], state["epoch"] + 1
        print(f"{desc}: resuming after epoch {first_epoch} from {checkpoint}")
    for epoch in range(first_epoch, epochs):
        torch.manual_seed(seed + epoch)
        random.seed(seed + epoch)  # timm's image augmentations draw from Python's RNG in this process
        generator = torch.Generator().manual_seed(seed + epoch)
        sums: dict[str, float] = {}
        count = 0
        t0 = time.perf_counter()
        bar = tqdm(itertools.islice(batches(generator), steps_per_epoch), total=steps_per_epoch, desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch")
        for batch in bar:
            losses = train_on_batch(step, batch, optimizer, scheduler)
            count += 1
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            bar.set_postfix(loss=f"{sums['loss'] / count:.4f}", refresh=False)  # shown at the next tick
        summary = {name: total / max(count, 1) for name, total in sums.items()}
        summary.update(epoch=epoch + 1, batches=count, seconds=time.perf_counter() - t0)
        history.append(summary)
        print(f"{desc} epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k}={v:.4f}" for k, v in summary.items()
                                                               if k not in ("epoch", "batches")))
        checkpoint.save({"trainable": trainable.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "history": history, "epoch": epoch})
        if on_epoch_end:
            on_epoch_end(epoch, summary)
    return history


def data_fingerprint(*arrays, modules=()) -> str:
    """Digest of what a run learns from (arrays: ids, labels, neighbour graphs; modules: frozen
    weights it builds on), so a checkpoint from other data is never resumed."""
    digest = hashlib.md5()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def checkpoint_key(params, *parts: object) -> str:
    """Identifies a training run's inputs, so a checkpoint is only resumed by the same run."""
    blob = json.dumps([params.seed, params.backbone.model_dump(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
