"""Ladder benchmark: which pseudo-granularities help on the data, before any fusion is trained.

    python -m benchmarks.ladder --ks 8 32 64 128 256 512 1024 2048 --uniform 128,512 64,256,1024

Runs snapshot, extract and cluster for every k in ``--ks`` into ``outputs/bench/ladder/seed<S>`` (all images),
trains the adaptor sets not already there, then scores on the validation classes of the ``query_db``
split (``evaluate.val_share``; never the test classes) the zero-shot backbone, every single-k model,
the uniform average of each ``--uniform`` subset and the per-domain best single k. Writes
``results/ladder_seed<S>.{json,md}``. It is how params.yaml's k ladder was chosen: coarse levels that
score below the zero-shot backbone are dead weight for the fusion.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from grappa.cli import run_all, run_step
from grappa.config import load_params
from grappa.core.backbones import create_backbone
from grappa.core.evaluation import ORACLE, VALIDATION, markdown_table, score_splits
from grappa.core.model import UNIFORM, ZERO_SHOT, pick_device, single
from grappa.io.artifacts import write_json, write_text
from grappa.io.assemble import assemble
from grappa.io.datasets import encode, load_inputs
from grappa.io.layout import layout
from grappa.io.scoring import validation_classes
from pipeline_steps.evaluate import protocol

from .quality import FULL_DATA, RESULTS


def ladder_table(rows: dict, images_per_cluster: dict[str, str]) -> str:
    domains = list(next(iter(rows.values()))["per_domain"])

    def row(name: str, res: dict) -> list[str]:
        cells = [f"{100 * res['per_domain'][d]['map_at_r']:.1f}" for d in domains]
        return [name, images_per_cluster.get(name, ""), *cells, f"**{100 * res['mean']['map_at_r']:.2f}**"]

    return markdown_table("mAP@R (%) on the validation classes of each domain's query_db split (all-vs-all "
                          "leave-one-out; oracle_val: per domain the best single k)",
                          ["model", "images per cluster", *domains, "mean"], [row(*item) for item in rows.items()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ks", type=int, nargs="+", required=True)
    parser.add_argument("--uniform", nargs="*", default=[], metavar="K1,K2,...",
                        help="subsets of --ks whose uniform adaptor average is scored")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    subsets = [[int(k) for k in item.split(",")] for item in args.uniform]
    if any(k not in args.ks for subset in subsets for k in subset):
        parser.error("every k of --uniform must be in --ks")
    if any(len(set(subset)) < 2 for subset in subsets):
        parser.error("a --uniform subset averages at least two adaptor sets")

    def params_for(ks: list[int]):
        return load_params(args.params, {**FULL_DATA, "cluster.ks": ks, "seed": args.seed,
                                         "out_dir": f"outputs/bench/ladder/seed{args.seed}"})

    params = params_for(args.ks)
    run_all(params, until="merge-features")  # snapshot, every extract shard, merge-features
    pool = run_step("cluster", params)["per_k"]
    for k in args.ks:  # sets trained by an earlier call on the same clusters are reused
        if not layout(params).adaptor(k).exists():
            run_step("train-adaptor", params, k)

    backbone, preprocess, _ = create_backbone(params.backbone)
    inputs = load_inputs(layout(params), "query_db", preprocess, train=False,
                         min_side=params.data.min_side, max_pixels=params.data.max_pixels)
    labels = inputs.labels.astype(str)
    images_per_cluster = {}

    def assembled(model_params):
        return assemble(model_params, backbone, with_fusion=False, load_fusion=False).to(pick_device())

    every_set = assembled(params)  # serves zero_shot and every single-k mode
    # zero_shot goes through the float16 prefix cache like every adapted row (one precision path)
    models = [(ZERO_SHOT, [], ZERO_SHOT, every_set)] + [(single(k), [k], single(k), every_set) for k in args.ks]
    # a uniform model holds exactly its subset's adaptor sets (UNIFORM averages all the sets it holds)
    models += [("uniform_" + "-".join(map(str, s)), s, UNIFORM, assembled(params_for(s))) for s in subsets]
    embeddings = {}
    for name, ks, mode, model in models:
        embeddings[name], _ = encode(model, inputs.dataset, mode, params.evaluate.batch_size,
                                     num_workers=params.extract.num_workers, desc=name)
        images_per_cluster[name] = " / ".join(f"{pool[str(k)]['mean_size']:.0f}" for k in ks)
    # scored on the validation classes only: the ladder is a choice, and choices never see the test classes
    val_classes = validation_classes(params, inputs.domains, labels)
    scores = score_splits(embeddings, inputs.domains, labels, val_classes, args.ks)
    rows = {name: scores[VALIDATION][name] for name in [*embeddings, ORACLE]}
    for name, res in rows.items():
        print(f"{name}: mean mAP@R {res['mean']['map_at_r']:.4f} (validation classes)")
    table = ladder_table(rows, images_per_cluster)
    write_json(args.results_dir / f"ladder_seed{args.seed}.json",
               {"protocol": protocol(params, inputs.domains, labels, val_classes), "rows": rows,
                "oracle_choice": scores["oracle_choice"], "images_per_cluster": images_per_cluster,
                "params": params.model_dump()})
    write_text(args.results_dir / f"ladder_seed{args.seed}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
