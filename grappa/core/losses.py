"""Training objectives of the two Grappa stages (pure functions of tensors)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineClassifier(nn.Module):
    """Normalised-softmax head: logits = <f/|f|, w_c/|w_c|> / tau, with w_c initialised from centroids."""

    def __init__(self, centroids: torch.Tensor, temperature: float):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(centroids.float(), dim=-1).clone())
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings, dim=-1) @ F.normalize(self.weight, dim=-1).t() / self.temperature


def neighbour_pair_infonce(anchors: torch.Tensor, neighbours: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE where each anchor's positive is its sampled kNN neighbour.

    Inputs are L2-normalised (B, D). Every other image of the 2B batch is a negative.
    """
    z = torch.cat([anchors, neighbours])  # (2B, D)
    b = anchors.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


def _kl(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """KL(sg(target) || pred) over the last axis, averaged over everything else."""
    target = target.detach().clamp_min(1e-8)
    return (target * (target.log() - pred.clamp_min(1e-8).log())).sum(-1).mean()


def attention_propagation(alpha_anchor: torch.Tensor, alpha_neighbour: torch.Tensor) -> torch.Tensor:
    """Symmetric KL(sg(alpha_j) || alpha_i) over (B, L, M) attentions, averaged over images and blocks.

    Each image is pulled towards the granularity attention of its neighbour in feature space; the
    target side is detached so the two images do not both collapse onto a compromise.
    """
    return 0.5 * (_kl(alpha_neighbour, alpha_anchor) + _kl(alpha_anchor, alpha_neighbour))


class AttentionBank(nn.Module):
    """A running memory of every pool image's attention (N, L, M) and the pool's kNN graph (N, k).

    Image i's target is the mean bank entry of its neighbours, sharpened (raised to 1 / ``sharpen`` and
    renormalised): a lean its neighbourhood shares is amplified rather than only damped, so the
    propagation has fixed points other than one constant attention for all, and a batch needs no
    neighbour forward (half the fusion's work). Buffers, so the bank travels in the checkpoint.
    """

    def __init__(self, neighbours: torch.Tensor, blocks: int, sets: int, momentum: float, sharpen: float):
        super().__init__()
        self.register_buffer("alpha", torch.full((len(neighbours), blocks, sets), 1.0 / sets))
        self.register_buffer("neighbours", neighbours.long(), persistent=False)  # from the data, not learnt
        self.momentum, self.sharpen = momentum, sharpen

    def target(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, L, M): the sharpened neighbourhood attention of images ``rows``."""
        sharp = self.alpha[self.neighbours[rows]].mean(1).clamp_min(1e-8) ** (1.0 / self.sharpen)
        return sharp / sharp.sum(-1, keepdim=True)

    @torch.no_grad()
    def update(self, rows: torch.Tensor, alpha: torch.Tensor) -> None:
        """Images ``rows`` were just seen with attention ``alpha``: move their entries towards it."""
        self.alpha[rows] = self.momentum * self.alpha[rows] + (1.0 - self.momentum) * alpha.detach().float()


def bank_propagation(alpha: torch.Tensor, bank: AttentionBank, rows: torch.Tensor) -> torch.Tensor:
    """KL(sharpened neighbourhood || alpha) of the batch's images, then their bank entries updated."""
    loss = _kl(bank.target(rows), alpha)
    bank.update(rows, alpha)
    return loss


def routing_information(alpha: torch.Tensor) -> torch.Tensor:
    """Mutual information between image and set, H(mean_i alpha_i) - mean_i H(alpha_i), averaged over
    blocks: high when each image picks a set confidently and the batch uses every set."""
    per_image = -(alpha * alpha.clamp_min(1e-8).log()).sum(-1).mean(0)  # (L,)
    return (batch_attention_entropy(alpha, per_block=True) - per_image).mean()


def batch_attention_entropy(alpha: torch.Tensor, per_block: bool = False) -> torch.Tensor:
    """Entropy of the batch-mean attention per block (high = granularities are all in use)."""
    mean = alpha.mean(dim=0).clamp_min(1e-8)  # (L, M)
    entropy = -(mean * mean.log()).sum(-1)
    return entropy if per_block else entropy.mean()
