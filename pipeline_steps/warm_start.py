"""Step 2c — ``grappa warm-start``: a full retrain, or an incremental run from the champion, and why.

Looks up the registry's champion (``tracking.registered_model``, alias ``champion``) and compares it
with this run (grappa/core/incremental.py): its recipe (the params it was trained with, apart from the
data), the share of the unlabeled pool it never saw, and how many incremental runs it descends from.
Writes ``<out>/champion/decision.json`` (mode, reason, champion version, generation, new share; small,
in git beside dvc.lock) and ``<out>/champion/bundle/``: for an incremental run the champion's
centroids, pseudo-labels, adaptor sets, classifiers and fusion, which the next steps start from; for a
full run only ``source.json``. DVC caches the bundle, so ``dvc repro`` reproduces an incremental run
from the very files, and a change of champion is a change of this stage's outputs.

The stage reruns when the pool (features.parquet), the recipe or ``adapt`` change: new images landing
is when the champion is looked up.
"""
from __future__ import annotations

import shutil
import time

from grappa.config import ConfigError, Params
from grappa.core.backbones import BlockwiseBackbone, timm_network
from grappa.core.incremental import choose_mode, fall_back
from grappa.io import champion as champions
from grappa.io.artifacts import write_json
from grappa.io.assemble import assemble
from grappa.io.features import read_columns, split_rows
from grappa.io.layout import WARM_BUNDLE, layout


def misfit(params: Params, champion: champions.Champion) -> str | None:
    """Why the champion's adaptor sets and fusion cannot start this code's model (keys or shapes
    changed since it was trained with the same params), or None when they load."""
    backbone = BlockwiseBackbone(timm_network(params.backbone.name), params.backbone.image_size, params.backbone.pooling)
    try:  # the bundle is in out_dir's layout: assemble it as a run's own outputs
        assemble(params.model_copy(update={"out_dir": str(champion.bundle)}), backbone, with_fusion=True, load_fusion=True)
    except (ConfigError, RuntimeError, KeyError) as err:  # torch lists the missing and unexpected keys
        text = " ".join(line.strip() for line in str(err).strip().splitlines())
        return text[:300] or type(err).__name__
    return None


def run(params: Params) -> dict:
    t0 = time.perf_counter()
    out, hp, ks = layout(params), params.adapt, params.cluster.ks
    dest = out.path(WARM_BUNDLE)
    ids = read_columns(out, ["image_id"], split_rows(out, "unlabeled")).column("image_id")
    champion = None if hp.mode == "full" else champions.fetch(params, dest)
    usable = champion is not None and champion.params is not None and champion.has(ks)
    known, new = None, len(ids)
    if usable:
        old_rows, new_rows = champions.split_old_new(champion.trained_ids(ks), ids)
        known, new = len(old_rows), len(new_rows)
    if champion is not None and not usable:  # registered before bundles, or with other k
        decision = fall_back(hp.mode, f"champion v{champion.version} holds no complete warm-start bundle for "
                                      f"cluster.ks {ks}")
    else:
        decision = choose_mode(hp.mode, champions.recipe(champion.params) if usable else None,
                               champions.recipe(params.model_dump(mode="json")), new / max(len(ids), 1),
                               hp.max_new_share, champion.generation if usable else 0, hp.max_generations, known)
    if decision.mode == "incremental" and (why := misfit(params, champion)):
        decision = fall_back(hp.mode, f"champion v{champion.version}'s weights do not fit this code's model: {why}")
    incremental = decision.mode == "incremental"
    if not incremental:  # nothing to start from: the bundle says so, and only that
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
    write_json(dest / "source.json", {"mode": decision.mode, **({
        "version": champion.version, "run_id": champion.run_id, "model_sha256": champion.model_sha256,
        "generation": champion.generation + 1} if incremental else {})})
    print(f"warm-start: {decision.mode} run: {decision.reason}", flush=True)
    return {"mode": decision.mode, "reason": decision.reason,
            "champion": champion.version if incremental else None,
            "generation": champion.generation + 1 if incremental else 0,
            "pool": len(ids), "new_images": new, "new_share": new / max(len(ids), 1),
            "timings_s": {"total": time.perf_counter() - t0}}
