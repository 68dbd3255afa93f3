"""MLflow lineage: parent/child runs, params/metrics/inputs, registry aliases, unreachable server.

One tracked tiny pipeline run (``grappa run`` through ``cli.main``) is shared by this module and
test_security.py (see :func:`tracked_run`); the MLflow SQLite DB is migrated once per session and
copied per use (:func:`fresh_tracking_uri`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import yaml

from conftest import REPO, make_collection, make_workspace
from grappa import cli
from grappa import tracking
from grappa.tracking import lineage
from grappa.tracking import publisher as publish

MODEL = "grappa-test-fused"
STAGES = {"snapshot", "extract@0-of-1", "merge_features", "warm_start", "cluster", "train_adaptor@2", "train_adaptor@4", "train_fusion",
          "evaluate", "index"}
# Fake credentials present in the environment during the shared run (test_security scans for them).
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAGRAPPAFAKE000042",
    "AWS_SECRET_ACCESS_KEY": "grappa/FakeSecret+Key0123456789abcdefXYZ",
    "AWS_SESSION_TOKEN": "GrappaFakeSessionToken-9f8e7d6c5b4a",
    "MLFLOW_TRACKING_PASSWORD": "grappa-fake-mlflow-password-31337",
}
AIRFLOW = {"AIRFLOW_CTX_DAG_ID": "grappa_pipeline", "AIRFLOW_CTX_DAG_RUN_ID": "manual__2026-01-01",
           "AIRFLOW_CTX_TASK_ID": "run_all", "AIRFLOW_CTX_MAP_INDEX": "-1"}
# variables that would change what the shared run does if the calling shell happened to set them
_SCRUB = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", tracking.ENV_PARENT, tracking.ENV_SWITCH,
          tracking.ENV_ARTIFACT_LOCATION, "DVC_STAGE", "DVC_ROOT", "GRAPPA_DVC_LOCK")

DVC_LOCK = {
    "schema": "2.0",
    "stages": {
        "extract@0-of-1": {
            "cmd": "grappa extract --shard 0-of-1",
            "deps": [{"path": "grappa/extract.py", "hash": "md5", "md5": "0123abcd" * 4, "size": 1}],
            "outs": [{"path": "outputs/extract/parts/0-of-1", "hash": "md5", "md5": "feedbeef" * 4 + ".dir", "size": 2}],
        }
    },
}


# --------------------------------------------------------------------------- shared helpers


def template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite DB, created once per session (migrations take seconds)."""
    db = tmp_path_factory.getbasetemp() / "mlflow-template.db"
    if not db.exists():
        from mlflow.tracking import MlflowClient

        tmp = db.with_suffix(".tmp.db")
        MlflowClient(f"sqlite:///{tmp}").search_experiments()
        tmp.rename(db)
    return db


def fresh_tracking_uri(tmp_path_factory, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(template_db(tmp_path_factory), folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def environment(**values: str | None):
    """Set (str) or unset (None) environment variables for the block, restoring them afterwards."""
    with mock.patch.dict(os.environ):
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("grappa:")]


_SHARED: dict[str, SimpleNamespace] = {}


def tracked_run(tmp_path_factory) -> SimpleNamespace:
    """The README's main command, `grappa run`, once with tracking on in a DVC workspace (fake AWS
    credentials and Airflow ids in env), shared by this module, test_dvc, test_security and test_serving.

    Sources: two manifests and an (empty) drop folder. The steps read a fixed dvc.lock
    (GRAPPA_DVC_LOCK) for their lock tags, so those can be checked exactly.
    """
    key = str(tmp_path_factory.getbasetemp())
    if key in _SHARED:
        return _SHARED[key]
    root = tmp_path_factory.mktemp("tracked")
    manifests = make_collection(root / "data")
    (root / "drop").mkdir()
    repo = make_workspace(root / "repo", [*manifests, root / "drop"], link_code=True, backbone={"image_size": 48},
                          adaptor={"epochs": 2}, fusion={"epochs": 2},
                          tracking={"experiment": "grappa-test", "registered_model": MODEL})
    params_path = repo / "params.yaml"
    raw = yaml.safe_load(params_path.read_text())
    # the same params with absolute paths, for the tests that run single steps elsewhere
    raw["data"]["sources"] = [str((repo / source).resolve()) for source in raw["data"]["sources"]]
    raw["extract"]["cache_dir"] = str(repo / raw["extract"]["cache_dir"])
    (root / "fixed.lock").write_text(yaml.safe_dump(DVC_LOCK))
    uri = fresh_tracking_uri(tmp_path_factory, root / "tracking")
    env = {**{k: None for k in _SCRUB}, **SECRETS, **AIRFLOW, "MLFLOW_TRACKING_URI": uri,
           "GRAPPA_DVC_LOCK": str(root / "fixed.lock"), "OMP_NUM_THREADS": "1"}
    with environment(**env), contextlib.chdir(repo):
        rc, stdout, stderr = run_cli(["run"])
    _SHARED[key] = SimpleNamespace(root=root, repo=repo, params_path=params_path, raw=raw, uri=uri, rc=rc,
                                   stdout=stdout, stderr=stderr, out_dir=repo / "outputs", secrets=dict(SECRETS))
    return _SHARED[key]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    shared = tracked_run(tmp_path_factory)
    assert shared.rc == 0, shared.stderr[-3000:]
    return shared


@pytest.fixture(scope="module")
def client(run):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(run.uri)
    mlflow.set_registry_uri(run.uri)
    return MlflowClient(run.uri)


@pytest.fixture(scope="module")
def runs(run, client):
    """(parent, {dvc.stage: child}) of the shared run."""
    experiment = client.get_experiment_by_name("grappa-test")
    all_runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in all_runs if r.data.tags.get("grappa.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_stage = {r.data.tags["dvc.stage"]: r for r in children}
    assert len(by_stage) == len(children)
    return parent, by_stage


# --------------------------------------------------------------------------- the shared run


def test_parent_and_one_child_per_step(run, runs, client):
    parent, children = runs
    assert set(children) == STAGES
    assert parent.info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children.values())
    assert children["train_adaptor@4"].data.tags["grappa.k"] == "4"
    assert parent.data.tags["airflow.dag_run_id"] == AIRFLOW["AIRFLOW_CTX_DAG_RUN_ID"]
    assert parent.info.run_name == AIRFLOW["AIRFLOW_CTX_DAG_RUN_ID"]
    assert client.get_experiment_by_name("grappa-test").artifact_location == (run.root / "tracking" / "mlruns").as_uri()
    # summary of the evaluation copied onto the parent by close
    metrics = json.loads((run.out_dir / "evaluate" / "report.json").read_text())
    grappa_map = metrics["methods"]["grappa"]["mean"]["map_at_r"]
    assert parent.data.metrics["methods.grappa.mean.map_at_r"] == pytest.approx(grappa_map)
    assert parent.data.metrics["steps_total"] == len(STAGES) and parent.data.metrics["steps_failed"] == 0
    assert parent.data.params["cluster.ks"] == "[2, 4]"
    assert f"tracking: pipeline run {parent.info.run_id}" in run.stdout


def test_tags_link_code_dvc_and_airflow(run, runs):
    _, children = runs
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for child in children.values():
        tags = child.data.tags
        assert tags["mlflow.source.git.commit"] == commit
        assert tags["airflow.dag_id"] == "grappa_pipeline" and tags["airflow.task_id"] == "run_all"
        assert tags["airflow.map_index"] == "-1"
        assert tags["dvc.lock.md5"]
    extract = children["extract@0-of-1"].data.tags
    assert extract["dvc.out.outputs/extract/parts/0-of-1"] == "feedbeef" * 4 + ".dir"
    assert extract["dvc.dep.grappa/extract.py"] == "0123abcd" * 4
    assert not any(k.startswith("dvc.out.") for k in children["cluster"].data.tags)  # no lock entry for it


def test_params_metrics_and_artifacts(run, runs, client):
    _, children = runs
    extract = children["extract@0-of-1"]  # the one part of extract.shards: 1
    assert extract.info.run_name == "extract@0-of-1" and extract.data.tags["grappa.shard"] == "0/1"
    assert extract.data.params["shard"] == "0/1" and extract.data.params["extract.shards"] == "1"
    assert extract.data.params["backbone.name"] == "test_efficientnet"
    # exactly the params.yaml keys the step reads (the registry's, = its DVC params)
    assert json.loads(children["snapshot"].data.params["data.sources"])[0].endswith("manifest.csv")
    assert extract.data.params["data.max_pixels"] and "data.sources" not in extract.data.params
    assert "adaptor.epochs" not in extract.data.params
    assert extract.data.metrics["images"] == 64.0
    assert extract.data.metrics["by_split.unlabeled"] == 32.0
    assert "report.json" in {a.path for a in client.list_artifacts(extract.info.run_id)}

    adaptor = children["train_adaptor@2"]
    assert adaptor.data.params["k"] == "2" and adaptor.data.params["adaptor.epochs"] == "2"
    history = client.get_metric_history(adaptor.info.run_id, "train.loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
    assert "final.loss" in adaptor.data.metrics
    fusion_history = client.get_metric_history(children["train_fusion"].info.run_id, "train.prop")
    assert len(fusion_history) == 2

    evaluate = children["evaluate"]
    assert children["train_fusion"].data.params["fusion.knn"] == "3"
    assert evaluate.data.params["fusion.attn_dim"] and "fusion.knn" not in evaluate.data.params
    assert 0.0 <= evaluate.data.metrics["methods.grappa.mean.map_at_r"] <= 1.0
    assert "methods.zero_shot.per_domain.shapes.recall_at_1" in evaluate.data.metrics
    # both sets of classes, and how the fused model routes, per adapted block
    assert 0.0 <= evaluate.data.metrics["validation.methods.oracle_val.mean.map_at_r"] <= 1.0
    assert "methods.oracle_test.mean.map_at_r" in evaluate.data.metrics
    for name in ("mutual_information", "per_image_attn_entropy", "batch_mean_attn_entropy", "domain_js_mean"):
        assert f"routing.block3.{name}" in evaluate.data.metrics
    assert "train.batch_mean_attn_entropy" in children["train_fusion"].data.metrics
    top = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    assert {"report.json", "results.md", "plots", "bundle"} <= top
    plots = {a.path for a in client.list_artifacts(evaluate.info.run_id, "plots")}
    assert "plots/per_domain_map_at_r.png" in plots
    bundle = {a.path for a in client.list_artifacts(evaluate.info.run_id, "bundle/adaptors/k4")}
    assert bundle == {"bundle/adaptors/k4/adaptor.pt", "bundle/adaptors/k4/classifier.pt"}
    # what a run warm-started from this version needs: each k's centroids (ids) and pseudo-labels (its pool)
    clusters = {a.path for a in client.list_artifacts(evaluate.info.run_id, "bundle/cluster")}
    assert clusters == {f"bundle/cluster/{name}" for k in (2, 4) for name in (f"centroids_k{k}.npy", f"k{k}.parquet")}


def test_inputs_logged_with_digests(run, runs):
    _, children = runs
    features = run.out_dir / "extract" / "features.parquet"
    expected = {split: lineage.split_digest(features, split)[0] for split in ("unlabeled", "query_db")}

    def inputs(child):
        return {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]): d.dataset
                for d in child.inputs.dataset_inputs}

    # the merged feature table is what later steps read: its step logs the datasets, not the parts
    assert inputs(children["extract@0-of-1"]) == {}
    extract = inputs(children["merge_features"])
    assert set(extract) == {("unlabeled", "training"), ("query_db", "evaluation")}
    assert extract[("unlabeled", "training")].digest == expected["unlabeled"][:32]
    assert extract[("query_db", "evaluation")].digest == expected["query_db"][:32]
    assert children["merge_features"].data.tags["dataset.unlabeled.sha256"] == expected["unlabeled"]
    # same (image id, content) pairs as the snapshot's: MLflow keeps the one dataset, first logged by snapshot
    assert "snapshot/manifest.parquet" in extract[("unlabeled", "training")].source
    assert set(inputs(children["snapshot"])) == set(extract)
    assert set(inputs(children["train_adaptor@2"])) == {("unlabeled", "training")}
    assert set(inputs(children["evaluate"])) == {("query_db", "evaluation")}


def test_first_version_is_candidate_and_champion(run, runs, client):
    _, children = runs
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert str(version.version) == "1"
    assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == "1"
    assert version.run_id == children["evaluate"].info.run_id
    metrics = json.loads((run.out_dir / "evaluate" / "report.json").read_text())
    # the champion is chosen on the validation classes, never on the test classes it is reported on
    score = metrics["validation"]["methods"]["grappa"]["mean"]["map_at_r"]
    assert float(version.tags[publish.SCORE_TAG]) == pytest.approx(score)
    assert "registered grappa-test-fused version 1 as candidate and champion" in run.stdout
    # its model card: the decision, the data it saw, both folds' scores, the recipe, the limits
    card = version.description
    assert "**Decision:** promoted to champion — first version: no champion yet" in card
    assert f"| grappa | {100 * metrics['methods']['grappa']['mean']['map_at_r']:.2f} | {100 * score:.2f} |" in card
    counts = publish.pool_counts(run.out_dir / "extract" / "features.parquet")
    assert set(counts) == {"unlabeled", "query_db"} and set(counts["query_db"]) == {"shapes", "stripes"}
    assert f"unlabeled pool of {sum(counts['unlabeled'].values())} images" in card
    assert "query_db: " + ", ".join(f"{d} {n}" for d, n in sorted(counts["query_db"].items())) in card
    assert f"k = {metrics['ks']}" in card and "**Known limits:**" in card
    assert "**Adaptation:** full, every adaptor set and the fusion trained from scratch (" in card
    # and the headline figures on the logged model, where the Models view ranks versions
    (logged,) = [m for m in client.search_logged_models([children["evaluate"].info.experiment_id])
                 if m.source_run_id == version.run_id]
    assert {m.key: m.value for m in logged.metrics}["val_mean_map_at_r"] == pytest.approx(score)


def test_lineage_from_champion_to_extract_digest(run, client):
    """models:/<name>@champion -> its run -> parent run -> merge_features child's dataset digest."""
    import mlflow

    version = client.get_model_version_by_alias(MODEL, "champion")
    evaluate_run = client.get_run(version.run_id)
    parent_id = evaluate_run.data.tags["mlflow.parentRunId"]
    (extract_run,) = client.search_runs([evaluate_run.info.experiment_id],
                                        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' "
                                                      "and tags.`dvc.stage` = 'merge_features'")
    logged = {d.dataset.name: d.dataset.digest for d in extract_run.inputs.dataset_inputs}
    digest, rows = lineage.split_digest(run.out_dir / "extract" / "features.parquet", "unlabeled")
    assert rows == 32 and logged["unlabeled"] == digest[:32]

    # the registered model takes images and returns unit-length embeddings
    import numpy as np
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    images = sorted((run.root / "data" / "shapes" / "images").glob("q_*.png"))[:2]
    emb = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    assert emb.shape == (2, 256) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert model.metadata.get_input_schema().input_names() == ["image", "path"]
    served = json.loads((run.out_dir / "model" / "model.json").read_text())["preprocess"]
    assert model.metadata.metadata["preprocess"] == served  # how to feed it, in the registry too


def _fake_evaluate(delta: float, test_delta: float = 0.0):
    """evaluate.run stand-in: the real metrics.json with the fused model's mean mAP@R shifted by
    ``delta`` on the validation classes and by ``test_delta`` on the test classes."""
    from grappa.io.artifacts import write_json

    def fake(params):
        path = Path(params.out_dir) / "evaluate" / "report.json"
        metrics = json.loads(path.read_text())
        metrics["validation"]["methods"]["grappa"]["mean"]["map_at_r"] += delta
        metrics["methods"]["grappa"]["mean"]["map_at_r"] += test_delta
        write_json(path, metrics)
        return metrics

    return fake


def copy_of_run(run, tmp_path: Path, monkeypatch) -> Path:
    """The shared run's outputs and params under tmp_path, tracking to the shared store; returns the params path."""
    shutil.copytree(run.out_dir, tmp_path / "outputs")
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump({**run.raw, "out_dir": str(tmp_path / "outputs")}))
    for key in _SCRUB:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", run.uri)
    return params_path


def test_dag_style_runs_candidate_vs_champion(run, client, tmp_path, monkeypatch):
    """open-run / step with GRAPPA_MLFLOW_PARENT_RUN_ID / close-run; a model worse on the validation
    classes stays candidate only, however much better it is on the test classes (and the reverse)."""
    import pipeline_steps.evaluate as evaluate

    params_path = copy_of_run(run, tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    champion_score = float(client.get_model_version_by_alias(MODEL, "champion").tags[publish.SCORE_TAG])

    for delta, test_delta, expect_champion in ((-0.05, +0.5, "1"), (+0.05, -0.5, None)):
        rc, stdout, stderr = run_cli(["--params", str(params_path), "open-run", "--name", f"dag {delta}"])
        assert rc == 0, stderr
        parent_id = stdout.strip().splitlines()[-1]
        monkeypatch.setenv(tracking.ENV_PARENT, parent_id)
        monkeypatch.setattr(evaluate, "run", _fake_evaluate(delta, test_delta))
        rc, stdout, stderr = run_cli(["--params", str(params_path), "evaluate"])
        assert rc == 0, stderr
        rc, stdout, stderr = run_cli(["--params", str(params_path), "close-run"])
        assert rc == 0, stderr
        monkeypatch.delenv(tracking.ENV_PARENT)

        parent = client.get_run(parent_id)
        assert parent.info.status == "FINISHED" and parent.info.run_name == f"dag {delta}"
        assert parent.data.metrics["validation.methods.grappa.mean.map_at_r"] == pytest.approx(champion_score + delta)
        (child,) = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
        assert child.data.tags["dvc.stage"] == "evaluate"
        new_version = child.data.tags["grappa.model_version"]
        assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == new_version
        champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
        assert champion == (expect_champion or new_version)
        # the (copied) outputs have been rewritten by the fake; restore the baseline for the next loop
        shutil.copy(run.out_dir / "evaluate" / "report.json", tmp_path / "outputs" / "evaluate" / "report.json")
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "3"


def test_champion_is_rescored_when_the_evaluation_set_changed(run, client, tmp_path, monkeypatch):
    """A candidate evaluated on other images is compared with the champion re-scored on those images."""
    import numpy as np
    import pyarrow.compute as pc

    from grappa.io.artifacts import read_table, write_table
    from grappa.io.features import write_prefix_index
    from grappa.io.layout import Layout

    params_path = copy_of_run(run, tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    extract_dir = tmp_path / "outputs" / "extract"
    table = read_table(extract_dir / "features.parquet")
    keep = ~np.array(pc.and_(pc.equal(table.column("split"), "query_db"),
                             pc.equal(table.column("domain"), "stripes")).to_pylist())
    write_table(extract_dir / "features.parquet", table.filter(keep))  # the stripes queries are gone
    part = extract_dir / "parts" / "0-of-1" / "prefix.npy"  # the one part's activations, listed in prefix.json
    np.save(part, np.load(part)[keep])
    write_prefix_index(Layout(tmp_path / "outputs"), [part])
    champion = client.get_model_version_by_alias(MODEL, "champion")

    rc, stdout, stderr = run_cli(["--params", str(params_path), "evaluate"])
    assert rc == 0, stderr
    metrics = json.loads((tmp_path / "outputs" / "evaluate" / "report.json").read_text())
    assert set(metrics["methods"]["grappa"]["per_domain"]) == {"shapes"}
    score = metrics["validation"]["methods"]["grappa"]["mean"]["map_at_r"]
    candidate = client.get_model_version(MODEL, client.get_model_version_by_alias(MODEL, "candidate").version)
    assert candidate.tags[publish.EVAL_SET_TAG] != champion.tags[publish.EVAL_SET_TAG]
    assert candidate.tags["grappa.compared_with"] == f"v{champion.version}"
    # the champion has the same weights here: re-scored on this set it must reach exactly this score
    assert float(candidate.tags["grappa.champion_score_on_eval_set"]) == pytest.approx(score, abs=1e-6)
    assert "re-scored on this evaluation set" in candidate.tags["grappa.promotion"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion.version  # not better: kept
    assert json.loads((tmp_path / "outputs" / "evaluate" / "champion.json").read_text())["version"] == str(champion.version)
    assert "(not champion)" in stdout


def test_an_unscored_first_candidate_leaves_evaluates_own_model_serving(tmp_path):
    """No champion and a candidate without a score: no registered version serves (the runner records
    evaluate's own model in champion.json)."""
    from mlflow import MlflowClient

    from conftest import tiny_params_dict
    from grappa.config import parse_params

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    client.create_registered_model("m")
    version = client.create_model_version("m", source=str(tmp_path), run_id=run_id).version
    params = parse_params({**tiny_params_dict(tmp_path, ["x"]), "tracking": {"registered_model": "m"}})
    decision = publish.promote(SimpleNamespace(client=client), run_id, params,
                               publish.Candidate("m", version, "new-sha", None, "set-a", {}))
    assert not decision.promote and decision.reason == "the candidate has no mean mAP@R"
    assert decision.serves is None
    assert client.get_model_version("m", version).tags["grappa.promotion"] == decision.reason
    assert client.get_run(run_id).data.tags["grappa.model_alias"] == "candidate"


def test_promotion_decisions():
    same, other = "set-a", "set-b"
    never = lambda: pytest.fail("re-scored although the sets are the same")  # noqa: E731
    assert publish.decide(0.5, same, None, never).promote
    assert publish.decide(None, same, publish.Standing("1", 0.1, same), never).promote is False
    assert publish.decide(0.5, same, publish.Standing("1", 0.4, same), never).promote
    assert not publish.decide(0.4, same, publish.Standing("1", 0.4, same), never).promote  # a tie keeps the champion
    close = publish.decide(0.357741, same, publish.Standing("1", 0.357712, same), never)
    assert close.promote and close.reason == "0.357741 beats 0.357712 (same evaluation set)"
    # another set: the stored 0.9 is not comparable; the champion's score on this set decides
    decision = publish.decide(0.5, same, publish.Standing("1", 0.9, other), lambda: 0.45)
    assert decision.promote and decision.champion_score == 0.45 and "re-scored" in decision.reason
    assert not publish.decide(0.5, same, publish.Standing("1", 0.1, other), lambda: 0.55).promote
    legacy = publish.decide(0.5, same, publish.Standing("1", None, None), lambda: None)
    assert legacy.promote and "cannot be scored" in legacy.reason


# --------------------------------------------------------------------------- failure modes and switches


def test_unreachable_server_keeps_outputs(run, tmp_path, monkeypatch):
    """Outputs first, then bounded retries, then one line and exit 4 -- without leaking the URI's password."""
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump({**run.raw, "out_dir": str(tmp_path / "outputs")}))  # shares the cache
    for key in _SCRUB:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://grappa:hunter2secret@127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    rc, stdout, stderr = run_cli(["--params", str(params_path), "snapshot"])
    assert rc == 4
    assert (tmp_path / "outputs" / "snapshot" / "manifest.parquet").is_file()
    assert (tmp_path / "outputs" / "snapshot" / "report.json").is_file()
    (line,) = error_lines(stderr)
    assert "cannot log step 'snapshot'" in line and "unreachable after 1 retries" in line
    assert "hunter2secret" not in stderr + stdout
    assert "Traceback" not in stderr


def test_tracking_switches(run, tmp_path, monkeypatch):
    """GRAPPA_TRACKING=0 or tracking.enabled=false: no MLflow at all (an unreachable URI is never touched)."""
    from grappa.config import parse_params

    params = parse_params(run.raw)
    monkeypatch.setenv(tracking.ENV_SWITCH, "0")
    assert tracking.from_params(params) is None
    monkeypatch.delenv(tracking.ENV_SWITCH)
    assert tracking.from_params(parse_params({**run.raw, "tracking": {"enabled": False}})) is None

    shutil.copytree(run.out_dir, tmp_path / "outputs")
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump({**run.raw, "out_dir": str(tmp_path / "outputs")}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv(tracking.ENV_SWITCH, "0")
    rc, _, stderr = run_cli(["--params", str(params_path), "cluster"])
    assert rc == 0, stderr


def test_default_uri_and_artifact_location(tmp_path, monkeypatch):
    for key in _SCRUB:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)  # not a git repo: the DB goes to cwd
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.artifact_location(tracking.tracking_uri()) == (tmp_path.resolve() / "mlruns").as_uri()
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_path / 'repo').resolve() / 'mlflow.db'}"
    assert tracking.artifact_location("http://mlflow:5000") is None
    monkeypatch.setenv(tracking.ENV_ARTIFACT_LOCATION, "s3://bucket/mlflow")
    assert tracking.artifact_location("http://mlflow:5000") == "s3://bucket/mlflow"


def test_lineage_helpers(tmp_path, monkeypatch):
    for key in (*_SCRUB, *AIRFLOW):
        monkeypatch.delenv(key, raising=False)
    from grappa.io.layout import Shard

    assert lineage.dvc_stage_name("train-adaptor", 8) == "train_adaptor@8"
    assert lineage.dvc_stage_name("extract", Shard(1, 2)) == "extract@1-of-2"
    assert lineage.dvc_stage_name("merge-features") == "merge_features"
    monkeypatch.setenv("DVC_STAGE", "sub/dvc.yaml:train_adaptor@16")
    assert lineage.dvc_stage_name("train-adaptor", 8) == "train_adaptor@16"
    assert lineage.airflow_tags() == {}
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "scheduled__x")  # a container gets only what the DAG passes
    assert lineage.airflow_tags() == {"airflow.dag_run_id": "scheduled__x"}
    assert lineage.dvc_lock_tags("extract@0-of-1", tmp_path / "missing.lock") == {}
    (tmp_path / "dvc.lock").write_text("stages: [unbalanced")
    assert lineage.dvc_lock_tags("extract@0-of-1", tmp_path / "dvc.lock") == {}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(DVC_LOCK))
    tags = lineage.dvc_lock_tags("extract@0-of-1", tmp_path / "dvc.lock")
    assert tags["dvc.out.outputs/extract/parts/0-of-1"].endswith(".dir") and len(tags) == 3
    assert set(lineage.dvc_lock_tags("evaluate", tmp_path / "dvc.lock")) == {"dvc.lock.md5"}


def test_airflow_steps_meet_in_one_parent_per_dag_run(run, client, tmp_path, monkeypatch):
    """Steps run as separate Airflow tasks share one parent run, found by the DAG run id."""
    params_path = copy_of_run(run, tmp_path, monkeypatch)
    for var in lineage.AIRFLOW_ENV.values():  # an earlier in-process dag.test() may have left these set
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "scheduled__2026-02-02")
    monkeypatch.chdir(tmp_path)
    for step in ("cluster", "evaluate", "close-run"):  # three tasks, three processes in production
        rc, _, stderr = run_cli(["--params", str(params_path), step])
        assert rc == 0, stderr
    experiment = client.get_experiment_by_name("grappa-test")
    (parent,) = client.search_runs([experiment.experiment_id],
                                   "tags.`airflow.dag_run_id` = 'scheduled__2026-02-02' and tags.`grappa.kind` = 'pipeline'")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["dvc.stage"] for c in children) == ["cluster", "evaluate"]
    assert parent.info.status == "FINISHED"  # closed by the DAG's close_run task
    assert "methods.grappa.mean.map_at_r" in parent.data.metrics
