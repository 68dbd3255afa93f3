"""GrappaModel: zero-initialised adaptors start at the backbone; fusion attention; which parameters train."""
from __future__ import annotations

import pytest
import torch

from grappa.config import BackboneParams
from grappa.core.backbones import create_backbone
from grappa.core.model import FUSION, UNIFORM, ZERO_SHOT, GrappaModel, adaptor_key, image_pool, single, single_k

KS = [2, 4, 8]


def build(name: str, size: int, start: int, attn_dim: int | None = 8, **fusion) -> GrappaModel:
    torch.manual_seed(0)
    backbone, _, _ = create_backbone(BackboneParams(name=name, weights="none", image_size=size, adapt_from_block=start))
    return GrappaModel(backbone, start, KS, reduction=4, attn_dim=attn_dim, **fusion)


CASES = [("test_efficientnet", 48, 3), ("test_efficientnet", 48, 0), ("test_vit", 64, 2)]


@pytest.mark.parametrize("name, size, start", CASES)
def test_every_mode_equals_zero_shot_at_init(name, size, start):
    model = build(name, size, start).eval()
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = model.forward_prefix(images)
        zero, alpha = model.forward_suffix(x, ZERO_SHOT)
        assert alpha is None
        assert torch.allclose(zero.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(zero, torch.nn.functional.normalize(model.backbone(images), dim=-1), atol=1e-5)
        assert model.modes() == [ZERO_SHOT, *[single(k) for k in KS], UNIFORM, FUSION]
        for mode in model.modes()[1:]:
            emb, _ = model.forward_suffix(x, mode)
            assert torch.allclose(emb, zero, atol=1e-6), f"{mode} differs from zero-shot at init"
        assert torch.allclose(model(images, FUSION), zero, atol=1e-6)


@pytest.mark.parametrize("name, size, start", CASES)
def test_fusion_attention_shape_and_normalisation(name, size, start):
    model = build(name, size, start).eval()
    # Non-zero adaptors and attention so modes differ. Biases too: a randomly initialised (weights
    # "none") CNN has vanishing activations in its late blocks, so weights alone would change little.
    for layers in model.adaptors.values():
        for adaptor in layers:
            torch.nn.init.normal_(adaptor.down.bias, std=1.0)
            torch.nn.init.normal_(adaptor.up.weight, std=0.5)
    for layer in model.fusion:
        for lin in (layer.query, layer.key):
            torch.nn.init.normal_(lin.weight, std=0.5)
            torch.nn.init.normal_(lin.bias, std=1.0)
    images = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = model.forward_prefix(images)
        emb, alpha = model.forward_suffix(x, FUSION)
        n_blocks = len(model.backbone.blocks) - start
        assert alpha.shape == (5, n_blocks, len(KS))
        assert torch.all(alpha >= 0)
        assert torch.allclose(alpha.sum(-1), torch.ones(5, n_blocks), atol=1e-5)
        assert alpha.std() > 1e-3, "attention is uniform although queries/keys are random"
        assert emb.shape == (5, model.backbone.embed_dim)
        single_embs = [model.forward_suffix(x, single(k))[0] for k in KS]
        assert not torch.allclose(single_embs[0], single_embs[1], atol=1e-4)
        zero = model.forward_suffix(x, ZERO_SHOT)[0]
        assert not torch.allclose(emb, zero, atol=1e-4)


def _trained_looking(model: GrappaModel) -> GrappaModel:
    """Non-zero adaptors (biases too), attention and W_V != I, so every term of the fusion counts."""
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for layers in model.adaptors.values():
            for adaptor in layers:
                for p in (adaptor.down.bias, adaptor.up.weight, adaptor.up.bias):
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for layer in model.fusion:
            for p in (layer.query.weight, layer.key.weight):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            if layer.value is not None:
                layer.value.bias.copy_(0.3 * torch.randn(layer.value.bias.shape, generator=g))
                layer.value.weight.add_(0.05 * torch.randn(layer.value.weight.shape, generator=g))
    return model


def _formula(layer, h: torch.Tensor, deltas: list[torch.Tensor], pool) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, block output) by the model docstring's formula, on the M full adaptor outputs a_m = A_m(h)."""
    q = layer.query(pool(h))
    if layer.attention == "cosine":  # g cos(W_Q pool h, W_K pool a_m)
        keys = torch.stack([torch.nn.functional.normalize(layer.key(pool(d)), dim=-1) for d in deltas], dim=1)
        logits = layer.log_scale.exp() * (keys @ torch.nn.functional.normalize(q, dim=-1)[:, :, None]).squeeze(-1)
    else:  # <W_Q pool h, W_K pool(h + a_m)> / sqrt(d)
        keys = torch.stack([layer.key(pool(h + d)) for d in deltas], dim=1)
        logits = (keys @ q[:, :, None]).squeeze(-1) / q.shape[-1] ** 0.5
    alpha = torch.softmax(logits, dim=-1)
    value = layer.value if layer.value is not None else (lambda d: d)
    shape = (-1,) + (1,) * (h.dim() - 1)
    # value(.) has a bias: sum_m alpha_m (W a_m + b) = W sum_m alpha_m a_m + b because alpha sums to one
    return alpha, h + sum(alpha[:, m].view(shape) * value(d) for m, d in enumerate(deltas))


@pytest.mark.parametrize("fusion", [{}, {"attention": "cosine", "value": "identity", "attention_scale": 3.0}])
@pytest.mark.parametrize("name, size, start", [("test_efficientnet", 48, 3), ("test_vit", 64, 2)])
def test_granularity_fusion_block_matches_formula(name, size, start, fusion):
    """The grouped computation is the formula on the M full adaptor outputs, for each attention / value kind."""
    model = _trained_looking(build(name, size, start, **fusion))
    layer, adaptors = model.fusion[0], [model.adaptor_set(k)[0] for k in KS]
    dim = model.backbone.block_dims[start]
    shape = (2, dim, 3, 3) if model.backbone.layout == "channels" else (2, 5, dim)  # a map, or 5 tokens
    h = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    pool = (lambda x: x.mean(dim=(-2, -1))) if model.backbone.layout == "channels" else (lambda x: x[:, 0])
    with torch.no_grad():
        out, alpha = layer(h, layer.weights(adaptors))
        pooled, pooled_alpha = layer(h, layer.weights(adaptors, pooled=True), pooled=True)
        expected_alpha, expected = _formula(layer, h, [adaptor(h) for adaptor in adaptors], pool)
    assert expected_alpha.std() > 1e-2  # not trivially uniform
    assert torch.allclose(alpha, expected_alpha, atol=1e-5) and torch.equal(pooled_alpha, alpha)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(pooled, pool(expected), atol=1e-5)  # the pooled output without the full map


def test_cosine_attention_learns_its_temperature_and_identity_value_has_no_map():
    layer = build("test_efficientnet", 48, 3, attention="cosine", value="identity", attention_scale=3.0).fusion[0]
    assert layer.value is None and layer.log_scale.exp().item() == pytest.approx(3.0)
    assert {id(p) for p in layer.attention_parameters()} == {id(p) for p in layer.parameters()}
    assert layer.value_regulariser().item() == 0.0


@pytest.mark.parametrize("fusion", [{}, {"attention": "cosine", "value": "identity"}])
def test_mean_embedding_shortcut_changes_neither_outputs_nor_gradients(fusion):
    """An average-pooled CNN's fused last block is pooled from pooled terms: the same as the full map."""
    model = _trained_looking(build("test_efficientnet", 48, 3, **fusion))
    assert model.mean_embed and not build("test_vit", 64, 2).mean_embed
    model.requires_grad_(False)
    model.fusion.requires_grad_(True)
    model.train()
    x = model.forward_prefix(torch.randn(5, 3, 48, 48, generator=torch.Generator().manual_seed(9)))
    weights = torch.randn(5, model.backbone.embed_dim, generator=torch.Generator().manual_seed(10))
    results = []
    for shortcut in (True, False):
        model.mean_embed = shortcut
        model.zero_grad(set_to_none=True)
        emb, alpha = model.forward_suffix(x, FUSION)
        ((emb * weights).sum() + alpha.pow(2).sum()).backward()
        results.append((emb.detach(), alpha.detach(), [p.grad.clone() for p in model.fusion.parameters()]))
    (emb0, alpha0, grads0), (emb1, alpha1, grads1) = results
    assert torch.allclose(emb0, emb1, atol=1e-6) and torch.allclose(alpha0, alpha1, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(grads0, grads1))


def test_image_pool_sends_back_an_nhwc_gradient():
    """Mean over an NHWC view: the gradient keeps the map's channels_last layout (speed, not values)."""
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = x * 1.0
    grads = []
    y.register_hook(grads.append)
    pooled = image_pool(y, "channels")
    assert torch.allclose(pooled, x.mean(dim=(-2, -1)), atol=1e-6)
    pooled.sum().backward()
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


def _grads(module: torch.nn.Module) -> dict[str, bool]:
    return {name: p.grad is not None for name, p in module.named_parameters()}


@pytest.mark.parametrize("name, size, start", [("test_efficientnet", 48, 3), ("test_vit", 64, 2)])
def test_only_adaptor_params_get_grads_in_single_mode(name, size, start):
    model = build(name, size, start)
    model.adaptors.requires_grad_(True)
    model.train()
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(4))
    emb, _ = model.forward_suffix(model.forward_prefix(images), single(4))
    (emb * torch.randn_like(emb)).sum().backward()
    got = _grads(model)
    with_grad = {n for n, g in got.items() if g}
    assert with_grad, "no parameter received a gradient"
    assert all(n.startswith(f"adaptors.{adaptor_key(4)}.") for n in with_grad), with_grad
    assert {n for n in got if n.startswith(f"adaptors.{adaptor_key(4)}.")} == with_grad  # every k=4 adaptor param
    up = [p for n, p in model.named_parameters() if n.startswith(f"adaptors.{adaptor_key(4)}.") and ".up." in n]
    assert any(p.grad.abs().sum() > 0 for p in up)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.training, "the frozen backbone must stay in eval mode (BN statistics)"


@pytest.mark.parametrize("name, size, start", [("test_efficientnet", 48, 3), ("test_vit", 64, 2)])
def test_only_fusion_params_get_grads_in_fusion_mode(name, size, start):
    model = build(name, size, start)
    for layers in model.adaptors.values():  # trained-looking adaptors, then frozen as in stage 2
        for adaptor in layers:
            torch.nn.init.normal_(adaptor.down.bias, std=1.0)
            torch.nn.init.normal_(adaptor.up.weight, std=0.1)
    model.requires_grad_(False)
    model.fusion.requires_grad_(True)
    model.train()
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(5))
    emb, alpha = model.forward_suffix(model.forward_prefix(images), FUSION)
    ((emb * torch.randn_like(emb)).sum() + alpha.pow(2).sum()).backward()
    with_grad = {n for n, g in _grads(model).items() if g}
    assert with_grad == {n for n, _ in model.named_parameters() if n.startswith("fusion.")}
    for part in ("query.weight", "key.weight", "value.weight"):
        assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(part)), part


def test_model_without_fusion_has_no_fusion_mode():
    model = build("test_efficientnet", 48, 3, attn_dim=None)
    assert model.fusion is None
    assert FUSION not in model.modes()
    solo = GrappaModel(model.backbone, 3, [5], reduction=4)
    assert solo.modes() == [ZERO_SHOT, single(5)]


@pytest.mark.parametrize("name, size, start", [("test_efficientnet", 48, 3), ("test_vit", 64, 2)])
def test_cpu_chunks_change_neither_outputs_nor_gradients(name, size, start):
    model = build(name, size, start)
    for layers in model.adaptors.values():
        for adaptor in layers:
            torch.nn.init.normal_(adaptor.down.bias, std=1.0)
            torch.nn.init.normal_(adaptor.up.weight, std=0.1)
    for layer in model.fusion:
        torch.nn.init.normal_(layer.query.weight, std=0.5)
    model.requires_grad_(False)
    model.fusion.requires_grad_(True)
    model.train()  # as in training: the adaptors' and fusion's modules in train mode, the backbone frozen
    x = model.forward_prefix(torch.randn(7, 3, size, size, generator=torch.Generator().manual_seed(6)))
    weights = torch.randn(7, model.backbone.embed_dim, generator=torch.Generator().manual_seed(7))
    results = {}
    for chunk in (None, 3):  # 7 images: chunks of 3, 3 and 1
        model.cpu_chunk = chunk
        model.zero_grad(set_to_none=True)
        emb, alpha = model.forward_suffix(x, FUSION)
        ((emb * weights).sum() + alpha.pow(2).sum()).backward()
        results[chunk] = (emb.detach(), alpha.detach(), [p.grad.clone() for p in model.fusion.parameters()])
        assert model.forward_suffix(x, ZERO_SHOT)[1] is None
    (emb0, alpha0, grads0), (emb3, alpha3, grads3) = results[None], results[3]
    assert emb3.shape == emb0.shape and alpha3.shape == alpha0.shape == (7, len(model.backbone.blocks) - start, len(KS))
    assert torch.allclose(emb3, emb0, atol=1e-5) and torch.allclose(alpha3, alpha0, atol=1e-6)
    assert alpha0.std() > 1e-3  # the attention is not trivially uniform, so equality means something
    assert all(torch.allclose(g3, g0, atol=1e-5, rtol=1e-4) for g3, g0 in zip(grads3, grads0))


def test_mode_names_are_the_result_names_and_the_weight_keys_stay():
    """One spelling from forward_suffix to metrics.json; model.pt keeps its adaptors.k<K>.* keys."""
    model = build("test_efficientnet", 48, 3)
    assert model.modes() == ["zero_shot", "single_k_2", "single_k_4", "single_k_8", "uniform", "grappa"]
    assert single(64) == "single_k_64" and single_k(single(64)) == 64
    assert single_k("uniform") is None and single_k("single_k_") is None
    assert {n.split(".")[1] for n in model.state_dict() if n.startswith("adaptors.")} == {"k2", "k4", "k8"}
    assert model.adaptor_set(4) is model.adaptors["k4"]
    with pytest.raises(KeyError, match="single_k_16"):
        model.forward_suffix(model.forward_prefix(torch.zeros(1, 3, 48, 48)), single(16))


def test_an_exported_model_keeps_its_attention_and_value_kind(tmp_path):
    """model.json carries the fusion's kind: a cosine / identity model serves as it was trained."""
    import yaml

    from conftest import tiny_params_dict
    from grappa.config import load_params
    from grappa.io import servable

    raw = tiny_params_dict(tmp_path, [tmp_path], fusion={"attention": "cosine", "value": "identity", "attention_scale": 2.0})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    backbone, preprocess, _ = create_backbone(params.backbone)
    model = _trained_looking(GrappaModel(backbone, 3, KS, params.adaptor.reduction, attn_dim=params.fusion.attn_dim,
                                         attention_scale=2.0, attention="cosine", value="identity")).eval()
    servable.export(model, params, preprocess, tmp_path / "model")
    loaded = servable.load(tmp_path / "model", "cpu").model
    assert loaded.fusion[0].attention == "cosine" and loaded.fusion[0].value is None
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(loaded(images), model(images), atol=1e-6)
