"""Ladder benchmark: which pseudo-granularities help on the data, before any fusion is trained.

    python -m benchmarks.ladder --ks 8 32 64 128 256 512 1024 2048 --uniform 128,512 64,256,1024

Runs snapshot, extract and cluster for every k in ``--ks`` into ``outputs/bench/ladder/seed<S>`` (all images),
trains the adaptor sets not already there, then scores on the full ``query_db`` split the zero-shot
backbone, every single-k model and the uniform average of each ``--uniform`` subset. Writes
``results/ladder_seed<S>.{json,md}``. It is how params.yaml's k ladder was chosen: coarse levels that
score below the zero-shot backbone are dead weight for the fusion.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from grappa.io.artifacts import write_json, write_text
from grappa.io.assemble import assemble
from grappa.core.backbones import create_backbone
from grappa.cli import run_step
from grappa.config import load_params
from grappa.steps.evaluate import per_domain_metrics
from grappa.io.datasets import encode, load_inputs
from grappa.core.model import UNIFORM, pick_device, single
from grappa.steps.train_adaptor import adaptor_path

from .quality import FULL_DATA, RESULTS


def ladder_table(rows: dict, images_per_cluster: dict[str, str]) -> str:
    domains = list(next(iter(rows.values()))["per_domain"])
    lines = ["mAP@R (%), all-vs-all leave-one-out on each domain's query_db split", "",
             "| model | images per cluster | " + " | ".join(domains) + " | mean |", "|" + "---|" * (len(domains) + 3)]
    for name, res in rows.items():
        cells = [f"{100 * res['per_domain'][d]['map_at_r']:.1f}" for d in domains]
        lines.append(f"| {name} | {images_per_cluster.get(name, '')} | " + " | ".join(cells)
                     + f" | **{100 * res['mean']['map_at_r']:.2f}** |")
    return "\n".join(lines) + "\n"


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
    run_step("snapshot", params)
    run_step("extract", params)
    pool = run_step("cluster", params)["per_k"]
    for k in args.ks:  # sets trained by an earlier call on the same clusters are reused
        if not adaptor_path(params, k).exists():
            run_step("train-adaptor", params, k)

    backbone, preprocess, _ = create_backbone(params.backbone)
    inputs = load_inputs(Path(params.out_dir) / "extract", "query_db", preprocess, train=False,
                         min_side=params.data.min_side, max_pixels=params.data.max_pixels)
    labels = inputs.labels.astype(str)
    rows = {"zero_shot": per_domain_metrics(inputs.zero_shot, inputs.domains, labels)}
    images_per_cluster = {}

    def assembled(model_params):
        return assemble(model_params, backbone, with_fusion=False, load_fusion=False).to(pick_device())

    every_set = assembled(params)  # serves every single-k mode
    models = [(f"single_k_{k}", [k], single(k), every_set) for k in args.ks]
    # a uniform model holds exactly its subset's adaptor sets (UNIFORM averages all the sets it holds)
    models += [("uniform_" + "-".join(map(str, s)), s, UNIFORM, assembled(params_for(s))) for s in subsets]
    for name, ks, mode, model in models:
        vectors, _ = encode(model, inputs.dataset, mode, params.evaluate.batch_size,
                            num_workers=params.extract.num_workers, desc=name)
        rows[name] = per_domain_metrics(vectors, inputs.domains, labels)
        images_per_cluster[name] = " / ".join(f"{pool[str(k)]['mean_size']:.0f}" for k in ks)
        print(f"{name}: mean mAP@R {rows[name]['mean']['map_at_r']:.4f}")
    table = ladder_table(rows, images_per_cluster)
    write_json(args.results_dir / f"ladder_seed{args.seed}.json",
               {"rows": rows, "images_per_cluster": images_per_cluster, "params": params.model_dump()})
    write_text(args.results_dir / f"ladder_seed{args.seed}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
