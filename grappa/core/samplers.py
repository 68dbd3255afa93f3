"""What goes into a training batch: P pseudo-classes x K images, or an image and one kNN neighbour."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from grappa.config import ConfigError


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


class NeighbourPairs(Dataset):
    """Item i = (i, stack[x_i, x_j]) with j drawn uniformly from i's kNN (torch RNG, seeded per epoch)."""

    def __init__(self, base: Dataset, neighbours: np.ndarray):
        self.base, self.neighbours = base, torch.from_numpy(neighbours)
        self.is_images = getattr(base, "is_images", False)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        j = int(self.neighbours[i, torch.randint(self.neighbours.shape[1], (1,))])
        _, xi, err_i = self.base[i]
        _, xj, err_j = self.base[j]
        if xi is None or xj is None:
            return i, None, err_i or err_j
        return i, torch.stack([xi, xj]), None
