"""Model publisher: log the evaluate run's state bundle, register the fused model as a servable
MLflow pyfunc (``tracking.registered_model``: images in, embeddings out) and move ``champion`` on
equal terms.

The bundle (``bundle/`` artifacts of the run: the adaptors and their stage-1 classifiers, the
fusion, each k's centroids and pseudo-labels, params.yaml) holds the inputs the servable model was
built from: what a later run warm-starts from when this version is the champion
(grappa/core/incremental.py).

A new version gets alias ``candidate``. It becomes ``champion`` only if its mean mAP@R beats the
champion's *on the same evaluation set* (same query_db images and contents, same task list; its
identity is the ``grappa.eval_set`` tag). When the champion was scored on another set, it is
re-scored on this one in the same step, and both scores, the set and the decision are recorded on
the new version. The decision names the version that serves; the runner writes it to
``<out>/evaluate/champion.json`` (grappa/cli.py), the file the ``index`` stage depends on, so the
catalogue index is rebuilt exactly when the champion changes.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from grappa.config import Params
from grappa.io.champion import CHAMPION, GENERATION_TAG, MODEL_SHA_TAG, PARENT_TAG, run_mode
from grappa.io.layout import WARM_DECISION, layout
from grappa.tracking import lineage
from grappa.tracking.runs import RunTree, params_yaml

CANDIDATE = "candidate"
SCORE_TAG = "grappa.mean_map_at_r"  # the version's mean mAP@R on the validation classes of EVAL_SET_TAG
EVAL_SET_TAG = "grappa.eval_set"
ADAPT_MODE_TAG, ADAPT_REASON_TAG = "grappa.adapt_mode", "grappa.adapt_reason"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # all of grappa/ travels with the model: pyfunc_model imports io, core
# what the pyfunc model imports when loaded (pinned to this environment's versions)
RUNTIME_PACKAGES = ("torch", "timm", "mlflow", "numpy", "pandas", "pillow", "pyarrow", "pydantic", "pyyaml", "tqdm")


# --------------------------------------------------------------------------- pure decisions


def eval_set_id(params: Params) -> str:
    """Identity of what a score is measured on: the query_db images (ids and content hashes), how
    their classes split into validation and test, and the tasks."""
    features = layout(params).features
    digest, _ = lineage.split_digest(features, "query_db")
    tasks = sorted(t.name for t in params.evaluate.instance_tasks)
    split = ["validation, stratified by class size", params.evaluate.val_share, params.evaluate.split_seed]
    return hashlib.sha256(json.dumps([digest, tasks, split]).encode()).hexdigest()


@dataclass(frozen=True)
class Standing:
    """A registered version's score and the evaluation set it was measured on."""

    version: str
    score: float | None
    eval_set: str | None


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    champion_score: float | None = None  # the champion's score on the candidate's evaluation set
    compared_with: str | None = None  # the champion's version, where there was one
    # (model_sha256, model URI, version) of the version that serves after the decision; None: none yet
    serves: tuple[str, str, str] | None = None


def decide(score: float | None, eval_set: str, champion: Standing | None,
           rescore: Callable[[], float | None]) -> Decision:
    """Promote the candidate only if it beats the champion measured on ``eval_set``."""
    return replace(_verdict(score, eval_set, champion, rescore), compared_with=champion.version if champion else None)


def _verdict(score: float | None, eval_set: str, champion: Standing | None,
             rescore: Callable[[], float | None]) -> Decision:
    if score is None:
        return Decision(False, "the candidate has no mean mAP@R")
    if champion is None:
        return Decision(True, "first version: no champion yet")
    if champion.eval_set == eval_set and champion.score is not None:
        best, basis = champion.score, "same evaluation set"
    else:
        best = rescore()
        if best is None:
            return Decision(True, f"champion v{champion.version} cannot be scored on this evaluation set "
                                  "(it predates the servable format); replaced")
        basis = f"champion v{champion.version} re-scored on this evaluation set"
    verdict = "beats" if score > best else "does not beat"
    # six decimals: two runs can differ in the fifth ("0.3577 beats 0.3577" says nothing)
    return Decision(score > best, f"{score:.6f} {verdict} {best:.6f} ({basis})", best)


# --------------------------------------------------------------------------- MLflow


def signature(embed_dim: int):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    from grappa.tracking.pyfunc_model import IMAGE, PATH

    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE, required=False), ColSpec("string", PATH, required=False)]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, embed_dim), name="embedding")]),
    )


def input_example(size: int):
    """Two small images as bytes (a request needs no file on the server)."""
    import pandas as pd
    from PIL import Image

    def png(colour) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (size, size), colour).save(buffer, "PNG")
        return buffer.getvalue()

    return pd.DataFrame({"image": [png((200, 30, 30)), png((30, 30, 200))]})


def _requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in RUNTIME_PACKAGES]


def _standing(version) -> Standing:
    try:
        score = float(version.tags[SCORE_TAG])
    except (KeyError, ValueError):
        score = None
    return Standing(str(version.version), score if score == score else None, version.tags.get(EVAL_SET_TAG))


def score_registered(name: str, version: str, params: Params) -> float | None:
    """Mean mAP@R of a registered version on this run's evaluation set (None if it cannot be loaded)."""
    from grappa.io import servable
    from grappa.io.scoring import score_servable

    try:
        model = servable.load(servable.download(f"models:/{name}/{version}"))
    except Exception as err:  # a version registered in an older format, or unreadable
        print(f"tracking: cannot load champion v{version} to re-score it: {str(err).splitlines()[0][:200]}")
        return None
    return score_servable(model, params)


def log_bundle(tree: RunTree, run_id: str, params: Params) -> None:
    """Log this (active) run's state bundle: every adaptor set with its classifier, each k's
    centroids and pseudo-labels, the fusion and the params."""
    import mlflow

    outputs = layout(params)
    for k in params.cluster.ks:
        for path in (outputs.adaptor(k), outputs.classifier(k)):
            mlflow.log_artifact(str(path), artifact_path=f"bundle/adaptors/k{k}")
        for path in (outputs.centroids(k), outputs.pseudo_labels(k)):
            mlflow.log_artifact(str(path), artifact_path="bundle/cluster")
    mlflow.log_artifact(str(outputs.fusion), artifact_path="bundle/fusion")
    tree.client.log_text(run_id, params_yaml(params), "bundle/params.yaml")


def adapt_tags(params: Params) -> dict[str, str]:
    """How the model was adapted, for its version and its run: mode, why, generation, parent version
    (``io.champion.run_mode``, the reader the training steps use; the reason from warm-start's decision
    when clustering did not override it)."""
    from grappa.io.artifacts import read_json

    mode, decision_file = run_mode(params), layout(params).path(WARM_DECISION)
    decision = read_json(decision_file) if decision_file.is_file() else {}
    tags = {ADAPT_MODE_TAG: mode["mode"], ADAPT_REASON_TAG: mode.get("reason") or decision.get("reason", ""),
            GENERATION_TAG: str(mode.get("generation", 0))}
    if mode.get("parent_version"):
        tags[PARENT_TAG] = str(mode["parent_version"])
    return tags


@dataclass(frozen=True)
class Candidate:
    """A version just registered: where it is and what it scored, on which evaluation set."""

    name: str
    version: str
    model_sha256: str
    score: float | None
    eval_set: str
    adapt: dict[str, str]  # adapt_tags: set on the version at registration, on the run at promotion


def register(tree: RunTree, params: Params, metrics: dict) -> Candidate:
    """Log the servable model of the active run as a pyfunc, register it as a new version tagged with
    its score and evaluation set, and give it alias ``candidate``."""
    import mlflow

    from grappa.io import servable

    folder = layout(params).model
    config = servable.read_config(folder)
    name = params.tracking.registered_model
    info = mlflow.pyfunc.log_model(
        name="grappa",
        python_model=str(PYFUNC_FILE),  # models-from-code: no pickled Python object in the registry
        artifacts={"model": str(folder)},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature(config["embed_dim"]),
        input_example=input_example(config["image_size"]),
        pip_requirements=_requirements(),
        registered_model_name=name,
        metadata={"ks": config["ks"], "backbone": config["timm_name"], "model_sha256": config["weights_sha256"],
                  "preprocess": config["preprocess"]},  # how to feed images, beside the weights
    )
    scores = model_metrics(metrics)
    # the candidate's score is its mean mAP@R on the validation classes: the champion is a choice, made on validation
    candidate = Candidate(name, str(info.registered_model_version), config["weights_sha256"],
                          scores.get("val_mean_map_at_r"), eval_set_id(params), adapt_tags(params))
    if scores:  # on the logged model too, so the Models view can rank the versions
        mlflow.log_metrics(scores, model_id=info.model_id)
    tags = {EVAL_SET_TAG: candidate.eval_set, MODEL_SHA_TAG: candidate.model_sha256,
            "dvc.stage": lineage.dvc_stage_name("evaluate"), **candidate.adapt}
    if candidate.score is not None:
        tags[SCORE_TAG] = repr(candidate.score)
    if tree.parent_run_id:
        tags["grappa.parent_run_id"] = tree.parent_run_id
    for key, value in tags.items():
        tree.client.set_model_version_tag(name, candidate.version, key, value)
    tree.client.set_registered_model_alias(name, CANDIDATE, candidate.version)
    return candidate


def promote(tree: RunTree, run_id: str, params: Params, candidate: Candidate) -> Decision:
    """Move ``champion`` to ``candidate`` when it beats the champion on the same evaluation set (see
    :func:`decide`) and record the comparison on the version and the run; the decision names the
    version that serves now, whichever won (the runner writes it to champion.json)."""
    client, name = tree.client, candidate.name
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # no champion yet
        current = None
    champion = _standing(current) if current is not None else None
    decision = decide(candidate.score, candidate.eval_set, champion,
                      lambda: score_registered(name, champion.version, params))
    if decision.compared_with is not None:
        client.set_model_version_tag(name, candidate.version, "grappa.compared_with", f"v{decision.compared_with}")
    if decision.champion_score is not None:
        client.set_model_version_tag(name, candidate.version, "grappa.champion_score_on_eval_set",
                                     repr(decision.champion_score))
    client.set_model_version_tag(name, candidate.version, "grappa.promotion", decision.reason)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
        decision = replace(decision, serves=(candidate.model_sha256, f"models:/{name}/{candidate.version}",
                                             candidate.version))
    elif champion is not None:
        held = client.get_model_version(name, champion.version)
        decision = replace(decision, serves=(held.tags.get(MODEL_SHA_TAG, ""), f"models:/{name}/{champion.version}",
                                             champion.version))
    # else no version serves yet (an unscored first candidate): evaluate's own model serves
    client.set_tag(run_id, "grappa.model_version", candidate.version)
    for key, value in candidate.adapt.items():
        client.set_tag(run_id, key, value)
    client.set_tag(run_id, "grappa.model_alias", CHAMPION if decision.promote else CANDIDATE)
    print(f"tracking: registered {name} version {candidate.version} as {CANDIDATE}"
          + (f" and {CHAMPION}" if decision.promote else f" (not {CHAMPION})") + f": {decision.reason}", flush=True)
    return decision


def pool_counts(features: Path) -> dict[str, dict[str, int]]:
    """{split: {domain: images}} of the feature table: what the model learnt from and was scored on."""
    import pyarrow.parquet as pq

    table = pq.read_table(features, columns=["split", "domain"])
    counts: dict[str, dict[str, int]] = {}
    for split, domain in zip(table.column("split").to_pylist(), table.column("domain").to_pylist()):
        counts.setdefault(split, {}).setdefault(domain, 0)
        counts[split][domain] += 1
    return counts


LIMITS = ("Scores are mAP@R over class-level domains; the unlabeled pool holds images of the evaluated "
          "classes (never their labels), so the gain over zero-shot is transductive at class level.",
          "One model for all domains: nothing reads a domain name, and a domain far from the pool may be "
          "served no better than the frozen backbone.")


def model_card(candidate: Candidate, decision: Decision, params: Params, metrics: dict, data: dict) -> str:
    """The registered version's description (Markdown): the data it saw, its scores and how it was
    chosen, the protocol, backbone and recipe, known limits. ``data``: snapshot digest and counts."""
    from grappa.core.evaluation import method_order  # here: it loads torch, which the runner of a
    # step without a model (merge-features, cluster) would otherwise import (+0.5 GB, 1.6 s)

    def pct(x) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}"

    methods, val = metrics.get("methods") or {}, (metrics.get("validation") or {}).get("methods") or {}
    protocol = metrics.get("protocol") or {}
    rows = ["| method | test mAP@R | validation mAP@R |", "|---|---|---|"]
    for name in method_order(list(methods)):
        rows.append(f"| {name} | {pct(methods[name]['mean']['map_at_r'])} | "
                    f"{pct((val.get(name) or {}).get('mean', {}).get('map_at_r'))} |")
    pools = "; ".join(f"{split}: " + ", ".join(f"{d} {n}" for d, n in sorted(domains.items()))
                      for split, domains in sorted(data["counts"].items()))
    compared = decision.compared_with
    champion = (f"champion v{compared} scored {pct(decision.champion_score)}" if decision.champion_score is not None
                else f"compared with champion v{compared}" if compared else "no champion before it")
    fusion, adaptor, adapt = params.fusion, params.adaptor, params.adapt
    how = candidate.adapt
    adaptation = (f"incremental, warm-started from champion v{how[PARENT_TAG]} (generation {how[GENERATION_TAG]}): "
                  f"{adapt.adaptor_epochs} adaptor and {adapt.fusion_epochs} fusion epochs on the new images plus "
                  f"at most {adapt.replay} replayed old ones" if how.get(ADAPT_MODE_TAG) == "incremental"
                  else "full, every adaptor set and the fusion trained from scratch")
    return "\n".join([
        f"**Grappa model, version {candidate.version}** — one embedding model for every domain of its pool.",
        "",
        f"**Decision:** {'promoted to champion' if decision.promote else 'candidate only'} — {decision.reason}. "
        f"Validation mean mAP@R {pct(candidate.score)}; {champion}.",
        "",
        f"**Data:** learnt from an unlabeled pool of {data['images']} images (digest `{data['digest'][:16]}`); "
        f"images per split and domain: {pools}.",
        "",
        f"**Protocol:** chosen on the validation classes, reported on the test classes (each domain's classes split "
        f"{protocol.get('val_share', params.evaluate.val_share)} / rest, class-disjoint, seed "
        f"{protocol.get('split_seed', params.evaluate.split_seed)}); scores in % (mean over domains).",
        "",
        *rows,
        "",
        f"**Backbone and recipe:** {params.backbone.name} (weights: {params.backbone.weights}), adaptors from block "
        f"{params.backbone.adapt_from_block}, k = {params.cluster.ks}, {adaptor.epochs} adaptor epochs on "
        f"`{adaptor.objective}`; fusion: {fusion.attention} attention, value {fusion.value}, {fusion.epochs} epochs "
        f"on `{fusion.objective}`, propagation {fusion.propagation}.",
        "",
        f"**Adaptation:** {adaptation} ({how.get(ADAPT_REASON_TAG) or 'no reason recorded'}).",
        "",
        "**Known limits:** " + " ".join(LIMITS),
    ])


def publish_model(tree: RunTree, run_id: str, params: Params, metrics: dict) -> tuple[str, Decision]:
    """Register the evaluate run's model, then decide whether it serves; returns (version, decision)."""
    candidate = register(tree, params, metrics)
    decision = promote(tree, run_id, params, candidate)
    describe(tree, params, metrics, candidate, decision)
    return candidate.version, decision


def describe(tree: RunTree, params: Params, metrics: dict, candidate: Candidate, decision: Decision) -> None:
    """The version's model card as its MLflow description."""
    features = layout(params).features
    digest, images = lineage.split_digest(features, "unlabeled")
    data = {"digest": digest, "images": images, "counts": pool_counts(features)}
    card = model_card(candidate, decision, params, metrics, data)
    tree.client.update_model_version(candidate.name, candidate.version, description=card)


def model_metrics(metrics: dict) -> dict[str, float]:
    """The fused model's headline figures: validation and test mean mAP@R, test R@1, test mAP@R per domain."""
    try:
        test, val = metrics["methods"]["grappa"], metrics["validation"]["methods"]["grappa"]
        out = {"val_mean_map_at_r": val["mean"]["map_at_r"], "test_mean_map_at_r": test["mean"]["map_at_r"],
               "test_mean_recall_at_1": test["mean"]["recall_at_1"]}
        out.update({lineage.safe_key(f"test_map_at_r.{domain}"): m["map_at_r"] for domain, m in test["per_domain"].items()})
        return {key: float(value) for key, value in out.items()}
    except (KeyError, TypeError, ValueError, AttributeError):  # not an evaluate report: nothing to rank by
        return {}
