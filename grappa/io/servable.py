"""The one fused model as a self-contained artifact: weights, architecture and preprocessing together.

``<folder>/model.pt`` holds the state dict of the whole :class:`GrappaModel` (frozen backbone,
every adaptor set, fusion layers; loaded with ``weights_only=True``) and ``<folder>/model.json``
everything needed to rebuild and feed it: the timm architecture, image size, pooling, adapted
blocks, k ladder, preprocessing (mean, std, interpolation, crop) and the weights' sha256. Loading
needs neither params.yaml nor the backbone's weight package, so the registered MLflow model, the
catalogue index and ``grappa search`` all embed images exactly the same way.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from grappa.config import ConfigError, Params
from grappa.core.backbones import BlockwiseBackbone, Preprocess, timm_network
from grappa.core.model import FUSION, GrappaModel, pick_device
from grappa.io.artifacts import atomic_paths, load_torch, read_json
from grappa.io.layout import layout

WEIGHTS, CONFIG = "model.pt", "model.json"
FORMAT = 1


@dataclass
class Servable:
    model: GrappaModel
    preprocess: Preprocess
    config: dict

    @property
    def digest(self) -> str:
        """Identifies the model: the sha256 of its weights file."""
        return self.config["weights_sha256"]

    def same_prefix_as(self, params: Params) -> bool:
        """True when this model's frozen prefix is the one ``params`` extracts (cached activations fit)."""
        return self.config["backbone"] == params.backbone.model_dump()

    @torch.inference_mode()
    def embed(self, images: list, batch_size: int = 32) -> np.ndarray:
        """L2-normalised (N, D) float32 embeddings of images given as bytes, local paths, s3:// URIs or
        decoded PIL images (an upload the server has already decoded for its thumbnail)."""
        from PIL import Image

        from grappa.io.sources import ImageDecodeError, decode_image
        from grappa.core.augment import image_transform
        from grappa.io.storage import StorageError, read_bytes

        transform = image_transform(self.preprocess, train=False)
        self.model.eval()
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(images), batch_size):
            batch = []
            for i, item in enumerate(images[start:start + batch_size], start):
                if isinstance(item, Image.Image):
                    batch.append(transform(item))
                    continue
                try:
                    data = bytes(item) if isinstance(item, (bytes, bytearray, memoryview)) else read_bytes(str(item))
                    batch.append(transform(decode_image(data, min_side=1, max_pixels=self.config["max_pixels"])))
                except (ImageDecodeError, StorageError) as err:
                    raise ValueError(f"image {i}: {err}") from None
            out.append(self.model(torch.stack(batch).to(device), FUSION).cpu().numpy())
        dim = self.config["embed_dim"]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)


def export(model: GrappaModel, params: Params, preprocess: Preprocess, folder: str | Path) -> dict:
    """Write ``model.pt`` and ``model.json`` into ``folder`` (both renamed into place together)."""
    buffer = io.BytesIO()
    torch.save({name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}, buffer)
    weights = buffer.getvalue()
    config = {
        "format": FORMAT,
        "mode": FUSION,
        "backbone": params.backbone.model_dump(),
        "timm_name": params.backbone.name,
        "image_size": params.backbone.image_size,
        "pooling": params.backbone.pooling,
        "adapt_from_block": model.start,
        "ks": model.ks,
        "reduction": params.adaptor.reduction,
        "attn_dim": params.fusion.attn_dim,
        "attention_scale": params.fusion.attention_scale,
        "attention": params.fusion.attention,
        "value": params.fusion.value,
        "preprocess": asdict(preprocess),
        "embed_dim": model.backbone.embed_dim,
        "max_pixels": params.data.max_pixels,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    folder = Path(folder)
    with atomic_paths(folder / WEIGHTS, folder / CONFIG) as (tmp_weights, tmp_config):
        tmp_weights.write_bytes(weights)
        tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ConfigError(f"no servable model at {folder} (missing {CONFIG})")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ConfigError(f"{path}: model format {config.get('format')!r} is not {FORMAT}; re-export it")
    return config


def load(folder: str | Path, device: str | torch.device | None = None) -> Servable:
    """Rebuild the model from ``folder`` (architecture from timm, every weight from ``model.pt``)."""
    config = read_config(folder)
    weights = Path(folder) / WEIGHTS
    if hashlib.sha256(weights.read_bytes()).hexdigest() != config["weights_sha256"]:
        raise ConfigError(f"{weights} does not match the sha256 recorded in {CONFIG}; the model is corrupt")
    backbone = BlockwiseBackbone(timm_network(config["timm_name"]), config["image_size"], config["pooling"])
    model = GrappaModel(backbone, config["adapt_from_block"], config["ks"], config["reduction"],
                        attn_dim=config["attn_dim"],
                        attention_scale=config.get("attention_scale", 1.0),  # models exported before it: 1
                        attention=config.get("attention", "bilinear"), value=config.get("value", "linear"))
    model.load_state_dict(load_torch(weights))
    model.requires_grad_(False).eval().to(device or pick_device())
    return Servable(model, Preprocess.from_dict(config["preprocess"]), config)


# --------------------------------------------------------------------------- the model that serves


def write_champion(params: Params, model_sha256: str, model_uri: str, version: str | None = None) -> None:
    """Record which model serves: only what changes when the champion changes (the index depends on it)."""
    from grappa.io.artifacts import write_json

    write_json(layout(params).champion, {"registered_model": params.tracking.registered_model if version else None,
                                       "version": version, "model_sha256": model_sha256, "model_uri": model_uri})


def download(model_uri: str) -> Path:
    """The servable folder of a registered model (its pyfunc ``model`` artifact), downloaded locally."""
    import tempfile

    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                     dst_path=tempfile.mkdtemp(prefix="grappa-model-")))
    found = sorted(local.rglob(CONFIG))
    if not found:
        raise FileNotFoundError(f"{model_uri} holds no {CONFIG} (not a servable grappa model)")
    return found[0].parent


def load_model(ref: str | None, params: Params) -> tuple[Servable, dict]:
    """The model for ``ref`` (a servable folder or models:/ URI; None: the champion) and its identity."""
    if ref is None:
        champion = layout(params).champion
        if not champion.is_file():
            raise ConfigError(f"no champion recorded at {champion}; run the pipeline up to 'evaluate' first")
        return load_identity(read_json(champion), params)
    if ref.startswith("models:/"):
        return load_identity({"model_uri": ref, "version": None, "model_sha256": None}, params)
    return load_identity({"model_uri": ref, "version": None,
                          "model_sha256": read_config(ref)["weights_sha256"]}, params)


def load_identity(identity: dict, params: Params) -> tuple[Servable, dict]:
    """Load the model ``identity`` names (model_uri, version, model_sha256); this workspace's own copy
    when it has those weights, else from the registry or folder the URI names."""
    uri, local = identity["model_uri"], layout(params).model
    if identity["model_sha256"] and (local / CONFIG).is_file() \
            and read_config(local)["weights_sha256"] == identity["model_sha256"]:
        folder = local  # no download
    elif uri.startswith("models:/"):
        try:
            folder = download(uri)
        except Exception as err:
            raise ConfigError(f"cannot load {uri} from the MLflow registry: {str(err).splitlines()[0][:200]}") from None
    else:
        folder = Path(uri)
    model = load(folder)
    if identity["model_sha256"] and model.digest != identity["model_sha256"]:
        raise ConfigError(f"{uri} has weights {model.digest[:12]}, expected {identity['model_sha256'][:12]}")
    return model, {**identity, "model_sha256": model.digest}
