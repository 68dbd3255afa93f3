"""Reliability: a killed training step resumes to the same weights; stale checkpoints are ignored;
whole runs are deterministic."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, make_collection, snapshot_and_extract, tiny_params_dict
from grappa.cli import run_all
from grappa.config import parse_params
from grappa.io.artifacts import load_torch, save_torch
from grappa.io.layout import layout
from pipeline_steps import cluster
from pipeline_steps import train_adaptor
from pipeline_steps import train_fusion

# 2 domains x 12 unlabeled images = 24; batch 8 -> 3 batches per epoch
ADAPTOR = {"epochs": 3, "batch_size": 8, "warmup_epochs": 1}
FUSION = {"epochs": 2, "batch_size": 8, "knn": 3}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tiny collection with extract and cluster done (and the adaptor sets trained), to copy per test."""
    root = tmp_path_factory.mktemp("reliability")
    manifests = make_collection(root / "data", classes=3, per_class=3, unlabeled=12, size=40)
    raw = tiny_params_dict(root, manifests, cluster={"ks": [2, 3], "niter": 10, "nredo": 1},
                           adaptor=ADAPTOR, fusion=FUSION)
    params = parse_params(raw)
    snapshot_and_extract(params)
    cluster.run(params)
    (root / "raw.json").write_text(json.dumps(raw))
    return root


def _params_at(prepared: Path, tmp_path: Path, name: str, **sections):
    """Params whose out_dir is a fresh copy of the prepared outputs."""
    raw = json.loads((prepared / "raw.json").read_text())
    out = tmp_path / name
    shutil.copytree(prepared / "outputs", out, ignore=shutil.ignore_patterns("adaptors", "checkpoints"))
    raw["out_dir"] = str(out)
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    return parse_params(raw), raw


def _interrupt_after(monkeypatch, module, n_batches: int) -> None:
    """Make ``module.fit`` raise KeyboardInterrupt from inside the step after ``n_batches`` batches."""
    real_fit = module.fit
    signature = inspect.signature(real_fit)

    def fit(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        real_step, calls = bound.arguments["step"], []

        def step(batch):
            calls.append(1)
            if len(calls) > n_batches:
                raise KeyboardInterrupt
            return real_step(batch)

        bound.arguments["step"] = step
        return real_fit(*bound.args, **bound.kwargs)

    monkeypatch.setattr(module, "fit", fit)


def _adaptor_state(params, k: int) -> dict[str, torch.Tensor]:
    return load_torch(Path(params.out_dir) / "adaptors" / f"k{k}" / "adaptor.pt")["state_dict"]


def _assert_same_state(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), f"{name} differs"


def _checkpoints(params) -> list[Path]:
    return sorted((Path(params.out_dir) / "checkpoints").glob("*.pt"))


def test_adaptor_killed_mid_epoch_resumes_to_the_same_weights(prepared, tmp_path, monkeypatch, capsys):
    clean, _ = _params_at(prepared, tmp_path, "clean")
    train_adaptor.run(clean, 2)
    reference = _adaptor_state(clean, 2)
    assert any(v.abs().sum() > 0 for n, v in reference.items() if ".up." in n), "training did not move the adaptors"

    params, _ = _params_at(prepared, tmp_path, "killed")
    with monkeypatch.context() as m:
        _interrupt_after(m, train_adaptor, 4)  # epoch 1 = batches 1-3 done, killed in batch 2 of epoch 2
        with pytest.raises(KeyboardInterrupt):
            train_adaptor.run(params, 2)
    assert not (Path(params.out_dir) / "adaptors" / "k2" / "adaptor.pt").exists()
    (ckpt,) = _checkpoints(params)
    assert load_torch(ckpt)["epoch"] == 0
    capsys.readouterr()

    report = train_adaptor.run(params, 2)
    assert "resuming after epoch 1" in capsys.readouterr().out
    _assert_same_state(_adaptor_state(params, 2), reference)
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3]
    assert _checkpoints(params) == [], "the checkpoint must be removed once the adaptor is published"


def test_stale_checkpoint_from_other_params_is_not_resumed(prepared, tmp_path, monkeypatch, capsys):
    params, _ = _params_at(prepared, tmp_path, "stale")
    with monkeypatch.context() as m:
        _interrupt_after(m, train_adaptor, 4)
        with pytest.raises(KeyboardInterrupt):
            train_adaptor.run(params, 2)
    (stale,) = _checkpoints(params)

    # another learning rate in the same out_dir: the stale checkpoint must not be picked up
    changed, _ = _params_at(prepared, tmp_path, "unused", adaptor={"lr": 0.005})
    changed = changed.model_copy(update={"out_dir": params.out_dir})
    capsys.readouterr()
    with monkeypatch.context() as m:
        _interrupt_after(m, train_adaptor, 4)
        with pytest.raises(KeyboardInterrupt):
            train_adaptor.run(changed, 2)
    assert "resuming" not in capsys.readouterr().out
    checkpoints = _checkpoints(params)
    assert len(checkpoints) == 2 and stale in checkpoints, "checkpoint names must be keyed by the run's inputs"

    train_adaptor.run(changed, 2)  # resumes its own checkpoint, not the stale one
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert _checkpoints(params) == [stale]

    fresh, _ = _params_at(prepared, tmp_path, "fresh", adaptor={"lr": 0.005})
    train_adaptor.run(fresh, 2)
    _assert_same_state(_adaptor_state(changed, 2), _adaptor_state(fresh, 2))
    clean, _ = _params_at(prepared, tmp_path, "clean")
    train_adaptor.run(clean, 2)
    with pytest.raises(AssertionError):  # the learning rate matters, so equality above is meaningful
        _assert_same_state(_adaptor_state(changed, 2), _adaptor_state(clean, 2))


def test_fusion_checkpoint_from_other_adaptors_is_not_resumed(prepared, tmp_path, monkeypatch, capsys):
    params, _ = _params_at(prepared, tmp_path, "fusion_stale", adaptor={"epochs": 1})
    for k in params.cluster.ks:
        train_adaptor.run(params, k)
    with monkeypatch.context() as m:
        _interrupt_after(m, train_fusion, 4)
        with pytest.raises(KeyboardInterrupt):
            train_fusion.run(params)
    (stale,) = _checkpoints(params)
    # same params, but the adaptor set k=2 is another one (as after re-clustering other images)
    path = layout(params).adaptor(2)
    state = load_torch(path)
    name = next(iter(state["state_dict"]))
    state["state_dict"][name] = state["state_dict"][name] + 0.01
    save_torch(path, state)
    capsys.readouterr()
    train_fusion.run(params)
    assert "resuming" not in capsys.readouterr().out
    assert _checkpoints(params) == [stale]  # its own checkpoint was removed once published


@pytest.mark.parametrize("propagation", ["pairs", "bank"])  # bank: the attention memory resumes with the weights
def test_fusion_killed_mid_epoch_resumes_to_the_same_weights(prepared, tmp_path, monkeypatch, capsys, propagation):
    clean, _ = _params_at(prepared, tmp_path, "clean", adaptor={"epochs": 1}, fusion={"propagation": propagation})
    for k in clean.cluster.ks:
        train_adaptor.run(clean, k)
    params, _ = _params_at(prepared, tmp_path, "killed", adaptor={"epochs": 1}, fusion={"propagation": propagation})
    shutil.copytree(Path(clean.out_dir) / "adaptors", Path(params.out_dir) / "adaptors")

    train_fusion.run(clean)
    with monkeypatch.context() as m:
        _interrupt_after(m, train_fusion, 4)
        with pytest.raises(KeyboardInterrupt):
            train_fusion.run(params)
    assert len(_checkpoints(params)) == 1
    capsys.readouterr()
    train_fusion.run(params)
    assert "resuming after epoch 1" in capsys.readouterr().out
    a = load_torch(Path(clean.out_dir) / "fusion" / "fusion.pt")["state_dict"]
    b = load_torch(Path(params.out_dir) / "fusion" / "fusion.pt")["state_dict"]
    _assert_same_state(a, b)


def _cli(params_path: Path, log: Path, *args: str) -> subprocess.Popen:
    """``python -m grappa`` in its own process group, output to ``log`` (a pipe could fill up)."""
    env = {**os.environ, "GRAPPA_TRACKING": "0", "PYTHONPATH": str(REPO)}
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "grappa", "--params", str(params_path), *args],
                                cwd=params_path.parent, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def test_sigkill_after_first_checkpoint_then_rerun_matches_a_clean_run(prepared, tmp_path):
    # enough epochs that the process is certainly still training when the first checkpoint appears
    adaptor = {"epochs": 8}  # 24 batches: after the first checkpoint, 21 are left to kill the process in
    params, raw = _params_at(prepared, tmp_path, "killed", adaptor=adaptor)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))

    log = tmp_path / "first.log"
    proc = _cli(path, log, "train-adaptor", "--k", "2")
    deadline = time.monotonic() + 300
    try:
        while not _checkpoints(params):
            if proc.poll() is not None:
                pytest.fail(f"training ended before any checkpoint appeared:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint after 300 s")
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (Path(params.out_dir) / "adaptors" / "k2" / "adaptor.pt").exists()
    assert len(_checkpoints(params)) == 1

    log = tmp_path / "rerun.log"
    rerun = _cli(path, log, "train-adaptor", "--k", "2")
    try:
        rerun.wait(timeout=300)
    finally:
        if rerun.poll() is None:
            os.killpg(rerun.pid, signal.SIGKILL)
            rerun.wait()
    out = log.read_text()
    assert rerun.returncode == 0, out[-3000:]
    assert "resuming after epoch" in out
    assert _checkpoints(params) == []

    clean, _ = _params_at(prepared, tmp_path, "clean", adaptor=adaptor)
    train_adaptor.run(clean, 2)
    _assert_same_state(_adaptor_state(params, 2), _adaptor_state(clean, 2))


def _numbers(obj, prefix=""):
    """Flatten every number in a JSON document to {path: value}."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _numbers(val, f"{prefix}/{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in _numbers(val, f"{prefix}/{i}").items()}
    return {prefix: obj} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


def test_two_full_runs_give_the_same_metrics(tmp_path):
    manifests = make_collection(tmp_path / "data", classes=3, per_class=3, unlabeled=8, size=40)
    metrics = []
    for name in ("a", "b"):
        params = parse_params(tiny_params_dict(tmp_path / name, manifests,
                                               cluster={"ks": [2, 3], "niter": 10, "nredo": 1},
                                               adaptor={"epochs": 1}, fusion={"epochs": 1, "knn": 3}))
        run_all(params)
        doc = json.loads((Path(params.out_dir) / "evaluate" / "report.json").read_text())
        doc.pop("timings_s")
        metrics.append(doc)
    a, b = (_numbers(m) for m in metrics)
    assert a.keys() == b.keys() and len(a) > 20
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert metrics[0]["oracle_choice"] == metrics[1]["oracle_choice"]
