"""Global pooling of CNN feature maps.

Pooling layers map a (B, C, H, W) feature map to a (B, C) descriptor:

* :class:`GeM` -- generalised mean, (mean x^p)^(1/p), Radenovic et al. TPAMI 2018
  (``cirtorch.layers.functional.gem``); p = 1 is average pooling, p -> inf is max pooling.
* :class:`MAC` -- global max pooling (maximum activations of convolutions).
* :class:`AvgPool` -- global average pooling (SPoC without the centre prior).

None of them L2-normalises: normalisation belongs to the descriptor head.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'gem', 'GeM', 'MAC', 'AvgPool', 'build_pooling',
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
