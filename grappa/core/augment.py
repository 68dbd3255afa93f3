"""Image transforms (timm's, and one resample for evaluation) and the augmentations' stand-in on cached feature maps."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from grappa.core.backbones import Preprocess


def augment_feature_maps(x: torch.Tensor, min_scale: float) -> torch.Tensor:
    """Random horizontal flip and random resized crop of cached (B, C, H, W) prefix activations.

    Without images there are no pixel augmentations; jittering the cached maps stands in for them so
    the pseudo-label task is not solved trivially by the features the clusters came from.
    """
    b, _, h, w = x.shape
    flip = torch.rand(b) < 0.5  # drawn on the CPU generator: identical on every device
    scale = min_scale + (1 - min_scale) * torch.rand(b)
    side = scale.sqrt()
    cx, cy = (1 - side) * (2 * torch.rand(b) - 1), (1 - side) * (2 * torch.rand(b) - 1)
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = side, side, cx, cy
    grid = F.affine_grid(theta.to(x.device), (b, x.shape[1], h, w), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", align_corners=False)


def image_transform(preprocess: Preprocess, train: bool):
    from timm.data import create_transform

    size = preprocess.image_size
    if train:  # standard metric-learning augmentations (grappa.md section 4)
        return create_transform((3, size, size), is_training=True, scale=(0.35, 1.0), hflip=0.5,
                                color_jitter=0.2, mean=preprocess.mean, std=preprocess.std,
                                interpolation=preprocess.interpolation)
    return CentreCrop(preprocess)


class CentreCrop:
    """timm's evaluation transform (resize the short side to ``image_size / crop_pct``, centre crop,
    to tensor, normalise) computed on the centre window only. PIL resizes in two passes, rows then
    columns, rounding to 8 bits between them; each pass here is one ``resize(box=...)`` call that
    reads the pixels around the window as the whole-image resize would and skips what the crop throws
    away. (One call with a box that crops rows runs the column pass first: up to 9 levels off on a
    quarter of the pixels.) What is left is float rounding of the filter's centres: at most two 8-bit
    levels, on under 0.1% of the pixel values of the demo images (tests/test_augment.py).

    ``pixels`` is the 8-bit crop and ``normalise`` the rest, so extraction can hand 8-bit batches to
    its frozen forward (a quarter of the bytes to batch and copy) and normalise inside it. Reading,
    decoding and preprocessing the demo's 224 px images takes 1.1 ms an image on one core instead of
    1.8 ms with timm's transform (the resize 0.53 ms instead of 0.9, the normalisation 0.07 instead of 0.36)."""

    def __init__(self, preprocess: Preprocess):
        from timm.data.transforms import str_to_pil_interp

        self.size, self.resize_to = preprocess.image_size, math.floor(preprocess.image_size / preprocess.crop_pct)
        self.interpolation = str_to_pil_interp(preprocess.interpolation)
        mean, std = (torch.tensor(v, dtype=torch.float32).reshape(3, 1, 1) for v in (preprocess.mean, preprocess.std))
        # (x / 255 - mean) / std as one multiply-add; tensors, so a trace keeps them as constants
        self.scale, self.shift = 1 / (255 * std), mean / std

    def __call__(self, image) -> torch.Tensor:
        # normalised after the transpose to CHW, while 8-bit: 0.03 ms, where the float HWC -> CHW took 0.6
        return self.normalise(self.pixels(image))

    def pixels(self, image) -> torch.Tensor:
        """The crop of a PIL RGB image: (3, size, size) uint8."""
        size = self.size
        if self.resize_to < size:  # the crop is wider than the resized image: torchvision pads it with 0
            from torchvision.transforms import functional as TF

            window = TF.center_crop(TF.resize(image, self.resize_to, TF.InterpolationMode(
                self.interpolation.name.lower())), [size, size])
        else:
            w, h = image.size
            short = self.resize_to
            # torchvision's Resize(int) and CenterCrop: the long side truncated, the offset rounded
            rw, rh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            left, top = int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))
            sx, sy = w / rw, h / rh
            rows = image.resize((size, h), self.interpolation, box=(left * sx, 0, (left + size) * sx, h))
            window = rows.resize((size, size), self.interpolation, box=(0, top * sy, size, (top + size) * sy))
        return torch.from_numpy(np.ascontiguousarray(np.asarray(window).transpose(2, 0, 1)))

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) pixels -> the float input ``__call__`` gives (torch ops: traceable)."""
        return pixels.float() * self.scale.to(pixels.device) - self.shift.to(pixels.device)
