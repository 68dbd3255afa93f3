"""Instance-level (revisited protocol) tasks evaluated beside the class-level domains."""
import json
import pickle
from pathlib import Path

import pytest

from grappa.cli import run_all
from grappa.config import ConfigError, parse_params
from pipeline_steps import evaluate
from tests.conftest import draw_image, tiny_params_dict


def make_revisited(root: Path, name: str = "rtoy") -> Path:
    """A toy revisitop layout: 2 queries (one per landmark), 8 database images."""
    jpg = root / name / "jpg"
    jpg.mkdir(parents=True)
    imlist = [f"db{i}" for i in range(8)]
    for i, im in enumerate(imlist):
        draw_image("shapes", i % 2, seed=50 + i).save(jpg / f"{im}.jpg")
    qimlist = ["q0", "q1"]
    for i, q in enumerate(qimlist):
        draw_image("shapes", i, seed=90 + i).save(jpg / f"{q}.jpg")
    gnd = [
        {"easy": [0, 2], "hard": [4], "junk": [6], "bbx": [4, 4, 44, 44]},
        {"easy": [1], "hard": [3, 5], "junk": [], "bbx": [0, 0, 48, 48]},
    ]
    with open(root / name / f"gnd_{name}.pkl", "wb") as fh:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, fh)
    return root


def test_class_and_instance_tasks_side_by_side(tmp_path, collection):
    root = make_revisited(tmp_path / "revisited")
    params = parse_params(tiny_params_dict(tmp_path, collection,
                                           evaluate={"instance_tasks": [{"name": "rtoy", "root": str(root)}]}))
    run_all(params)
    metrics = json.loads((Path(params.out_dir) / "evaluate" / "report.json").read_text())
    assert set(metrics["methods"]) >= {"zero_shot", "grappa"}  # class-level tasks are still there
    task = metrics["instance_tasks"]["rtoy"]
    assert set(task) == {"zero_shot", "single_k_2", "single_k_4", "uniform", "grappa"}
    for res in task.values():
        assert set(res) == {"easy", "medium", "hard"}
        for protocol in res.values():
            assert 0.0 < protocol["map"] <= 1.0
    assert "rtoy" in (Path(params.out_dir) / "evaluate" / "results.md").read_text()


def test_missing_instance_dataset_fails_before_work(tmp_path, collection):
    params = parse_params(tiny_params_dict(tmp_path, collection,
                                           evaluate={"instance_tasks": [{"name": "roxford5k", "root": str(tmp_path)}]}))
    with pytest.raises(ConfigError, match="not bundled"):
        evaluate.run(params)
    assert not (Path(params.out_dir) / "evaluate").exists()
