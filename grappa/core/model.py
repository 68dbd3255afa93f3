"""Grappa model: a frozen backbone, M bottleneck adaptor sets and per-block granularity fusion.

For each adapted block l with frozen output h_l and adaptor outputs a_l^m = A_l^m(h_l):

    single granularity m:  z_l = h_l + a_l^m
    uniform:               z_l = h_l + (1/M) sum_m a_l^m
    fusion:                alpha_l(x) = softmax_m( s <W_Q pool(h_l), W_K pool(h_l + a_l^m)> / sqrt(d) )   (bilinear)
                                      or softmax_m( g_l cos(W_Q pool(h_l), W_K pool(a_l^m)) )        (cosine)
                           z_l = h_l + W_V sum_m alpha_l^m(x) a_l^m + b_V    (value "linear"; "identity": W_V = I, no b_V)

The attention is image-level (pooled query/keys, shared by all positions of the image), so each image
has one "granularity attention" per block that stage 2 can propagate to its neighbours. W_V starts at
the identity and W_Q/W_K near zero, so the fused model starts as the uniform average; every adaptor's
up-projection starts at zero, so each adaptor set starts exactly at the backbone.

The fusion is computed without materialising the M outputs a_l^m (see GranularityFusion), and the
last block of an average-pooled CNN only as its mean (the embedding), from pooled terms.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

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
ATTENTIONS = ("bilinear", "cosine")  # how a fusion layer scores the adaptor sets (GranularityFusion)
VALUES = ("linear", "identity")  # its output map W_V: trained from the identity, or the identity itself


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


def _matrix(layer: nn.Module) -> torch.Tensor:
    """A pointwise layer's weight as an (out, in) matrix (a 1x1 conv's (out, in, 1, 1), viewed)."""
    return layer.weight.flatten(1)


def _apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: str) -> torch.Tensor:
    """The pointwise layer of (out, in) matrix ``weight`` on maps or tokens."""
    return F.conv2d(x, weight[:, :, None, None], bias) if layout == "channels" else F.linear(x, weight, bias)


@torch.no_grad()
def _embeds_mean(backbone: BlockwiseBackbone) -> bool:
    """Whether ``backbone.embed`` of a last-block map is its spatial mean (probed on a random map)."""
    device = next(backbone.parameters()).device
    probe = torch.randn(2, *backbone.block_shapes[-1], generator=torch.Generator().manual_seed(0)).to(device)
    return torch.allclose(backbone.embed(probe), probe.mean(dim=(-2, -1)), rtol=1e-5, atol=1e-6)


def _per_channel(v: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, C) per-image values, broadcast over the positions of (B, C, H, W) maps or (B, N, C) tokens."""
    return v[:, :, None, None] if layout == "channels" else v[:, None, :]


def image_pool(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Image-level summary of a block output: spatial mean for maps, the CLS token for ViTs."""
    if layout != "channels":
        return x[:, 0]
    # The mean over an NHWC view sends back an NHWC gradient, like the convolutions'. mean(dim=(-2, -1))
    # sends back an NCHW one; added to them, it made the frozen BN + ReLU6 backward before it ~10x slower.
    return x.permute(0, 2, 3, 1).mean(dim=(1, 2))


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


class FusionWeights(NamedTuple):
    """One block's M adaptors and W_V as grouped weights (see :meth:`GranularityFusion.weights`)."""

    down: torch.Tensor  # (M h, C): every set's down-projection D_m, stacked
    down_bias: torch.Tensor  # (M h,)
    up: torch.Tensor  # (M, h, C): every set's up-projection U_m, transposed
    up_bias: torch.Tensor  # (M, 1, C): c_m
    value_up: torch.Tensor | None  # (C, M h): [W_V U_1 .. W_V U_M]; None where only the pooled output is needed
    value_bias: torch.Tensor | None  # (M, C): W_V c_m; None likewise
    act: nn.Module


class GranularityFusion(nn.Module):
    """AdapterFusion-style attention over the M adaptor outputs of one block, per image.

    Computed without the M full-size adaptor outputs a_m = U_m g_m + c_m (g_m = act(D_m h)): the
    keys read pool(a_m) = U_m pool(g_m) + c_m (pooling is linear), and the output is

        h + W_V sum_m alpha_m a_m + b_V = h + [W_V U_1 .. W_V U_M] [alpha_1 g_1; ..; alpha_M g_M]
                                            + sum_m alpha_m W_V c_m + b_V,

    two grouped pointwise ops per block (all M down-projections, then one C x M h projection)
    instead of M bottlenecks and a C x C value projection: the same function for a fraction of the
    work (the fusion batch went from 2.2 s to ~1 s, see CPU_CHUNK).
    """

    def __init__(self, dim: int, num_sets: int, attn_dim: int, layout: str, scale: float = 1.0,
                 attention: str = "bilinear", value: str = "linear"):
        super().__init__()
        if attention not in ATTENTIONS or value not in VALUES:
            raise ValueError(f"attention {attention!r} / value {value!r}: expected one of {ATTENTIONS} / {VALUES}")
        self.layout = layout
        self.num_sets = num_sets
        self.attention = attention
        # s, the attention's inverse temperature: Adam moves W_Q and W_K by about lr a step whatever
        # the gradient's size, so s (not the loss) sets how fast the logits can leave uniform. Under
        # cosine attention the logits are bounded by g_l = exp(log_scale), learnt per block from s.
        self.scale = scale / math.sqrt(attn_dim)
        if attention == "cosine":
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.query = nn.Linear(dim, attn_dim)
        self.key = nn.Linear(dim, attn_dim)
        # "identity": the attention is the only lever (no map that lowers the loss without routing)
        self.value = _pointwise(dim, dim, layout) if value == "linear" else None
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        if self.value is not None:
            with torch.no_grad():  # W_V = I: fusion starts as the uniform average of the adaptors
                self.value.weight.copy_(torch.eye(dim).view_as(self.value.weight))
                self.value.bias.zero_()

    def attention_parameters(self) -> list[nn.Parameter]:
        """The parameters that set the attention (W_Q, W_K and the learnt temperature), not the output map."""
        return [p for name, p in self.named_parameters() if not name.startswith("value.")]

    def weights(self, adaptors: Sequence[BottleneckAdaptor], pooled: bool = False) -> FusionWeights:
        """This block's adaptors (one per set, in attention order) as grouped weights; W_V U_m costs
        C x C x M h, so a chunked batch computes them once for all its chunks (and never if ``pooled``)."""
        up = torch.cat([_matrix(a.up) for a in adaptors], dim=1)  # (C, M h)
        up_bias = torch.stack([a.up.bias for a in adaptors])  # (M, C)
        value_up, value_bias = up, up_bias
        if self.value is not None and not pooled:
            value = _matrix(self.value)
            value_up, value_bias = value @ up, up_bias @ value.t()
        return FusionWeights(torch.cat([_matrix(a.down) for a in adaptors]), torch.cat([a.down.bias for a in adaptors]),
                             up.t().reshape(len(adaptors), -1, up.shape[0]), up_bias[:, None],
                             None if pooled else value_up, None if pooled else value_bias, adaptors[0].act)

    def logits(self, pooled_h: torch.Tensor, pooled_a: torch.Tensor) -> torch.Tensor:
        """(B, M) attention logits from the pooled block output (B, C) and adaptor outputs (B, M, C)."""
        q = self.query(pooled_h)  # (B, A)
        if self.attention == "cosine":  # keys of the adaptor outputs alone: h no longer cancels once normalised
            keys = F.normalize(self.key(pooled_a), dim=-1)
            return torch.bmm(keys, F.normalize(q, dim=-1)[:, :, None]).squeeze(-1) * self.log_scale.exp()
        keys = self.key(pooled_h[:, None] + pooled_a)  # (B, M, A) = key(pool(h + a_m))
        return torch.bmm(keys, q[:, :, None]).squeeze(-1) * self.scale

    def forward(self, h: torch.Tensor, w: FusionWeights, pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, (B, M) attention); ``pooled``: the output's image_pool (B, C) only, from pooled terms."""
        b, (m, hidden, _) = h.shape[0], w.up.shape
        g = w.act(_apply(h, w.down, w.down_bias, self.layout))  # (B, M h, ...) every set's hidden units
        pooled_h = image_pool(h, self.layout)  # (B, C)
        pooled_g = image_pool(g, self.layout).view(b, m, hidden).transpose(0, 1)  # (M, B, h)
        pooled_a = torch.baddbmm(w.up_bias, pooled_g, w.up).transpose(0, 1)  # (B, M, C): pool(a_m)
        alpha = torch.softmax(self.logits(pooled_h, pooled_a), dim=-1)
        if pooled:
            mean_a = torch.bmm(alpha[:, None], pooled_a).squeeze(1)  # sum_m alpha_m pool(a_m)
            if self.value is None:
                return pooled_h + mean_a, alpha
            return pooled_h + F.linear(mean_a, _matrix(self.value), self.value.bias), alpha
        scale = alpha[:, :, None].expand(b, m, hidden).reshape(b, m * hidden)  # alpha_m on set m's hidden units
        out = h + _apply(g * _per_channel(scale, self.layout), w.value_up, None, self.layout)
        bias = alpha @ w.value_bias if self.value is None else torch.addmm(self.value.bias, alpha, w.value_bias)
        out += _per_channel(bias, self.layout)  # in place: one full map
        return out, alpha

    def value_regulariser(self) -> torch.Tensor:
        if self.value is None:  # W_V is the identity
            return self.query.weight.new_zeros(())
        w = self.value.weight.view(self.value.weight.shape[0], -1)
        return (w - torch.eye(w.shape[0], device=w.device)).pow(2).sum()


class GrappaModel(nn.Module):
    """Backbone + adaptor sets (one per k) on blocks [start, end) + optional fusion layers."""

    def __init__(self, backbone: BlockwiseBackbone, start: int, ks: list[int], reduction: int,
                 attn_dim: int | None = None, attention_scale: float = 1.0, attention: str = "bilinear",
                 value: str = "linear"):
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
            self.fusion = nn.ModuleList(GranularityFusion(d, len(ks), attn_dim, layout, attention_scale, attention, value)
                                       for d in dims)
        self.cpu_chunk: int | None = CPU_CHUNK  # None: whole batches (the speed benchmark's baseline)
        # Whether the embedding is the spatial mean of the last map (average-pooled CNNs): then the fused
        # last block is only ever averaged, and its mean comes from pooled terms without the full map.
        self.mean_embed = layout == "channels" and _embeds_mean(backbone)
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
        fused = self._fusion_weights() if mode == FUSION else None  # once for all chunks
        if self.cpu_chunk and x.device.type == "cpu" and x.shape[0] > self.cpu_chunk:
            parts = [self._suffix(chunk, mode, fused) for chunk in x.split(self.cpu_chunk)]
            alphas = [alpha for _, alpha in parts]
            return torch.cat([emb for emb, _ in parts]), (None if alphas[0] is None else torch.cat(alphas))
        return self._suffix(x, mode, fused)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def adaptor_set(self, k: int) -> nn.ModuleList:
        """Adaptor set k: one adaptor per adapted block."""
        return self.adaptors[adaptor_key(k)]

    def _fusion_weights(self) -> list[FusionWeights]:
        """Every fusion layer's grouped weights, from its block's adaptor of each set in ``ks`` order."""
        if self.fusion is None:
            raise KeyError(f"unknown mode {FUSION!r}; this model's modes are {self.modes()}")
        sets = [self.adaptor_set(k) for k in self.ks]
        return [layer.weights([adaptors[i] for adaptors in sets], pooled=self._pooled_out(i))
                for i, layer in enumerate(self.fusion)]

    def _pooled_out(self, i: int) -> bool:
        """Whether fusion layer i outputs only its pooled map (the last one, under a mean embedding)."""
        return self.mean_embed and i == len(self.fusion) - 1

    def _suffix(self, x: torch.Tensor, mode: str,
                fused: list[FusionWeights] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._layout(x)
        sets = [self.adaptor_set(k) for k in self.ks]
        alone = None  # the one adaptor set of a single_k_<K> mode
        if mode not in (ZERO_SHOT, FUSION, UNIFORM):
            if single_k(mode) not in self.ks:
                raise KeyError(f"unknown mode {mode!r}; this model's modes are {self.modes()}")
            alone = self.adaptor_set(single_k(mode))
        alphas, pooled = [], False
        for i, block in enumerate(self.backbone.blocks[self.start:]):
            h = block(x)
            if mode == ZERO_SHOT:
                x = h
            elif mode == FUSION:
                pooled = self._pooled_out(i)  # then x is already the embedding, embed(map) = mean(map)
                x, alpha = self.fusion[i](h, fused[i], pooled=pooled)
                alphas.append(alpha)
            elif mode == UNIFORM:
                x = h + torch.stack([adaptors[i](h) for adaptors in sets]).mean(0)
            else:
                x = h + alone[i](h)
        emb = F.normalize(x if pooled else self.backbone.embed(x), dim=-1)
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
