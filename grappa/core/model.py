"""Grappa model: a frozen backbone, M bottleneck adaptor sets and per-block granularity fusion.

For each adapted block l with frozen output h_l and adaptor outputs a_l^m = A_l^m(h_l):

    single granularity m:  z_l = h_l + a_l^m
    uniform:               z_l = h_l + (1/M) sum_m a_l^m
    fusion:                alpha_l(x) = softmax_m( <W_Q pool(h_l), W_K pool(h_l + a_l^m)> / sqrt(d) )
                           z_l = h_l + W_V sum_m alpha_l^m(x) a_l^m

The attention is image-level (pooled query/keys, shared by all positions of the image), so each image
has one "granularity attention" per block that stage 2 can propagate to its neighbours. W_V starts at
the identity and W_Q/W_K near zero, so the fused model starts as the uniform average; every adaptor's
up-projection starts at zero, so each adaptor set starts exactly at the backbone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from grappa.core.backbones import BlockwiseBackbone

# Mode names: the one spelling of a model variant, from forward_suffix to metrics.json, results.md and MLflow.
ZERO_SHOT = "zero_shot"  # the frozen backbone
UNIFORM = "uniform"  # the mean of every adaptor set the model holds
FUSION = "grappa"  # the fused model (the one that serves)
_SINGLE = "single_k_"  # + K: backbone + adaptor set K alone, see single()
# On the CPU the adapted blocks take at most this many images at a time. Past it a block's working set
# leaves the caches and the time grows faster than the batch: a fusion batch (128 pairs = 256 images
# through 3 adaptor sets) took 5.3 s whole and 2.2 s in chunks of 64; an adaptor batch of 128, 0.75 s
# and 0.53 s (2 cores, one run; `python -m benchmarks.speed --only train` prints both side by side).
# No result changes: every image goes through on its own (the backbone's batch norm is frozen).
CPU_CHUNK = 64


def pick_device() -> torch.device:
    """CUDA when present (the paper's all-block placement is meant for it), else CPU; GRAPPA_DEVICE overrides."""
    import os

    return torch.device(os.environ.get("GRAPPA_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def single(k: int) -> str:
    """Mode name for the single-granularity model with adaptor set k: ``single_k_<k>``."""
    return f"{_SINGLE}{k}"


def single_k(mode: str) -> int | None:
    """The K of a ``single_k_<K>`` mode name; None for every other name."""
    tail = mode[len(_SINGLE):] if mode.startswith(_SINGLE) else ""
    return int(tail) if tail.isdigit() else None


def adaptor_key(k: int) -> str:
    """Key of adaptor set k in ``GrappaModel.adaptors``: part of the weights layout (``adaptors.k<k>.*``
    in model.pt), never a mode name; changing it would orphan every saved model."""
    return f"k{k}"


def _pointwise(in_dim: int, out_dim: int, layout: str) -> nn.Module:
    return nn.Conv2d(in_dim, out_dim, 1) if layout == "channels" else nn.Linear(in_dim, out_dim)


def image_pool(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Image-level summary of a block output: spatial mean for maps, the CLS token for ViTs."""
    return x.mean(dim=(-2, -1)) if layout == "channels" else x[:, 0]


class BottleneckAdaptor(nn.Module):
    """a(h) = U act(D h), a 1x1 (or per-token) bottleneck; the block output becomes h + a(h)."""

    def __init__(self, dim: int, reduction: int, layout: str):
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.down = _pointwise(dim, hidden, layout)
        self.act = nn.GELU()
        self.up = _pointwise(hidden, dim, layout)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # zero up-projection: training starts exactly at the backbone
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


class GranularityFusion(nn.Module):
    """AdapterFusion-style attention over the M adaptor outputs of one block, per image."""

    def __init__(self, dim: int, num_sets: int, attn_dim: int, layout: str):
        super().__init__()
        self.layout = layout
        self.num_sets = num_sets
        self.query = nn.Linear(dim, attn_dim)
        self.key = nn.Linear(dim, attn_dim)
        self.value = _pointwise(dim, dim, layout)
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        with torch.no_grad():  # W_V = I: fusion starts as the uniform average of the adaptors
            self.value.weight.copy_(torch.eye(dim).view_as(self.value.weight))
            self.value.bias.zero_()

    def forward(self, h: torch.Tensor, deltas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.query(image_pool(h, self.layout))  # (B, A)
        keys = torch.stack([self.key(image_pool(h + d, self.layout)) for d in deltas], dim=1)  # (B, M, A)
        alpha = torch.softmax(torch.einsum("ba,bma->bm", q, keys) / math.sqrt(q.shape[-1]), dim=-1)
        shape = (-1, self.num_sets) + (1,) * (h.dim() - 1)
        mixed = (alpha.view(shape) * torch.stack(deltas, dim=1)).sum(dim=1)
        # W_V is linear and alpha sums to one, so W_V(sum a_m alpha_m) == sum alpha_m W_V a_m.
        return h + self.value(mixed), alpha

    def value_regulariser(self) -> torch.Tensor:
        w = self.value.weight.view(self.value.weight.shape[0], -1)
        return (w - torch.eye(w.shape[0], device=w.device)).pow(2).sum()


class GrappaModel(nn.Module):
    """Backbone + adaptor sets (one per k) on blocks [start, end) + optional fusion layers."""

    def __init__(self, backbone: BlockwiseBackbone, start: int, ks: list[int], reduction: int,
                 attn_dim: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.start = start
        self.ks = list(ks)
        layout = backbone.layout
        dims = backbone.block_dims[start:]
        self.adaptors = nn.ModuleDict(
            {adaptor_key(k): nn.ModuleList(BottleneckAdaptor(d, reduction, layout) for d in dims) for k in ks}
        )
        self.fusion = None
        if attn_dim is not None:
            self.fusion = nn.ModuleList(GranularityFusion(d, len(ks), attn_dim, layout) for d in dims)
        self.cpu_chunk: int | None = CPU_CHUNK  # None: whole batches (the speed benchmark's baseline)
        # CNN maps in NHWC (channels_last): the Lite0 forward at batch 32 ran 2.5x faster on 2 CPU cores
        # than in NCHW, with the same embeddings to 4e-7 (one run); inputs are converted on the way in.
        self.channels_last = layout == "channels"
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "GrappaModel":
        super().train(mode)
        self.backbone.eval()  # frozen BN statistics, always
        return self

    @torch.no_grad()
    def forward_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen part before the first adapted block (computed once and cached on CPU)."""
        x = self.backbone.stem(self._layout(images))
        for block in self.backbone.blocks[: self.start]:
            x = block(x)
        return x

    def forward_suffix(self, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adapted blocks -> L2-normalised embedding, plus (B, L, M) attention in fusion mode."""
        if self.cpu_chunk and x.device.type == "cpu" and x.shape[0] > self.cpu_chunk:
            parts = [self._suffix(chunk, mode) for chunk in x.split(self.cpu_chunk)]
            alphas = [alpha for _, alpha in parts]
            return torch.cat([emb for emb, _ in parts]), (None if alphas[0] is None else torch.cat(alphas))
        return self._suffix(x, mode)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def adaptor_set(self, k: int) -> nn.ModuleList:
        """Adaptor set k: one adaptor per adapted block."""
        return self.adaptors[adaptor_key(k)]

    def _suffix(self, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._layout(x)
        sets = [self.adaptor_set(k) for k in self.ks]
        alone = None  # the one adaptor set of a single_k_<K> mode
        if mode not in (ZERO_SHOT, FUSION, UNIFORM):
            if single_k(mode) not in self.ks:
                raise KeyError(f"unknown mode {mode!r}; this model's modes are {self.modes()}")
            alone = self.adaptor_set(single_k(mode))
        alphas = []
        for i, block in enumerate(self.backbone.blocks[self.start:]):
            h = block(x)
            if mode == ZERO_SHOT:
                x = h
            elif mode == FUSION:
                x, alpha = self.fusion[i](h, [adaptors[i](h) for adaptors in sets])
                alphas.append(alpha)
            elif mode == UNIFORM:
                x = h + torch.stack([adaptors[i](h) for adaptors in sets]).mean(0)
            else:
                x = h + alone[i](h)
        emb = F.normalize(self.backbone.embed(x), dim=-1)
        return emb, (torch.stack(alphas, dim=1) if alphas else None)

    def forward(self, images: torch.Tensor, mode: str = FUSION) -> torch.Tensor:
        return self.forward_suffix(self.forward_prefix(images), mode)[0]

    def modes(self) -> list[str]:
        """This model's mode names, in the order of the results table (oracle aside)."""
        out = [ZERO_SHOT] + [single(k) for k in self.ks]
        if len(self.ks) > 1:
            out.append(UNIFORM)
        if self.fusion is not None:
            out.append(FUSION)
        return out
