import numpy as np
import pytest
import torch

from grappa.core.pooling import (
    GeM,
    MAC,
    AvgPool,
    apply_pca_whitening,
    build_pooling,
    fit_pca_whitening,
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


def test_pca_whitening_decorrelates_training_set():
    x = _correlated_features()
    assert np.abs(np.corrcoef(x, rowvar=False) - np.eye(x.shape[1])).max() > 0.3  # really correlated
    w = fit_pca_whitening(x, dim=None, eps=0.0)
    assert w['mean'].dtype == np.float32 and w['projection'].dtype == np.float32
    assert w['projection'].shape == (12, 12)
    raw = apply_pca_whitening(x, w, normalize=False)
    np.testing.assert_allclose(raw.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(raw, rowvar=False), np.eye(12), atol=1e-3)


def test_pca_whitening_output_is_l2_normalised_and_reduced():
    x = _correlated_features()
    w = fit_pca_whitening(x, dim=4)
    y = apply_pca_whitening(x, w)
    assert y.shape == (500, 4) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    # The kept components are the top-variance ones: they explain more variance than any other 4.
    centred = x - x.mean(axis=0)
    directions = w['projection'] / np.linalg.norm(w['projection'], axis=1, keepdims=True)
    kept = np.sum((centred @ directions.T) ** 2)
    assert kept > 0.8 * np.sum(centred ** 2)
    # Single vectors work too.
    np.testing.assert_allclose(apply_pca_whitening(x[0], w), y[0], atol=1e-6)


def test_pca_whitening_shrinkage_and_validation():
    x = _correlated_features()
    full = apply_pca_whitening(x, fit_pca_whitening(x, eps=0.0), normalize=False)
    shrunk = apply_pca_whitening(x, fit_pca_whitening(x, eps=1.0), normalize=False)
    var_full, var_shrunk = full.var(axis=0, ddof=1), shrunk.var(axis=0, ddof=1)
    # Shrinkage damps the low-variance directions most (variance lambda / (lambda + eps*lambda_max)).
    assert var_shrunk[-1] < 0.05 * var_full[-1]
    assert var_shrunk[0] == pytest.approx(0.5, rel=1e-3)
    with pytest.raises(ValueError):
        fit_pca_whitening(x[:5], dim=5)  # rank of 5 centred samples is 4
    with pytest.raises(ValueError):
        apply_pca_whitening(x[:, :3], fit_pca_whitening(x))
