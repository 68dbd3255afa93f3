"""Airflow DAGs of grappa-pipeline.

- ``grappa_pipeline``: the five steps (task ids = dvc.yaml stage names), one ``train_adaptor``
  instance per k. Runs when the unlabeled-data asset gets an event, or manually with conf
  ``{"sources": [...], "ks": [...], "params_file": "..."}`` (all optional).
- ``grappa_watch_folder`` / ``grappa_watch_s3``: poll a local folder / an S3 prefix and emit an
  event on the asset only when the listing changed.

Where the steps run: env ``GRAPPA_RUNNER`` = local (subprocess in the repo, ``GRAPPA_REPO``),
docker or k8s (image ``GRAPPA_IMAGE`` from containers/). Other settings: see containers/README.md.
"""
from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

from airflow.sdk import Asset, Param, chain, dag, task

# Airflow puts the DAG folder on sys.path; this also covers loading the file by path (tests).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import runners  # noqa: E402

UNLABELED = Asset(uri="grappa://data/unlabeled", name="grappa_unlabeled")
START = datetime(2026, 1, 1)
SETTLE_S = float(os.environ.get("GRAPPA_WATCH_SETTLE_S", 30))


def build_pipeline(runner: str):
    @dag(
        dag_id="grappa_pipeline",
        schedule=[UNLABELED],
        start_date=START,
        catchup=False,
        max_active_runs=1,  # runs share one workspace (outputs/, feature cache)
        params={
            "sources": Param(None, type=["null", "array"], items={"type": "string"}),
            "ks": Param(None, type=["null", "array"], items={"type": "integer", "minimum": 2}),
            "params_file": Param(None, type=["null", "string"]),
        },
        tags=["grappa"],
        doc_md=__doc__,
    )
    def grappa_pipeline():
        @task
        def plan_ks(params=None, ti=None) -> list:
            # Glue, not a step: a bad conf fails here at once, without retries. Returns one
            # train_adaptor command per k (mapping needs the return value); the others go by key.
            commands = runners.plan(dict(params or {}), runner)
            for name in ("extract", "cluster", "train_fusion", "evaluate"):
                ti.xcom_push(key=name, value=commands[name])
            return commands["train_adaptor"]

        plan = plan_ks()
        step = {name: runners.step_operator(name, plan[name], runner)
                for name in ("extract", "cluster", "train_fusion", "evaluate")}
        adaptors = runners.step_operator("train_adaptor", plan, runner, mapped=True)
        chain(plan, step["extract"], step["cluster"], adaptors, step["train_fusion"], step["evaluate"])

    return grappa_pipeline()


pipeline = build_pipeline(runners.runner_name())


@dag(
    dag_id="grappa_watch_folder",
    schedule=os.environ.get("GRAPPA_WATCH_SCHEDULE", "*/15 * * * *"),
    start_date=START,
    catchup=False,
    max_active_runs=1,
    params={"folder": Param(os.environ.get("GRAPPA_WATCH_DIR", str(runners.REPO.parent / "shared" / "data")),
                            type="string")},
    tags=["grappa", "watcher"],
)
def grappa_watch_folder():
    @task(outlets=[UNLABELED])
    def detect_folder_change(params=None, outlet_events=None) -> str:
        folder = params["folder"]
        fingerprint = runners.settled(lambda: runners.folder_fingerprint(folder), SETTLE_S)
        return runners.emit_if_changed(folder, fingerprint, outlet_events[UNLABELED])

    detect_folder_change()


@dag(
    dag_id="grappa_watch_s3",
    schedule=os.environ.get("GRAPPA_WATCH_SCHEDULE", "*/15 * * * *"),
    start_date=START,
    catchup=False,
    max_active_runs=1,
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
    def detect_s3_change(params=None, outlet_events=None) -> str:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        client = S3Hook(aws_conn_id=aws_conn_id).get_conn()
        bucket, prefix = params["bucket"], params["prefix"]
        fingerprint = runners.settled(lambda: runners.s3_fingerprint(client, bucket, prefix), SETTLE_S)
        return runners.emit_if_changed(f"s3://{bucket}/{prefix}", fingerprint, outlet_events[UNLABELED])

    wait >> detect_s3_change()


grappa_watch_folder()
grappa_watch_s3()
