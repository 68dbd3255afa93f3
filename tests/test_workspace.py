"""The DVC workspace rule: overrides go into params.yaml, dvc.yaml watches the folders the sources name."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_collection, tiny_params_dict
from grappa import workspace
from grappa.config import ConfigError, load_params, parse_params

PARAMS_WITH_COMMENTS = """\
# Parameters of every step
seed: 0
data:
  # where the images are
  sources:
    - {source}
cluster:
  ks: [2, 4]   # pseudo-granularities
"""


def test_data_roots_are_what_dvc_must_watch():
    assert workspace.data_roots([
        "../shared/birds/manifest.csv", "data/incoming/", "s3://bucket/raw", "s3://bucket/m/list.parquet",
        "manifest.csv", "data/incoming",
    ]) == ["../shared/birds", "data/incoming", "s3://bucket/raw/", "s3://bucket/m/", "."]


def test_record_params_rewrites_only_changed_keys_and_keeps_comments(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_WITH_COMMENTS.format(source="data/m.csv"))
    current = load_params(path)
    assert workspace.record_params(path, current) == []  # nothing to record: the file is left alone

    target = load_params(path, {"cluster.ks": [2, 3], "data.max_unlabeled_per_domain": 10})
    changes = workspace.record_params(path, target)
    assert changes == ["data.max_unlabeled_per_domain: None -> 10", "cluster.ks: [2, 4] -> [2, 3]"]
    text = path.read_text()
    for kept in ("# Parameters of every step", "  # where the images are", "# pseudo-granularities"):
        assert kept in text
    assert "ks: [2, 3]" in text  # the flow style of the list is kept
    assert load_params(path) == target


def test_sync_data_deps_replaces_only_the_data_roots(tmp_path):
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    manifests = make_collection(tmp_path / "data", classes=2, per_class=2, unlabeled=2)
    (tmp_path / "drop").mkdir()
    params = parse_params(tiny_params_dict(tmp_path, [f"data/{m.parent.name}/manifest.csv" for m in manifests] + ["drop"]))
    assert "snapshot stage watches" in workspace.drift(tmp_path, params)
    before = (tmp_path / "dvc.yaml").read_text()

    changes = workspace.sync_data_deps(tmp_path, params)
    assert "snapshot deps + data/shapes" in changes and "snapshot deps - ../shared/data/multidomain/birds" in changes
    assert workspace.drift(tmp_path, params) is None and workspace.sync_data_deps(tmp_path, params) == []
    after = (tmp_path / "dvc.yaml").read_text()
    deps = yaml.safe_load(after)["stages"]["snapshot"]["deps"]
    assert deps[-3:] == ["data/shapes", "data/stripes", "drop"]
    assert [d for d in deps if d.startswith(workspace.CODE_PREFIXES)] == \
        [d for d in yaml.safe_load(before)["stages"]["snapshot"]["deps"] if d.startswith(workspace.CODE_PREFIXES)]
    # comments and every other stage are untouched
    assert [line for line in before.splitlines() if "multidomain" not in line and "incoming" not in line] == \
        [line for line in after.splitlines() if "data/s" not in line and "- drop" not in line]

    catalogue = parse_params({**tiny_params_dict(tmp_path, ["drop"]), "index": {"sources": ["drop"]}})
    assert "index deps + drop" in workspace.sync_data_deps(tmp_path, catalogue)
    assert yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]["index"]["deps"][-1] == "drop"


def test_missing_source_and_outputs_outside_are_clear_errors(tmp_path):
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    with pytest.raises(ConfigError, match="source not found: nowhere"):
        workspace.sync_data_deps(tmp_path, parse_params(tiny_params_dict(tmp_path, ["nowhere"])))
    with pytest.raises(ConfigError, match="out_dir: .* outside the DVC workspace"):
        workspace.check_outputs_inside(tmp_path, parse_params(tiny_params_dict(tmp_path, ["x"])))  # absolute out_dir


def test_a_changed_shard_count_is_a_drift_that_sync_rewrites(tmp_path):
    """dvc.yaml spells out the extract@<i>-of-<n> stages: another extract.shards makes it stale."""
    manifests = make_collection(tmp_path / "data", classes=2, per_class=2, unlabeled=2)
    sources = [f"data/{m.parent.name}/manifest.csv" for m in manifests]
    one = parse_params(tiny_params_dict(tmp_path, sources))
    three = parse_params(tiny_params_dict(tmp_path, sources, extract={"shards": 3}))
    assert workspace.sync_data_deps(tmp_path, one)  # written for one shard
    assert workspace.drift(tmp_path, one) is None
    assert workspace.drift(tmp_path, three) == (
        "dvc.yaml's extract stages run 1 shard(s) but params.yaml's extract.shards is 3; "
        "run 'grappa prepare' (grappa run and the Airflow DAG do it themselves)")
    assert workspace.sync_data_deps(tmp_path, three) == ["extract stages: 1 -> 3 shards"]
    assert workspace.drift(tmp_path, three) is None and workspace.sync_data_deps(tmp_path, three) == []
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert stages["extract"]["foreach"] == ["0-of-3", "1-of-3", "2-of-3"]
    assert [d for d in stages["merge_features"]["deps"] if not d.startswith(workspace.CODE_PREFIXES)] == [
        f"${{out_dir}}/extract/parts/{i}-of-3" for i in range(3)]
    # the other stages do not depend on the count
    assert workspace.generated(one).split("# step 3:")[1] == workspace.generated(three).split("# step 3:")[1]


def test_one_pipeline_run_holds_the_workspace_and_tasks_keep_their_runs_params(tmp_path, monkeypatch, capsys):
    from grappa.cli import main

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(tmp_path, ["x"])))
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path)
    with workspace.exclusive(tmp_path, "a 'grappa run'"):
        with pytest.raises(ConfigError, match=r"is busy: a 'grappa run' \(pid \d+, since"):
            with workspace.exclusive(tmp_path, "a 'grappa prepare'"):
                pass
        assert main(["prepare"]) == 2  # what the Airflow plan task runs: refused, params.yaml untouched
        assert "is busy: a 'grappa run'" in capsys.readouterr().err
    with workspace.exclusive(tmp_path, "again"):  # released
        pass
    pinned = workspace.params_sha256(tmp_path)
    workspace.check_pinned(tmp_path, pinned)
    (tmp_path / "params.yaml").write_text((tmp_path / "params.yaml").read_text() + "# edited\n")
    with pytest.raises(ConfigError, match="params.yaml changed since this run started"):
        workspace.check_pinned(tmp_path, pinned)
    assert main(["repro", "snapshot", "--params-sha256", pinned]) == 2
    assert "params.yaml changed since this run started" in capsys.readouterr().err


def test_the_default_dvc_remote_survives_a_reboot_and_holds_no_secret():
    """The committed .dvc/config: the default remote is a durable local path (not /tmp), and no credential."""
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    sections = {name.strip("'"): config[name] for name in config.sections()}  # DVC writes ['remote "x"']
    url = sections[f'remote "{sections["core"]["remote"]}"']["url"]
    assert url.startswith("~/") and not Path(url).expanduser().is_relative_to("/tmp"), url
    for section in config.sections():
        assert not {"access_key_id", "secret_access_key", "password", "token"} & set(config[section]), section
