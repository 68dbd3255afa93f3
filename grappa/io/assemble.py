"""The Grappa model of a params file: built fresh for training, or assembled from the published
adaptor sets (step 4) and fusion layers (step 5). (A servable model rebuilds from its own
``model.json`` instead: grappa.io.servable.)"""
from __future__ import annotations

from grappa.config import ConfigError, Params
from grappa.core.backbones import BlockwiseBackbone
from grappa.core.model import GrappaModel
from grappa.io.artifacts import load_torch
from grappa.io.layout import layout


def build_model(params: Params, backbone: BlockwiseBackbone, ks: list[int], with_fusion: bool = False) -> GrappaModel:
    """``backbone`` with fresh adaptor sets for ``ks`` at the params' blocks (and fresh fusion layers)."""
    return GrappaModel(backbone, params.backbone.adapt_from_block, ks, params.adaptor.reduction,
                       attn_dim=params.fusion.attn_dim if with_fusion else None,
                       attention_scale=params.fusion.attention_scale, attention=params.fusion.attention,
                       value=params.fusion.value)


def assemble(params: Params, backbone: BlockwiseBackbone, with_fusion: bool, load_fusion: bool) -> GrappaModel:
    """Backbone + every adaptor set in cluster.ks (+ fusion layers, fresh or trained)."""
    ks = params.cluster.ks
    model = build_model(params, backbone, ks, with_fusion)
    for k in ks:
        path = layout(params).adaptor(k)
        if not path.exists():
            raise ConfigError(f"adaptor set k={k} not found at {path}; run 'grappa train-adaptor --k {k}' first")
        state = load_torch(path)
        if state["meta"]["backbone"] != params.backbone.model_dump() or state["meta"]["start"] != model.start:
            raise ConfigError(f"adaptor set k={k} was trained with another backbone setup; retrain it")
        model.adaptor_set(k).load_state_dict(state["state_dict"])
    if load_fusion:
        path = layout(params).fusion
        if not path.exists():
            raise ConfigError(f"fusion layers not found at {path}; run 'grappa train-fusion' first")
        state = load_torch(path)
        if state["meta"]["ks"] != ks:
            raise ConfigError(f"fusion was trained on ks={state['meta']['ks']}, params say {ks}; retrain it")
        model.fusion.load_state_dict(state["state_dict"])
    model.requires_grad_(False)
    return model
