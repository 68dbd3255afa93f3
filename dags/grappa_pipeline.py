"""Airflow DAGs of grappa-pipeline.

- ``grappa_pipeline``: the steps (task ids = dvc.yaml stage names) between the glue tasks ``plan``
  and ``close_run``: ``extract`` mapped over the parts of the snapshot (one instance per shard of
  ``extract.shards``, then ``merge_features`` joins them) and ``train_adaptor`` over k (one instance
  per k of ``cluster.ks``), each fed its commands by a glue task ``plan_<task>``. Runs when the
  unlabeled-data asset gets an event, or manually with conf
  ``{"sources": [...], "ks": [...], "shards": N, "params_file": "..."}`` (all optional). With the
  local runner the conf is first written into the workspace's params.yaml (``grappa prepare``,
  which also writes the ``extract@<i>-of-<n>`` stages of ``shards`` into dvc.yaml) and every step
  task runs ``grappa repro <stage>`` (``extract@0-of-2``, ``train_adaptor@8``): DVC reruns exactly what
  the new data or conf changed, and a task whose stage is up to date ends as *skipped* with a log
  line saying so. A run with nothing new at all stops at ``plan`` (``dvc status`` up to date, said
  in its log) and every later task shows as skipped: a visible no-op.
- ``grappa_watch_folder`` / ``grappa_watch_s3``: poll the local folders the pipeline reads (or
  GRAPPA_WATCH_DIR) / an S3 prefix and emit an event on the asset when the listing differs from
  the one the last pipeline run started on.

With ``GRAPPA_WORKSPACE_MODE=own`` (workers that share no disk, e.g. Celery workers with clones of
their own) plan instead starts the run as a DVC experiment on the git remote (``grappa start-run
<run id>``, the conf in its params) and every step task is ``grappa task --run <run id> <stage>`` in
the worker's clone: inputs pulled from the DVC remote, outputs pushed, dvc.lock committed on the run's
ref (grappa/experiments.py); ``dvc exp show`` lists the runs.

Where the steps run: env ``GRAPPA_RUNNER`` = local (subprocess in the repo, ``GRAPPA_REPO``),
docker or k8s (image ``GRAPPA_IMAGE`` from containers/). Other settings: see containers/README.md.
"""
from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path

from airflow.sdk import Asset, Param, chain, dag, task

# Airflow puts the DAG folder on sys.path; this also covers loading the file by path (tests).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import planning  # noqa: E402
import runners  # noqa: E402
import watchers  # noqa: E402

UNLABELED = Asset(uri="grappa://data/unlabeled", name="grappa_unlabeled")
START = datetime(2026, 1, 1)
# The watchers' poll schedule; empty: no schedule (triggered by hand or by the API only).
WATCH_SCHEDULE = os.environ.get("GRAPPA_WATCH_SCHEDULE", "*/15 * * * *") or None
SETTLE_S = float(os.environ.get("GRAPPA_WATCH_SETTLE_S", 30))


def build_pipeline(runner: str):
    runners.workspace_mode(runner)  # a bad setting is the DAG's import error, at once

    @dag(
        dag_id=runners.PIPELINE_DAG,
        schedule=[UNLABELED],
        start_date=START,
        catchup=False,
        # shared: runs share one workspace (outputs/, feature cache); own: a run starts from the last one's dvc.lock
        max_active_runs=1,
        params={
            "sources": Param(None, type=["null", "array"], items={"type": "string"}),
            "ks": Param(None, type=["null", "array"], items={"type": "integer", "minimum": 2}),
            "shards": Param(None, type=["null", "integer"], minimum=1),
            "params_file": Param(None, type=["null", "string"]),
        },
        tags=["grappa"],
        doc_md=__doc__,
    )
    def grappa_pipeline():
        @task.short_circuit
        def plan(params=None, ti=None, run_id=None, triggering_asset_events=None) -> bool:
            # Glue, not a step: a bad conf fails here at once, without retries. Pushes every step's
            # command (a list for a mapped step) under its task id. Returns False (every later task
            # skipped) when DVC finds nothing to do.
            events = planning.trigger_events(triggering_asset_events)
            for event in events:
                print(f"triggered by new data: source={event['source']} fingerprint={event['fingerprint']}")
            if not events:
                print("no asset event: manual run")
            commands = planning.plan(dict(params or {}), runner, run_id)
            if commands["start"]:  # own workspaces: the run's params on its experiment ref of the git remote
                print(planning.prepare_workspace(commands["start"]))
                # the k and shards of the run's params.yaml, as start-run checked it out here
                commands = planning.plan(dict(params or {}), runner, run_id)
            if commands["prepare"]:
                prepared = planning.prepare_workspace(commands["prepare"])
                print(prepared)
                # every step runs on the params this prepare wrote, or refuses to
                commands = planning.pin_params(commands, planning.pinned_digest(prepared))
            planning.record_started(events)  # the watchers compare against what a run has started on
            stale = planning.stale_stages(runner)
            if stale == []:
                print("nothing to do: the data, params and code are those dvc.lock recorded; every step is skipped")
                return False
            if stale:
                print(f"out of date (dvc status): {', '.join(stale)}; the stages after them rerun where their inputs change")
            print(f"{commands['shards']} extract shard(s), k in {commands['ks']}")
            ti.xcom_push(key="trigger", value=json.dumps(events))
            for name in (*runners.VERBS, "close_run"):
                ti.xcom_push(key=name, value=commands[name])
            return True

        @task
        def fan_out(commands: list) -> list:
            # Glue: a task maps only over another task's return value, so each mapped step gets its
            # list of commands from plan through one of these.
            return commands

        planned = plan()

        def step(name: str):
            # none_failed: a step skipped as up to date does not skip the steps after it (DVC decides there)
            if name in runners.MAPPED:
                commands = fan_out.override(task_id=f"plan_{name}")(planned[name])
                return runners.step_operator(name, commands, runner, mapped=True, trigger_rule="none_failed")
            return runners.step_operator(name, planned[name], runner, trigger_rule="none_failed")

        steps = [step(name) for name in runners.VERBS]  # in the registry's (pipeline) order
        # Closes the MLflow parent run (if a step opened one) whatever happened before. No Airflow
        # retries: close-run retries the tracking server itself, and when plan refused the conf there
        # is no command to run, so retrying would only hold the run (and the watchers) for minutes.
        close = runners.step_operator("close_run", planned["close_run"], runner, trigger_rule="all_done", retries=0)
        chain(planned, *steps, close)

    return grappa_pipeline()


pipeline = build_pipeline(runners.runner_name())


@dag(
    dag_id="grappa_watch_folder",
    schedule=WATCH_SCHEDULE,
    start_date=START,
    catchup=False,
    max_active_runs=1,
    # empty: every local folder the workspace's params.yaml reads (data.sources, index.sources)
    params={"folders": Param([], type="array", items={"type": "string"})},
    tags=["grappa", "watcher"],
)
def grappa_watch_folder():
    @task(outlets=[UNLABELED])
    def detect_folder_change(params=None, outlet_events=None, ti=None) -> str:
        folders = list(params["folders"]) or watchers.watched_folders()
        source = ", ".join(folders)
        fingerprint = watchers.settled(lambda: watchers.folders_fingerprint(folders), SETTLE_S)
        return watchers.emit_if_changed(source, fingerprint, outlet_events[UNLABELED], watchers.pipeline_busy(ti))

    detect_folder_change()


@dag(
    dag_id="grappa_watch_s3",
    schedule=WATCH_SCHEDULE,
    start_date=START,
    catchup=False,
    max_active_runs=1,
    # Without a bucket configured (GRAPPA_WATCH_BUCKET) every poll would fail on a bucket that is not
    # there: the watcher starts paused, to be switched on in the UI once S3 is set up.
    is_paused_upon_creation="GRAPPA_WATCH_BUCKET" not in os.environ,
    params={
        "bucket": Param(os.environ.get("GRAPPA_WATCH_BUCKET", "grappa-data"), type="string"),
        "prefix": Param(os.environ.get("GRAPPA_WATCH_PREFIX", "unlabeled/"), type="string"),
    },
    tags=["grappa", "watcher"],
)
def grappa_watch_s3():
    from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor

    aws_conn_id = os.environ.get("GRAPPA_AWS_CONN_ID", "aws_default")
    # Deferred in the triggerer (no worker slot held) until the prefix has any object; a quiet
    # interval ends as "skipped", not failed.
    wait = S3KeySensor(
        task_id="wait_for_objects",
        bucket_name="{{ params.bucket }}",
        bucket_key="{{ params.prefix }}*",
        wildcard_match=True,
        aws_conn_id=aws_conn_id,
        deferrable=os.environ.get("GRAPPA_DEFERRABLE", "1") == "1",
        poke_interval=60,
        timeout=10 * 60,
        soft_fail=True,
    )

    @task(outlets=[UNLABELED])
    def detect_s3_change(params=None, outlet_events=None, ti=None) -> str:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        client = S3Hook(aws_conn_id=aws_conn_id).get_conn()
        bucket, prefix = params["bucket"], params["prefix"]
        fingerprint = watchers.settled(lambda: watchers.s3_fingerprint(client, bucket, prefix), SETTLE_S)
        return watchers.emit_if_changed(f"s3://{bucket}/{prefix}", fingerprint, outlet_events[UNLABELED],
                                       watchers.pipeline_busy(ti))

    wait >> detect_s3_change()


grappa_watch_folder()
grappa_watch_s3()
