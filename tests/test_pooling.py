import numpy as np
import pytest
import torch

from grappa.core.pooling import (
    GeM,
    MAC,
    AvgPool,
    build_pooling,
)


def _feature_map(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 5, 7, 6, generator=g, dtype=torch.float64) + 0.5  # positive activations


def test_shapes_and_builder():
    x = _feature_map()
    for name, cls in [('gem', GeM), ('mac', MAC), ('avg', AvgPool)]:
        pool = build_pooling(name)
        assert isinstance(pool, cls)
        assert pool(x).shape == (2, 5)
    with pytest.raises(ValueError, match='Unknown pooling'):
        build_pooling('rmac')
    with pytest.raises(ValueError):
        MAC()(torch.zeros(2, 5))


def test_mac_and_avg_values():
    x = _feature_map()
    torch.testing.assert_close(MAC()(x), x.flatten(2).max(dim=-1).values)
    torch.testing.assert_close(AvgPool()(x), x.flatten(2).mean(dim=-1))


def test_gem_p1_is_average_pooling():
    x = _feature_map()
    torch.testing.assert_close(GeM(p=1.0)(x), AvgPool()(x).to(torch.float64))


def test_gem_large_p_approaches_mac():
    x = _feature_map()
    mac = MAC()(x)
    gaps = [(mac - GeM(p=p)(x)).abs().max().item() for p in (3.0, 20.0, 500.0)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.02
    # GeM lies between average and max pooling.
    g3 = GeM(p=3.0)(x)
    assert torch.all(g3 >= AvgPool()(x) - 1e-12) and torch.all(g3 <= mac + 1e-12)


def test_gem_p_is_learnable_and_defaults():
    pool = GeM()
    assert isinstance(pool.p, torch.nn.Parameter) and pool.p.item() == 3.0 and pool.eps == 1e-6
    pool(_feature_map().float()).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs().item() > 0
    fixed = GeM(learn_p=False)
    assert not any(True for _ in fixed.parameters())


def _correlated_features(n=500, d=12, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.linspace(3.0, 0.1, d)[:, None]
    return (rng.normal(size=(n, d)) @ mixing + 5.0).astype(np.float32)
