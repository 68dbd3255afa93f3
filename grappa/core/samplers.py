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
        order = np.argsort(labels, kind="stable")  # each cluster's members in ascending order
        _, starts = np.unique(labels[order], return_index=True)
        self.members = [m for m in np.split(order, starts[1:]) if len(m) >= 2]
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


def read_items(base: Dataset, rows: list[int]) -> list:
    """Items ``rows`` of ``base`` in one read when it reads batches (the feature store's prefix rows)."""
    fetch = getattr(base, "__getitems__", None)
    return fetch(rows) if fetch is not None else [base[r] for r in rows]


class BatchReads(Dataset):
    """A view of ``base`` that reads a whole batch at once (``__getitems__``); one item is a batch of one."""

    def __init__(self, base: Dataset):
        self.base = base
        self.is_images = getattr(base, "is_images", False)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]


class Subset(BatchReads):
    """Items ``positions`` of ``base``, each still named by its row in ``base``, so what is indexed by
    row (pseudo-labels, the attention bank) indexes them as before; a batch is one read of the base."""

    def __init__(self, base: Dataset, positions: np.ndarray):
        super().__init__(base)
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitems__(self, items: list[int]) -> list:
        return read_items(self.base, [int(self.positions[i]) for i in items])


class NeighbourPairs(BatchReads):
    """Item i = (i, stack[x_i, x_j]) with j drawn uniformly from i's kNN (torch RNG, seeded per epoch)."""

    def __init__(self, base: Dataset, neighbours: np.ndarray):
        super().__init__(base)
        self.neighbours = torch.from_numpy(neighbours)

    def __len__(self) -> int:
        return len(self.base)

    def __getitems__(self, items: list[int]) -> list:
        """A batch: the anchors and their drawn neighbours in one read of the base (when it reads
        batches, like the feature store's prefix rows)."""
        picks = [int(self.neighbours[i, torch.randint(self.neighbours.shape[1], (1,))]) for i in items]
        got = read_items(self.base, list(items) + picks)
        out = []
        for n, i in enumerate(items):
            (_, xi, err_i), (_, xj, err_j) = got[n], got[len(items) + n]
            out.append((i, None, err_i or err_j) if xi is None or xj is None else (i, torch.stack([xi, xj]), None))
        return out
