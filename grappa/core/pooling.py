"""Global pooling of CNN feature maps and PCA-whitening of the resulting descriptors.

Pooling layers map a (B, C, H, W) feature map to a (B, C) descriptor:

* :class:`GeM` -- generalised mean, (mean x^p)^(1/p), Radenovic et al. TPAMI 2018
  (``cirtorch.layers.functional.gem``); p = 1 is average pooling, p -> inf is max pooling.
* :class:`MAC` -- global max pooling (maximum activations of convolutions).
* :class:`AvgPool` -- global average pooling (SPoC without the centre prior).

None of them L2-normalises: normalisation belongs to the descriptor head.

PCA-whitening (:func:`fit_pca_whitening`, :func:`apply_pca_whitening`) is plain numpy, float32 in
and out, and is meant to be learned on a held-out set of descriptors (never on the test set).
"""
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'gem', 'GeM', 'MAC', 'AvgPool', 'build_pooling',
    'fit_pca_whitening', 'apply_pca_whitening',
]


def _check_4d(x: torch.Tensor):
    if x.dim() != 4:
        raise ValueError(f'expected a (B, C, H, W) feature map, got shape {tuple(x.shape)}')


def gem(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling over H, W: (B, C, H, W) -> (B, C)."""
    _check_4d(x)
    # Clamp: x^p with fractional p is undefined for negatives and has infinite slope at 0.
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """Generalised-mean pooling with a (by default learnable) exponent ``p``.

    Args:
        p: initial exponent (3.0 is the cirtorch / dirtorch setting).
        eps: lower clamp of the activations before the power.
        learn_p: if False, ``p`` is a fixed buffer instead of a parameter.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True):
        super().__init__()
        if p <= 0:
            raise ValueError(f'GeM p must be > 0, got {p}')
        p_init = torch.ones(1) * p
        if learn_p:
            self.p = nn.Parameter(p_init)
        else:
            self.register_buffer('p', p_init)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f'p={self.p.item():.4f}, eps={self.eps}, learn_p={isinstance(self.p, nn.Parameter)}'


class MAC(nn.Module):
    """Global max pooling: (B, C, H, W) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x)
        return x.amax(dim=(-2, -1))


class AvgPool(nn.Module):
    """Global average pooling: (B, C, H, W) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


_POOLINGS = {'gem': GeM, 'mac': MAC, 'avg': AvgPool}


def build_pooling(name: str, **kwargs) -> nn.Module:
    """Create a pooling layer by name: ``'gem'`` | ``'mac'`` | ``'avg'`` (kwargs go to GeM)."""
    key = name.lower()
    if key not in _POOLINGS:
        raise ValueError(f'Unknown pooling {name!r}; expected one of {sorted(_POOLINGS)}')
    if kwargs and key != 'gem':
        raise ValueError(f'pooling {name!r} takes no arguments, got {sorted(kwargs)}')
    return _POOLINGS[key](**kwargs)


def fit_pca_whitening(
        features: np.ndarray,
        dim: Optional[int] = None,
        eps: float = 1e-6,
        power: float = 0.5,
) -> Dict[str, np.ndarray]:
    """Learn PCA-whitening from training descriptors.

    Computes the principal directions V and variances lambda (sample covariance, N - 1
    denominator) of the centred features and returns the map x -> diag(w) V^T (x - mean) with
    w_k = (lambda_k + eps * lambda_max) ** -power.

    Args:
        features: (N, D) training descriptors.
        dim: number of output dimensions (top principal components); None keeps
            min(D, N - 1), the rank of the centred data.
        eps: relative shrinkage added to every eigenvalue, as a fraction of the largest one. It
            bounds the amplification of near-zero-variance directions (noise) and makes the
            result invariant to a global rescaling of the features.
        power: eigenvalue exponent; 0.5 is full whitening, 0.25 is dirtorch's ``--whitenp``.

    Returns:
        ``{'mean': (D,) float32, 'projection': (dim, D) float32}``. Each direction's sign is
        fixed (largest-magnitude component positive) so refits give identical outputs.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f'features must be (N, D), got shape {x.shape}')
    n, d = x.shape
    if n < 2:
        raise ValueError('PCA-whitening needs at least 2 training descriptors')
    rank = min(d, n - 1)
    if dim is None:
        dim = rank
    if not 1 <= dim <= rank:
        raise ValueError(f'dim must be in [1, {rank}] for {n} samples of dimension {d}, got {dim}')
    if eps < 0:
        raise ValueError(f'eps must be >= 0, got {eps}')

    mean = x.mean(axis=0)
    # SVD of the centred data rather than eig of the covariance: better conditioned, and the
    # singular values come sorted in decreasing order.
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    eigval = s[:dim] ** 2 / (n - 1)
    eigvec = vt[:dim]  # (dim, D), rows = principal directions
    signs = np.sign(eigvec[np.arange(dim), np.abs(eigvec).argmax(axis=1)])
    eigvec = eigvec * signs[:, None]
    scale = (eigval + eps * eigval[0]) ** -power
    projection = scale[:, None] * eigvec
    return {'mean': mean.astype(np.float32), 'projection': projection.astype(np.float32)}


def apply_pca_whitening(
        features: np.ndarray,
        whitening: Dict[str, np.ndarray],
        normalize: bool = True,
) -> np.ndarray:
    """Project (N, D) (or (D,)) descriptors with a learned whitening; L2-normalise by default.

    Returns float32 of shape (N, dim) (or (dim,)). ``normalize=False`` returns the raw whitened
    vectors (identity covariance on the training set, up to the shrinkage).
    """
    x = np.asarray(features, dtype=np.float32)
    mean, projection = whitening['mean'], whitening['projection']
    if x.shape[-1] != mean.shape[0]:
        raise ValueError(f'feature dimension {x.shape[-1]} != whitening input dimension {mean.shape[0]}')
    y = (x - mean) @ projection.T
    if normalize:
        norm = np.linalg.norm(y, axis=-1, keepdims=True)
        y = y / np.maximum(norm, 1e-12)  # guard the (degenerate) all-zero vector
    return y.astype(np.float32, copy=False)
