"""params.yaml validation and the CLI's handling of user mistakes: one line on stderr, exit 2, no work done."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

import grappa
from conftest import make_collection, tiny_params_dict
from grappa.cli import main
from grappa.config import ConfigError, load_params, parse_params


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch):
    monkeypatch.setenv("GRAPPA_TRACKING", "0")


def _base(tmp_path: Path) -> dict:
    return tiny_params_dict(tmp_path, [tmp_path / "data" / "shapes" / "manifest.csv"])


def _with(raw: dict, dotted: str, value) -> dict:
    raw = copy.deepcopy(raw)
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return raw


def _write(tmp_path: Path, raw: dict | str, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def _assert_one_line(message: str, *needles: str) -> None:
    assert "\n" not in message.strip(), f"expected one line, got: {message!r}"
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_defaults_are_the_shipped_recipe():
    """What a test or a user leaves out is what params.yaml ships: no default runs a recipe the
    product does not. Given: the data, the k ladder, and the backbone (its block count decides
    where adaptors can go)."""
    from conftest import REPO

    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = parse_params({"data": shipped["data"], "cluster": {"ks": shipped["cluster"]["ks"]},
                             "backbone": shipped["backbone"]})
    assert defaults.model_dump(mode="json") == parse_params(shipped).model_dump(mode="json")


def test_valid_params_parse_and_ks_are_sorted(tmp_path):
    params = parse_params(_with(_base(tmp_path), "cluster.ks", [8, 2, 4]))
    assert params.cluster.ks == [2, 4, 8]
    assert params.backbone.name == "test_efficientnet"


@pytest.mark.parametrize(
    "dotted, value, needles",
    [
        ("adaptor.learning_rate", 0.1, ["adaptor.learning_rate", "unknown key"]),  # unknown key
        ("bogus_section", {"a": 1}, ["bogus_section", "unknown key"]),
        ("adaptor.epochs", "five", ["adaptor.epochs"]),  # wrong type
        ("data.sources", "just/a/string.csv", ["data.sources"]),
        ("fusion.knn", 2.5, ["fusion.knn"]),
        ("adaptor.lr", -0.001, ["adaptor.lr", "greater than 0"]),  # bad values
        ("fusion.lr", 0, ["fusion.lr"]),
        ("cluster.ks", [1, 4], ["cluster.ks", ">= 2"]),
        ("cluster.ks", [4, 4], ["cluster.ks", "unique"]),
        ("cluster.ks", [], ["cluster.ks"]),
        ("cluster.ks", [8], ["cluster.ks"]),
        ("backbone.pooling", "median", ["backbone.pooling"]),
        ("data.sources", [], ["data.sources"]),
    ],
)
def test_bad_params_raise_one_line_config_error_naming_the_key(tmp_path, dotted, value, needles):
    with pytest.raises(ConfigError) as info:
        parse_params(_with(_base(tmp_path), dotted, value))
    _assert_one_line(str(info.value), *needles)


def test_missing_required_section(tmp_path):
    raw = _base(tmp_path)
    del raw["cluster"]
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    _assert_one_line(str(info.value), "cluster", "missing")


def test_load_params_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_params(tmp_path / "nope.yaml")
    _assert_one_line(str(info.value), "not found", "nope.yaml")

    bad = _write(tmp_path, "data: {sources: [a.csv]\ncluster: [", "bad.yaml")
    with pytest.raises(ConfigError) as info:
        load_params(bad)
    _assert_one_line(str(info.value), "not valid YAML")

    scalar = _write(tmp_path, "- just\n- a list\n", "list.yaml")
    with pytest.raises(ConfigError) as info:
        load_params(scalar)
    _assert_one_line(str(info.value), "mapping")


def test_load_params_overrides_are_validated(tmp_path):
    path = _write(tmp_path, _base(tmp_path))
    assert load_params(path, {"cluster.ks": [3, 5]}).cluster.ks == [3, 5]
    with pytest.raises(ConfigError) as info:
        load_params(path, {"adaptor.lr": -1})
    _assert_one_line(str(info.value), "adaptor.lr")


# --------------------------------------------------------------------------- CLI


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda raw: _with(raw, "adaptor.lr", -1.0), "adaptor.lr"),
        (lambda raw: _with(raw, "cluster.ks", [4]), "cluster.ks"),
        (lambda raw: _with(raw, "extract.batchsize", 4), "extract.batchsize"),
        (lambda raw: _with(raw, "seed", "zero"), "seed"),
    ],
)
@pytest.mark.parametrize("step", ["check", "extract", "run"])
def test_cli_bad_params_exit_2_with_one_line_before_any_work(tmp_path, capsys, mutate, needle, step):
    raw = mutate(_base(tmp_path))
    path = _write(tmp_path, raw)
    rc, out, err = _cli(capsys, "--params", str(path), step)
    assert rc == 2
    _assert_one_line(err, "grappa: error:", needle)
    assert "Traceback" not in err + out
    assert not Path(raw["out_dir"]).exists(), "a step started despite invalid params"
    assert not (tmp_path / "cache").exists()


def test_cli_missing_params_file_and_bad_yaml(tmp_path, capsys):
    rc, _, err = _cli(capsys, "--params", str(tmp_path / "absent.yaml"), "extract")
    assert rc == 2
    _assert_one_line(err, "absent.yaml")
    path = _write(tmp_path, "data: [unclosed\n")
    rc, _, err = _cli(capsys, "--params", str(path), "cluster")
    assert rc == 2
    _assert_one_line(err, "not valid YAML")
    assert "Traceback" not in err


def _checkable(tmp_path: Path) -> Path:
    """params.yaml of _base with its source on disk (check also looks for the sources)."""
    make_collection(tmp_path / "data", domains=("shapes",), classes=2, per_class=2, unlabeled=2, size=16)
    return _write(tmp_path, _base(tmp_path))


def test_cli_set_override_is_validated(tmp_path, capsys):
    path = _checkable(tmp_path)
    rc, out, _ = _cli(capsys, "--params", str(path), "--set", "cluster.ks=[3, 6]", "check")
    assert rc == 0 and "ok" in out
    rc, _, err = _cli(capsys, "--params", str(path), "--set", "cluster.ks=[1, 6]", "check")
    assert rc == 2
    _assert_one_line(err, "cluster.ks")
    rc, _, err = _cli(capsys, "--params", str(path), "--set", "noequals", "check")
    assert rc == 2
    _assert_one_line(err, "key=value")


@pytest.mark.parametrize("override", ["seed=[", "data.sources.x=1"])
def test_cli_malformed_set_is_a_one_line_error(tmp_path, capsys, override):
    path = _write(tmp_path, _base(tmp_path))
    rc, _, err = _cli(capsys, "--params", str(path), "--set", override, "check")
    assert rc == 2
    _assert_one_line(err, "grappa: error:")


def test_cli_missing_backbone_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    manifests = make_collection(tmp_path / "data", domains=("shapes",), classes=2, per_class=2, unlabeled=2,
                                size=32)
    raw = tiny_params_dict(tmp_path, manifests, backbone={"weights": str(tmp_path / "no" / "such.pt")})
    path = _write(tmp_path, raw)
    assert _cli(capsys, "--params", str(path), "snapshot")[0] == 0
    rc, out, err = _cli(capsys, "--params", str(path), "extract")
    assert rc == 2
    _assert_one_line(err, "backbone.weights", "such.pt")
    assert "Traceback" not in err + out
    assert not (Path(raw["out_dir"]) / "extract" / "features.parquet").exists()


def test_cli_unknown_source_is_one_line_exit_2(tmp_path, capsys):
    raw = tiny_params_dict(tmp_path, [tmp_path / "missing-folder"])
    rc, _, err = _cli(capsys, "--params", str(_write(tmp_path, raw)), "snapshot")
    assert rc == 2
    _assert_one_line(err, "missing-folder")


def test_cluster_k_larger_than_unlabeled_pool_is_a_clear_error(tmp_path, capsys):
    # 2 domains x 3 unlabeled images = 6 images to cluster; k=8 cannot work.
    manifests = make_collection(tmp_path / "data", classes=2, per_class=2, unlabeled=3, size=32)
    raw = tiny_params_dict(tmp_path, manifests, cluster={"ks": [2, 8]})
    path = _write(tmp_path, raw)
    assert _cli(capsys, "--params", str(path), "snapshot")[0] == 0
    assert _cli(capsys, "--params", str(path), "extract")[0] == 0
    assert _cli(capsys, "--params", str(path), "merge-features")[0] == 0
    rc, out, err = _cli(capsys, "--params", str(path), "cluster")
    assert rc == 2
    _assert_one_line(err, "cluster.ks", "k=8", "(6)")
    assert "Traceback" not in err + out
    assert not (Path(raw["out_dir"]) / "cluster" / "k2.parquet").exists(), "must fail before clustering any k"


def test_params_and_set_work_after_the_verb_too(tmp_path, capsys):
    path = _checkable(tmp_path)
    rc, out, _ = _cli(capsys, "check", "--params", str(path), "--set", "cluster.ks=[3, 6]")
    assert rc == 0 and f"{path}: ok" in out
    rc, _, err = _cli(capsys, "check", "--params", str(path), "--set", "cluster.ks=[1, 6]")
    assert rc == 2
    _assert_one_line(err, "cluster.ks")
    # overrides before and after the verb both apply
    rc, _, err = _cli(capsys, "--set", "cluster.ks=[1, 6]", "check", "--params", str(path), "--set", "seed=1")
    assert rc == 2
    _assert_one_line(err, "cluster.ks")
    rc, _, err = _cli(capsys, "--params", str(path), "check", "--set", "seed=zero")
    assert rc == 2
    _assert_one_line(err, "seed")


@pytest.mark.parametrize("value", ["0", "-1", "abc", "10001"])
def test_cli_search_top_k_out_of_range_is_a_usage_error_before_any_work(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error, before the params are read
        main(["--params", str(tmp_path / "absent.yaml"), "search", "q.png", "--top-k", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--top-k: expected an integer from 1 to 10000" in err and "Traceback" not in err


def test_help_groups_the_verbs_hides_the_plumbing_and_shows_the_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    groups = [text.index(title) for title in ("run the pipeline:", "use the model:", "admin:", "examples:")]
    assert groups == sorted(groups)
    for verb in ("run", "train-fusion", "repro", "search", "embed", "check", "prepare"):
        assert f"\n  {verb} " in text, verb
    assert "open-run" not in text and "close-run" not in text  # the DAG's plumbing
    assert "_AFTER" not in text and "``" not in text and "`" not in text  # no internal names, no markup
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    sub = capsys.readouterr().out
    assert sub.startswith("usage: grappa search") and "--params FILE" in sub and "--top-k K" in sub
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"grappa {grappa.__version__}"


@pytest.mark.parametrize("dotted, value, needle", [
    ("data.sources", ["absent/manifest.csv"], "source not found: absent (listed for the snapshot stage)"),
    ("index.sources", ["absent-catalogue"], "source not found: absent-catalogue (listed for the index stage)"),
    ("index.factory", "IVFbogus", "index.factory: faiss cannot make 'IVFbogus' for 256-d embeddings "
                                  "(could not parse index string IVFbogus)"),
    ("index.factory", "IVF16,PQ7", "should be a multiple of the number of subquantizers"),  # 7 does not divide 256
    ("index.search_params", "nprobe=4", "index.search_params: 'nprobe=4' does not apply to this index"),  # Flat
])
def test_check_catches_what_would_fail_later_in_one_line(tmp_path, capsys, monkeypatch, dotted, value, needle):
    path = _checkable(tmp_path)
    monkeypatch.chdir(tmp_path)  # relative sources are the workspace's
    rc, out, _ = _cli(capsys, "--params", str(path), "check")
    assert rc == 0 and "256-d embeddings" in out and "applies" in out, out
    _write(tmp_path, _with(_base(tmp_path), dotted, value))
    rc, _, err = _cli(capsys, "--params", str(path), "check")
    assert rc == 2
    _assert_one_line(err, needle)
