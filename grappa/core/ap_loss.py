"""Listwise Average-Precision losses for metric learning / instance retrieval.

Every sample of a batch of L2-normalised embeddings is used in turn as a query against all the
*other* samples of the batch (the diagonal is masked out); positives are the samples sharing its
label. The loss is ``1 - mean AP`` over the queries that have at least one positive.

* :class:`HistogramAPLoss` -- quantised AP (AP_Q) of Revaud et al., "Learning with Average
  Precision: Training Image Retrieval with a Listwise Loss", ICCV 2019. Same quantiser as the
  official ``dirtorch/loss.py`` ``APLoss`` (triangular soft-binning, saturating end bins).
* :class:`SmoothAPLoss` -- Smooth-AP of Brown et al., "Smooth-AP: Smoothing the Path Towards
  Large-Scale Image Retrieval", ECCV 2020, with the query removed from its own retrieval set
  (the official code keeps it).
* :func:`exact_average_precision` -- brute-force (non-interpolated) AP, the quantity both
  surrogates approximate; used as the reference in tests.

Functional forms (``histogram_ap``, ``smooth_ap``) work on a (Q, N) score matrix and return one
AP per query, NaN for queries without positives.
"""
from typing import Optional

import torch
import torch.nn as nn

__all__ = [
    'histogram_ap', 'smooth_ap', 'exact_average_precision',
    'HistogramAPLoss', 'SmoothAPLoss', 'build_ap_loss',
]


def _check_inputs(scores: torch.Tensor, relevant: torch.Tensor, valid: Optional[torch.Tensor]):
    if scores.dim() != 2:
        raise ValueError(f'scores must be (Q, N), got shape {tuple(scores.shape)}')
    if relevant.shape != scores.shape:
        raise ValueError(f'relevant shape {tuple(relevant.shape)} != scores shape {tuple(scores.shape)}')
    if valid is not None and valid.shape != scores.shape:
        raise ValueError(f'valid shape {tuple(valid.shape)} != scores shape {tuple(scores.shape)}')


def _masks(scores, relevant, valid):
    """Float relevance / validity masks; relevance is restricted to valid items."""
    valid_f = torch.ones_like(scores) if valid is None else valid.to(scores.dtype)
    rel_f = relevant.to(scores.dtype) * valid_f
    return rel_f, valid_f


def histogram_ap(
        scores: torch.Tensor,
        relevant: torch.Tensor,
        num_bins: int = 20,
        min_score: float = -1.0,
        max_score: float = 1.0,
        valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Quantised (histogram-binned) AP per query, differentiable w.r.t. ``scores``.

    Args:
        scores: (Q, N) similarities, nominally in [min_score, max_score]; values outside fall
            entirely into the first / last bin (the end bins saturate, as in dirtorch).
        relevant: (Q, N) bool/0-1, positives of each query.
        num_bins: number of bins M; centres b_k = max - k * delta, delta = (max - min) / (M - 1),
            ordered from high to low similarity.
        valid: optional (Q, N) bool mask; invalid items (e.g. the query itself) are removed from
            the ranked list.

    Returns:
        (Q,) tensor: AP_Q = sum_k P_k * r_k, NaN where a query has no valid positive.
    """
    _check_inputs(scores, relevant, valid)
    if not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f'num_bins must be an int >= 2, got {num_bins!r}')
    if max_score <= min_score:
        raise ValueError(f'max_score ({max_score}) must exceed min_score ({min_score})')
    rel_f, valid_f = _masks(scores, relevant, valid)

    delta = (max_score - min_score) / (num_bins - 1)
    centres = max_score - delta * torch.arange(num_bins, device=scores.device, dtype=scores.dtype)
    d = (scores.unsqueeze(1) - centres.view(1, -1, 1)) / delta  # Q x M x N, offset in bin widths
    # Triangular kernel as the min of a falling and a rising line (dirtorch's construction). The
    # top bin has no falling edge and the bottom bin no rising edge, so the weights of every score
    # sum to 1 (partition of unity) even outside [min, max].
    falling = 1.0 - d
    rising = 1.0 + d
    falling[:, 0] = 1.0
    rising[:, -1] = 1.0
    assign = torch.minimum(falling, rising).clamp(min=0) * valid_f.unsqueeze(1)

    count = assign.sum(dim=-1)  # Q x M soft number of items per bin (c_k)
    count_pos = (assign * rel_f.unsqueeze(1)).sum(dim=-1)  # Q x M soft positives per bin (c+_k)
    # 1e-16 as in dirtorch: bins above the first occupied one have 0/0 precision, weighted by 0.
    precision = count_pos.cumsum(dim=-1) / (count.cumsum(dim=-1) + 1e-16)
    num_pos = rel_f.sum(dim=-1)
    # Clamp instead of dividing by 0 so NaNs never reach the backward pass of other queries.
    recall_inc = count_pos / num_pos.clamp(min=1e-16).unsqueeze(-1)
    ap = (precision * recall_inc).sum(dim=-1)
    return torch.where(num_pos > 0, ap, torch.full_like(ap, float('nan')))


def smooth_ap(
        scores: torch.Tensor,
        relevant: torch.Tensor,
        temperature: float = 0.01,
        valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Smooth-AP per query: ranks relaxed with a sigmoid of temperature ``temperature``.

    For positive i: R(i, S) = 1 + sum_{j in S, j != i} sigmoid((s_j - s_i) / tau), and
    AP = mean_i R(i, P) / R(i, Omega) over the positives P, Omega = all valid items.
    The sigmoid argument is clamped to [-50, 50] like the official code (avoids exp overflow).
    Memory is O(Q * N^2).

    Returns:
        (Q,) tensor, NaN where a query has no valid positive.
    """
    _check_inputs(scores, relevant, valid)
    if temperature <= 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    rel_f, valid_f = _masks(scores, relevant, valid)
    n = scores.shape[1]

    # diff[q, i, j] = s_qj - s_qi: how far item j is above item i.
    diff = scores.unsqueeze(1) - scores.unsqueeze(2)
    above = torch.sigmoid((diff / temperature).clamp(min=-50, max=50))
    not_self = 1.0 - torch.eye(n, device=scores.device, dtype=scores.dtype)  # j != i
    above = above * not_self
    rank_all = 1.0 + (above * valid_f.unsqueeze(1)).sum(dim=-1)  # Q x N: R(i, Omega)
    rank_pos = 1.0 + (above * rel_f.unsqueeze(1)).sum(dim=-1)  # Q x N: R(i, P)

    num_pos = rel_f.sum(dim=-1)
    ap = (rank_pos / rank_all * rel_f).sum(dim=-1) / num_pos.clamp(min=1e-16)
    return torch.where(num_pos > 0, ap, torch.full_like(ap, float('nan')))


@torch.no_grad()
def exact_average_precision(
        scores: torch.Tensor,
        relevant: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact non-interpolated AP per query (mean over positives of precision at their rank).

    Brute force, O(Q * N^2): meant as a test reference, not for training.
    Ties are broken *pessimistically*: a positive is ranked below every negative with the same
    score (among tied positives, by index), so AP is never overestimated on ties. With continuous
    scores ties do not occur and this is the usual AP.

    Returns:
        (Q,) float64 tensor, NaN where a query has no valid positive.
    """
    _check_inputs(scores, relevant, valid)
    scores = scores.detach().double()
    val = torch.ones_like(relevant, dtype=torch.bool) if valid is None else valid.bool()
    rel = relevant.bool() & val
    n = scores.shape[1]

    s_i = scores.unsqueeze(2)  # [q, i, 1]
    s_j = scores.unsqueeze(1)  # [q, 1, j]
    idx = torch.arange(n, device=scores.device)
    before_idx = (idx.view(1, 1, n) < idx.view(1, n, 1))  # j < i
    # j is ranked strictly before positive i.
    ahead_pos = (s_j > s_i) | ((s_j == s_i) & before_idx)  # among positives: index order
    ahead_neg = s_j >= s_i  # a tied negative goes first (pessimistic)
    rel_j = rel.unsqueeze(1)
    neg_j = (val & ~rel).unsqueeze(1)
    n_pos_ahead = (ahead_pos & rel_j).sum(dim=-1)
    n_neg_ahead = (ahead_neg & neg_j).sum(dim=-1)
    precision = (n_pos_ahead + 1).double() / (n_pos_ahead + n_neg_ahead + 1).double()  # [q, i]

    num_pos = rel.sum(dim=-1)
    ap = (precision * rel.double()).sum(dim=-1) / num_pos.clamp(min=1).double()
    return torch.where(num_pos > 0, ap, torch.full_like(ap, float('nan')))


def _batch_scores(embeddings: torch.Tensor, labels: torch.Tensor):
    """Cosine-similarity matrix, positive mask and self-exclusion mask of a batch."""
    if embeddings.dim() != 2:
        raise ValueError(f'embeddings must be (B, D), got shape {tuple(embeddings.shape)}')
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f'labels must be (B,) matching embeddings, got {tuple(labels.shape)}')
    b = embeddings.shape[0]
    scores = embeddings @ embeddings.t()
    valid = ~torch.eye(b, dtype=torch.bool, device=embeddings.device)  # query is not its own db
    relevant = (labels.view(-1, 1) == labels.view(1, -1)) & valid
    return scores, relevant, valid


def _mean_loss(ap: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """1 - mean AP over queries with positives (NaN entries); 0 if no query has one."""
    keep = ~torch.isnan(ap)
    if not bool(keep.any()):
        # Still attached to the graph so that .backward() works (with zero gradients).
        return embeddings.sum() * 0.0
    return 1.0 - ap[keep].mean()


class HistogramAPLoss(nn.Module):
    """Revaud et al. 2019 listwise quantised AP loss (AP_Q) on cosine similarities.

    Args:
        num_bins: histogram bins over [min_score, max_score] (20 over [-1, 1] by default, the
            setting used by public ports of dirtorch; the dirtorch class default is 25 on [0, 1]).

    Input: ``embeddings`` (B, D) L2-normalised, ``labels`` (B,). Output: scalar ``1 - mAP``.
    Memory is O(B^2 * num_bins).
    """

    def __init__(self, num_bins: int = 20, min_score: float = -1.0, max_score: float = 1.0):
        super().__init__()
        if not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f'num_bins must be an int >= 2, got {num_bins!r}')
        self.num_bins = num_bins
        self.min_score = min_score
        self.max_score = max_score

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        scores, relevant, valid = _batch_scores(embeddings, labels)
        ap = histogram_ap(scores, relevant, self.num_bins, self.min_score, self.max_score, valid=valid)
        return _mean_loss(ap, embeddings)

    def extra_repr(self) -> str:
        return f'num_bins={self.num_bins}, min_score={self.min_score}, max_score={self.max_score}'


class SmoothAPLoss(nn.Module):
    """Brown et al. 2020 Smooth-AP loss, query excluded from its own retrieval set.

    Unlike the official implementation the batch needs no particular ordering or fixed number of
    samples per class. Input/output as :class:`HistogramAPLoss`. Memory is O(B^3).
    """

    def __init__(self, temperature: float = 0.01):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        scores, relevant, valid = _batch_scores(embeddings, labels)
        ap = smooth_ap(scores, relevant, self.temperature, valid=valid)
        return _mean_loss(ap, embeddings)

    def extra_repr(self) -> str:
        return f'temperature={self.temperature}'


_AP_LOSSES = {
    'histogram_ap': HistogramAPLoss,
    'smooth_ap': SmoothAPLoss,
}


def build_ap_loss(name: str, **kwargs) -> nn.Module:
    """Create an AP loss by name: ``'histogram_ap'`` or ``'smooth_ap'``; kwargs go to its ctor."""
    key = name.lower()
    if key not in _AP_LOSSES:
        raise ValueError(f'Unknown AP loss {name!r}; expected one of {sorted(_AP_LOSSES)}')
    return _AP_LOSSES[key](**kwargs)
