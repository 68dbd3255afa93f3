"""The AP objective as a params.yaml switch for adaptor training (instance-retrieval issue)."""
import numpy as np
import pytest
import torch

from conftest import snapshot_and_extract, tiny_params_dict
from grappa.config import AdaptorParams, ConfigError, parse_params
from grappa.core.losses import CosineClassifier
from grappa.core.objectives import EmbeddedBatch, adaptor_objective
from grappa.core.samplers import ClusterBatchSampler
from grappa.io.artifacts import load_torch
from grappa.io.datasets import PrefixDataset
from grappa.io.layout import layout
from pipeline_steps import cluster
from pipeline_steps import train_adaptor


def test_cluster_batches_always_hold_positives():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1 + [3] * 6)
    sampler = ClusterBatchSampler(labels, batch_size=8, per_cluster=4, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(labels) // 8
    for batch in batches:
        assert len(batch) == 8
        batch_labels = labels[batch]
        assert 2 not in batch_labels  # the singleton cluster has no positive and is never drawn
        _, counts = np.unique(batch_labels, return_counts=True)
        assert counts.min() >= 2


@pytest.mark.parametrize("objective, metrics", [
    ("cosine_softmax", ["cross_entropy", "accuracy", "loss"]),
    ("histogram_ap", ["ap_loss", "loss"]),
    ("smooth_ap", ["ap_loss", "loss"]),
    ("cosine_softmax+histogram_ap", ["cross_entropy", "accuracy", "ap_loss", "loss"]),
])
def test_listwise_objectives_train_on_batches_of_clusters(objective, metrics):
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    hp = AdaptorParams(objective=objective, images_per_cluster=2)
    built = adaptor_objective(hp, CosineClassifier(torch.randn(4, 8), 0.05), torch.from_numpy(labels))
    assert built.ranks_batch == (objective != "cosine_softmax")
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert list(built(EmbeddedBatch(emb, torch.tensor([0, 1, 3, 4])))) == metrics
    dataset = PrefixDataset(np.zeros((len(labels), 2), np.float16))
    batches = train_adaptor.epoch_batches(dataset, labels, 4, hp, built.ranks_batch, torch.Generator().manual_seed(0))
    for rows, _, _ in batches:
        assert len(rows) == 4
        if built.ranks_batch:  # P clusters x images_per_cluster: every anchor has a positive
            assert np.unique(labels[rows.numpy()], return_counts=True)[1].min() >= 2


@pytest.mark.parametrize("objective", ["histogram_ap", "smooth_ap", "cosine_softmax+histogram_ap"])
def test_ap_objective_trains_adaptors(tmp_path, collection, objective):
    params = parse_params(tiny_params_dict(tmp_path, collection, adaptor={"objective": objective, "epochs": 1,
                                                                           "images_per_cluster": 2}))
    snapshot_and_extract(params)
    cluster.run(params)
    report = train_adaptor.run(params, 2)
    assert "ap" not in report["final"] and 0.0 <= report["final"]["ap_loss"] <= 1.0  # named as the loss it is
    assert ("cross_entropy" in report["final"]) == objective.startswith("cosine_softmax")
    state = load_torch(layout(params).adaptor(2))["state_dict"]
    up = [v for name, v in state.items() if "up.weight" in name]
    assert any(float(w.abs().sum()) > 0 for w in up), "up-projections left at zero: nothing was trained"


def test_instance_discrimination_needs_images(tmp_path, collection):
    cached = parse_params(tiny_params_dict(tmp_path, collection, adaptor={"objective": "histogram_ap",
                                                                          "ap_positives": "augmentation"}))
    snapshot_and_extract(cached)
    cluster.run(cached)
    with pytest.raises(ConfigError, match="ap_positives"):
        train_adaptor.run(cached, 2)


def test_instance_discrimination_from_images(tmp_path, collection):
    params = parse_params(tiny_params_dict(
        tmp_path, collection,
        backbone={"name": "test_efficientnet", "weights": "none", "image_size": 48, "adapt_from_block": 0},
        adaptor={"objective": "histogram_ap", "ap_positives": "augmentation", "epochs": 1}))
    snapshot_and_extract(params)
    cluster.run(params)
    report = train_adaptor.run(params, 2)
    assert 0.0 <= report["final"]["ap_loss"] <= 1.0
