import math

import pytest
import torch
import torch.nn.functional as F

from grappa.core.ap_loss import (
    HistogramAPLoss,
    SmoothAPLoss,
    build_ap_loss,
    exact_average_precision,
    histogram_ap,
    smooth_ap,
)


def _random_problem(seed=0, q=8, n=30):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(q, n, generator=g, dtype=torch.float64) * 2 - 1
    relevant = torch.rand(q, n, generator=g) < 0.3
    relevant[:, 0] = True  # every query has a positive
    return scores, relevant


def _clustered_batch(seed=0, n_classes=4, per_class=4, dim=16, noise=0.6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return x, labels


def test_exact_ap_known_values_and_pessimistic_ties():
    scores = torch.tensor([[0.9, 0.5, 0.1, -0.3]])
    assert exact_average_precision(scores, torch.tensor([[1, 0, 1, 0]])).item() == pytest.approx((1 + 2 / 3) / 2)
    assert exact_average_precision(scores, torch.tensor([[0, 0, 0, 1]])).item() == pytest.approx(0.25)
    # A positive tied with a negative is ranked after it.
    tied = torch.tensor([[0.5, 0.5]])
    assert exact_average_precision(tied, torch.tensor([[1, 0]])).item() == pytest.approx(0.5)
    assert exact_average_precision(tied, torch.tensor([[0, 1]])).item() == pytest.approx(0.5)
    # Invalid items are removed from the list; no positive -> NaN.
    valid = torch.tensor([[True, False, True, True]])
    assert exact_average_precision(scores, torch.tensor([[1, 0, 1, 0]]), valid).item() == pytest.approx(1.0)
    assert math.isnan(exact_average_precision(scores, torch.zeros(1, 4)).item())


def test_histogram_ap_reference_vector():
    # Research note §4.1: 20 bins over [-1, 1].
    ap = histogram_ap(torch.tensor([[0.9, 0.5, 0.1, -0.3]]), torch.tensor([[1, 0, 1, 0]]), num_bins=20)
    assert ap.item() == pytest.approx(0.8165, abs=1e-4)


def test_histogram_assignment_is_partition_of_unity_outside_range():
    # Scores beyond [min, max] saturate in the end bins: a single relevant item still has AP 1 and
    # a negative above the range still precedes the positives.
    scores = torch.tensor([[1.3, -1.4]])
    assert histogram_ap(scores, torch.tensor([[0, 1]])).item() == pytest.approx(0.5)
    assert histogram_ap(scores, torch.tensor([[1, 0]])).item() == pytest.approx(1.0)


def test_histogram_ap_converges_to_exact_ap():
    scores, relevant = _random_problem()
    exact = exact_average_precision(scores, relevant)
    errors = [(histogram_ap(scores, relevant, num_bins=m) - exact).abs().mean().item() for m in (5, 20, 100, 1000)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.02
    assert errors[0] > 0.02  # coarse bins are genuinely approximate


def test_smooth_ap_converges_to_exact_ap():
    scores, relevant = _random_problem(seed=1)
    exact = exact_average_precision(scores, relevant)
    errors = [(smooth_ap(scores, relevant, temperature=t) - exact).abs().mean().item() for t in (0.5, 0.1, 0.01, 1e-4)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3


@pytest.mark.parametrize('loss_fn', [HistogramAPLoss(), SmoothAPLoss()], ids=['histogram', 'smooth'])
def test_perfect_ranking_has_zero_loss(loss_fn):
    labels = torch.arange(4).repeat_interleave(3)
    emb = F.one_hot(labels, 4).float()  # positives at cosine 1, negatives at 0
    assert loss_fn(emb, labels).item() == pytest.approx(0.0, abs=1e-6)
    # Sanity: a shuffled labelling of the same embeddings is not perfect.
    assert loss_fn(emb, labels[torch.tensor([0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11])]).item() > 0.3


@pytest.mark.parametrize('loss_fn', [HistogramAPLoss(), SmoothAPLoss(temperature=0.05)], ids=['histogram', 'smooth'])
def test_queries_without_positives_are_ignored(loss_fn):
    x, labels = _clustered_batch()
    labels = labels.clone()
    labels[0] = 99  # a singleton: no positive for query 0 (still a negative for the others)
    emb = F.normalize(x, dim=1)
    scores = emb @ emb.t()
    valid = ~torch.eye(len(labels), dtype=torch.bool)
    relevant = (labels[:, None] == labels[None, :]) & valid
    if isinstance(loss_fn, HistogramAPLoss):
        ap = histogram_ap(scores, relevant, 20, valid=valid)
    else:
        ap = smooth_ap(scores, relevant, 0.05, valid=valid)
    assert math.isnan(ap[0].item()) and not torch.isnan(ap[1:]).any()
    loss = loss_fn(emb, labels)
    assert loss.item() == pytest.approx(1 - ap[1:].mean().item(), abs=1e-6)
    # Counting the singleton as AP 0 would give a different (larger) loss.
    assert loss.item() < 1 - ap[1:].sum().item() / len(labels) - 1e-3


def test_no_query_with_positives_gives_zero_differentiable_loss():
    emb = F.normalize(torch.randn(5, 8), dim=1).requires_grad_()
    loss = HistogramAPLoss()(emb, torch.arange(5))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(emb.grad == 0)


def test_histogram_gradient_pushes_misranked_pair():
    # Positive at 0.28 is ranked just below the negative at 0.30 (same bins, width 2/19): the loss
    # must push the positive up and the negative down. Items that share no bin with a positive of
    # different rank get no gradient (the quantised AP is flat there), e.g. the -0.3 negative.
    scores = torch.tensor([[0.9, 0.30, 0.28, -0.3]], requires_grad=True)
    relevant = torch.tensor([[1, 0, 1, 0]])
    (1 - histogram_ap(scores, relevant)).mean().backward()
    g = scores.grad[0]
    assert g[2] < -0.1  # positive: descent increases its score
    assert g[1] > 0.1  # negative above it: descent decreases its score
    assert g[3] == 0


@pytest.mark.parametrize('name', ['histogram_ap', 'smooth_ap'])
def test_sgd_step_raises_positive_and_lowers_negative_similarity(name):
    x, labels = _clustered_batch(seed=3, noise=1.0)
    x = x.clone().requires_grad_()
    loss_fn = build_ap_loss(name, **({'temperature': 0.1} if name == 'smooth_ap' else {}))

    def pair_means(emb):
        sim = emb @ emb.t()
        same = labels[:, None] == labels[None, :]
        off = ~torch.eye(len(labels), dtype=torch.bool)
        return sim[same & off].mean().item(), sim[~same].mean().item()

    loss = loss_fn(F.normalize(x, dim=1), labels)
    loss.backward()
    with torch.no_grad():
        pos0, neg0 = pair_means(F.normalize(x, dim=1))
        x_new = x - 0.5 * x.grad
        pos1, neg1 = pair_means(F.normalize(x_new, dim=1))
        loss_new = loss_fn(F.normalize(x_new, dim=1), labels)
    assert 0 < loss.item() < 1
    assert pos1 > pos0
    assert neg1 < neg0
    assert loss_new.item() < loss.item()


def test_build_ap_loss():
    assert isinstance(build_ap_loss('histogram_ap'), HistogramAPLoss)
    assert build_ap_loss('histogram_ap', num_bins=30).num_bins == 30
    assert build_ap_loss('smooth_ap', temperature=0.05).temperature == 0.05
    with pytest.raises(ValueError, match='Unknown AP loss'):
        build_ap_loss('fast_ap')
