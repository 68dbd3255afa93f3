"""The validation classes of ``query_db`` and scoring a servable model on them: where the evaluate
step, the champion comparison (grappa.tracking.publisher) and the benchmarks make their choices."""
from __future__ import annotations

import numpy as np

from grappa.config import ConfigError, Params
from grappa.core.augment import image_transform
from grappa.core.evaluation import VALIDATION, class_split, per_domain_metrics, split_mask
from grappa.core.model import FUSION, pick_device
from grappa.io import servable
from grappa.io.datasets import ImageDataset, encode, load_inputs
from grappa.io.layout import layout


def score_servable(model: servable.Servable, params: Params) -> float:
    """Mean mAP@R of a servable model on this run's validation set (for the equal-terms comparison).

    Fed like the candidate was: the cached prefix activations when the model's frozen prefix is the
    one extracted here, else the images through the model's own preprocessing.
    """
    inputs = load_inputs(layout(params), "query_db", model.preprocess, train=False,
                         min_side=params.data.min_side, max_pixels=params.data.max_pixels)
    dataset = inputs.dataset
    if not dataset.is_images and not model.same_prefix_as(params):  # cached activations of another prefix
        dataset = ImageDataset(inputs.uris, image_transform(model.preprocess, train=False), params.data.min_side,
                               params.data.max_pixels)
    vectors, _ = encode(model.model.to(pick_device()), dataset, FUSION, params.evaluate.batch_size,
                        num_workers=params.extract.num_workers, desc="re-score champion")
    labels = inputs.labels.astype(str)
    val = split_mask(inputs.domains, labels, validation_classes(params, inputs.domains, labels), VALIDATION)
    return per_domain_metrics(vectors[val], inputs.domains[val], labels[val])["mean"]["map_at_r"]


def validation_classes(params: Params, domains: np.ndarray, labels: np.ndarray) -> dict[str, list[str]]:
    """Per domain, its validation classes (the rest are test)."""
    single = sorted(d for d in set(domains) if len(set(labels[domains == d])) < 2)
    if single:
        raise ConfigError(f"evaluate: domain {single[0]!r} has one labelled class in query_db; the validation/test "
                          "split needs at least two")
    return class_split(domains, labels, params.evaluate.val_share, params.evaluate.split_seed)
