"""Incremental runs end to end, step by step through the CLI with MLflow on: a champion is trained in
full, images land, ``grappa warm-start`` decides, and the training steps start from the champion."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from conftest import draw_image, make_collection, tiny_params_dict
from test_tracking import environment, fresh_tracking_uri, run_cli

MODEL = "grappa-incremental"
STEPS = ["snapshot", "extract", "merge-features", "warm-start", "cluster", "train-adaptor", "train-fusion", "evaluate"]


def steps(params: Path, verbs: list[str], *extra: str) -> None:
    for verb in verbs:
        rc, stdout, stderr = run_cli(["--params", str(params), verb, *extra])
        assert rc == 0, f"{verb}: {stderr[-3000:]}"


def land(drop: Path, count: int, seed: int) -> None:
    """``count`` new unlabeled images in the drop folder (domain 'shapes')."""
    (drop / "shapes").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        draw_image("shapes", i % 4, 50_000 + seed * 100 + i).save(drop / "shapes" / f"new_{seed}_{i}.png")


def decision(root: Path) -> dict:
    return json.loads((root / "outputs" / "champion" / "decision.json").read_text())


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A full run whose model is registered as champion (v1), in its own tracking DB."""
    root = tmp_path_factory.mktemp("incremental")
    manifests = make_collection(root / "data")
    (root / "drop").mkdir()
    raw = tiny_params_dict(root, [*manifests, root / "drop"], adapt={"replay": 6},
                           tracking={"experiment": "incremental", "registered_model": MODEL})
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = {"MLFLOW_TRACKING_URI": fresh_tracking_uri(tmp_path_factory, root / "tracking"), "GRAPPA_TRACKING": "1",
           "GRAPPA_MLFLOW_PARENT_RUN_ID": None, "OMP_NUM_THREADS": "1"}
    with environment(**env):
        steps(params, STEPS)
    shutil.copytree(root / "outputs" / "model", root / "champion-model")
    return SimpleNamespace(root=root, params=params, raw=raw, env=env)


def test_first_run_is_full_because_there_is_no_champion(champion):
    assert decision(champion.root)["mode"] == "full"
    assert decision(champion.root)["reason"] == "no champion to start from"


def test_an_incremental_run_starts_from_the_champion_and_records_its_parent(champion, monkeypatch):
    """New images: warm-start picks incremental; a model warm-started from the champion embeds exactly
    like it before any optimiser step; the real run trains on new + replay images only and its
    MLflow version names its parent and generation."""
    import pipeline_steps.train_adaptor as train_adaptor
    import pipeline_steps.train_fusion as train_fusion
    from mlflow import MlflowClient

    from grappa.io import servable

    root = champion.root
    land(root / "drop", 4, seed=1)
    with environment(**champion.env):
        steps(champion.params, STEPS[:5])
        made = decision(root)
        assert made["mode"] == "incremental" and made["champion"] == "1" and made["generation"] == 1, made
        assert made["new_images"] == 4 and made["pool"] == 36 and "11% of the pool is new" in made["reason"]
        mode = json.loads((root / "outputs" / "cluster" / "mode.json").read_text())
        assert mode["mode"] == "incremental" and mode["parent_version"] == "1"
        assert set(mode["label_persistence"]) == {"2", "4"}

        def no_training(*args, **kwargs):
            return [{"epoch": 0, "loss": 0.0}]

        with monkeypatch.context() as patch:
            patch.setattr(train_adaptor, "fit", no_training)
            patch.setattr(train_fusion, "fit", no_training)
            steps(champion.params, ["train-adaptor", "train-fusion"])
        images = sorted((root / "data" / "shapes" / "images").glob("*.png"))[:6] + sorted((root / "drop").rglob("*.png"))
        before = servable.load(root / "champion-model").embed(images)
        warm = servable.load(root / "outputs" / "model").embed(images)
        assert np.abs(before - warm).max() < 1e-6

        steps(champion.params, ["train-adaptor", "train-fusion", "evaluate"])
    adaptor = json.loads((root / "outputs" / "adaptors" / "k4" / "report.json").read_text())
    fusion = json.loads((root / "outputs" / "fusion" / "report.json").read_text())
    assert adaptor["trained_on"] == fusion["trained_on"] == 4 + 6  # the new images and replay 6 of the 32 old
    assert len(adaptor["history"]) == 5  # adapt.adaptor_epochs, not adaptor.epochs
    version = MlflowClient(champion.env["MLFLOW_TRACKING_URI"]).get_model_version(MODEL, "2")
    assert version.tags["grappa.adapt_mode"] == "incremental" and version.tags["grappa.parent_version"] == "1"
    assert version.tags["grappa.generation"] == "1" and "of the pool is new" in version.tags["grappa.adapt_reason"]
    # its model card says so: a reader of the MLflow page sees how it was trained, from which version
    assert "**Adaptation:** incremental, warm-started from champion v1 (generation 1): 5 adaptor and" in version.description


def test_auto_falls_back_to_full_when_the_recipe_changed(champion):
    with environment(**champion.env):
        steps(champion.params, ["warm-start"], "--set", "fusion.epochs=3")
        made = decision(champion.root)
        assert made["mode"] == "full"
        assert made["reason"] == "the recipe changed since the champion: fusion.epochs"
        rc, _, stderr = run_cli(["--params", str(champion.params), "warm-start", "--set", "fusion.epochs=3",
                                 "--set", "adapt.mode=incremental"])
    assert rc == 2 and stderr.strip() == ("grappa: error: adapt.mode incremental: the recipe changed since the "
                                          "champion: fusion.epochs; run with adapt.mode auto or full")


def test_a_warm_start_from_a_champion_trained_on_other_data_is_refused(champion, tmp_path):
    other = make_collection(tmp_path / "other", domains=("waves",), classes=3)  # image ids are paths: all new
    raw = {**champion.raw, "out_dir": str(tmp_path / "outputs"), "data": {"sources": [str(m) for m in other]},
           "adapt": {"mode": "incremental"}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    with environment(**champion.env):
        steps(params, STEPS[:3])
        rc, _, stderr = run_cli(["--params", str(params), "warm-start"])
    assert rc == 2 and stderr.strip() == ("grappa: error: adapt.mode incremental: the champion was trained on other "
                                          "data: none of its images is in the pool; run with adapt.mode auto or full")


def test_an_unreachable_registry_stops_the_run_instead_of_retraining_in_full(champion):
    from test_tracking import closed_port

    env = {**champion.env, "MLFLOW_TRACKING_URI": f"http://grappa:hunter2secret@127.0.0.1:{closed_port()}",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    with environment(**env):
        rc, _, stderr = run_cli(["--params", str(champion.params), "warm-start"])
    assert rc == 3 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("grappa: error: model registry at http://127.0.0.1:") and "hunter2secret" not in stderr


def test_a_champion_whose_weights_do_not_fit_the_model_of_this_code_is_not_warm_started(champion, tmp_path):
    """Same params, other code: the bundle's state dicts are loaded into this code's model first."""
    import torch

    from grappa.config import parse_params
    from grappa.io.champion import Champion
    from pipeline_steps.warm_start import misfit

    params = parse_params(champion.raw)
    bundle = tmp_path / "bundle"
    for part in ("cluster", "adaptors", "fusion"):
        shutil.copytree(champion.root / "outputs" / part, bundle / part)
    found = Champion("1", "run", "", 0, champion.raw, bundle)
    assert found.has(params.cluster.ks) and misfit(params, found) is None
    state = torch.load(bundle / "adaptors" / "k4" / "adaptor.pt", weights_only=False)
    state["state_dict"]["renamed.weight"] = state["state_dict"].pop(next(iter(state["state_dict"])))
    torch.save(state, bundle / "adaptors" / "k4" / "adaptor.pt")
    assert "renamed.weight" in misfit(params, found)
