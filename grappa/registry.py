"""The seven steps, declared once: what the CLI, dvc.yaml, the Airflow DAG and MLflow tracking read.

One :class:`Step` per step gives its CLI verb (``train-adaptor``; the DVC stage and Airflow task id
is the same word with ``_``: ``train_adaptor``), the module whose ``run()`` computes it, the
params.yaml keys it reads (DVC params deps, and the params of its MLflow run), its inputs and
outputs as :mod:`grappa.io.layout` templates, and its report (logged as MLflow metrics).
``dvc.yaml`` is generated from these declarations (:mod:`grappa.dvc_yaml`).

Standard library only: the Airflow DAG processor imports it on every parse.
"""
from __future__ import annotations

from dataclasses import dataclass

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
class Step:
    verb: str
    summary: str
    params: tuple[str, ...]  # the params.yaml keys (sections or dotted leaves) the step reads
    deps: tuple[str, ...]  # layout templates of its inputs (code deps are derived from imports)
    outs: tuple[Out, ...]
    report: str  # layout template of the JSON report logged to MLflow
    per_k: bool = False  # one independent run per k in cluster.ks (`--k K`, foreach, mapped task)
    reads_sources: str | None = None  # params key of the image sources whose data roots it watches
    # (split, MLflow context) of the datasets the step learns from or is scored on, logged as run inputs
    datasets: tuple[tuple[str, str], ...] = (("unlabeled", "training"),)

    @property
    def stage(self) -> str:
        return self.verb.replace("-", "_")

    @property
    def module(self) -> str:
        return f"grappa.steps.{self.stage}"

    def stage_name(self, k: int | None = None) -> str:
        return f"{self.stage}@{k}" if self.per_k and k is not None else self.stage


BASE = ("seed", "out_dir")
IMAGES = ("data.min_side", "data.max_pixels")  # how images are decoded, wherever a step reads them
BOTH_SPLITS = (("unlabeled", "training"), ("query_db", "evaluation"))
# train-adaptor does NOT read cluster.ks (it only checks K is in it): editing the k list reruns
# cluster, the new train_adaptor@K and fusion/evaluate, while unchanged k keep their adaptors.
STEPS: tuple[Step, ...] = (
    Step("snapshot", "step 1: the images of data.sources as a versioned manifest (hashes only new files)",
         params=(*BASE, "data.sources", "data.max_unlabeled_per_domain", "data.max_query_db_per_domain"),
         deps=(), outs=(Out(L.SNAPSHOT, persist=True,
                            note="persistent: the previous manifest is the hash cache (unchanged files are not re-read)"),),
         report=L.SNAPSHOT_REPORT, reads_sources="data.sources", datasets=BOTH_SPLITS),
    Step("extract", "step 2: frozen backbone features (cached by content hash)",
         params=(*BASE, "backbone", "extract", *IMAGES),
         deps=(L.MANIFEST,), outs=(Out(L.EXTRACT, note="a folder: prefix.npy exists only when backbone.adapt_from_block > 0"),),
         report=L.EXTRACT_REPORT, datasets=BOTH_SPLITS),
    Step("cluster", "step 3: spherical k-means at every k",
         params=(*BASE, "cluster"),
         deps=(L.FEATURES,),
         outs=(Out(L.CLUSTER, note="every k in one run; consumers depend on their own k<K> files inside it"),),
         report=L.CLUSTER_REPORT),
    Step("train-adaptor", "step 4: one adaptor set on the k pseudo-labels",
         params=(*BASE, "backbone", "adaptor", *IMAGES, "extract.num_workers"),
         # prefix.npy is read too: a function of features.parquet's content hashes and the backbone params
         deps=(L.FEATURES, L.PSEUDO_LABELS, L.CENTROIDS),
         outs=(Out(L.ADAPTOR), Out(L.ADAPTOR_REPORT), Out(L.CLASSIFIER, note="the frozen stage-1 classifier, for fusion.objective: pseudo_labels")),
         report=L.ADAPTOR_REPORT, per_k=True),
    Step("train-fusion", "step 5: granularity fusion; exports the servable model",
         params=(*BASE, "backbone", "adaptor", "fusion", "cluster.ks", *IMAGES, "extract.num_workers",
                 "evaluate.batch_size"),
         # the adaptors folder orders this stage after every train_adaptor@K, whatever cluster.ks holds
         deps=(L.FEATURES, L.CLUSTER, L.ADAPTORS),
         outs=(Out(L.FUSION), Out(L.KNN), Out(L.FUSION_REPORT),
               Out(L.MODEL, note="the servable model (weights + architecture + preprocessing)")),
         report=L.FUSION_REPORT),
    Step("evaluate", "step 6: retrieval metrics, table and plots; registers and promotes the model",
         params=(*BASE, "backbone", "adaptor.reduction", "fusion.attn_dim", "cluster.ks", *IMAGES,
                 "extract.num_workers", "evaluate", "tracking.registered_model"),
         deps=(L.FEATURES, L.ADAPTORS, L.FUSION, L.MODEL),
         outs=(Out(L.RESULTS),
               Out(L.CHAMPION, cache=False, note="which model serves: changes only when `champion` moves, "
                                                 "so `index` reruns exactly then"),
               Out(L.METRICS, cache=False, kind="metrics"), Out(L.PLOTS, kind="plots")),
         report=L.METRICS, datasets=(("query_db", "evaluation"),)),
    Step("index", "step 7: faiss index of the catalogue with the champion model",
         params=(*BASE, "backbone", "index", *IMAGES, "extract.num_workers"),
         # the manifest is the catalogue when index.sources is empty; images extract holds are fed
         # from its prefix cache
         deps=(L.MANIFEST, L.FEATURES, L.CHAMPION),
         outs=(Out(L.INDEX, persist=True, note="persistent: new catalogue images are added to the existing index"),),
         report=L.INDEX_REPORT, reads_sources="index.sources", datasets=()),
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
