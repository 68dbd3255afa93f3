"""The seven steps chained on a tiny synthetic collection."""
import json
from pathlib import Path

from grappa import registry
from grappa.cli import run_all
from grappa.io.artifacts import load_torch
from grappa.io.layout import layout


def test_all_steps_chain(tiny_params):
    timings = run_all(tiny_params)
    out = Path(tiny_params.out_dir)
    assert set(timings) == {"snapshot", "extract@0-of-1", "merge_features", "warm_start", "cluster", "train_adaptor@2",
                            "train_adaptor@4", "train_fusion", "evaluate", "index"}  # stage names, as DVC and Airflow
    metrics = json.loads((out / "evaluate" / "report.json").read_text())
    modes = {"zero_shot", "single_k_2", "single_k_4", "uniform", "oracle_val", "grappa"}
    assert set(metrics["methods"]) == modes | {"oracle_test"} and set(metrics["validation"]["methods"]) == modes
    for res in [*metrics["methods"].values(), *metrics["validation"]["methods"].values()]:
        assert set(res["per_domain"]) == {"shapes", "stripes"}
        assert 0.0 <= res["mean"]["map_at_r"] <= 1.0
    # 4 classes x 4 images per domain: two classes (half) are validation, two are test
    protocol = metrics["protocol"]
    assert protocol["select"] == "val" and protocol["report"] == "test" and protocol["split_seed"] == 0
    assert {d: len(c) for d, c in protocol["val_classes"].items()} == {"shapes": 2, "stripes": 2}
    for domain, val in protocol["val_classes"].items():
        assert not set(val) & set(protocol["test_classes"][domain]) and len(protocol["test_classes"][domain]) == 2
    assert protocol["images"] == {"val": 2 * 8, "test": 2 * 8}
    # how the fused model routes, per adapted block (tiny_params adapt from block 3 on)
    routing = metrics["routing"]
    blocks = [key for key in routing if key.startswith("block")]
    assert blocks[0] == "block3" and len(blocks) == len(metrics["attention_by_domain"]["shapes"])
    for block in blocks:
        r = routing[block]
        assert 0 <= r["per_image_attn_entropy"] <= r["batch_mean_attn_entropy"] <= routing["max_entropy"] + 1e-6
        assert r["mutual_information"] >= -1e-9 and 0 <= r["domain_js_mean"] <= r["domain_js_max"] <= 0.7
    # zero_shot is scored from the float16 prefix cache like every adapted row; the float32 figure is kept beside it
    precision = metrics["precision_path"]
    assert precision["zero_shot_fp16_prefix"]["test"] == metrics["methods"]["zero_shot"]["mean"]["map_at_r"]
    assert abs(precision["zero_shot_fp32_features"]["test"] - precision["zero_shot_fp16_prefix"]["test"]) < 0.05
    results = (out / "evaluate" / "results.md").read_text()
    assert "test classes" in results and "validation classes" in results
    for plot in ("per_domain_map_at_r.png", "attention_by_domain.png"):
        assert (out / "evaluate" / "plots" / plot).stat().st_size > 1000
    # the run report: both folds' tables, the two plots, galleries, the map and the clusters in one
    # page that fetches nothing
    page = (out / "evaluate" / "report.html").read_text(encoding="utf-8")
    assert page.count("<table>") == 3 and "test classes" in page and "validation classes" in page
    assert page.count('<img class="figure" src="data:image/png;base64,') == 2 and "http" not in page
    assert f"<td>grappa</td><td>" in page and "<b>" in page  # the rows, the mean in bold
    # galleries: grid_queries (1) test query per domain, each beside its top-5 with marks
    assert page.count('<figure class="query">') == 2 and page.count("#5 · ") == 2
    assert page.count('<figure class="right">') + page.count('<figure class="wrong">') == 2 * 5
    # the map: every query_db image (32 < map_points), one dot each; the clusters: every k, members shown
    assert page.count("<circle ") == 32 and "t-SNE of 32 of 32 query_db images" in page
    assert "<h3>k = 2</h3>" in page and "<h3>k = 4</h3>" in page and page.count('<figure class="small">') >= 2 * 6
    _map_shows_the_image_under_the_pointer(out / "evaluate" / "report.html", out.parent / "browser")
    assert not list((out / "checkpoints").glob("*.pt")), "checkpoints must be cleaned after success"
    index = json.loads((out / "index" / "index.json").read_text())
    model = json.loads((out / "model" / "model.json").read_text())
    assert index["count"] == 64 and index["model_sha256"] == model["weights_sha256"]  # every snapshot image
    # how to feed images travels with every saved artifact, so no loader needs params.yaml for it
    for artifact in (layout(tiny_params).adaptor(2), layout(tiny_params).adaptor(4), layout(tiny_params).fusion):
        assert json.loads(json.dumps(load_torch(artifact)["meta"]["preprocess"])) == model["preprocess"], artifact
    assert model["preprocess"]["image_size"] == tiny_params.backbone.image_size
    # every step's report (where the registry says it is) holds its duration under one key
    for step in registry.STEPS:
        for item in step.items(tiny_params):
            report = json.loads(step.report_file(layout(tiny_params), item).read_text())
            assert report["timings_s"]["total"] > 0, (step.stage_name(item), report.get("timings_s"))


def _map_shows_the_image_under_the_pointer(page: Path, profile: Path) -> None:
    """In Chromium: the pointer on a dot of the map shows that image and its domain / class."""
    from browser import Browser

    browser = Browser(profile)
    try:
        browser.open(page.as_uri())
        browser.evaluate("document.querySelector('svg.map').scrollIntoView()")
        x, y, caption = browser.evaluate("(() => { const dot = document.querySelector('svg.map circle'); "
                                         "const r = dot.getBoundingClientRect(); "
                                         "return [r.x + r.width / 2, r.y + r.height / 2, dot.dataset.caption]; })()")
        assert browser.evaluate("document.getElementById('map-tip').style.display") in ("", "none")
        browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        assert browser.evaluate("document.getElementById('map-tip').style.display") == "block"
        assert browser.evaluate("document.getElementById('map-tip').innerText").strip() == caption
        assert browser.evaluate("document.querySelector('#map-tip img').naturalWidth") > 0
    finally:
        browser.close()
