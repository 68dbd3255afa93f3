"""Sharded extraction, as the CLI, dvc.yaml and the DAG's plan run it: ``extract --shard I/N`` (or
every shard in turn), one DVC stage per part (``extract@0-of-2``) that ``merge_features`` depends on,
one mapped task instance per shard; and the same feature table whatever the shard count.

(Store-level equality of the parts and the merge: tests/test_extract.py. The DAG's structure: tests/test_dag.py.)
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, make_collection, make_workspace, tiny_params_dict, write_step_params
from grappa import cli, registry, workspace
from grappa.config import parse_params
from grappa.io.layout import Shard

sys.path.insert(0, str(REPO / "dags"))
import planning  # noqa: E402
import runners  # noqa: E402

VENV_BIN = REPO / ".venv" / "bin"
DVC = str(VENV_BIN / "dvc") if (VENV_BIN / "dvc").exists() else shutil.which("dvc")
needs_dvc = pytest.mark.skipif(DVC is None, reason="dvc is not installed")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([DVC, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture
def small_workspace(tmp_path) -> Path:
    """A folder with a small collection, params.yaml (relative paths) and the dvc.yaml generated for it."""
    manifests = make_collection(tmp_path / "data", classes=2, per_class=2, unlabeled=4)
    params = write_step_params(tmp_path, manifests)
    workspace.sync_data_deps(tmp_path, params)
    return tmp_path


def set_shards(repo: Path, shards: int) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["extract"]["shards"] = shards
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


# --------------------------------------------------------------------------- the registry


def test_one_mapped_axis_per_step_and_one_name_per_item():
    extract, merge, adaptor = (registry.step(name) for name in ("extract", "merge-features", "train-adaptor"))
    assert (extract.mapped, merge.mapped, adaptor.mapped) == ("shard", None, "k")
    assert [s.stage for s in registry.STEPS][:5] == ["snapshot", "extract", "merge_features", "warm_start", "cluster"]
    params = parse_params(tiny_params_dict(Path("/tmp"), ["x"], extract={"shards": 2}))
    assert extract.items(params) == [Shard(0, 2), Shard(1, 2)] and adaptor.items(params) == [2, 4]
    assert merge.items(params) == [None]
    assert [extract.stage_name(s) for s in extract.items(params)] == ["extract@0-of-2", "extract@1-of-2"]
    assert extract.stage_name() == "extract" and adaptor.stage_name(64) == "train_adaptor@64"
    assert extract.axis.arg(Shard(1, 2)) == "1/2" and extract.axis.parse("1-of-2") == Shard(1, 2)  # CLI / dvc.yaml spellings
    # the merge's table is what later steps learn from and are scored on
    assert extract.datasets == () and merge.datasets == registry.BOTH_SPLITS
    for name in ("train-adaptor", "train-fusion", "evaluate", "index"):  # they read prefix activations
        assert "extract/prefix.json" in registry.step(name).deps, name
    assert "extract/prefix.json" not in registry.step("cluster").deps
    with pytest.raises(ValueError, match="no axis"):
        registry.Step("x", "", (), (), (), "", mapped="domain")


# --------------------------------------------------------------------------- dvc.yaml


@needs_dvc
def test_dvc_runs_one_extract_stage_per_shard_and_the_merge_after_all_of_them(small_workspace):
    repo = small_workspace
    set_shards(repo, 2)
    with contextlib.chdir(repo):
        rc, out, _ = run_cli(["prepare"])
    assert rc == 0 and "dvc.yaml: extract stages: 1 -> 2 shards" in out
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert stages["extract"]["foreach"] == ["0-of-2", "1-of-2"]
    assert stages["extract"]["do"]["cmd"] == "python -m grappa extract --shard ${item}"
    assert stages["extract"]["do"]["outs"] == ["${out_dir}/extract/parts/${item}"]

    # what DVC itself makes of it
    dvc(repo, "init", "--no-scm", "-q")
    listed = dict(re.findall(r"^(\S+)\s+Outputs (.*)$", dvc(repo, "stage", "list"), re.M))
    assert [name for name in listed if name.startswith("extract")] == ["extract@0-of-2", "extract@1-of-2"]
    assert listed["extract@0-of-2"] == "outputs/extract/parts/0-of-2"
    assert listed["extract@1-of-2"] == "outputs/extract/parts/1-of-2"
    edges = set(re.findall(r'^"([^"]+)" -> "([^"]+)";$', dvc(repo, "dag", "--dot"), re.M))
    assert {("snapshot", "extract@0-of-2"), ("snapshot", "extract@1-of-2"), ("extract@0-of-2", "merge_features"),
            ("extract@1-of-2", "merge_features"), ("merge_features", "warm_start"), ("warm_start", "cluster"),
            ("merge_features", "train_adaptor@2")} <= edges
    assert not any(a.startswith("extract@") and b != "merge_features" for a, b in edges)  # only the merge reads parts


def test_grappa_check_sees_a_stale_dvc_yaml_after_extract_shards_changes(small_workspace):
    repo = small_workspace
    with contextlib.chdir(repo):
        assert run_cli(["check"])[0] == 0
        set_shards(repo, 3)
        rc, _, err = run_cli(["check"])
        assert rc == 2 and err.strip().splitlines() == [
            "grappa: error: dvc.yaml's extract stages run 1 shard(s) but params.yaml's extract.shards is 3; "
            "run 'grappa prepare' (grappa run and the Airflow DAG do it themselves)"]
        # `grappa repro` of a stage the count changes refuses too, before DVC runs anything
        rc, _, err = run_cli(["repro", "merge_features"])
        assert rc == 2 and "extract.shards is 3" in err
        assert run_cli(["prepare"])[0] == 0
        rc, out, _ = run_cli(["check"])
    assert rc == 0 and "dvc.yaml: as grappa/registry.py generates it" in out


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("argv, message", [
    (["extract", "--shard", "5/2"], "grappa: error: --shard: shard 5/2: the index must be in 0..1"),
    (["extract", "--shard", "x"], "grappa: error: --shard: shard 'x': expected I/N, e.g. 0/4"),
    (["train-adaptor", "--k", "x"], "grappa: error: --k: k 'x': expected an integer of cluster.ks, e.g. 64"),
])
def test_a_bad_item_is_a_one_line_error(small_workspace, argv, message, monkeypatch):
    monkeypatch.setattr(cli, "_execute", lambda *a: pytest.fail("ran a step"))
    rc, out, err = run_cli(["--params", str(small_workspace / "params.yaml"), *argv])
    assert (rc, err.strip().splitlines()) == (2, [message])


def test_a_shard_of_another_count_is_refused_by_the_step(small_workspace):
    rc, _, err = run_cli(["--params", str(small_workspace / "params.yaml"), "extract", "--shard", "0/3"])
    assert rc == 2 and err.strip().splitlines() == [
        "grappa: error: --shard 0/3: extract.shards is 1; use --shard I/1"]


def test_without_the_option_every_item_runs_in_turn(small_workspace, monkeypatch):
    ran = []
    monkeypatch.setattr(cli, "_execute", lambda verb, params, item=None: ran.append((verb, item)) or {})
    monkeypatch.setattr(cli, "_record_champion", lambda params, serves=None: None)  # no model: nothing ran
    params = str(small_workspace / "params.yaml")
    assert run_cli(["--params", params, "--set", "extract.shards=3", "extract"])[0] == 0
    assert run_cli(["--params", params, "extract", "--set", "extract.shards=3", "--shard", "1-of-3"])[0] == 0
    assert run_cli(["--params", params, "train-adaptor"])[0] == 0
    assert run_cli(["--params", params, "train-adaptor", "--k", "4"])[0] == 0
    assert ran == [("extract", Shard(0, 3)), ("extract", Shard(1, 3)), ("extract", Shard(2, 3)),
                   ("extract", Shard(1, 3)), ("train-adaptor", 2), ("train-adaptor", 4), ("train-adaptor", 4)]
    for verb in ("extract", "train-adaptor"):
        assert "default: every" in cli.build_parser()._subparsers._group_actions[0].choices[verb].format_help()

    ran.clear()
    timings = cli.run_all(parse_params({**yaml.safe_load(Path(params).read_text()), "extract": {"shards": 2}}))
    assert list(timings) == ["snapshot", "extract@0-of-2", "extract@1-of-2", "merge_features", "warm_start", "cluster",
                             "train_adaptor@2", "train_adaptor@4", "train_fusion", "evaluate", "index"]
    assert ran[1:4] == [("extract", Shard(0, 2)), ("extract", Shard(1, 2)), ("merge-features", None)]


# --------------------------------------------------------------------------- end to end


def features(out_dir: Path) -> dict:
    import pyarrow.parquet as pq

    from grappa.io.artifacts import arrow_to_vectors

    table = pq.read_table(out_dir / "extract" / "features.parquet")
    return {"rows": table.drop(["vector"]).to_pylist(), "vectors": arrow_to_vectors(table.column("vector"))}


@needs_dvc
def test_the_dag_local_commands_of_three_shards_give_the_features_of_one(tmp_path, monkeypatch):
    """plan() of a run conf {"shards": 3} with the local runner, executed as the DAG's tasks would
    (the three extract instances at once), in a DVC workspace: the same features.parquet as the one
    part the CLI extracts with extract.shards=1 (own feature caches: each computes its images)."""
    manifests = make_collection(tmp_path / "data", classes=2, per_class=3, unlabeled=6)
    repo = make_workspace(tmp_path / "repo", manifests)
    monkeypatch.setattr(runners, "REPO", repo)
    monkeypatch.delenv("GRAPPA_PARAMS", raising=False)
    monkeypatch.setenv("GRAPPA_PYTHON", str(VENV_BIN / "python"))
    plan = planning.plan({"shards": 3}, "local")
    assert [c.split()[-1] for c in plan["extract"]] == ["extract@0-of-3", "extract@1-of-3", "extract@2-of-3"]

    env = {**os.environ, "GRAPPA_TRACKING": "0", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}

    def task(command: str) -> subprocess.Popen:
        return subprocess.Popen(["bash", "-c", command], cwd=repo, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def finish(proc: subprocess.Popen) -> str:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        return out

    assert "extract stages: 1 -> 3 shards" in planning.prepare_workspace(plan["prepare"])
    assert yaml.safe_load((repo / "params.yaml").read_text())["extract"]["shards"] == 3
    finish(task(plan["snapshot"]))
    outputs = [finish(p) for p in [task(c) for c in plan["extract"]]]  # in parallel, as the mapped task may
    for i, out in enumerate(outputs):
        assert f"Running stage 'extract@{i}-of-3'" in out
    assert "Running stage 'merge_features'" in finish(task(plan["merge_features"]))
    assert sorted(p.name for p in (repo / "outputs" / "extract" / "parts").iterdir()) == ["0-of-3", "1-of-3", "2-of-3"]
    status = dvc(repo, "status", "snapshot", "extract@0-of-3", "extract@1-of-3", "extract@2-of-3", "merge_features")
    assert "up to date" in status, status

    # extract.shards = 1, through the CLI without --shard (its every part: the one)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    one = {**raw, "out_dir": str(tmp_path / "one"), "extract": {**raw["extract"], "shards": 1,
                                                                   "cache_dir": str(tmp_path / "one-cache")},
           "data": {**raw["data"], "sources": [str(m) for m in manifests]}}
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
    for verb in ("snapshot", "extract", "merge-features"):
        rc, _, err = run_cli(["--params", str(tmp_path / "one.yaml"), verb])
        assert rc == 0, err
    sharded, single = features(repo / "outputs"), features(tmp_path / "one")
    assert len(single["rows"]) == 2 * (2 * 3 + 6)
    for row in sharded["rows"] + single["rows"]:  # the sources were written relative to the workspace
        row["uri"] = os.path.realpath(row["uri"] if os.path.isabs(row["uri"]) else repo / row["uri"])
    assert sharded["rows"] == single["rows"]
    np.testing.assert_allclose(sharded["vectors"], single["vectors"], rtol=0, atol=1e-6)
