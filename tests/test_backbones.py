"""Frozen backbones: the offline EfficientNet-Lite0 weights are the real ImageNet model; timm test models
split into blocks without changing their output; unsupported setups are one-line ConfigErrors."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageDraw
from torch import nn

from conftest import SHARED_DATA
from grappa.config import BackboneParams, ConfigError
from grappa.core.augment import image_transform
from grappa.core.backbones import BlockwiseBackbone, create_backbone, lite0_package_state_dict

# ImageNet-1k bird classes: 7-24 (cock .. great grey owl), 80-100 (black grouse .. black swan),
# 127-146 (white stork .. albatross).
BIRD_CLASSES = set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147))
LITE0 = BackboneParams(name="tf_efficientnet_lite0", weights="auto", image_size=224)


@pytest.fixture(scope="module")
def lite0():
    """ImageNet classifier (num_classes=1000) with the package weights, classifier included."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    state = lite0_package_state_dict()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    backbone, preprocess, fingerprint = create_backbone(LITE0)
    return model.eval(), image_transform(preprocess, train=False), backbone, fingerprint


def synthetic_image() -> Image.Image:
    img = Image.new("RGB", (224, 224), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i in range(0, 224, 16):
        draw.rectangle([i, 0, i + 7, 223], fill=(0, 0, 0))
    return img


def test_lite0_package_weights_give_confident_imagenet_predictions(lite0):
    model, transform, _, _ = lite0
    with torch.no_grad():
        probs = model(transform(synthetic_image())[None]).softmax(-1)[0]
    entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum())
    # A random or mis-mapped network is close to uniform: max prob ~ 1/1000, entropy ~ log(1000) = 6.9.
    assert float(probs.max()) > 0.05
    assert entropy < 0.9 * math.log(1000)


def _shared_birds(n: int = 3) -> list[str]:
    manifest = SHARED_DATA / "birds" / "manifest.csv"
    if not manifest.exists():
        pytest.skip(f"shared data not available at {SHARED_DATA}")
    with open(manifest) as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "query_db"]
    wanted = ["images/0/0005.jpg", "images/54/0002.jpg", "images/81/0003.jpg"]  # goldfinch and two others
    paths = [r["path"] for r in rows if r["path"] in wanted][:n]
    if len(paths) < n:
        pytest.skip("expected bird images are not in the shared manifest")
    return [str(SHARED_DATA / "birds" / p) for p in paths]


def test_lite0_recognises_real_birds(lite0):
    model, transform, _, _ = lite0
    paths = _shared_birds()
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        top1 = model(batch).argmax(-1).tolist()
    assert all(c in BIRD_CLASSES for c in top1), f"top-1 ImageNet classes {top1} are not birds"


def test_lite0_backbone_matches_the_classifier_features_and_is_deterministic(lite0):
    model, transform, b1, fp1 = lite0
    torch.manual_seed(99)  # the global RNG state must not matter
    b2, _, fp2 = create_backbone(LITE0)
    x = transform(synthetic_image())[None]
    with torch.no_grad():
        f1, f2 = b1(x), b2(x)
        reference = model.forward_head(model.forward_features(x), pre_logits=True)
    assert fp1 == fp2
    assert torch.equal(f1, f2)
    assert torch.allclose(f1, reference, atol=1e-5)
    assert not any(p.requires_grad for p in b1.parameters())


@pytest.mark.parametrize("name, size", [("test_vit", 64), ("test_resnet", 64), ("test_convnext", 64),
                                        ("test_efficientnet", 64), ("test_nfnet", 64)])
def test_blockwise_forward_equals_timm_pooled_features(name, size):
    backbone, _, _ = create_backbone(BackboneParams(name=name, weights="none", image_size=size, pooling="avg"))
    assert len(backbone.blocks) >= 3
    assert len(backbone.block_dims) == len(backbone.blocks) == len(backbone.block_shapes)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = backbone(x)
        theirs = backbone.model(x)  # num_classes=0: timm's own pooled features
        manual = backbone.stem(x)
        for block in backbone.blocks:
            manual = block(manual)
        assert tuple(manual.shape[1:]) == backbone.block_shapes[-1]
    assert ours.shape == theirs.shape == (2, backbone.embed_dim)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, size", [("test_efficientnet", 48), ("test_resnet", 48)])
def test_same_params_same_features_across_instances(name, size):
    params = BackboneParams(name=name, weights="none", image_size=size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    b1, _, fp1 = create_backbone(params)
    torch.manual_seed(456)  # the global RNG state must not matter
    b2, _, fp2 = create_backbone(params)
    with torch.no_grad():
        assert torch.equal(b1(x), b2(x))
    assert fp1 == fp2


def test_random_init_vit_is_the_same_in_every_step():
    params = BackboneParams(name="test_vit", weights="none", image_size=64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    b1, _, _ = create_backbone(params)
    torch.manual_seed(456)
    b2, _, _ = create_backbone(params)
    with torch.no_grad():
        assert torch.equal(b1(x), b2(x))


def test_fingerprint_changes_with_setup():
    base = BackboneParams(name="test_efficientnet", weights="none", image_size=48)
    fps = {create_backbone(p)[2] for p in (base, base.model_copy(update={"pooling": "gem"}),
                                          base.model_copy(update={"image_size": 64}))}
    assert len(fps) == 3


def test_unsupported_architecture_is_a_config_error():
    class NotABackbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3)

    with pytest.raises(ConfigError, match="unsupported"):
        BlockwiseBackbone(NotABackbone(), image_size=32)
    with pytest.raises(ConfigError, match="unsupported") as info:
        create_backbone(BackboneParams(name="mixer_s16_224", weights="none", image_size=224))
    assert "\n" not in str(info.value)


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="backbone.name"):
        create_backbone(BackboneParams(name="no_such_model_xyz", weights="none"))


def test_adapt_from_block_past_the_end_is_a_config_error():
    with pytest.raises(ConfigError, match="adapt_from_block") as info:
        create_backbone(BackboneParams(name="test_efficientnet", weights="none", image_size=48, adapt_from_block=99))
    assert "\n" not in str(info.value)
    last = len(create_backbone(BackboneParams(name="test_efficientnet", weights="none", image_size=48))[0].blocks)
    with pytest.raises(ConfigError, match="adapt_from_block"):
        create_backbone(BackboneParams(name="test_efficientnet", weights="none", image_size=48, adapt_from_block=last))
    create_backbone(BackboneParams(name="test_efficientnet", weights="none", image_size=48, adapt_from_block=last - 1))


def test_missing_or_unfit_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint not found"):
        create_backbone(BackboneParams(name="test_efficientnet", weights=str(tmp_path / "absent.pt"), image_size=48))
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ConfigError, match="cannot load"):
        create_backbone(BackboneParams(name="test_efficientnet", weights=str(tmp_path / "junk.pt"), image_size=48))
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        create_backbone(BackboneParams(name="test_efficientnet", weights=str(tmp_path / "other.pt"), image_size=48))


def test_local_checkpoint_roundtrip(tmp_path):
    """A checkpoint saved from one random model (wrapped, with a 'module.' prefix) loads into another."""
    source = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.05)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ck.pt")
    backbone, _, fp = create_backbone(BackboneParams(name="test_efficientnet", weights=str(tmp_path / "ck.pt"),
                                                     image_size=48))
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(backbone(x), source.eval()(x), atol=1e-5)
    assert np.isfinite(backbone(x).numpy()).all() and len(fp) == 16


@pytest.mark.parametrize("name", ["test_maxvit"])
def test_architectures_that_do_not_chain_block_by_block_are_refused(name):
    from grappa.core.backbones import create_backbone
    from grappa.config import ConfigError

    with pytest.raises(ConfigError, match="backbone"):
        create_backbone(BackboneParams(name=name, weights="none", image_size=64))
