"""The training objectives of both Grappa stages: named, weighted loss terms from a small registry.

An objective is a list of (term, weight) built once from the params: ``adaptor.objective`` and
``fusion.objective`` name registry terms joined by ``+``, parsed once by :func:`parse_objective`
(an unknown name is a :class:`ConfigError`). Evaluated on an :class:`EmbeddedBatch` it returns
every term's named metrics plus ``"loss"`` = sum of weight x term, the dict ``fit`` consumes and
logs. Terms are evaluated in registry order, whatever order the params name them in.

    stage 1 (adaptor.objective):  cosine_softmax -> cross_entropy (+ accuracy)
                                  histogram_ap | smooth_ap -> ap_loss  (1 - AP, weight ap_weight
                                  when summed with cosine_softmax, else 1)
    stage 2 (always):             prop | bank_prop (lambda_prop, fusion.propagation), value (lambda_value), batch_mean_attn_entropy (-lambda_entropy),
                                  routing_mi (-lambda_mi)
            (fusion.objective):   neighbour_pairs -> pair, pseudo_labels -> pseudo_ce  (weight 1)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from grappa.config import AdaptorParams, ConfigError, FusionParams
from grappa.core.ap_loss import build_ap_loss
from grappa.core.losses import (AttentionBank, CosineClassifier, attention_propagation, bank_propagation,
                                batch_attention_entropy, neighbour_pair_infonce, routing_information)

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EmbeddedBatch:
    """One training batch after the forward pass, as the loss terms read it.

    ``emb[:len(rows)]`` are the anchors, ``rows`` their dataset rows (the pseudo-label lookup, and the
    instance ids of two-view batches); in fusion batches the anchors' kNN neighbours follow them.
    """

    emb: torch.Tensor  # (N, D)
    rows: torch.Tensor  # (B,), B = N for adaptor batches, N / 2 for anchor/neighbour pairs
    alpha: torch.Tensor | None = None  # (N, L, M) attention over the granularities (fusion)

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchors, neighbours) of ``emb`` or ``alpha``."""
        b = x.shape[0] // 2
        return x[:b], x[b:]


@dataclass(frozen=True)
class LossTerm:
    """A registry entry: the metric a term is logged as, and how it is built from the stage's params.

    ``build(hp, **resources)`` returns a function of an :class:`EmbeddedBatch` giving ``{metric: value,
    ...extra metrics}``; resources are what the stage trains with (classifier, targets, fusion, heads).
    """

    metric: str
    build: Callable[..., Callable[[EmbeddedBatch], Metrics]]
    ranks_batch: bool = False  # listwise: every anchor needs a positive in its batch


def _cosine_softmax(hp: AdaptorParams, *, classifier: CosineClassifier, targets: torch.Tensor, **_):
    def term(batch: EmbeddedBatch) -> Metrics:
        pseudo = targets[batch.rows]
        logits = classifier(batch.emb)
        return {"cross_entropy": F.cross_entropy(logits, pseudo),
                "accuracy": (logits.argmax(1) == pseudo).float().mean()}

    return term


def _listwise_ap(name: str):
    def build(hp: AdaptorParams, *, targets: torch.Tensor, **_):
        loss = build_ap_loss(name, **({"num_bins": hp.ap_bins} if name == "histogram_ap" else {}))

        def term(batch: EmbeddedBatch) -> Metrics:
            labels = batch.rows if hp.ap_positives == "augmentation" else targets[batch.rows]
            return {"ap_loss": loss(batch.emb, labels)}  # 1 - AP: falls as ranking improves

        return term

    return build


def _attention_propagation(hp: FusionParams, **_):
    return lambda batch: {"prop": attention_propagation(*batch.halves(batch.alpha))}


def _bank_propagation(hp: FusionParams, *, bank: AttentionBank | None = None, **_):
    if bank is None:
        raise ConfigError("fusion.propagation: bank needs the attention bank of the pool")
    return lambda batch: {"prop": bank_propagation(batch.alpha, bank, batch.rows)}


def _value_regulariser(hp: FusionParams, *, fusion: nn.ModuleList, **_):
    return lambda batch: {"value": sum(layer.value_regulariser() for layer in fusion)}


def _attention_entropy(hp: FusionParams, **_):
    return lambda batch: {"batch_mean_attn_entropy": batch_attention_entropy(batch.alpha)}


def _routing_information(hp: FusionParams, **_):
    return lambda batch: {"routing_mi": routing_information(batch.alpha)}


def _neighbour_pairs(hp: FusionParams, **_):
    return lambda batch: {"pair": neighbour_pair_infonce(*batch.halves(batch.emb), hp.temperature)}


def _pseudo_labels(hp: FusionParams, *, heads: Sequence[tuple[CosineClassifier, torch.Tensor]], **_):
    if not heads:
        raise ConfigError("fusion.objective: pseudo_labels needs the stage-1 classifiers of every k")

    # level_norm: CE_m / log k_m, each level's loss on the scale of its chance level
    scales = [1.0 / math.log(max(head.weight.shape[0], 2)) if hp.level_norm else 1.0 for head, _ in heads]

    def term(batch: EmbeddedBatch) -> Metrics:  # mean over levels of the frozen stage-1 cosine-softmax losses
        b = len(batch.rows)
        return {"pseudo_ce": sum(w * F.cross_entropy(head(batch.emb[:b]), labels[batch.rows])
                                 for w, (head, labels) in zip(scales, heads)) / len(heads)}

    return term


# Registry order is evaluation order (the float sum of the terms, hence the weights, depend on it).
LOSS_TERMS: dict[str, LossTerm] = {
    "cosine_softmax": LossTerm("cross_entropy", _cosine_softmax),
    "histogram_ap": LossTerm("ap_loss", _listwise_ap("histogram_ap"), ranks_batch=True),
    "smooth_ap": LossTerm("ap_loss", _listwise_ap("smooth_ap"), ranks_batch=True),
    "prop": LossTerm("prop", _attention_propagation),
    "bank_prop": LossTerm("prop", _bank_propagation),
    "value": LossTerm("value", _value_regulariser),
    "batch_mean_attn_entropy": LossTerm("batch_mean_attn_entropy", _attention_entropy),
    "routing_mi": LossTerm("routing_mi", _routing_information),
    "neighbour_pairs": LossTerm("pair", _neighbour_pairs),
    "pseudo_labels": LossTerm("pseudo_ce", _pseudo_labels),
}
ADAPTOR_TERMS = ("cosine_softmax", "histogram_ap", "smooth_ap")  # what adaptor.objective may name
FUSION_TERMS = ("neighbour_pairs", "pseudo_labels")  # what fusion.objective may name
FUSION_REGULARISERS = ("value", "batch_mean_attn_entropy", "routing_mi")  # in every fusion objective, after prop


def parse_objective(text: str, key: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """``"a+b"`` -> the registry names (registry order); unknown, repeated or clashing names are ConfigErrors."""
    names = text.split("+")
    for name in names:
        if name not in allowed:
            raise ConfigError(f"params: {key}: unknown loss term '{name}' (known: {', '.join(allowed)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"params: {key}: a loss term is named twice in '{text}'")
    metrics = [LOSS_TERMS[name].metric for name in names]
    if len(set(metrics)) != len(metrics):
        raise ConfigError(f"params: {key}: '{text}' names two terms logged as the same metric; keep one")
    return tuple(sorted(names, key=list(LOSS_TERMS).index))


def adaptor_terms(hp: AdaptorParams) -> list[tuple[str, float]]:
    """The (registry name, weight) pairs of ``adaptor.objective``."""
    names = parse_objective(hp.objective, "adaptor.objective", ADAPTOR_TERMS)
    ap_weight = hp.ap_weight if "cosine_softmax" in names else 1.0  # an AP loss alone keeps weight 1
    return [(name, ap_weight if LOSS_TERMS[name].ranks_batch else 1.0) for name in names]


def fusion_terms(hp: FusionParams) -> list[tuple[str, float]]:
    """The (registry name, weight) pairs of the fusion objective: the regularisers, then ``fusion.objective``."""
    weights = {"value": hp.lambda_value, "batch_mean_attn_entropy": -hp.lambda_entropy, "routing_mi": -hp.lambda_mi}
    names = parse_objective(hp.objective, "fusion.objective", FUSION_TERMS)
    prop = "bank_prop" if hp.propagation == "bank" else "prop"
    return ([(prop, hp.lambda_prop)] + [(name, weights[name]) for name in FUSION_REGULARISERS]
            + [(name, 1.0) for name in names])


class Objective:
    """Weighted registry terms; ``objective(batch)`` = their metrics and ``"loss"`` = sum of weight x term."""

    def __init__(self, terms: Sequence[tuple[str, float]], hp, **resources):
        self.terms = [(name, float(weight)) for name, weight in terms]
        self._built = [(LOSS_TERMS[name].metric, weight, LOSS_TERMS[name].build(hp, **resources))
                       for name, weight in self.terms]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.terms)

    @property
    def ranks_batch(self) -> bool:
        """Whether a term is listwise, so the batches must hold positives of every anchor."""
        return any(LOSS_TERMS[name].ranks_batch for name in self.names)

    def __call__(self, batch: EmbeddedBatch) -> Metrics:
        losses: Metrics = {}
        total = batch.emb.new_zeros(())
        for metric, weight, term in self._built:
            values = term(batch)
            losses.update(values)
            total = total + weight * values[metric]
        losses["loss"] = total
        return losses


def adaptor_objective(hp: AdaptorParams, classifier: CosineClassifier, targets: torch.Tensor) -> Objective:
    """Stage 1: ``targets`` are the pseudo-labels of every dataset row, on the training device."""
    return Objective(adaptor_terms(hp), hp, classifier=classifier, targets=targets)


def fusion_objective(hp: FusionParams, fusion: nn.ModuleList,
                     heads: Sequence[tuple[CosineClassifier, torch.Tensor]] = (),
                     bank: AttentionBank | None = None) -> Objective:
    """Stage 2: ``fusion`` = the trained fusion layers; ``heads`` = (frozen classifier, pseudo-labels of
    every row) per k, needed by ``pseudo_labels``; ``bank``: the pool's attention memory, needed by
    ``fusion.propagation: bank``."""
    return Objective(fusion_terms(hp), hp, fusion=fusion, heads=heads, bank=bank)
