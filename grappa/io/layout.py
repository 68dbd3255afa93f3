"""Where every output lives under ``out_dir``: the one place output paths are spelled.

Paths are templates relative to ``out_dir`` (``{k}`` for per-k outputs), so the step registry
and ``dvc.yaml`` (``${out_dir}/<template>``) use the very strings the steps write to.
Standard library only: the Airflow DAG processor reads it through the registry.
"""
from __future__ import annotations

from pathlib import Path

SNAPSHOT = "snapshot"
MANIFEST = "snapshot/manifest.parquet"
SNAPSHOT_REPORT = "snapshot/report.json"
EXTRACT = "extract"
FEATURES = "extract/features.parquet"
PREFIX = "extract/prefix.npy"  # only when backbone.adapt_from_block > 0
EXTRACT_REPORT = "extract/report.json"
CLUSTER = "cluster"
PSEUDO_LABELS = "cluster/k{k}.parquet"
CENTROIDS = "cluster/centroids_k{k}.npy"
CLUSTER_REPORT = "cluster/report.json"
ADAPTORS = "adaptors"
ADAPTOR = "adaptors/k{k}/adaptor.pt"
CLASSIFIER = "adaptors/k{k}/classifier.pt"  # the frozen stage-1 head, for fusion.objective pseudo_labels
ADAPTOR_REPORT = "adaptors/k{k}/metrics.json"
FUSION = "fusion/fusion.pt"
KNN = "fusion/knn.parquet"
FUSION_REPORT = "fusion/report.json"
MODEL = "model"  # the servable model (grappa.io.servable)
METRICS = "evaluate/metrics.json"
RESULTS = "evaluate/results.md"
PLOTS = "evaluate/plots"
CHAMPION = "evaluate/champion.json"
INDEX = "index"
INDEX_REPORT = "index/index.json"
CHECKPOINTS = "checkpoints"  # resume state; not a DVC out (DVC removes outs before a rerun)


class Layout:
    """The outputs of one params file: ``Layout(params.out_dir).adaptor(64)``."""

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)

    def path(self, template: str, k: int | None = None) -> Path:
        return self.root / template.format(k=k)

    manifest = property(lambda self: self.path(MANIFEST))
    features = property(lambda self: self.path(FEATURES))
    prefix = property(lambda self: self.path(PREFIX))
    cluster = property(lambda self: self.path(CLUSTER))
    adaptors = property(lambda self: self.path(ADAPTORS))
    fusion = property(lambda self: self.path(FUSION))
    knn = property(lambda self: self.path(KNN))
    model = property(lambda self: self.path(MODEL))
    metrics = property(lambda self: self.path(METRICS))
    results = property(lambda self: self.path(RESULTS))
    plots = property(lambda self: self.path(PLOTS))
    champion = property(lambda self: self.path(CHAMPION))
    index = property(lambda self: self.path(INDEX))

    def pseudo_labels(self, k: int) -> Path:
        return self.path(PSEUDO_LABELS, k)

    def centroids(self, k: int) -> Path:
        return self.path(CENTROIDS, k)

    def adaptor(self, k: int) -> Path:
        return self.path(ADAPTOR, k)

    def classifier(self, k: int) -> Path:
        return self.path(CLASSIFIER, k)

    def checkpoint(self, name: str) -> Path:
        return self.root / CHECKPOINTS / f"{name}.pt"


def layout(params) -> Layout:
    return Layout(params.out_dir)
