"""The evaluation transform: timm's resize + centre crop + normalise, computed as one resample."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from grappa.core.augment import CentreCrop, image_transform
from grappa.core.backbones import Preprocess
from conftest import SHARED_DATA


def _timm(pre: Preprocess):
    size = pre.image_size
    return create_transform((3, size, size), is_training=False, mean=pre.mean, std=pre.std,
                            interpolation=pre.interpolation, crop_pct=pre.crop_pct)


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: the resample's filter sees structure at every scale."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([127 + 100 * np.sin(xx / (7 + c) + yy / (11 + 2 * c)) for c in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("crop_pct", [0.875, 0.95, 1.0])
@pytest.mark.parametrize("size", [(224, 224), (299, 224), (224, 337), (97, 131), (1000, 333), (640, 480)])
def test_centre_crop_is_timms_eval_transform(size, crop_pct, interpolation):
    pre = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation=interpolation,
                     crop_pct=crop_pct, image_size=64 if min(size) < 200 else 224)
    image = _photo(*size, seed=sum(size))
    ours = image_transform(pre, train=False)
    assert isinstance(ours, CentreCrop)
    got, want = ours(image), _timm(pre)(image)
    assert got.dtype == torch.float32 and got.shape == want.shape == (3, pre.image_size, pre.image_size)
    _same_pixels(got, want, pre)


def _same_pixels(got: torch.Tensor, want: torch.Tensor, pre: Preprocess) -> None:
    """Within two 8-bit levels, on under 1% of the pixel values: the filter centres' float rounding (one
    level after a pass, two where the second pass sums two of them; on 162 demo images at most 0.09%
    of the values, on the noise images here up to 0.5% with the bilinear filter)."""
    levels = (got - want).abs() * 255 * torch.tensor(pre.std).reshape(3, 1, 1)
    assert float(levels.max()) < 2.001
    assert float((levels > 0.5).float().mean()) < 1e-2


def test_centre_crop_on_the_demo_images():
    files = sorted(SHARED_DATA.glob("*/images/**/*.jpg"))[::50]
    if not files:
        pytest.skip(f"no images under {SHARED_DATA}")
    pre = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", crop_pct=0.875, image_size=224)
    ours, timm_tf = image_transform(pre, train=False), _timm(pre)
    for f in files:
        image = Image.open(f).convert("RGB")
        _same_pixels(ours(image), timm_tf(image), pre)


def test_a_crop_wider_than_the_resize_pads_as_timm_does():
    pre = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", crop_pct=1.2, image_size=64)
    image = _photo(80, 70, seed=1)
    assert float((image_transform(pre, train=False)(image) - _timm(pre)(image)).abs().max()) < 1e-5


def test_pixels_then_normalise_is_the_transform():
    """Extraction batches the 8-bit crop and normalises inside its forward: the same input."""
    pre = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic",
                     crop_pct=0.875, image_size=96)
    crop = CentreCrop(pre)
    image = _photo(150, 120, seed=3)
    pixels = crop.pixels(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 96, 96)
    batch = torch.stack([pixels, crop.pixels(_photo(120, 150, seed=4))])
    assert float((crop.normalise(batch)[0] - crop(image)).abs().max()) < 1e-6
