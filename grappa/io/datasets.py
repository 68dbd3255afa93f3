"""Model inputs for the steps after extraction: decoded images or cached prefix activations.

With ``backbone.adapt_from_block > 0`` the frozen prefix's activations were computed once by
``extract`` (``prefix.npy``); every later step then runs only the adapted suffix. With 0 (the paper's
all-block placement) the steps read and transform the images themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from grappa.config import ConfigError
from grappa.core.augment import image_transform
from grappa.core.backbones import Preprocess
from grappa.io.artifacts import arrow_to_vectors, read_table
from grappa.io.layout import Layout
from grappa.io.sources import ImageDecodeError, SourceError, decode_image
from grappa.io.storage import StorageError, read_bytes



class ImageDataset(Dataset):
    """Items are (row, tensor) or (row, None, reason) for an image that cannot be used."""

    is_images = True

    def __init__(self, uris: list[str], transform, min_side: int, max_pixels: int):
        self.uris, self.transform = uris, transform
        self.min_side, self.max_pixels = min_side, max_pixels

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int):
        try:
            image = decode_image(read_bytes(self.uris[i]), self.min_side, self.max_pixels)
        except (ImageDecodeError, StorageError) as err:
            return i, None, str(err)
        return i, self.transform(image), None


class PrefixDataset(Dataset):
    """Rows of the cached (N, ...) float16 prefix activations, as float32 tensors."""

    is_images = False

    def __init__(self, prefix: np.ndarray, rows: np.ndarray | None = None):
        self.prefix = prefix
        self.rows = np.arange(len(prefix)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return i, torch.from_numpy(np.asarray(self.prefix[self.rows[i]], dtype=np.float32)), None


def collate_usable(batch):
    """Drop unusable items; returns (rows, stacked inputs or None, [(row, reason), ...])."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, reason) for i, x, reason in batch if x is None]
    if not good:
        return torch.empty(0, dtype=torch.long), None, bad
    rows, xs = zip(*good)
    return torch.tensor(rows), torch.stack(xs), bad


@dataclass
class StepInputs:
    """The extracted rows of one split and a dataset aligned with them."""

    image_ids: list[str]
    domains: np.ndarray
    labels: np.ndarray  # None entries for the unlabeled split
    uris: list[str]
    zero_shot: np.ndarray  # (N, D) L2-normalised backbone features
    dataset: Dataset



def load_inputs(out: Layout, split: str, preprocess: Preprocess, train: bool,
                min_side: int = 1, max_pixels: int = 1 << 40) -> StepInputs:
    table = read_table(out.features)
    split_mask = np.array(table.column("split").to_pylist()) == split
    rows = np.flatnonzero(split_mask)
    sub = table.take(rows)
    uris = sub.column("uri").to_pylist()
    prefix_path = out.prefix
    if prefix_path.exists():
        prefix = np.load(prefix_path, mmap_mode="r")
        if prefix.shape[0] != table.num_rows:  # never train on activations of other images
            raise ConfigError(f"{prefix_path} has {prefix.shape[0]} rows but features.parquet has "
                              f"{table.num_rows}; rerun 'grappa extract'")
        dataset: Dataset = PrefixDataset(prefix, rows)
    else:
        dataset = ImageDataset(uris, image_transform(preprocess, train), min_side, max_pixels)
    return StepInputs(
        image_ids=sub.column("image_id").to_pylist(),
        domains=np.array(sub.column("domain").to_pylist()),
        labels=np.array(sub.column("label").to_pylist(), dtype=object),
        uris=uris,
        zero_shot=arrow_to_vectors(sub.column("vector")),
        dataset=dataset,
    )


def loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0,
           generator: torch.Generator | None = None, drop_last: bool = False) -> DataLoader:
    # Cached activations are in memory already: worker processes would only add pickling cost.
    workers = num_workers if getattr(dataset, "is_images", False) else 0
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      collate_fn=collate_usable, generator=generator, drop_last=drop_last,
                      persistent_workers=False)


@torch.inference_mode()
def encode(model, dataset: Dataset, mode: str, batch_size: int, num_workers: int = 0,
           desc: str | None = None, unreadable: list | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Embeddings (N, D) of every item under ``mode``, plus (N, L, M) attentions in fusion mode.

    An item that cannot be read is an error, unless ``unreadable`` is a list: then (row, reason) is
    appended to it and the row's embedding is left at zero.
    """
    model.eval()
    device = next(model.parameters()).device
    embeddings, alphas = [None] * len(dataset), [None] * len(dataset)
    for rows, x, bad in tqdm(loader(dataset, batch_size, num_workers=num_workers), desc=desc or mode,
                             unit="batch", leave=False):
        if bad and unreadable is None:  # every input was readable when it was listed: a file vanished or broke since
            raise SourceError(f"{len(bad)} images could not be read (e.g. {bad[0][1]}); rerun 'grappa extract'")
        if bad:
            unreadable.extend(bad)
        if x is None:
            continue
        x = x.to(device)
        if getattr(dataset, "is_images", False):
            x = model.forward_prefix(x)
        emb, alpha = model.forward_suffix(x, mode)
        emb, alpha = emb.cpu(), (alpha.cpu() if alpha is not None else None)
        for j, r in enumerate(rows.tolist()):
            embeddings[r] = emb[j].numpy()
            if alpha is not None:
                alphas[r] = alpha[j].numpy()
    if not embeddings:
        return np.zeros((0, model.backbone.embed_dim), np.float32), None
    if unreadable:
        empty = np.zeros(model.backbone.embed_dim, np.float32)
        embeddings, alphas = [empty if e is None else e for e in embeddings], [None]
    emb_arr = np.stack(embeddings).astype(np.float32)
    return emb_arr, (np.stack(alphas) if alphas[0] is not None else None)


