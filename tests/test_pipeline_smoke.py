"""The seven steps chained on a tiny synthetic collection."""
import json
from pathlib import Path

from grappa.cli import run_all
from grappa.io.artifacts import load_torch
from grappa.io.layout import layout


def test_all_steps_chain(tiny_params):
    timings = run_all(tiny_params)
    out = Path(tiny_params.out_dir)
    assert set(timings) == {"snapshot", "extract@0-of-1", "merge-features", "cluster", "train-adaptor@2", "train-adaptor@4", "train-fusion",
                            "evaluate", "index"}
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"zero_shot", "single_k_2", "single_k_4", "uniform", "oracle", "grappa"}
    for res in metrics["methods"].values():
        assert set(res["per_domain"]) == {"shapes", "stripes"}
        assert 0.0 <= res["mean"]["map_at_r"] <= 1.0
    for plot in ("per_domain_map_at_r.png", "attention_by_domain.png", "top5_grappa.png"):
        assert (out / "evaluate" / "plots" / plot).stat().st_size > 1000
    assert not list((out / "checkpoints").glob("*.pt")), "checkpoints must be cleaned after success"
    index = json.loads((out / "index" / "index.json").read_text())
    model = json.loads((out / "model" / "model.json").read_text())
    assert index["count"] == 64 and index["model_sha256"] == model["weights_sha256"]  # every snapshot image
    # how to feed images travels with every saved artifact, so no loader needs params.yaml for it
    for artifact in (layout(tiny_params).adaptor(2), layout(tiny_params).adaptor(4), layout(tiny_params).fusion):
        assert json.loads(json.dumps(load_torch(artifact)["meta"]["preprocess"])) == model["preprocess"], artifact
    assert model["preprocess"]["image_size"] == tiny_params.backbone.image_size
