"""Model inputs for the steps after extraction: decoded images or cached prefix activations.

With ``backbone.adapt_from_block > 0`` the frozen prefix's activations were computed once by
``extract`` (the parts' ``prefix.npy``, listed by ``prefix.json``); every later step then runs only
the adapted suffix, reading a batch of rows at a time from the store. With 0 (the paper's all-block
placement) the steps read and transform the images themselves.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from functools import cached_property

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from grappa.core.augment import image_transform
from grappa.core.backbones import Preprocess
from grappa.core.model import FUSION
from grappa.io.features import open_prefix, read_columns, split_rows, take_vectors
from grappa.io.layout import Layout
from grappa.io.sources import ImageDecodeError, SourceError, content_hash, decode_image
from grappa.io.storage import StorageError, read_bytes



class ImageDataset(Dataset):
    """Items are (row, tensor) or (row, None, reason) for an image that cannot be used. With
    ``hashes`` (the snapshot's content hash of each uri), the bytes read must hash to it: a file
    rewritten since the snapshot is unusable here, so its features never land under another hash."""

    is_images = True

    def __init__(self, uris: list[str], transform, min_side: int, max_pixels: int, hashes: list[str] | None = None,
                 max_bytes: int | None = None):
        self.uris, self.transform, self.hashes = uris, transform, hashes
        self.min_side, self.max_pixels, self.max_bytes = min_side, max_pixels, max_bytes

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int):
        try:
            data = read_bytes(self.uris[i], self.max_bytes)
            if self.hashes is not None and content_hash(data) != self.hashes[i]:
                return i, None, "changed since the snapshot (its bytes no longer have the snapshot's hash)"
            image = decode_image(data, self.min_side, self.max_pixels)
        except (ImageDecodeError, StorageError) as err:
            return i, None, str(err)
        return i, self.transform(image), None


class PrefixDataset(Dataset):
    """Rows of the cached (N, ...) float16 prefix activations (an array or the store's
    :class:`~grappa.io.features.RowSet`), as float32 tensors; a batch is one read (``__getitems__``)."""

    is_images = False

    def __init__(self, prefix, rows: np.ndarray | None = None):
        self.prefix = prefix
        self.rows = np.arange(len(prefix)) if rows is None else np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, items: list[int]) -> list:
        rows = self.rows[np.asarray(items, dtype=np.int64)]
        block = self.prefix[rows] if isinstance(self.prefix, np.ndarray) else self.prefix.take(rows)
        block = torch.from_numpy(np.asarray(block, dtype=np.float32))
        return [(i, x, None) for i, x in zip(items, block)]


def collate_usable(batch):
    """Drop unusable items; returns (rows, stacked inputs or None, [(row, reason), ...])."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, reason) for i, x, reason in batch if x is None]
    if not good:
        return torch.empty(0, dtype=torch.long), None, bad
    rows, xs = zip(*good)
    return torch.tensor(rows), torch.stack(xs), bad


class StepInputs:
    """The extracted rows of one split and a dataset aligned with them. Columns are read from the
    store when first used, so a training step over a million images holds its ids (an Arrow
    array) and streams the rest: ``zero_shot`` is the one (N, D) array, read only when asked."""

    def __init__(self, out: Layout, rows: np.ndarray, dataset: Dataset, budget_mb: int):
        self.out, self.rows, self.dataset, self.budget_mb = out, rows, dataset, budget_mb

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> pa.Array:
        return read_columns(self.out, [name], self.rows).column(name).combine_chunks()

    @cached_property
    def ids(self) -> pa.Array:
        return self.column("image_id")

    @cached_property
    def image_ids(self) -> list[str]:
        return self.ids.to_pylist()

    @cached_property
    def domains(self) -> np.ndarray:
        return np.array(self.column("domain").to_pylist())

    @cached_property
    def labels(self) -> np.ndarray:  # None entries for the unlabeled split
        return np.array(self.column("label").to_pylist(), dtype=object)

    @cached_property
    def uris(self) -> list[str]:
        return self.column("uri").to_pylist()

    @cached_property
    def zero_shot(self) -> np.ndarray:  # (N, D) L2-normalised backbone features
        return take_vectors(self.out, self.rows, self.budget_mb)


def load_inputs(out: Layout, split: str, preprocess: Preprocess, train: bool,
                min_side: int = 1, max_pixels: int = 1 << 40, budget_mb: int = 1024) -> StepInputs:
    rows = split_rows(out, split)
    prefix = open_prefix(out, expected_rows=read_columns(out, ["split"]).num_rows)
    if prefix is not None:
        dataset: Dataset = PrefixDataset(prefix, rows)
    else:
        uris = read_columns(out, ["uri"], rows).column("uri").to_pylist()
        dataset = ImageDataset(uris, image_transform(preprocess, train), min_side, max_pixels)
    return StepInputs(out, rows, dataset, budget_mb)


def loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0,
           generator: torch.Generator | None = None, drop_last: bool = False) -> DataLoader:
    # Cached activations are in memory already: worker processes would only add pickling cost.
    workers = num_workers if getattr(dataset, "is_images", False) else 0
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      collate_fn=collate_usable, generator=generator, drop_last=drop_last,
                      persistent_workers=False)


def prefetched(items: Iterable, depth: int = 2) -> Iterator:
    """``items`` produced by a thread ``depth`` ahead of the caller: a loader without worker processes
    decodes the next batches while the caller's forward runs (PIL and numpy release the GIL). An
    error in the thread is raised here; a caller that stops early stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as err:  # noqa: BLE001 -- handed to the caller, who raises it
            put((end, err))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, err = ready.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


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



def _attention_batches(model, dataset: Dataset, batch_size: int):
    """(rows, (B, L, M) fusion attention) batch by batch over the usable items of ``dataset``."""
    model.eval()
    device = next(model.parameters()).device
    for rows, x, _ in tqdm(loader(dataset, batch_size), desc="attention", unit="batch", leave=False):
        if x is None:
            continue
        x = x.to(device)
        _, alpha = model.forward_suffix(model.forward_prefix(x) if getattr(dataset, "is_images", False) else x, FUSION)
        yield rows, alpha.cpu()


@torch.inference_mode()
def attention_of(model, dataset: Dataset, batch_size: int, into: torch.Tensor) -> torch.Tensor:
    """Every usable item's fusion attention written into its row of ``into`` (N, L, M)."""
    for rows, alpha in _attention_batches(model, dataset, batch_size):
        into[torch.as_tensor(rows)] = alpha.to(into.dtype)
    return into


@torch.inference_mode()
def mean_attention(model, dataset: Dataset, batch_size: int) -> np.ndarray:
    """(L, M) mean fusion attention over ``dataset``, summed batch by batch (nothing per image kept)."""
    total, count = None, 0
    for _, alpha in _attention_batches(model, dataset, batch_size):
        total = alpha.sum(0) if total is None else total + alpha.sum(0)
        count += len(alpha)
    return (total / max(count, 1)).double().numpy()
