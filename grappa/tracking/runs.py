"""The run tree on the tracking server: a parent run per pipeline run, child runs hung below it.

- URI: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<repo or cwd>/mlflow.db`` with artifacts in the
  ``mlruns/`` folder next to the DB (``GRAPPA_MLFLOW_ARTIFACT_LOCATION``, e.g. ``s3://bucket/mlflow``,
  overrides where a *new* experiment keeps its artifacts).
- Experiment: ``tracking.experiment`` (``MLFLOW_EXPERIMENT_NAME`` overrides it).
- Parent: the steps of one pipeline run meet in one parent run, found by the run key
  ``GRAPPA_PIPELINE_RUN`` (``grappa run`` sets it; under Airflow it is the DAG run id) and created
  by the first step that logs, so a run in which DVC had nothing to do leaves no empty run behind.
  The orchestrator closes it (``grappa run`` itself, the DAG's ``close_run`` task). An explicit
  ``GRAPPA_MLFLOW_PARENT_RUN_ID`` (``grappa open-run``) wins; without any, a step is a standalone run.
- Errors of any client call become one :class:`TrackingError` line.
- Nothing from the environment is logged, and every logged string has URI userinfo stripped.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from grappa.config import Params
from grappa.io.champion import registry_uri, tracking_uri
from grappa.tracking import lineage

ENV_PARENT = "GRAPPA_MLFLOW_PARENT_RUN_ID"
ENV_RUN_KEY = "GRAPPA_PIPELINE_RUN"
RUN_KEY_TAG = "grappa.pipeline_run"
ENV_ARTIFACT_LOCATION = "GRAPPA_MLFLOW_ARTIFACT_LOCATION"

# Bounded retries for an unreachable server (MLflow's own defaults wait minutes).
_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # urllib3: 0 s, 2 s, 4 s
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # a pipeline never phones home unless asked to
}


class TrackingError(RuntimeError):
    """MLflow could not be reached or refused a call (printed as one line; outputs are kept)."""


def artifact_location(uri: str) -> str | None:
    """Artifact root for a new experiment: explicit env, else next to a sqlite DB; servers decide."""
    if os.environ.get(ENV_ARTIFACT_LOCATION):
        return os.environ[ENV_ARTIFACT_LOCATION]
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.resolve().parent / "mlruns").as_uri()
    return None


def pipeline_run_key() -> str | None:
    """The key the steps of one pipeline run share: GRAPPA_PIPELINE_RUN, else the Airflow DAG run id."""
    return os.environ.get(ENV_RUN_KEY) or lineage.airflow_tags().get("airflow.dag_run_id")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists stay leaves."""
    flat: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            flat.update(flatten(value, f"{prefix}{key}."))
    else:
        flat[prefix[:-1]] = obj
    return flat


def step_params(params: Params, keys: tuple[str, ...] | None = None) -> dict[str, str]:
    """The flattened params (all, or those under ``keys``: sections or dotted leaves), as MLflow params."""
    flat = flatten(lineage.redact(params.model_dump(mode="json")))
    if keys is not None:
        flat = {name: v for name, v in flat.items() if any(name == key or name.startswith(key + ".") for key in keys)}
    return {lineage.safe_key(k): (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000]
            for k, v in flat.items()}


def params_yaml(params: Params) -> str:
    import yaml

    return yaml.safe_dump(lineage.redact(params.model_dump(mode="json")), sort_keys=False)


def one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = lineage.redact_uri(lines[0] if lines else type(err).__name__)
    if "Max retries exceeded" in text or "NewConnectionError" in text or "ConnectionError" in text:
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
        return f"server unreachable after {retries} retries ({type(err).__name__})"
    return text[:300]


class RunTree:
    """One process's client of the tracking server for one params file, and the parent its runs hang below."""

    def __init__(self, params: Params, parent_run_id: str | None = None):
        for key, value in _CLIENT_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import mlflow
        from mlflow.tracking import MlflowClient

        self.params = params
        self.uri = tracking_uri()
        self.safe_uri = lineage.redact_uri(self.uri)
        self.parent_run_id = parent_run_id if parent_run_id is not None else (os.environ.get(ENV_PARENT) or None)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(registry_uri())
        self.client = MlflowClient(self.uri, registry_uri())
        self._experiment_id: str | None = None

    # ------------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except TrackingError:
            raise
        except Exception as err:  # MlflowException, requests/urllib3, boto, sqlalchemy...
            raise TrackingError(f"tracking: cannot {what} at {self.safe_uri}: {one_line(err)}") from None

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.params.tracking.experiment
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    self._experiment_id = self.client.create_experiment(name, artifact_location=artifact_location(self.uri))
                except Exception:  # another process created it in between
                    experiment = self.client.get_experiment_by_name(name)
                    if experiment is None:
                        raise
                    self._experiment_id = experiment.experiment_id
            else:
                self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def _common_tags(self) -> dict[str, str]:
        return {**lineage.git_tags(), **lineage.airflow_tags()}

    def _log_batch(self, run_id: str, params: dict | None = None, metrics: dict | None = None,
                   step: int = 0) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v == v],
            params=[Param(k, v) for k, v in (params or {}).items()],
        )

    # ------------------------------------------------------------------ parent run

    def open_parent(self, run_name: str | None = None, key: str | None = None) -> str:
        """Create (but do not keep active) the parent run of one pipeline run; returns its id."""
        with self._guard("open the pipeline run"):
            tags = {**self._common_tags(), "grappa.kind": "pipeline", "mlflow.source.name": "grappa"}
            if key:
                tags[RUN_KEY_TAG] = key
            name = run_name or tags.get("airflow.dag_run_id") or f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}"
            run = self.client.create_run(self.experiment_id(), tags=tags, run_name=name)
            run_id = run.info.run_id
            self._log_batch(run_id, params=step_params(self.params))
            self.client.log_text(run_id, params_yaml(self.params), "params.yaml")
        self.parent_run_id = run_id
        return run_id

    def _parents(self, key: str) -> list:
        """Parent runs tagged with ``key``, earliest first (run id breaks a tie)."""
        found = self.client.search_runs([self.experiment_id()], max_results=10,
                                        filter_string=f"tags.`grappa.kind` = 'pipeline' and tags.`{RUN_KEY_TAG}` = '{key}'")
        return sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))

    def find_parent(self, key: str) -> str | None:
        """The parent run of pipeline run ``key``, if a step has created it."""
        with self._guard("find the pipeline run"):
            found = self._parents(key)
        return found[0].info.run_id if found else None

    def keyed_parent(self, key: str) -> str:
        """The parent run of pipeline run ``key``: found, else created by this (first logging) step.

        Steps of one run execute in separate processes (DVC stages, Airflow tasks, containers) and
        meet through the tracking server. Two steps may start at once (mapped adaptor tasks); both
        then create a parent, and the later one deletes its own in favour of the earliest.
        """
        found = self._parents(key)
        if found:
            return found[0].info.run_id
        own = self.open_parent(key=key)  # named after the Airflow run id, else a timestamp
        earliest = self._parents(key)[0].info.run_id
        if earliest != own:
            self.client.delete_run(own)
        self.parent_run_id = earliest
        return earliest

    def close_parent(self, run_id: str, status: str = "FINISHED") -> dict[str, float]:
        """Copy the evaluation summary from the children onto the parent and set its final status."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        with self._guard("close the pipeline run"):
            parent = self.client.get_run(run_id)
            children = self.client.search_runs([parent.info.experiment_id],
                                               filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{run_id}'",
                                               max_results=1000)
            summary: dict[str, float] = {
                "steps_total": float(len(children)),
                "steps_failed": float(sum(c.info.status != "FINISHED" for c in children)),
            }
            for child in children:
                if child.data.tags.get("grappa.step") == "evaluate" and child.info.status == "FINISHED":
                    for key, value in child.data.metrics.items():
                        if key.endswith(".mean.map_at_r") or key.endswith(".mean.recall_at_1"):
                            summary[key] = value
                    for key in ("grappa.model_version", "grappa.model_alias"):
                        if key in child.data.tags:
                            self.client.set_tag(run_id, key, child.data.tags[key])
            if summary["steps_failed"] and status == "FINISHED":
                status = "FAILED"
            self._log_batch(run_id, metrics=summary)
            self.client.set_terminated(run_id, status=status)
        return summary

    # ------------------------------------------------------------------ child runs

    def open_child(self, run_name: str, start_s: float, tags: dict[str, str]) -> str:
        """Create a run below this pipeline run's parent (found or created by key; none: standalone); returns its id."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        if not self.parent_run_id and pipeline_run_key():
            self.parent_run_id = self.keyed_parent(pipeline_run_key())
        tags = {**self._common_tags(), **tags}
        if self.parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
        run = self.client.create_run(self.experiment_id(), start_time=int(start_s * 1000), tags=tags,
                                     run_name=run_name)
        return run.info.run_id
