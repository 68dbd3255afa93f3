"""The registered MLflow model (models-from-code: MLflow runs this file, nothing is pickled).

Input: a table with one image per row, as bytes in column ``image`` (base64 in JSON requests) or
as a local path / ``s3://`` URI in column ``path``. Output: the fused model's L2-normalised
embeddings, one row per image. Weights, architecture and preprocessing come from the ``model``
artifact (see grappa/io/servable.py); the code travels in the model's ``code/`` folder, so loading needs no
checkout of this repository.
"""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

IMAGE, PATH = "image", "path"


def images_of(model_input) -> list:
    """One bytes-or-URI item per row of a DataFrame (or a plain list of them)."""
    if not isinstance(model_input, pd.DataFrame):
        return list(model_input)
    items = []
    for i, row in enumerate(model_input.to_dict("records")):
        image, path = row.get(IMAGE), row.get(PATH)
        if isinstance(image, (bytes, bytearray)):
            items.append(bytes(image))
        elif isinstance(path, str) and path:
            items.append(path)
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
