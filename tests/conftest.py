"""Shared fixtures: small synthetic image collections and tiny-model params (timm ``test_*`` models)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "multidomain"
# Airflow reads its config on first import: every test session gets a throw-away home and our DAG folder.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="grappa-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))


# Modules that run whole pipelines, services, DVC, containers or training to convergence: the
# "integration" lane. `make test-fast` (pytest -m "not integration") runs the rest in a few minutes.
INTEGRATION = {"test_benchmarks", "test_containers", "test_dvc", "test_index", "test_learning", "test_loop",
               "test_incremental_run", "test_pipeline_smoke", "test_reliability", "test_serving", "test_sharding", "test_tracking",
               "test_workspace"}


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: whole pipelines, services, DVC or containers (the slow lane)")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in INTEGRATION:
            item.add_marker(pytest.mark.integration)


def draw_image(domain: str, cls: int, seed: int, size: int = 48) -> Image.Image:
    """A class-structured synthetic image: 'shapes' vary colour by class, 'stripes' vary frequency."""
    rng = np.random.default_rng(seed)
    if domain == "shapes":
        palette = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 30)]
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
        draw = ImageDraw.Draw(img)
        x0, y0 = rng.integers(0, size // 3, 2)
        draw.ellipse([x0, y0, x0 + size // 2, y0 + size // 2], fill=palette[cls % len(palette)])
        return img
    period = 3 + 4 * (cls % 4)
    xs = np.arange(size)
    wave = (np.sin(2 * np.pi * (xs[None, :] + rng.integers(0, period)) / period) > 0).astype(np.uint8) * 200
    arr = np.repeat(np.broadcast_to(wave, (size, size))[..., None], 3, axis=2).copy()
    arr = np.clip(arr.astype(int) + rng.integers(0, 40, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_collection(root: Path, domains=("shapes", "stripes"), classes: int = 4, per_class: int = 4,
                    unlabeled: int = 16, size: int = 48) -> list[Path]:
    """Writes ``root/<domain>/manifest.csv`` + images (query_db: classes x per_class, plus an unlabeled pool)."""
    manifests = []
    for d, domain in enumerate(domains):
        folder = root / domain
        (folder / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        seed = 1000 * d
        for cls in range(classes):
            for i in range(per_class):
                rel = f"images/q_{cls}_{i}.png"
                draw_image(domain, cls, seed := seed + 1, size).save(folder / rel)
                rows.append({"path": rel, "domain": domain, "class_id": cls, "class_name": f"c{cls}", "split": "query_db"})
        for i in range(unlabeled):
            rel = f"images/u_{i}.png"
            draw_image(domain, i % classes, seed := seed + 1, size).save(folder / rel)
            rows.append({"path": rel, "domain": domain, "class_id": i % classes, "class_name": "", "split": "unlabeled"})
        with open(folder / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        manifests.append(folder / "manifest.csv")
    return manifests


def tiny_params_dict(tmp_path: Path, sources: list, **sections) -> dict:
    """A full params dict for a tiny, fast run; ``sections`` override whole keys (e.g. adaptor={...})."""
    raw = {
        "seed": 0,
        "out_dir": str(tmp_path / "outputs"),
        "data": {"sources": [str(s) for s in sources]},
        "backbone": {"name": "test_efficientnet", "weights": "none", "image_size": 48, "adapt_from_block": 3},
        "extract": {"batch_size": 16, "num_workers": 0, "cache_dir": str(tmp_path / "cache")},
        "cluster": {"ks": [2, 4], "niter": 10, "nredo": 1},
        "adaptor": {"epochs": 2, "batch_size": 8},
        "fusion": {"epochs": 2, "batch_size": 8, "knn": 3},
        "evaluate": {"batch_size": 16, "grid_queries": 1},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) and isinstance(value, dict) else value
    return raw


def make_workspace(repo: Path, sources: list, link_code: bool = False, **sections) -> Path:
    """A DVC workspace at ``repo`` (git repo, dvc.yaml, .dvc/config, the code, params.yaml) for tiny runs.

    ``sources`` are written relative to ``repo`` where they can be; ``link_code`` symlinks the
    package instead of copying it (tracked runs then carry this checkout's git commit).
    """
    repo.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    (repo / ".dvc").mkdir(exist_ok=True)
    for name in ("config", ".gitignore"):
        shutil.copy(REPO / ".dvc" / name, repo / ".dvc" / name)
    for code in ("grappa", "pipeline_steps"):  # the library and the steps: the stages' code deps
        if link_code:
            (repo / code).symlink_to(REPO / code, target_is_directory=True)
        else:
            shutil.copytree(REPO / code, repo / code, ignore=shutil.ignore_patterns("__pycache__"))
    # The committed default remote is a fixed path; a per-checkout override goes to config.local.
    (repo / ".dvc" / "config.local").write_text(f"['remote \"local\"']\n    url = {repo.parent / 'dvc-remote'}\n")
    write_workspace_params(repo, sources, **sections)
    return repo


def write_workspace_params(repo: Path, sources: list, **sections) -> None:
    """params.yaml of a tiny run in workspace ``repo`` (every key written: DVC does not know the defaults),
    and the data roots of its sources in dvc.yaml."""
    from grappa.workspace import sync_data_deps

    sync_data_deps(repo, write_step_params(repo, sources, **sections))


def write_step_params(repo: Path, sources: list, **sections):
    """params.yaml of a tiny run whose paths are all relative to ``repo`` (sources, outputs, cache),
    so the same file serves the workspace mounted anywhere, e.g. at /workspace in a container."""
    from grappa.config import parse_params

    relative = [os.path.relpath(s, repo) if not str(s).startswith("s3://") else str(s) for s in sources]
    defaults = {"backbone": {"image_size": 32}, "adaptor": {"epochs": 1, "batch_size": 8},
                "fusion": {"epochs": 1, "batch_size": 8, "knn": 3}}
    for key, value in defaults.items():
        sections[key] = {**value, **sections.get(key, {})}
    raw = tiny_params_dict(repo, relative, **sections)
    raw["out_dir"], raw["extract"]["cache_dir"] = "outputs", ".cache/features"  # DVC outs live in the workspace
    params = parse_params(raw)
    (repo / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return params


def snapshot_and_extract(params) -> dict:
    """Steps 1 and 2 (the data snapshot of the params' sources, then its features: every shard of
    extract.shards, then merge-features); the merged extract report."""
    from grappa.cli import run_step
    from grappa.io.layout import shards

    run_step("snapshot", params)
    for shard in shards(params.extract.shards):
        run_step("extract", params, shard)
    return run_step("merge-features", params)


BUILD_SCRIPT = REPO / "containers" / "build.sh"


def _build_script(action: str) -> str:
    """``containers/build.sh <action>``'s last line of output; skips the test, with the reason, where no
    Docker engine answers (exit 3)."""
    done = subprocess.run(["bash", str(BUILD_SCRIPT), action], capture_output=True, text=True, timeout=3000)
    if done.returncode == 3:
        pytest.skip(done.stderr.strip().splitlines()[-1].removeprefix("build.sh: "))
    assert done.returncode == 0, done.stderr[-3000:]
    return (done.stdout.strip().splitlines() or [""])[-1]


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """A Docker engine that answers. The tests never install or start one on a user's machine: where
    none answers they skip and say so; .ci/run starts one (containers/build.sh engine) before them."""
    _build_script("check")


@pytest.fixture(scope="session")
def step_image(docker_engine) -> str:
    """The step image as ``containers/build.sh`` builds it on this machine."""
    return json.loads(_build_script("image"))["image"]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """`grappa run` once, in one workspace, on make_collection's images with make_workspace's params:
    the dvc.lock and evaluate's metrics that a run spread over workers or containers must give."""
    import sys
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("reference")
    repo = make_workspace(root / "repo", make_collection(root / "data"))
    env = {**os.environ, "GRAPPA_TRACKING": "0", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "grappa", "run"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return SimpleNamespace(lock=yaml.safe_load((repo / "dvc.lock").read_text()),
                           metrics=json.loads((repo / "outputs/evaluate/report.json").read_text()))


@pytest.fixture(autouse=True, scope="module")
def _no_mlflow_uri_from_another_module():
    """mlflow.set_tracking_uri / set_registry_uri export their URI to os.environ: a server an earlier
    module started and stopped must not be where this module's steps look for a champion."""
    saved = {key: os.environ.pop(key, None) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for key, value in saved.items():
        os.environ.pop(key, None)
        if value is not None:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _tracking_off_by_default(monkeypatch):
    """Tests that exercise MLflow switch it on themselves; nothing else writes an mlflow.db."""
    monkeypatch.setenv("GRAPPA_TRACKING", "0")


@pytest.fixture
def collection(tmp_path: Path) -> list[Path]:
    return make_collection(tmp_path / "data")


@pytest.fixture
def tiny_params(tmp_path: Path, collection):
    from grappa.config import parse_params

    return parse_params(tiny_params_dict(tmp_path, collection))
