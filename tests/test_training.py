"""The shared epoch loop: warm-up/cosine schedule, per-epoch checkpoints and exact resume (toy model)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grappa.io.artifacts import load_torch
from grappa.core.training import fit, warmup_cosine


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
        self.checkpoint, self.epochs, self.interrupt_at, self.calls = checkpoint, epochs, interrupt_at, 0

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

    def fit(self):
        return fit(self.model, self.optimizer, self.epochs, 5, 1.0, self.batches, self.step, self.checkpoint,
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
