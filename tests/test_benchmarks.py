"""The benchmark scripts on tiny inputs. speed.py at its smallest sizes runs, writes the documented JSON,
and faiss's kNN graph is numpy's brute-force one; speed itself is never asserted (it depends on the
machine and its load). quality.py aggregates seeds; ladder.py scores single-k and uniform models."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, make_collection, tiny_params_dict
from grappa.config import AdaptorParams, FusionParams, load_params
from grappa.core.model import CPU_CHUNK

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speed")
    make_collection(tmp / "data", classes=2, per_class=3, unlabeled=4)  # 2 domains x 10 images
    timings = tmp / "run.log"
    timings.write_text("==> extract\nstep timings (s): extract=1.5, cluster=0.5, train-fusion=2.0\n")
    cmd = [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--quick", "--images", str(tmp / "data" / "*" / "images"),
           "--out-dir", str(tmp / "out"), "--device-name", "test-device", "--pipeline-timings", str(timings)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / "out" / "speed_test-device.json").read_text()), proc.stdout


def test_json_schema(quick_run):
    res, stdout = quick_run
    assert res["schema_version"] == 1 and res["device"] == "test-device" and res["preset"] == "quick"
    assert {"name", "torch_device", "faiss_gpus", "cpu_cores"} <= set(res["host"])
    for section, keys in {
        "extraction": {"n", "ours_s", "plain_s", "ours_img_per_s", "plain_img_per_s", "ratio", "ratio_cpu",
                       "min_cosine_ours_vs_plain"},
        "kmeans": {"n", "k", "faiss_s", "sklearn_s", "ratio", "ratio_cpu", "faiss_objective", "sklearn_objective"},
        "knn": {"n", "k", "faiss_s", "numpy_s", "ratio", "ratio_cpu", "recall", "recall_tie_aware", "compared_queries"},
        "training": {"name", "stage", "adapt_from_block", "batch", "s_per_step", "cpu_s_per_step"},
    }.items():
        rows = res[section]["rows"]
        assert rows, section
        for row in rows:
            assert keys <= set(row), (section, keys - set(row))
    for section in ("extraction", "kmeans", "knn"):
        assert len(res[section]["rows"]) == 2
        assert all(v is None or isinstance(v, float) for v in res[section]["growth"].values())
    for row in res["extraction"]["rows"]:
        assert row["ours_s"] > 0 and row["plain_s"] > 0
        assert row["min_cosine_ours_vs_plain"] > 0.999  # both paths compute the same features
    for row in res["kmeans"]["rows"]:
        assert row["faiss_s"] > 0 and row["sklearn_s"] > 0  # the quick budget skips nothing
        assert 0 < row["faiss_objective"]["mean_cosine"] <= 1 and row["sklearn_objective"]["mean_sq_l2"] >= 0
    names = {r["name"] for r in res["training"]["rows"]}
    assert any("cpu-recipe" in n for n in names) and any("paper" in n for n in names)
    assert [r["adaptor_sets"] for r in res["training"]["rows"] if r["stage"] == "fusion"] == [4, 4]
    per_anchor = 2 if load_params(REPO / "params.yaml").fusion.propagation == "pairs" else 1  # the bank: anchors alone
    assert {r["inputs_per_step"] for r in res["training"]["rows"] if r["stage"] == "fusion"} == {per_anchor * r["batch"]
                                                                                                for r in res["training"]["rows"]}
    # the shipped chunked forward and the whole-batch baseline, side by side, for both steps
    assert [(r["stage"], r["chunk"]) for r in res["training"]["rows"] if r["adapt_from_block"] > 0] == [
        ("adaptor", CPU_CHUNK), ("adaptor", None), ("fusion", CPU_CHUNK), ("fusion", None)]
    # the pipeline's own steps, timed on the objectives it ships (params.yaml = the config defaults)
    shipped = load_params(REPO / "params.yaml")
    assert shipped.adaptor.objective == AdaptorParams().objective
    assert shipped.fusion.objective == FusionParams().objective
    assert res["training"]["objectives"] == {"adaptor": shipped.adaptor.objective, "fusion": shipped.fusion.objective}
    assert {(r["stage"], r["objective"]) for r in res["training"]["rows"]} == {
        ("adaptor", shipped.adaptor.objective), ("fusion", shipped.fusion.objective)}
    ratios = res["training"]["ratios"]
    assert all(ratios[name] > 0 for name in ("adaptor_paper_vs_cpu_recipe", "fusion_vs_adaptor_batch",
                                             "fusion_whole_vs_chunked", "adaptor_whole_vs_chunked"))
    assert res["pipeline"]["steps_s"] == {"extract": 1.5, "cluster": 0.5, "train-fusion": 2.0}
    assert res["pipeline"]["total_s"] == 4.0
    for title in ("1. feature extraction", "2. k-means", "3. kNN graph", "4. training step", "5. end-to-end"):
        assert title in stdout


def test_faiss_knn_equals_numpy(quick_run):
    res, _ = quick_run
    for row in res["knn"]["rows"]:
        assert row["compared_queries"] == row["n"]  # quick sizes run both methods in full
        assert row["recall"] == 1.0 and row["recall_tie_aware"] == 1.0


def test_knn_functions_agree_directly():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import speed

    x = speed.synthetic_vectors(500, 16, seed=3)
    a = speed.faiss_knn(x, 10, gpu=False)
    b = speed.numpy_knn(x, 10)
    assert all(set(r1) == set(r2) for r1, r2 in zip(a, b))
    assert not (a == np.arange(500)[:, None]).any()  # an image is never its own neighbour
    sample = np.array([0, 7, 499])
    assert (speed.faiss_knn(x, 10, gpu=False, queries=sample) == a[sample]).all()
    assert (speed.numpy_knn(x, 10, queries=sample) == b[sample]).all()
    assert speed.growth_exponent([10, 100], [1.0, 100.0]) == 2.0


def test_speed_only_replaces_its_sections_and_keeps_the_rest():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import speed

    run = {"created_utc": "t0", "note": "first", "args": {}}
    previous = {**run, "extraction": {"x": 1}, "training": {"old": True}, "pipeline": {"demo": 683.0}}
    result = {"created_utc": "t1", "note": "train again", "args": {"only": ["train"]}, "training": {"new": True}}
    merged = speed.keep_other_sections(previous, result, {"train"})
    assert merged["training"] == {"new": True} and merged["pipeline"] == {"demo": 683.0} and merged["extraction"]
    assert merged["runs"]["training"]["created_utc"] == "t1" and merged["runs"]["pipeline"]["note"] == "first"
    assert merged["created_utc"] == "t1"


def test_quality_aggregates_seeds_in_table_order():
    from benchmarks.quality import aggregate, method_order

    def run(value):
        cell = {"map_at_r": value, "recall_at_1": 2 * value}
        return {"methods": {name: {"per_domain": {"birds": cell, "cars": cell}, "mean": cell}
                            for name in ("grappa", "single_k_128", "zero_shot", "single_k_8", "oracle_val", "uniform")}}

    methods = aggregate([run(0.2), run(0.4)])
    assert list(methods) == ["zero_shot", "single_k_8", "single_k_128", "uniform", "oracle_val", "grappa"]
    assert methods["grappa"]["mean"]["map_at_r"] == pytest.approx(0.3)
    assert methods["grappa"]["std"]["map_at_r"] == pytest.approx(0.1)
    assert methods["grappa"]["per_domain"]["cars"]["std"]["recall_at_1"] == pytest.approx(0.2)
    assert method_order(["grappa", "single_k_32", "single_k_8"]) == ["single_k_8", "single_k_32", "grappa"]


def test_ladder_scores_singles_and_uniform_subsets_and_reuses_trained_sets(tmp_path, monkeypatch, collection):
    import yaml

    from benchmarks import ladder

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict(tmp_path, collection)))
    monkeypatch.chdir(tmp_path)  # the ladder's outputs go to ./outputs/bench/ladder/seed<S>
    argv = ["--params", str(params), "--ks", "2", "3", "4", "--uniform", "2,4", "--results-dir", str(tmp_path / "res")]
    assert ladder.main(argv) == 0
    first = json.loads((tmp_path / "res" / "ladder_seed0.json").read_text())
    assert set(first["rows"]) == {"zero_shot", "single_k_2", "single_k_3", "single_k_4", "uniform_2-4", "oracle_val"}
    # a choice: scored on the validation classes only (half of each domain's 4 classes)
    assert first["protocol"]["select"] == "val" and first["protocol"]["images"]["val"] == 2 * 8
    assert first["rows"]["oracle_val"]["mean"]["map_at_r"] >= max(first["rows"][f"single_k_{k}"]["mean"]["map_at_r"]
                                                                  for k in (2, 3, 4)) - 1e-9
    for row in first["rows"].values():
        assert set(row["per_domain"]) == {"shapes", "stripes"}
        assert all(0.0 <= cell["map_at_r"] <= 1.0 for cell in row["per_domain"].values())
    assert first["images_per_cluster"]["uniform_2-4"] == "16 / 8"  # 32 unlabeled images over k=2 and k=4
    assert "| uniform_2-4 | 16 / 8 |" in (tmp_path / "res" / "ladder_seed0.md").read_text()

    adaptor = tmp_path / "outputs" / "bench" / "ladder" / "seed0" / "adaptors" / "k3" / "adaptor.pt"
    trained_at = adaptor.stat().st_mtime_ns
    assert ladder.main(argv) == 0  # a second call scores the same sets without retraining them
    assert adaptor.stat().st_mtime_ns == trained_at
    assert json.loads((tmp_path / "res" / "ladder_seed0.json").read_text())["rows"] == first["rows"]


def test_incremental_benchmark_compares_an_increment_and_a_chain_with_a_full_retrain(tmp_path, monkeypatch, collection,
                                                                                         capsys):
    import yaml

    from benchmarks import incremental

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict(tmp_path, collection, adapt={"replay": 4})))
    monkeypatch.chdir(tmp_path)  # outputs/bench/incremental/...
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["--params", str(params), "--seeds", "0", "--chain-steps", "2", "--chain-share", "0.1",
            "--results-dir", str(tmp_path / "res")]
    assert incremental.main(argv) == 0
    res = json.loads((tmp_path / "res" / "incremental.json").read_text())
    assert res["seeds"] == [0] and res["increment"]["seeds"] == [0] and res["chain"]["seeds"] == [0]
    runs = res["runs"]["0"]
    assert [r["mode"] for r in runs["increment"]] == ["full", "incremental"]
    assert [r["mode"] for r in runs["chain"]] == ["full", "incremental", "incremental"]
    assert [r["mode"] for r in runs["full"]] == ["full"] and runs["full"][0]["decision"]["reason"] == "adapt.mode is full"
    assert runs["increment"][1]["decision"]["new_images"] == 3  # 10% of the 32 unlabeled images
    assert res["increment"]["per_seed"]["0"]["mode"] == "incremental" and res["increment"]["seconds_ratio"] > 0
    # what serves at the chain's end is a version of its own registry: the last run's, or one the gate kept
    assert res["chain"]["per_seed"]["0"]["serves"] in {"1", "2", "3"} and res["chain"]["serving_map_at_r_diff"] is not None
    assert os.environ.get("MLFLOW_TRACKING_URI") is None  # each arm's registry was set for its runs only
    assert "| increment (+10%) |" in (tmp_path / "res" / "incremental.md").read_text()
    finished = (tmp_path / "outputs" / "bench" / "incremental" / "seed0" / "chain" / "run2.json").stat().st_mtime_ns
    assert incremental.main(argv) == 0  # a second call reads every finished run back
    assert (tmp_path / "outputs" / "bench" / "incremental" / "seed0" / "chain" / "run2.json").stat().st_mtime_ns == finished
    # outputs gone (a fresh clone): the arms not asked for come from the results file, the chain from its runs
    shutil.rmtree(tmp_path / "outputs" / "bench" / "incremental" / "seed0" / "full")
    shutil.rmtree(tmp_path / "outputs" / "bench" / "incremental" / "seed0" / "increment")
    assert incremental.main([*argv, "--arms", "chain"]) == 0
    again = json.loads((tmp_path / "res" / "incremental.json").read_text())
    assert again["increment"] == res["increment"] and again["chain"] == res["chain"]
    assert not (tmp_path / "outputs" / "bench" / "incremental" / "seed0" / "full").exists()  # read, not rerun
    # other settings under the same name would read these runs back as theirs: refused in one line
    with pytest.raises(SystemExit) as refused:
        incremental.main([*argv, "--held", "0.2"])
    assert refused.value.code == 2 and "holds runs of other settings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        incremental.main([*argv, "--set", "adaptor.epochs=3"])


@pytest.mark.parametrize("uniform", ["2,5", "2,2"])
def test_ladder_refuses_bad_uniform_subsets(uniform, capsys):
    from benchmarks import ladder

    with pytest.raises(SystemExit) as exit_:
        ladder.main(["--ks", "2", "4", "--uniform", uniform])
    assert exit_.value.code == 2
    assert "--uniform" in capsys.readouterr().err


@pytest.mark.timeout(300)  # ~60 s on an idle 2-core machine: a dozen `python -m grappa` child processes
def test_scale_quick_writes_rows_for_every_step_and_size(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--quick", "--out", str(tmp_path / "out"),
           "--work-dir", str(tmp_path / "work"), "--device-name", "test-device", "--images", str(tmp_path / "none")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=290, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "scale_test-device.json").read_text())
    assert res["schema_version"] == 1 and res["device"] == "test-device" and res["preset"] == "quick"
    sizes, ks = res["settings"]["sizes"], res["settings"]["ks"]
    steps = ["merge_features", "cluster", *[f"train_adaptor@{k}" for k in ks], "train_fusion"]  # stage names
    measured = {(r["step"], r["n"]): r for r in res["rows"] if r["store"] == "synthetic" and r["step"] != "knn"}
    assert set(measured) == {(step, n) for step in steps for n in sizes}
    for row in [*measured.values(), *(r for r in res["rows"] if r["store"] == "images")]:
        assert row["rc"] == 0 and row["seconds"] > 0 and row["peak_rss_mb"] > 0, row
    assert {r["step"] for r in res["rows"] if r["store"] == "images"} == {"snapshot", "extract"}
    for step in steps:  # one slope per pair of consecutive sizes, and the fit over all of them
        for key in ("seconds", "peak_rss_mb"):
            assert isinstance(res["exponents"][step][key]["overall"], float), (step, key)
        assert isinstance(res["exponents"][step]["flat_memory"], bool)
    fusion = next(r for r in res["rows"] if r["step"] == "train_fusion")
    assert fusion["report"]["knn_graph"]["method"] == "exact"  # the quick stores are below knn_exact_below
    # the training steps run steps_per_epoch = 2 batches at every N (a full epoch would be 3 and 6)
    trained = [r for r in res["rows"] if r["step"].startswith("train_")]
    assert trained and all(r["report"]["final"]["batches"] == 2 and r["report"]["s_per_batch"] > 0 for r in trained)
    ex = res["extraction"]
    assert ex["runs"][0]["part_report"]["computed"] == ex["n"]  # every synthetic image was its own file
    for key in ("images_per_s", "ratio_vs_plain_timm_loop", "gflops_per_image", "flop_bound_images_per_s",
                "fraction_of_flop_bound"):
        assert ex[key] > 0, key
    assert ex["plain_timm_loop"]["images_per_s"] > 0 and ex["matmul"]["gflops"] > 0
    # the params' runtime (auto: OpenVINO on the CPU) beside PyTorch on the same images, each stage alone
    side = ex["runtime_vs_torch"]
    assert ex["runtime"]["name"] == "openvino" and side["speedup"] > 0 and side["min_cosine_vs_torch"] > 0.9999
    assert side["images_compared"] == ex["runs"][0]["n"]
    assert {"decode_resize", "forward_torch", "forward_openvino"} <= set(ex["stages"])
    assert all(stage["images_per_s"] > 0 for stage in ex["stages"].values())
    assert "growth exponents" in proc.stdout and "FLOP bound" in proc.stdout and "vs torch" in proc.stdout


def test_readme_results_are_the_committed_benchmark():
    """The README's results block is results/multidomain.md, which is rendered from the committed
    JSON: a figure in the README cannot drift from what the benchmark measured."""
    from benchmarks.quality import RESULTS, render

    results = json.loads((RESULTS / "multidomain.json").read_text())
    assert results["protocol"]["select"] == "val" and results["protocol"]["report"] == "test"
    assert results["seeds"] == [0, 1, 2]
    rendered = render(results)
    assert (RESULTS / "multidomain.md").read_text() == rendered
    readme = (RESULTS.parents[1] / "README.md").read_text()
    start, end = "<!-- benchmarks/results/multidomain.md -->\n", "<!-- end of benchmarks/results/multidomain.md -->"
    assert readme[readme.index(start) + len(start):readme.index(end)] == rendered


def test_readme_incremental_table_is_the_committed_benchmark():
    """The README's incremental table is results/incremental.md, rendered from the committed JSON."""
    from benchmarks.incremental import RESULTS, render

    results = json.loads((RESULTS / "incremental.json").read_text())
    rendered = render(results)
    assert (RESULTS / "incremental.md").read_text() == rendered
    readme = (RESULTS.parents[1] / "README.md").read_text()
    start, end = "<!-- benchmarks/results/incremental.md -->\n", "<!-- end of benchmarks/results/incremental.md -->"
    assert readme[readme.index(start) + len(start):readme.index(end)] == rendered


def test_paired_interval_is_zero_for_equal_rows_and_brackets_a_shift():
    from benchmarks.adaptation import paired_interval

    rng = np.random.default_rng(0)
    domains = np.repeat(["a", "b"], 60)
    labels = np.tile(np.repeat(np.arange(12), 5), 2).astype(str)
    ap = rng.uniform(size=120)
    assert paired_interval(ap, ap, domains, labels) == (0.0, 0.0, 0.0)
    better = np.clip(ap + rng.normal(0.05, 0.02, size=120), 0, None)
    point, lo, hi = paired_interval(better, ap, domains, labels)
    assert lo < point < hi and 0.03 < point < 0.07 and lo > 0
    ap[3] = np.nan  # a query without a relevant image counts in neither row
    assert np.isfinite(paired_interval(better, ap, domains, labels)).all()


def test_simplex_grid_has_the_corners_midpoints_and_centre():
    from benchmarks.adaptation import simplex_grid

    grid = simplex_grid(3)
    assert len(grid) == 7 and all(abs(sum(w) - 1) < 1e-9 for w in grid.values())
    assert grid["e1"] == [0.0, 1.0, 0.0] and grid["e0+e2"] == [0.5, 0.0, 0.5]


def test_the_readme_scale_table_is_the_committed_json_s():
    """README's scale table is generated (`python benchmarks/scale.py --markdown`), never hand-edited."""
    import re

    sys.path.insert(0, str(REPO / "benchmarks"))
    import scale

    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- scale table:[^\n]*-->\n(.*?)<!-- end scale table -->", readme, re.S)
    assert block, "README.md has no generated scale table"
    committed = json.loads((REPO / "benchmarks" / "results" / "scale_cpu-2core.json").read_text())
    assert block.group(1) == scale.markdown_table(committed)
    assert "| train_fusion |" in block.group(1) and "1M" in block.group(1)
