"""The method learns on separable synthetic data: stage 1 and the fusion beat the frozen backbone, the
fusion loss falls, each image's attention becomes confident and two domains whose best granularities
differ are routed differently.

The data live in the space of a tiny backbone's cached prefix maps. Domain "fine" has 6 classes; domain
"coarse" has 2 classes, each made of 3 sub-modes that its labels do not distinguish. Pseudo-labels come
from spherical k-means of the frozen embeddings of the unlabeled pool at k = 2 and k = 12, so the
coarse level suits the coarse domain and the fine level the fine one, as in the real benchmark.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from grappa.config import AdaptorParams, BackboneParams, FusionParams
from grappa.core.backbones import create_backbone
from grappa.core.evaluation import per_domain_metrics
from grappa.core.kmeans import spherical_kmeans
from grappa.core.losses import CosineClassifier
from grappa.core.model import FUSION, ZERO_SHOT, GrappaModel, single
from grappa.core.objectives import adaptor_objective, fusion_objective
from grappa.core.training import adaptor_step, fusion_step, train_on_batch, warmup_cosine

pytestmark = pytest.mark.timeout(300)
KS = [2, 12]
START = 3


def synthetic(per_mode: int, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(N, 32, 6, 6) prefix maps, their domain and class: 6 fine classes, and 2 coarse classes of 3 sub-modes."""
    protos = torch.Generator().manual_seed(0)  # the same modes for every sample set
    shape = (32, 6, 6)
    fine = torch.randn(6, *shape, generator=protos)
    coarse_centres = torch.randn(2, *shape, generator=protos)
    coarse = coarse_centres.repeat_interleave(3, 0) + 0.6 * torch.randn(6, *shape, generator=protos)
    offset = torch.zeros(shape)
    offset[:16] = 1.5  # the domains differ in what every image of them shares
    g = torch.Generator().manual_seed(seed)
    xs, domains, labels = [], [], []
    for mode in range(6):
        xs += [fine[mode] + 0.9 * torch.randn(per_mode, *shape, generator=g)]
        domains += ["fine"] * per_mode
        labels += [f"f{mode}"] * per_mode
        xs += [coarse[mode] + offset + 0.9 * torch.randn(per_mode, *shape, generator=g)]
        domains += ["coarse"] * per_mode
        labels += [f"c{mode // 3}"] * per_mode
    return torch.cat(xs), np.array(domains), np.array(labels)


def embed(model: GrappaModel, x: torch.Tensor, mode: str) -> tuple[np.ndarray, torch.Tensor | None]:
    model.eval()
    with torch.no_grad():
        emb, alpha = model.forward_suffix(x, mode)
    return emb.numpy(), alpha


def mean_map(model, x, domains, labels, mode) -> float:
    return per_domain_metrics(embed(model, x, mode)[0], domains, labels)["mean"]["map_at_r"]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    backbone, _, _ = create_backbone(BackboneParams(name="test_efficientnet", weights="none", image_size=48,
                                                    adapt_from_block=START))
    fusion = FusionParams(attention="cosine", value="identity", attention_scale=1.0, lambda_mi=0.5, lambda_prop=0.0,
                          propagation="pairs")  # no propagation here: the batches are the whole pool's rows
    model = GrappaModel(backbone, START, KS, reduction=4, attn_dim=16, attention=fusion.attention,
                        value=fusion.value, attention_scale=fusion.attention_scale)
    pool, pool_domains, _ = synthetic(per_mode=30, seed=1)  # the labels of the pool are never read
    test = synthetic(per_mode=12, seed=2)
    frozen, _ = embed(model, pool, ZERO_SHOT)
    heads = []
    for k in KS:  # stage 1: one adaptor set per k on its pseudo-labels, from zero-initialised up-projections
        pseudo, centroids = spherical_kmeans(frozen, k, niter=20, nredo=3, seed=0)
        pseudo = torch.from_numpy(pseudo.astype(np.int64))
        classifier = CosineClassifier(torch.from_numpy(centroids), 0.05)
        objective = adaptor_objective(AdaptorParams(objective="cosine_softmax"), classifier, pseudo)
        optimizer = torch.optim.AdamW([*model.adaptor_set(k).parameters(), *classifier.parameters()], lr=1e-2)
        schedule = warmup_cosine(optimizer, 120, 10)
        step = partial(adaptor_step, model, objective, single(k), "cpu", images=False, augment_scale=0.7)
        g = torch.Generator().manual_seed(k)
        model.train()
        for _ in range(120):
            rows = torch.randperm(len(pool), generator=g)[:64]
            train_on_batch(step, (rows, pool[rows], []), optimizer, schedule)
        heads.append((classifier.requires_grad_(False), pseudo))
    model.requires_grad_(False)
    model.fusion.requires_grad_(True)  # stage 2: only the fusion layers train
    objective = fusion_objective(fusion, model.fusion, heads)
    optimizer = torch.optim.AdamW(model.fusion.parameters(), lr=3e-2)
    schedule = warmup_cosine(optimizer, 150, 0)
    step = partial(fusion_step, model, objective, "cpu", images=False, augment_scale=0.7)
    everything = (torch.arange(len(pool)), torch.stack([pool, pool], dim=1), [])  # the neighbour half is unused here
    whole_pool = partial(fusion_step, model, objective, "cpu", images=False)  # without jitter: a fixed measurement
    with torch.no_grad():
        losses = [float(whole_pool(everything)["loss"])]
    g = torch.Generator().manual_seed(7)
    model.train()
    for _ in range(150):
        rows = torch.randperm(len(pool), generator=g)[:64]
        train_on_batch(step, (rows, torch.stack([pool[rows], pool[rows]], dim=1), []), optimizer, schedule)
    with torch.no_grad():
        losses.append(float(whole_pool(everything)["loss"]))
    return model, test, losses


def test_stage_one_and_the_fusion_beat_the_frozen_backbone(trained):
    model, (x, domains, labels), _ = trained
    zero = mean_map(model, x, domains, labels, ZERO_SHOT)
    best_single = max(mean_map(model, x, domains, labels, single(k)) for k in KS)
    fused = mean_map(model, x, domains, labels, FUSION)
    assert best_single > zero + 0.02, (best_single, zero)
    assert fused > zero + 0.02, (fused, zero)


def test_the_fusion_loss_falls(trained):
    _, _, (before, after) = trained  # the whole objective on the whole pool, before and after stage 2
    assert after < before - 0.1, (before, after)


def test_attention_is_confident_per_image_and_differs_between_domains(trained):
    model, (x, domains, _), _ = trained
    _, alpha = embed(model, x, FUSION)
    alpha = alpha.double()
    per_image = -(alpha * alpha.clamp_min(1e-12).log()).sum(-1).mean()
    assert per_image < 0.8 * np.log(len(KS)), per_image
    fine, coarse = alpha[domains == "fine"].mean(0), alpha[domains == "coarse"].mean(0)  # (L, M)
    assert (fine - coarse).abs().max() > 0.2, (fine, coarse)
