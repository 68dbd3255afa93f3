"""Where every output lives under ``out_dir``: the one place output paths are spelled.

Paths are templates relative to ``out_dir`` (``{k}`` for per-k outputs, ``{shard}`` for the parts
of a sharded extraction), so the step registry and ``dvc.yaml`` (``${out_dir}/<template>``) use the
very strings the steps write to. Standard library only: the Airflow DAG processor reads it through
the registry.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SNAPSHOT = "snapshot"
MANIFEST = "snapshot/manifest.parquet"
SNAPSHOT_REPORT = "snapshot/report.json"
# `extract --shard i/n` writes one part: its rows of the snapshot, in snapshot order
EXTRACT_PART = "extract/parts/{shard}"
PART_FEATURES = "extract/parts/{shard}/features.parquet"
PART_PREFIX = "extract/parts/{shard}/prefix.npy"  # only when backbone.adapt_from_block > 0
PART_REPORT = "extract/parts/{shard}/report.json"
# `merge-features` joins the parts: one features table; the prefix activations stay in the parts
# (no copy) and prefix.json lists them in row order
FEATURES = "extract/features.parquet"
PREFIX_INDEX = "extract/prefix.json"  # always written (a DVC out); lists no part when adapt_from_block is 0
EXTRACT_REPORT = "extract/report.json"
# `warm-start`: whether this run adapts from the champion and why (decision.json, in git beside
# dvc.lock), and the champion's files it starts from (bundle/, in out_dir's layout; empty of them in a
# full run)
WARM_START = "champion"
WARM_DECISION = "champion/decision.json"
WARM_BUNDLE = "champion/bundle"
CLUSTER = "cluster"
# the mode the adaptation runs in, after clustering (which may force a full run): what the training
# steps read
CLUSTER_MODE = "cluster/mode.json"
PSEUDO_LABELS = "cluster/k{k}.parquet"
CENTROIDS = "cluster/centroids_k{k}.npy"
CLUSTER_REPORT = "cluster/report.json"
ADAPTORS = "adaptors"
ADAPTOR = "adaptors/k{k}/adaptor.pt"
CLASSIFIER = "adaptors/k{k}/classifier.pt"  # the frozen stage-1 head, for fusion.objective pseudo_labels
ADAPTOR_REPORT = "adaptors/k{k}/report.json"
FUSION = "fusion/fusion.pt"
KNN = "fusion/knn.parquet"
FUSION_REPORT = "fusion/report.json"
MODEL = "model"  # the servable model (grappa.io.servable)
EVALUATE_REPORT = "evaluate/report.json"  # the metrics: DVC's metrics file, MLflow's run metrics
RESULTS = "evaluate/results.md"
RUN_REPORT = "evaluate/report.html"  # the results, the plots inline: one page to open
PLOTS = "evaluate/plots"
CHAMPION = "evaluate/champion.json"
INDEX = "index"
INDEX_REPORT = "index/report.json"  # what the run did; index/index.json is the catalogue's pointer
CHECKPOINTS = "checkpoints"  # resume state; not a DVC out (DVC removes outs before a rerun)


@dataclass(frozen=True, order=True)
class Shard:
    """Part ``index`` of ``count`` of the snapshot: ``Shard.parse("1/4")``, labelled ``1-of-4``."""

    index: int
    count: int

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: the index must be in 0..{self.count - 1}")

    @property
    def label(self) -> str:
        return f"{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``i/n`` (the CLI's spelling) or ``i-of-n`` (the label in paths and DVC stage names)."""
        match = re.fullmatch(r"(\d+)(?:/|-of-)(\d+)", str(text).strip())
        if not match:
            raise ValueError(f"shard '{text}': expected I/N, e.g. 0/4")
        return cls(int(match[1]), int(match[2]))

    def rows(self, total: int) -> range:
        """Its contiguous slice of ``total`` rows (sizes differ by at most one)."""
        return range(self.index * total // self.count, (self.index + 1) * total // self.count)


def shards(count: int) -> list[Shard]:
    return [Shard(i, count) for i in range(count)]


class Layout:
    """The outputs of one params file: ``Layout(params.out_dir).adaptor(64)``."""

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)

    def path(self, template: str, k: int | None = None, shard: Shard | None = None) -> Path:
        return self.root / template.format(k=k, shard=shard.label if shard else None)

    manifest = property(lambda self: self.path(MANIFEST))
    features = property(lambda self: self.path(FEATURES))
    prefix_index = property(lambda self: self.path(PREFIX_INDEX))
    cluster = property(lambda self: self.path(CLUSTER))
    adaptors = property(lambda self: self.path(ADAPTORS))
    fusion = property(lambda self: self.path(FUSION))
    knn = property(lambda self: self.path(KNN))
    model = property(lambda self: self.path(MODEL))
    evaluation = property(lambda self: self.path(EVALUATE_REPORT))
    results = property(lambda self: self.path(RESULTS))
    run_report = property(lambda self: self.path(RUN_REPORT))
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

    def part(self, shard: Shard) -> Path:
        return self.path(EXTRACT_PART, shard=shard)

    def checkpoint(self, name: str) -> Path:
        return self.root / CHECKPOINTS / f"{name}.pt"


def layout(params) -> Layout:
    return Layout(params.out_dir)
