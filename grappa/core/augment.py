"""Training augmentations: timm's image transforms and their stand-in on cached feature maps."""
from __future__ import annotations

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
    return create_transform((3, size, size), is_training=False, mean=preprocess.mean, std=preprocess.std,
                            interpolation=preprocess.interpolation, crop_pct=preprocess.crop_pct)
