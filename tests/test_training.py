"""The shared training skeleton: warm-up/cosine schedule, per-epoch checkpoints and exact resume (toy
model); the loss-term registry the two stages' objectives are built from, and their batch steps."""
from __future__ import annotations

import math
import re
import typing
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grappa.config import AdaptorParams, BackboneParams, ConfigError, FusionParams
from grappa.core.ap_loss import HistogramAPLoss
from grappa.core.backbones import create_backbone
from grappa.core.losses import (AttentionBank, CosineClassifier, attention_propagation, batch_attention_entropy,
                                neighbour_pair_infonce, routing_information)
from grappa.core.model import GrappaModel, single
from grappa.core.objectives import (LOSS_TERMS, EmbeddedBatch, adaptor_objective, adaptor_terms, fusion_objective,
                                    fusion_terms, parse_objective)
from grappa.core.training import adaptor_step, epoch_steps, fit, fusion_step, train_on_batch, warmup_cosine
from grappa.io.artifacts import TorchCheckpoint, load_torch


def test_warmup_cosine_factors():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = warmup_cosine(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warm-up: (step+1)/2 -> 0.5, 1.0; then 0.5 * (1 + cos(pi * (step-2)/8)) for steps 2..9
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert lrs == pytest.approx(expected, abs=1e-12)


class Toy:
    """A tiny regression problem with shuffled batches and a dropout layer (uses the torch RNG)."""

    def __init__(self, checkpoint: Path, epochs: int = 4, interrupt_at: int | None = None):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(40, 6, generator=g)
        self.y = self.x @ torch.randn(6, 1, generator=g)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.checkpoint, self.epochs, self.interrupt_at, self.calls = TorchCheckpoint(checkpoint), epochs, interrupt_at, 0

    def batches(self, generator):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8, shuffle=True, generator=generator)

    def step(self, batch):
        self.calls += 1
        if self.interrupt_at is not None and self.calls > self.interrupt_at:
            raise KeyboardInterrupt
        x, y = batch
        self.model.train()
        loss = nn.functional.mse_loss(self.model(x), y)
        return {"loss": loss, "half": loss / 2}

    def fit(self, steps_per_epoch: int = 5):
        return fit(self.model, self.optimizer, self.epochs, steps_per_epoch, 1.0, self.batches, self.step, self.checkpoint,
                   seed=3, desc="toy")


def test_fit_resumes_mid_epoch_to_identical_weights(tmp_path, capsys):
    clean = Toy(tmp_path / "clean.pt")
    history = clean.fit()
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[0]["half"] == pytest.approx(history[0]["loss"] / 2)

    # killed in the middle of epoch 3 (5 batches per epoch): epochs 1 and 2 are checkpointed
    ckpt = tmp_path / "run.pt"
    killed = Toy(ckpt, interrupt_at=12)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert load_torch(ckpt)["epoch"] == 1  # 0-based: the second epoch finished
    assert not list(tmp_path.glob(".*.tmp"))

    resumed = Toy(ckpt)  # a fresh process would start from a fresh model, too
    resumed_history = resumed.fit()
    assert "toy: resuming after epoch 2" in capsys.readouterr().out
    assert resumed.calls == 2 * 5, "resume must not redo finished epochs"
    for (name, a), b in zip(clean.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in resumed_history] == pytest.approx([h["loss"] for h in history], abs=1e-7)
    # the optimizer state was restored too (Adam moments), not only the weights
    for a, b in zip(clean.optimizer.state_dict()["state"].values(), resumed.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_steps_per_epoch_caps_each_epoch_and_the_schedule(tmp_path):
    assert epoch_steps(40, 8, None) == 5 and epoch_steps(40, 8, 2) == 2 and epoch_steps(40, 8, 9) == 5
    capped = Toy(tmp_path / "capped.pt", epochs=3)
    history = capped.fit(steps_per_epoch=epoch_steps(40, 8, 2))
    assert capped.calls == 3 * 2, "each epoch stops after steps_per_epoch batches of the 5 the loader has"
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # the warm-up/cosine schedule spans the capped steps: it has reached its end after the last one
    assert capped.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_fit_checkpoint_of_a_finished_run_only_returns_history(tmp_path):
    ckpt = tmp_path / "done.pt"
    first = Toy(ckpt, epochs=2)
    history = first.fit()
    again = Toy(ckpt, epochs=2)
    assert again.fit() == history
    assert again.calls == 0
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))


def test_different_seed_gives_different_weights(tmp_path):
    a, b = Toy(tmp_path / "a.pt"), Toy(tmp_path / "b.pt")
    a.fit()
    fit(b.model, b.optimizer, b.epochs, 5, 1.0, b.batches, b.step, b.checkpoint, seed=4, desc="toy")
    assert not torch.equal(a.model[0].weight, b.model[0].weight)


# --------------------------------------------------------------------------- the loss-term registry


def test_shipped_objectives_are_the_named_terms_with_their_weights():
    assert adaptor_terms(AdaptorParams()) == [("cosine_softmax", 1.0), ("histogram_ap", 1.0)]
    assert adaptor_terms(AdaptorParams(ap_weight=0.3)) == [("cosine_softmax", 1.0), ("histogram_ap", 0.3)]
    assert adaptor_terms(AdaptorParams(objective="smooth_ap", ap_weight=0.3)) == [("smooth_ap", 1.0)]  # alone: 1
    assert adaptor_terms(AdaptorParams(objective="cosine_softmax")) == [("cosine_softmax", 1.0)]
    assert fusion_terms(FusionParams()) == [("bank_prop", 1.0), ("value", 0.01), ("batch_mean_attn_entropy", 0.0),
                                            ("routing_mi", 0.0), ("pseudo_labels", 1.0)]
    hp = FusionParams(objective="pseudo_labels+neighbour_pairs", lambda_prop=0.5, lambda_entropy=0.2, lambda_mi=0.3,
                      propagation="pairs")
    assert fusion_terms(hp) == [("prop", 0.5), ("value", 0.01), ("batch_mean_attn_entropy", -0.2), ("routing_mi", -0.3),
                                ("neighbour_pairs", 1.0), ("pseudo_labels", 1.0)]  # registry order, whatever order the params name
    assert fusion_terms(FusionParams(propagation="pairs"))[0] == ("prop", 1.0)
    metrics = {name: LOSS_TERMS[name].metric for name in LOSS_TERMS}
    assert metrics == {"cosine_softmax": "cross_entropy", "histogram_ap": "ap_loss", "smooth_ap": "ap_loss",
                       "prop": "prop", "bank_prop": "prop", "value": "value", "batch_mean_attn_entropy": "batch_mean_attn_entropy",
                       "routing_mi": "routing_mi", "neighbour_pairs": "pair", "pseudo_labels": "pseudo_ce"}


@pytest.mark.parametrize("field, terms", [("adaptor", adaptor_terms), ("fusion", fusion_terms)])
def test_every_objective_the_config_accepts_is_built_from_registry_terms(field, terms):
    params = {"adaptor": AdaptorParams, "fusion": FusionParams}[field]
    for value in typing.get_args(params.model_fields["objective"].annotation):
        extra = {"propagation": "pairs"} if "neighbour_pairs" in value else {}  # InfoNCE needs the pairs
        names = [name for name, _ in terms(params(objective=value, **extra))]
        assert set(value.split("+")) <= set(names) <= set(LOSS_TERMS), value


@pytest.mark.parametrize("text, message", [
    ("cosine_softmax+focal", "params: adaptor.objective: unknown loss term 'focal' (known: cosine_softmax, "
                             "histogram_ap, smooth_ap)"),
    ("neighbour_pairs", "unknown loss term 'neighbour_pairs'"),  # a fusion term is not an adaptor term
    ("histogram_ap+histogram_ap", "named twice"),
    ("histogram_ap+smooth_ap", "same metric"),
])
def test_unknown_or_clashing_terms_are_one_line_config_errors(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        parse_objective(text, "adaptor.objective", ("cosine_softmax", "histogram_ap", "smooth_ap"))
    assert "\n" not in str(err.value)


def test_objectives_evaluate_to_the_named_losses_and_their_weighted_sum():
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(8, 16, generator=g), dim=-1).requires_grad_(True)
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0])
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    classifier = CosineClassifier(torch.randn(3, 16, generator=g), 0.05)
    hp = AdaptorParams(ap_weight=0.25)
    losses = adaptor_objective(hp, classifier, targets)(EmbeddedBatch(emb, rows))
    assert list(losses) == ["cross_entropy", "accuracy", "ap_loss", "loss"]
    logits = classifier(emb)
    ce, ap = F.cross_entropy(logits, targets[rows]), HistogramAPLoss(hp.ap_bins)(emb, targets[rows])
    assert torch.equal(losses["cross_entropy"], ce) and torch.equal(losses["ap_loss"], ap)
    assert torch.equal(losses["accuracy"], (logits.argmax(1) == targets[rows]).float().mean())
    assert torch.equal(losses["loss"], ce + 0.25 * ap)
    two_views = AdaptorParams(objective="histogram_ap", ap_positives="augmentation")  # positives: the same row
    views = adaptor_objective(two_views, classifier, targets)(EmbeddedBatch(emb, torch.cat([rows[:4], rows[:4]])))
    assert torch.equal(views["loss"], HistogramAPLoss(20)(emb, torch.cat([rows[:4], rows[:4]])))

    fusion = nn.ModuleList([nn.Linear(2, 2)])
    fusion[0].value_regulariser = lambda: torch.tensor(0.5)
    alpha = torch.softmax(torch.randn(8, 2, 3, generator=g), dim=-1)
    heads = [(classifier, targets), (CosineClassifier(torch.randn(4, 16, generator=g), 0.05), targets % 4)]
    hp = FusionParams(objective="pseudo_labels+neighbour_pairs", lambda_entropy=0.1, lambda_mi=0.2, propagation="pairs")
    losses = fusion_objective(hp, fusion, heads)(EmbeddedBatch(emb, rows[:4], alpha))
    assert list(losses) == ["prop", "value", "batch_mean_attn_entropy", "routing_mi", "pair", "pseudo_ce", "loss"]
    prop, ent = attention_propagation(alpha[:4], alpha[4:]), batch_attention_entropy(alpha)
    per_image = -(alpha * alpha.log()).sum(-1).mean()
    mi = routing_information(alpha)
    assert torch.allclose(mi, ent - per_image) and 0 < mi < ent
    pair = neighbour_pair_infonce(emb[:4], emb[4:], hp.temperature)
    ces = [F.cross_entropy(head(emb[:4]), labels[rows[:4]]) for head, labels in heads]
    pseudo = sum(ces) / 2
    assert torch.equal(losses["pair"], pair) and torch.equal(losses["pseudo_ce"], pseudo)
    assert torch.equal(losses["loss"], prop + 0.01 * 0.5 - 0.1 * ent - 0.2 * mi + pair + pseudo)
    normed = fusion_objective(FusionParams(level_norm=True, propagation="pairs"), fusion, heads)(EmbeddedBatch(emb, rows[:4], alpha))
    assert torch.allclose(normed["pseudo_ce"], (ces[0] / math.log(3) + ces[1] / math.log(4)) / 2)
    with pytest.raises(ConfigError, match="pseudo_labels needs"):
        fusion_objective(FusionParams(propagation="pairs"), fusion, heads=[])


def test_the_attention_bank_amplifies_what_a_neighbourhood_shares():
    # images 0-2 are each other's neighbours, 3-5 too; one block, two sets
    neighbours = torch.tensor([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]])
    bank = AttentionBank(neighbours, blocks=1, sets=2, momentum=0.5, sharpen=0.5)
    assert torch.allclose(bank.target(torch.arange(6)), torch.full((6, 1, 2), 0.5))  # no lean: none proposed
    bank.update(torch.tensor([0, 1, 2]), torch.tensor([[[0.9, 0.1]]] * 3))
    assert torch.allclose(bank.alpha[0], torch.tensor([[0.7, 0.3]]))  # half kept, half the new attention
    lean = bank.target(torch.tensor([0]))[0, 0]
    assert torch.allclose(lean, torch.tensor([0.49, 0.09]) / 0.58)  # (0.7, 0.3) squared and renormalised
    assert torch.allclose(bank.target(torch.tensor([3])), torch.full((1, 1, 2), 0.5))  # the other group untouched
    assert "alpha" in bank.state_dict() and "neighbours" not in bank.state_dict()  # the memory resumes, not the graph

    alpha = torch.tensor([[[0.5, 0.5]]], requires_grad=True)
    head = (CosineClassifier(torch.randn(2, 4), 0.05), torch.zeros(6, dtype=torch.long))
    objective = fusion_objective(FusionParams(propagation="bank", lambda_prop=1.0), nn.ModuleList(), [head], bank)
    assert objective.names[0] == "bank_prop"
    losses = objective(EmbeddedBatch(torch.randn(1, 4), torch.tensor([1]), alpha.softmax(-1)))
    assert losses["prop"] > 0  # an undecided image next to a leaning neighbourhood is pulled to it
    assert torch.allclose(bank.alpha[1], torch.tensor([[0.6, 0.4]]))  # and its entry moved towards what it showed
    with pytest.raises(ConfigError, match="attention bank"):
        fusion_objective(FusionParams(propagation="bank"), nn.ModuleList(), [head])
    with pytest.raises(ValueError, match="neighbour_pairs needs"):
        FusionParams(propagation="bank", objective="neighbour_pairs")


# --------------------------------------------------------------------------- the batch steps


def test_batch_steps_train_the_model_on_the_shipped_objectives():
    torch.manual_seed(0)
    backbone, _, _ = create_backbone(BackboneParams(name="test_efficientnet", weights="none", image_size=48,
                                                    adapt_from_block=3))
    model = GrappaModel(backbone, 3, [2, 4], reduction=4, attn_dim=8).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, *backbone.block_shapes[2], generator=g)
    targets = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    classifier = CosineClassifier(torch.randn(2, backbone.embed_dim, generator=g), 0.05)
    objective = adaptor_objective(AdaptorParams(), classifier, targets)
    step = partial(adaptor_step, model, objective, single(2), "cpu", images=False, augment_scale=0.5)
    optimizer = torch.optim.AdamW([*model.adaptors.parameters(), *classifier.parameters()], lr=1e-2)
    before = [p.detach().clone() for p in model.adaptors.parameters()]
    losses = train_on_batch(step, (torch.arange(8), x, []), optimizer, warmup_cosine(optimizer, 2, 0))
    assert set(losses) == {"cross_entropy", "accuracy", "ap_loss", "loss"}
    assert any(not torch.equal(a, b) for a, b in zip(before, model.adaptors.parameters()))

    model.requires_grad_(False)
    model.fusion.requires_grad_(True)
    heads = [(classifier, targets), (CosineClassifier(torch.randn(4, backbone.embed_dim, generator=g), 0.05),
                                     torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))]
    pairs_hp = FusionParams(propagation="pairs")
    step = partial(fusion_step, model, fusion_objective(pairs_hp, model.fusion, heads), "cpu", images=False)
    pairs = torch.stack([x[:4], x[4:]], dim=1)  # 4 anchors, each with one neighbour
    losses = step((torch.arange(4), pairs, []))
    assert set(losses) == {"prop", "value", "batch_mean_attn_entropy", "routing_mi", "pseudo_ce", "loss"}
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.fusion.parameters())
    jittered = partial(fusion_step, model, fusion_objective(pairs_hp, model.fusion, heads), "cpu", images=False,
                       augment_scale=0.5)
    assert not torch.equal(jittered((torch.arange(4), pairs, []))["pseudo_ce"], losses["pseudo_ce"])

    bank = AttentionBank(torch.tensor([[1], [0], [3], [2]]), len(model.fusion), 2, momentum=0.5, sharpen=0.5)
    anchors = partial(fusion_step, model, fusion_objective(FusionParams(propagation="bank"), model.fusion, heads, bank),
                      "cpu", images=False, pairs=False)
    model.fusion.zero_grad()
    losses = anchors((torch.arange(4), x[:4], []))  # anchors alone: the neighbours' side is the bank's
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.fusion.parameters())
    assert not torch.allclose(bank.alpha, torch.full_like(bank.alpha, 0.5))
