"""Untrusted input cannot run code: an image source (from params.yaml, ``--set`` or an Airflow run
conf) is checked where it enters, and dvc.yaml is emitted by a YAML serializer, so no string can add
a stage, a command or a DVC interpolation to it."""
from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import REPO, tiny_params_dict
from hypothesis import given, settings
from hypothesis import strategies as st

from grappa import workspace
from grappa.config import ConfigError, check_source, load_params, parse_params
from grappa.dvc_yaml import render
from grappa.registry import STEPS

STAGES = [step.stage for step in STEPS]
# every character but surrogates (not encodable): control characters, YAML indicators, quotes, non-ASCII
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)
# what a careless or hostile user writes into a path
ODD_PATHS = ["data/#1 cats", "it's \"quoted\"", "café/ünïcode 画像", "a: b", "- dash", "[x]", "{y}", "*star",
             "&anchor", "!tag", "%pct", "@at", "`tick`", "? q", "|pipe", ">gt", " lead", "trail ", "a\\b", "~",
             "null", "true", "1e3", "0o17"]


def _dvc_stages(text: str) -> dict:
    """dvc.yaml as DVC itself parses it."""
    from dvc.utils.serialize import parse_yaml

    return parse_yaml(text, "dvc.yaml")["stages"]


@settings(max_examples=300, deadline=None)
@given(ANY_TEXT)
def test_a_source_is_refused_in_one_line_or_lands_in_dvc_yaml_verbatim(source):
    try:
        check_source(source)
    except ValueError as err:
        assert "\n" not in str(err) and "\r" not in str(err)
        return
    assert all(ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F and c not in "\u2028\u2029" for c in source)
    assert "${" not in source and ("://" not in source.split("/")[0] or source.startswith("s3://"))
    stages = _dvc_stages(render({"snapshot": [source]}, 1))
    assert list(stages) == STAGES, "no stage added or lost"
    assert stages["snapshot"]["deps"][-1] == source and stages["snapshot"]["cmd"] == "python -m grappa snapshot"
    assert [s["cmd"] if "cmd" in s else s["do"]["cmd"] for s in stages.values()] == \
        [s["cmd"] if "cmd" in s else s["do"]["cmd"] for s in _dvc_stages(render({}, 1)).values()]


@pytest.mark.parametrize("source", ["data/x\n  evil:\n    cmd: touch /tmp/pwned", "data/x\r", "a\x00b", "a\x1bb",
                                    "a\u2028b", "a\x85b", "${HOME}/x", "http://h/x", "file:///etc", "gs://b/x",
                                    "s3:///no-bucket", "", " "])
def test_bad_sources_are_one_line_errors_where_they_enter(source, tmp_path):
    with pytest.raises(ConfigError) as err:  # params.yaml, --set and the run conf all parse through here
        parse_params(tiny_params_dict(tmp_path, [source]))
    assert str(err.value).startswith("params: data.sources: ") and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="params: index.sources: "):
        parse_params({**tiny_params_dict(tmp_path, ["x"]), "index": {"sources": [source]}})
    with pytest.raises(ConfigError, match="data.sources"):
        load_params(REPO / "params.yaml", {"data.sources": [source]})  # what --set does


def test_odd_paths_round_trip_params_yaml_to_dvc_yaml_to_check(tmp_path):
    """params.yaml -> dvc.yaml -> `grappa check` (workspace.drift) keep every path exactly as written."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    for path in ODD_PATHS:
        (tmp_path / path).mkdir(parents=True, exist_ok=True)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params_dict(tmp_path, ["x"]), allow_unicode=True))
    (tmp_path / "x").mkdir()
    workspace.record_params(params_file, parse_params(tiny_params_dict(tmp_path, ODD_PATHS)))
    params = load_params(params_file)
    assert params.data.sources == ODD_PATHS, "params.yaml keeps each path as written"
    workspace.sync_data_deps(tmp_path, params)
    assert workspace.drift(tmp_path, params) is None
    stages = _dvc_stages((tmp_path / "dvc.yaml").read_text())
    assert list(stages) == STAGES
    assert stages["snapshot"]["deps"][-len(ODD_PATHS):] == [p.rstrip("/") for p in ODD_PATHS]
