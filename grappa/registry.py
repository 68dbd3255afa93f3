"""The steps, declared once: what the CLI, dvc.yaml, the Airflow DAG and MLflow tracking read.

One :class:`Step` per step gives its CLI verb (``train-adaptor``; the DVC stage and Airflow task id
is the same word with ``_``: ``train_adaptor``), the module whose ``run()`` computes it, the
params.yaml keys it reads (DVC params deps, and the params of its MLflow run), its inputs and
outputs as :mod:`grappa.io.layout` templates, and its report (logged as MLflow metrics).
``dvc.yaml`` is generated from these declarations (:mod:`grappa.dvc_yaml`).

A step can be ``mapped`` over one :class:`Axis`: one independent run per item, the item being the
second argument of its ``run()``. ``k`` (the items of ``cluster.ks``: ``train-adaptor --k 64``, DVC
stage ``train_adaptor@64``) and ``shard`` (the parts of the snapshot, ``extract.shards`` of them:
``extract --shard 0/2``, stage ``extract@0-of-2``). The same item has the same name everywhere:
the DVC stage, the Airflow map index (``shard=0/2``), the MLflow child run.

Standard library only: the Airflow DAG processor imports it on every parse.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grappa.io import layout as L


@dataclass(frozen=True)
class Out:
    """A DVC output: a layout template and how DVC keeps it."""

    path: str
    persist: bool = False  # kept before a rerun (the step reads its previous self)
    cache: bool = True  # False: small files that identify state (stay in git, not in the DVC cache)
    kind: str = "outs"  # or "metrics" / "plots"
    note: str = ""  # why, as a comment in dvc.yaml


@dataclass(frozen=True)
class Axis:
    """What a mapped step runs once per item of. ``name`` is the CLI option (``--k``), the
    :meth:`grappa.io.layout.Layout.path` keyword of its templates (``{k}``) and the Airflow map index
    (``k=64``)."""

    name: str
    key: str  # the params key whose value gives the items
    metavar: str
    help: str  # the CLI option's help
    items_of: Callable[[Any], list]  # the value of ``key`` -> the items, in order
    parse: Callable[[str], Any]  # the CLI spelling -> an item (ValueError when malformed)
    label: Callable[[Any], str] = str  # in stage names, dvc.yaml foreach items and layout paths
    arg: Callable[[Any], str] = str  # the CLI spelling of an item

    def items(self, params) -> list:
        value = params
        for part in self.key.split("."):
            value = getattr(value, part)
        return self.items_of(value)


def _k(text: str) -> int:
    if not str(text).strip().isdigit():
        raise ValueError(f"k '{text}': expected an integer of cluster.ks, e.g. 64")
    return int(text)


AXES = {
    "k": Axis("k", "cluster.ks", "K", "the k of cluster.ks to train (default: every k of cluster.ks, one after "
              "the other)", items_of=list, parse=_k),
    "shard": Axis("shard", "extract.shards", "I/N", "the part I of N = extract.shards of the snapshot to extract, "
                  "e.g. 0/4 (default: every part, one after the other; merge-features then joins them)",
                  items_of=L.shards, parse=L.Shard.parse, label=lambda shard: shard.label),
}


@dataclass(frozen=True)
class Resources:
    """What one run of a step asks a scheduler for (Kubernetes quantities): ``cpu`` and ``memory``
    requested, ``memory_limit`` the most it may use. From the peak RSS of benchmarks/scale.py's
    table (benchmarks/results/scale_cpu-2core.json, at 1M images where measured) with headroom."""

    cpu: str
    memory: str
    memory_limit: str


@dataclass(frozen=True)
class Step:
    verb: str
    summary: str
    params: tuple[str, ...]  # the params.yaml keys (sections or dotted leaves) the step reads
    deps: tuple[str, ...]  # layout templates of its inputs (code deps are derived from imports)
    outs: tuple[Out, ...]
    report: str  # layout template of the JSON report logged to MLflow
    mapped: str | None = None  # an axis of AXES: one independent run per item (`--k K`, foreach, mapped task)
    reads_sources: str | None = None  # params key of the image sources whose data roots it watches
    # (split, MLflow context) of the datasets the step learns from or is scored on, logged as run inputs
    # from the table ``datasets_from`` (a layout template)
    datasets: tuple[tuple[str, str], ...] = (("unlabeled", "training"),)
    datasets_from: str = L.FEATURES
    artifacts: tuple[str, ...] = ()  # layout templates tracking logs beside the report (files or folders)
    publishes: bool = False  # tracking logs the run's bundle and registers (and may promote) its model
    resources: Resources = Resources("1", "1Gi", "2Gi")

    def __post_init__(self):
        if self.mapped is not None and self.mapped not in AXES:
            raise ValueError(f"step {self.verb}: no axis '{self.mapped}'; the axes are {', '.join(AXES)}")

    @property
    def stage(self) -> str:
        return self.verb.replace("-", "_")

    @property
    def module(self) -> str:
        return f"pipeline_steps.{self.stage}"

    @property
    def axis(self) -> Axis | None:
        return AXES[self.mapped] if self.mapped else None

    def items(self, params) -> list:
        """What one full run of the step runs over: the axis' items of ``params``, or ``[None]``."""
        return self.axis.items(params) if self.axis else [None]

    def stage_name(self, item=None) -> str:
        """``extract@0-of-2``, ``train_adaptor@64``; the stage alone for an unmapped step or no item."""
        return f"{self.stage}@{self.axis.label(item)}" if self.axis and item is not None else self.stage

    def report_file(self, out: L.Layout, item=None):
        """Where the runner writes this step's (item's) report, and tracking and benchmarks read it."""
        return out.path(self.report, **({self.mapped: item} if self.axis and item is not None else {}))


BASE = ("seed", "out_dir")
IMAGES = ("data.min_side", "data.max_pixels")  # how images are decoded, wherever a step reads them
BOTH_SPLITS = (("unlabeled", "training"), ("query_db", "evaluation"))
# train-adaptor does NOT read cluster.ks (it only checks K is in it): editing the k list reruns
# cluster, the new train_adaptor@K and fusion/evaluate, while unchanged k keep their adaptors.
STEPS: tuple[Step, ...] = (
    Step("snapshot", "step 1: the images of data.sources as a versioned manifest (hashes only new files)",
         params=(*BASE, "data.sources", "data.max_unlabeled_per_domain", "data.max_query_db_per_domain",
                 "data.max_file_bytes"),
         deps=(), outs=(Out(L.SNAPSHOT, persist=True,
                            note="persistent: the previous manifest is the hash cache (unchanged files are not re-read)"),),
         report=L.SNAPSHOT_REPORT, reads_sources="data.sources", datasets=BOTH_SPLITS, datasets_from=L.MANIFEST,
         resources=Resources("1", "512Mi", "1Gi")),  # peak 175 MB at 10k images
    # one run per part of the snapshot (extract.shards of them, in the "extract" section it reads)
    Step("extract", "step 2: frozen backbone features of one part of the snapshot (cached by content hash)",
         params=(*BASE, "backbone", "extract", *IMAGES),
         deps=(L.MANIFEST,),
         outs=(Out(L.EXTRACT_PART, note="a folder: features.parquet, report.json, and prefix.npy when "
                                        "backbone.adapt_from_block > 0"),),
         report=L.PART_REPORT, mapped="shard", datasets=(),
         resources=Resources("2", "3Gi", "4Gi")),  # peak 1.8 GB at 50k images on OpenVINO (1.6 GB on torch at 2k)
    # the parts' folders: one dep per shard of extract.shards
    Step("merge-features", "step 2b: the extracted parts as one feature table (prefix activations stay in the parts)",
         params=(*BASE, "extract.shards"),
         deps=(L.EXTRACT_PART,),
         outs=(Out(L.FEATURES), Out(L.PREFIX_INDEX, note="lists the parts' prefix.npy in row order (empty "
                                                          "when backbone.adapt_from_block is 0)"),
               Out(L.EXTRACT_REPORT)),
         report=L.EXTRACT_REPORT, datasets=BOTH_SPLITS,
         resources=Resources("1", "512Mi", "1Gi")),  # peak 319 MB at 1M
    # the registry's champion is read when the pool or the recipe changes: new images are when it matters
    Step("warm-start", "step 2c: full retrain or incremental run from the champion, and why",
         # the adapt keys it decides by, and the recipe it compares with the champion's
         params=(*BASE, "adapt.mode", "adapt.max_new_share", "adapt.max_generations", "backbone", "cluster", "adaptor",
                 "fusion", "tracking.registered_model"),
         deps=(L.FEATURES,),
         outs=(Out(L.WARM_DECISION, cache=False, note="the mode and its reason, readable beside dvc.lock"),
               Out(L.WARM_BUNDLE, note="the champion's files an incremental run starts from (source.json "
                                       "alone in a full run)")),
         report=L.WARM_DECISION, datasets=(), resources=Resources("1", "1Gi", "2Gi")),
    Step("cluster", "step 3: spherical k-means at every k (from the champion's centroids in an incremental run)",
         params=(*BASE, "cluster", "adapt.cluster_niter", "adapt.max_label_change"),
         deps=(L.FEATURES, L.WARM_BUNDLE),
         outs=(Out(L.CLUSTER, note="every k in one run; consumers depend on their own k<K> files inside it"),),
         report=L.CLUSTER_REPORT, resources=Resources("2", "1536Mi", "2Gi")),  # peak 870-997 MB at 1M
    Step("train-adaptor", "step 4: one adaptor set on the k pseudo-labels",
         params=(*BASE, "backbone", "adaptor", *IMAGES, "extract.num_workers", "adapt.replay", "adapt.adaptor_epochs"),
         # prefix.json: the parts' prefix activations it lists are read too (a function of
         # features.parquet's content hashes and the backbone params); mode.json and the champion's
         # bundle: an incremental run starts from the champion's set
         deps=(L.FEATURES, L.PREFIX_INDEX, L.PSEUDO_LABELS, L.CENTROIDS, L.CLUSTER_MODE, L.WARM_BUNDLE),
         outs=(Out(L.ADAPTOR), Out(L.ADAPTOR_REPORT), Out(L.CLASSIFIER, note="the frozen stage-1 classifier, for fusion.objective: pseudo_labels")),
         report=L.ADAPTOR_REPORT, mapped="k",
         resources=Resources("2", "2Gi", "3Gi")),  # peak 1.1 GB at 1M (tiny backbone; Lite0 adds its weights)
    Step("train-fusion", "step 5: granularity fusion; exports the servable model",
         params=(*BASE, "backbone", "adaptor", "fusion", "cluster.ks", *IMAGES, "extract.num_workers",
                 "evaluate.batch_size", "adapt.replay", "adapt.fusion_epochs"),
         # the adaptors folder orders this stage after every train_adaptor@K, whatever cluster.ks holds
         deps=(L.FEATURES, L.PREFIX_INDEX, L.CLUSTER, L.ADAPTORS, L.WARM_BUNDLE),
         outs=(Out(L.FUSION), Out(L.KNN), Out(L.FUSION_REPORT),
               Out(L.MODEL, note="the servable model (weights + architecture + preprocessing)")),
         report=L.FUSION_REPORT, resources=Resources("2", "3Gi", "4Gi")),  # peak 1.7 GB at 1M
    Step("evaluate", "step 6: retrieval metrics, table and plots; registers and promotes the model",
         params=(*BASE, "backbone", "adaptor.reduction", "fusion.attn_dim", "fusion.attention_scale", "fusion.attention", "fusion.value", "cluster.ks",
                 *IMAGES, "extract.num_workers", "evaluate", "tracking.registered_model"),
         # the cluster folder: the report's cluster galleries
         deps=(L.FEATURES, L.PREFIX_INDEX, L.CLUSTER, L.ADAPTORS, L.FUSION, L.MODEL),
         outs=(Out(L.RESULTS), Out(L.RUN_REPORT, note="the tables and plots in one self-contained page"),
               Out(L.CHAMPION, cache=False, note="which model serves: changes only when `champion` moves, "
                                                 "so `index` reruns exactly then"),
               Out(L.EVALUATE_REPORT, cache=False, kind="metrics"), Out(L.PLOTS, kind="plots")),
         report=L.EVALUATE_REPORT, datasets=(("query_db", "evaluation"),), artifacts=(L.RESULTS, L.RUN_REPORT, L.PLOTS), publishes=True,
         resources=Resources("2", "3Gi", "4Gi")),  # not in the scale table: as train_fusion (every mode's embeddings)
    Step("index", "step 7: faiss index of the catalogue with the champion model",
         params=(*BASE, "backbone", "index", *IMAGES, "data.max_file_bytes", "extract.num_workers"),
         # the manifest is the catalogue when index.sources is empty; images extract holds are fed
         # from its prefix activations
         deps=(L.MANIFEST, L.FEATURES, L.PREFIX_INDEX, L.CHAMPION),
         outs=(Out(L.INDEX, persist=True, note="persistent: new catalogue images are added to the existing index"),),
         report=L.INDEX_REPORT, reads_sources="index.sources", datasets=(),
         resources=Resources("2", "2Gi", "3Gi")),  # not in the scale table: the model and the index in memory
)
BY_VERB = {step.verb: step for step in STEPS}
BY_STAGE = {step.stage: step for step in STEPS}


def step(name: str) -> Step:
    """The step called ``name``: a CLI verb, a stage or task id, or a stage name such as ``train_adaptor@64``."""
    base = name.partition("@")[0]
    found = BY_VERB.get(base) or BY_STAGE.get(base)
    if found is None:
        raise KeyError(f"no step '{name}'; the steps are {', '.join(BY_VERB)}")
    return found
