"""The registered MLflow model (models-from-code: MLflow runs this file, nothing is pickled).

Input: a table with one image per row, as bytes in column ``image`` (base64 in JSON requests).
Output: the fused model's L2-normalised embeddings, one row per image. Weights, architecture and
preprocessing come from the ``model`` artifact (see grappa/io/servable.py); the code travels in the
model's ``code/`` folder, so loading needs no checkout of this repository.

A client may name a file instead (column ``path``) only where the server allows it: the server's
environment lists the allowed roots in ``GRAPPA_SERVE_PATH_ROOTS`` (comma-separated local folders
and ``s3://bucket/prefix/``); a path that resolves outside them (symlinks and ``..`` followed) or a
file above ``GRAPPA_SERVE_MAX_BYTES`` (default 32 MB) is refused. Unset, the server reads no path.
"""
from __future__ import annotations

import os
import stat

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

IMAGE, PATH = "image", "path"
ROOTS_ENV, MAX_BYTES_ENV = "GRAPPA_SERVE_PATH_ROOTS", "GRAPPA_SERVE_MAX_BYTES"
DEFAULT_MAX_BYTES = 32 << 20


def path_policy(environ=os.environ) -> tuple[list[str], int]:
    """(allowed roots, byte cap) from the server's environment; an s3:// root must name its bucket."""
    roots = [r.strip() for r in environ.get(ROOTS_ENV, "").split(",") if r.strip()]
    for root in roots:
        if root.startswith("s3://") and not root[len("s3://"):].split("/")[0]:
            raise ValueError(f"{ROOTS_ENV}: {root!r} names no bucket")
    return roots, int(environ.get(MAX_BYTES_ENV) or DEFAULT_MAX_BYTES)


def _inside(path: str, roots: list[str]) -> bool:
    if path.startswith("s3://"):
        return ".." not in path.split("/") and any(
            r.startswith("s3://") and path.startswith(r.rstrip("/") + "/") for r in roots)
    real = os.path.realpath(path)
    return any(real == base or real.startswith(base.rstrip(os.sep) + os.sep)
               for base in (os.path.realpath(r) for r in roots if not r.startswith("s3://")))


def read_allowed(path: str, roots: list[str], max_bytes: int) -> bytes:
    """The bytes of a client-named file inside ``roots``, at most ``max_bytes``; ValueError otherwise.
    A local file is resolved once, opened once and must be a regular file (not a FIFO or a device),
    and no more than ``max_bytes`` + 1 bytes are ever read from it."""
    from grappa.io.storage import StorageError, read_bytes, stat_many

    if not roots:
        raise ValueError(f"this server reads no paths: send the image bytes in '{IMAGE}' "
                         f"(or set {ROOTS_ENV} on the server)")
    if not _inside(path, roots):
        raise ValueError(f"{path!r} is outside the folders this server may read ({ROOTS_ENV})")
    too_big = f"{path!r} is above the server's cap of {max_bytes} bytes ({MAX_BYTES_ENV})"
    try:
        if path.startswith("s3://"):
            if stat_many([path])[path].size > max_bytes:
                raise ValueError(too_big)
            return read_bytes(path)
        fd = os.open(os.path.realpath(path), os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"{path!r} is not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(max_bytes + 1)
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            raise ValueError(too_big)
        return data
    except (OSError, KeyError, StorageError) as err:
        raise ValueError(f"cannot read {path!r}: {getattr(err, 'strerror', None) or err}") from None


def images_of(model_input, environ=os.environ) -> list[bytes]:
    """The image bytes of each row of a DataFrame (or a plain list of bytes)."""
    roots, max_bytes = path_policy(environ)
    rows = (model_input.to_dict("records") if isinstance(model_input, pd.DataFrame)
            else [{IMAGE: item} if isinstance(item, (bytes, bytearray)) else {PATH: item} for item in model_input])
    items = []
    for i, row in enumerate(rows):
        image, path = row.get(IMAGE), row.get(PATH)
        if isinstance(image, (bytes, bytearray)):
            items.append(bytes(image))
        elif isinstance(path, str) and path:
            try:
                items.append(read_allowed(path, roots, max_bytes))
            except ValueError as err:
                raise ValueError(f"row {i}: {err}") from None
        else:
            raise ValueError(f"row {i}: give the image as bytes in '{IMAGE}' or as a path/URI in '{PATH}'")
    return items


class GrappaEmbedder(PythonModel):
    def load_context(self, context) -> None:
        from grappa.io import servable

        self.servable = servable.load(context.artifacts["model"])

    # The DataFrame hint keeps MLflow on the logged signature (it infers no schema from this type).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        return self.servable.embed(images_of(model_input))


mlflow.models.set_model(GrappaEmbedder())
