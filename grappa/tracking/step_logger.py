"""One pipeline step recorded as a child run of the run tree.

Each step is logged *after* it has written its outputs, from its report/metrics files, so a
tracking failure never costs a step's results: its params.yaml sections as params, its report's
numbers as metrics (training curves per epoch), the report and evaluation plots as artifacts, the
datasets it read as MLflow inputs, and the model of the step the registry marks ``publishes`` (see
publisher): what is logged per step is the registry's, so nothing here names a step.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from grappa import registry
from grappa.config import Params
from grappa.io.layout import layout
from grappa.tracking import lineage, publisher
from grappa.tracking.runs import RunTree, one_line, flatten, step_params

def numeric_metrics(report: dict, skip: tuple[str, ...] = ("history",)) -> dict[str, float]:
    """Every int/float leaf of a report (bools, strings and lists are not metrics)."""
    out = {}
    for key, value in flatten({k: v for k, v in report.items() if k not in skip}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[lineage.safe_key(key)] = float(value)
    return out


def log_step(tree: RunTree, step: str, params: Params, item, start_s: float,
             error: BaseException | None = None) -> publisher.Decision | None:
    """Record one finished (or failed) step as a child run. ``item``: the k or
    :class:`~grappa.io.layout.Shard` of a mapped step (None otherwise). Returns what publishing
    decided for a step that publishes its model, else None."""
    import mlflow

    declared = registry.step(step)
    stage = lineage.dvc_stage_name(step, item)
    with tree._guard(f"log step '{stage}'"):
        tags = {**lineage.dvc_lock_tags(stage), "dvc.stage": stage, "grappa.step": step,
                "grappa.kind": "step", "mlflow.source.name": f"grappa {step}"}
        mapped = declared.mapped if item is not None else None
        if mapped:  # grappa.k = "64", grappa.shard = "0/2"
            tags[f"grappa.{mapped}"] = declared.axis.arg(item)
        # named by its stage, as DVC and Airflow name it (train_fusion, extract@0-of-2, train_adaptor@64)
        run_id = tree.open_child(declared.stage_name(item), start_s, tags)
        step_p = step_params(params, declared.params)
        if mapped:
            step_p[mapped] = declared.axis.arg(item)
        tree._log_batch(run_id, params=step_p)
        if error is not None:
            tree.client.set_tag(run_id, "grappa.error", lineage.redact_uri(one_line(error)))
            tree.client.set_terminated(run_id, status="FAILED")
            return None
        with mlflow.start_run(run_id=run_id):  # the active run is where log_artifact/log_input/log_model go
            return _log_outputs(tree, run_id, step, params, item)


def _log_outputs(tree: RunTree, run_id: str, step: str, params: Params, item) -> publisher.Decision | None:
    import mlflow

    declared, out = registry.step(step), layout(params)
    report_file = declared.report_file(out, item)
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    metrics = numeric_metrics(report)
    if isinstance(report.get("skipped"), list):
        metrics["skipped"] = float(len(report["skipped"]))
    tree._log_batch(run_id, metrics=metrics)
    for entry in report.get("history") or []:  # training curves: one step per epoch
        epoch = int(entry.get("epoch", 0))
        values = {lineage.safe_key(f"train.{key}"): float(v) for key, v in entry.items()
                  if key != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        tree._log_batch(run_id, metrics=values, step=epoch)
    for path in (report_file, *(out.path(template) for template in declared.artifacts)):
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=path.name)
        elif path.is_file():
            mlflow.log_artifact(str(path))
    data = out.path(declared.datasets_from)  # what the registry says the step read its images from
    if data.is_file():
        for split, context in declared.datasets:
            _log_dataset(tree, run_id, data, split, context)
    if not declared.publishes:
        return None
    publisher.log_bundle(tree, run_id, params)
    return publisher.publish_model(tree, run_id, params, report)[1]


def _log_dataset(tree: RunTree, run_id: str, features: Path, split: str, context: str) -> None:
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    sha, rows = lineage.split_digest(features, split)
    if not rows:
        return
    # MLflow caps dataset digests at 36 chars: log 128 bits of the sha256, the full one as a tag.
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(features.resolve()))
    dataset = MetaDataset(source=source, name=split, digest=sha[:32])
    mlflow.log_input(dataset, context=context, tags={"rows": str(rows)})
    tree.client.set_tag(run_id, f"dataset.{split}.sha256", sha)
