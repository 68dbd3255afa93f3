"""The epoch loop shared by both training steps: AdamW + warm-up/cosine, checkpoint and resume.

Every epoch re-seeds torch from ``seed + epoch`` (data order and augmentations), and a checkpoint is
written atomically after each epoch, so a run killed mid-epoch and restarted resumes from the last
finished epoch and ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from grappa.io.artifacts import load_torch, save_torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    trainable: nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float,
    batches: Callable[[torch.Generator], Iterable],
    step: Callable[[object], dict[str, torch.Tensor]],
    checkpoint: Path,
    seed: int,
    desc: str,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``trainable`` (the parameters to checkpoint); ``step`` returns named losses incl. "loss"."""
    scheduler = warmup_cosine(optimizer, epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch))
    history: list[dict[str, float]] = []
    first_epoch = 0
    if checkpoint.exists():
        state = load_torch(checkpoint)
        trainable.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, first_epoch = state["history"], state["epoch"] + 1
        print(f"{desc}: resuming after epoch {first_epoch} from {checkpoint}")
    for epoch in range(first_epoch, epochs):
        torch.manual_seed(seed + epoch)
        generator = torch.Generator().manual_seed(seed + epoch)
        sums: dict[str, float] = {}
        count = 0
        t0 = time.perf_counter()
        bar = tqdm(batches(generator), total=steps_per_epoch, desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch")
        for batch in bar:
            losses = step(batch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            scheduler.step()
            count += 1
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            bar.set_postfix(loss=f"{sums['loss'] / count:.4f}", refresh=False)  # shown at the next tick
        summary = {name: total / max(count, 1) for name, total in sums.items()}
        summary.update(epoch=epoch + 1, seconds=time.perf_counter() - t0)
        history.append(summary)
        print(f"{desc} epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k}={v:.4f}" for k, v in summary.items()
                                                               if k not in ("epoch",)))
        save_torch(checkpoint, {"trainable": trainable.state_dict(), "optimizer": optimizer.state_dict(),
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


def run_key(params, *parts: object) -> str:
    """Identifies a training run's inputs, so a checkpoint is only resumed by the same run."""
    blob = json.dumps([params.seed, params.backbone.model_dump(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
