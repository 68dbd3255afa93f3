"""Quality benchmark: the full method on the multidomain data, several seeds, mean and spread.

    python -m benchmarks.quality                       # 3 seeds, all images, writes results/multidomain.json
    python -m benchmarks.quality --name ablation_no_prop --set fusion.lambda_prop=0

Each seed runs the five steps into ``outputs/bench/<name>/seed<S>`` (extraction is shared through the
content-hash cache, so only the first run pays for it). The JSON follows the schema of the issue:
``{"protocol": {"select": "val", "report": "test", "val_classes": {...}}, "methods": {name: {"per_domain":
{domain: {"map_at_r", "recall_at_1"}}, "mean": {...}}}, "validation": {"methods": ...}, "timings_s",
"params"}``: ``methods`` on the test classes, with ``std`` (over seeds) beside every mean and the
per-seed results.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from grappa.cli import _parse_set, run_all
from grappa.config import load_params
from grappa.core.evaluation import METRICS, markdown_table, method_order, routing_table
from grappa.io.artifacts import read_json, write_json, write_text
from grappa.io.layout import layout

RESULTS = Path(__file__).resolve().parent / "results"
FULL_DATA = {"data.max_unlabeled_per_domain": None, "data.max_query_db_per_domain": None}


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and std over seeds of every (method, domain, metric) cell, plus the mean over domains."""
    methods = {}
    for name in method_order(per_seed[0]["methods"]):
        domains = per_seed[0]["methods"][name]["per_domain"]
        entry = {"per_domain": {}, "mean": {}, "std": {}}
        for domain in domains:
            cells = [run["methods"][name]["per_domain"][domain] for run in per_seed]
            entry["per_domain"][domain] = {m: float(np.mean([c[m] for c in cells])) for m in METRICS}
            entry["per_domain"][domain]["std"] = {m: float(np.std([c[m] for c in cells])) for m in METRICS}
        means = [run["methods"][name]["mean"] for run in per_seed]
        entry["mean"] = {m: float(np.mean([c[m] for c in means])) for m in METRICS}
        entry["std"] = {m: float(np.std([c[m] for c in means])) for m in METRICS}
        methods[name] = entry
    return methods


def markdown(methods: dict, seeds: list[int]) -> str:
    domains = list(next(iter(methods.values()))["per_domain"])
    rows = []
    for name in method_order(methods):  # the JSON keeps its keys sorted
        res = methods[name]
        cells = [f"{100 * res['per_domain'][d]['map_at_r']:.1f} ± {100 * res['per_domain'][d]['std']['map_at_r']:.1f}"
                 for d in domains]
        cells.append(f"**{100 * res['mean']['map_at_r']:.1f}** ± {100 * res['std']['map_at_r']:.1f}")
        cells.append(f"{100 * res['mean']['recall_at_1']:.1f} ± {100 * res['std']['recall_at_1']:.1f}")
        rows.append([name, *cells])
    return markdown_table(f"mAP@R (%) on the test classes, mean ± std over seeds {seeds}; R@1 of the mean in the last "
                          "column (oracle_val: the k best on validation; oracle_test: the k best on test, uses the test labels)",
                          ["method", *domains, "mean mAP@R", "mean R@1"], rows)


def summary(per_seed: list[dict], seeds: list[int], timings: dict, params) -> dict:
    """The results JSON of evaluate's ``metrics.json`` of each seed (in ``seeds`` order)."""
    validated = [r for r in per_seed if "validation" in r]  # seeds measured with the validation split
    return {
        # where choices were made and where the figures come from (evaluate's class-disjoint split)
        "protocol": validated[-1]["protocol"] if len(validated) == len(per_seed) else None,
        "methods": aggregate(per_seed),  # test classes
        "validation": {"methods": aggregate([r["validation"] for r in validated])} if validated else None,
        "timings_s": timings,
        "params": {**params.model_dump(mode="json"), "seed": seeds},
        "seeds": seeds,
        "per_seed": {str(s): r["methods"] for s, r in zip(seeds, per_seed)},
        "per_seed_validation": {str(s): r["validation"]["methods"] for s, r in zip(seeds, per_seed) if "validation" in r},
        "oracle_choice": {str(s): r["oracle_choice"] for s, r in zip(seeds, per_seed)},
        "oracle_test_choice": {str(s): r.get("oracle_test_choice") for s, r in zip(seeds, per_seed)},
        # mean mAP@R of the frozen backbone from extract's float32 features and from the float16 prefix
        "precision_path": {str(s): r.get("precision_path") for s, r in zip(seeds, per_seed)},
        # how the fused model routes (per adapted block) and its mean attention per domain, each seed
        "routing": {str(s): r.get("routing") for s, r in zip(seeds, per_seed)},
        "attention_by_domain": {str(s): r.get("attention_by_domain") for s, r in zip(seeds, per_seed)},
    }


def render(results: dict) -> str:
    """``results/<name>.md`` from ``results/<name>.json``: the test-class table over the seeds, then
    how the first seed's fused model routes (the README's results table is this text, tested)."""
    text = markdown(results["methods"], results["seeds"])
    first = str(results["seeds"][0])
    routing = (results.get("routing") or {}).get(first)
    if routing:
        text += "\n" + routing_table(routing).replace("Routing of", f"Seed {first}: routing of", 1)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="multidomain", help="results file name (and outputs sub-folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep-caps", action="store_true", help="keep params.yaml's per-domain caps (default: all images)")
    parser.add_argument("--add", action="store_true",
                        help="add these seeds to the seeds already in results/<name>.json instead of starting over")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite results/<name>.md from results/<name>.json (no compute)")
    args = parser.parse_args(argv)
    if args.render:
        text = render(json.loads((RESULTS / f"{args.name}.json").read_text()))
        write_text(RESULTS / f"{args.name}.md", text)
        print(text)
        return 0

    overrides = {} if args.keep_caps else dict(FULL_DATA)
    overrides.update(_parse_set(args.set))
    per_seed, timings, done = [], {}, []
    previous = RESULTS / f"{args.name}.json"
    if args.add and previous.exists():  # seeds measured by an earlier invocation with the same params
        old = json.loads(previous.read_text())
        now = load_params(args.params, overrides).model_dump(mode="json")
        if any(old["params"].get(k) != v for k, v in now.items() if k not in ("seed", "out_dir")):
            parser.error(f"--add: {previous} was measured with other params; run without --add to start over")
        for seed in old["seeds"]:
            entry = {"methods": old["per_seed"][str(seed)], "oracle_choice": old["oracle_choice"][str(seed)]}
            if str(seed) in (old.get("per_seed_validation") or {}):  # measured with the validation split
                entry.update(validation={"methods": old["per_seed_validation"][str(seed)]}, protocol=old["protocol"],
                             **{key: (old.get(key) or {}).get(str(seed)) for key in
                                ("oracle_test_choice", "precision_path", "routing", "attention_by_domain")})
            per_seed.append(entry)
            timings[f"seed{seed}"] = old["timings_s"][f"seed{seed}"]
            done.append(seed)
    for seed in [s for s in args.seeds if s not in done]:
        params = load_params(args.params, {**overrides, "seed": seed, "out_dir": f"outputs/bench/{args.name}/seed{seed}"})
        t0 = time.perf_counter()
        steps = run_all(params, until="evaluate")
        timings[f"seed{seed}"] = {**steps, "total": time.perf_counter() - t0}
        per_seed.append(json.loads(layout(params).metrics.read_text()))
        done.append(seed)
        # rewritten after every seed: a long benchmark interrupted later keeps what it measured
        write_json(RESULTS / f"{args.name}.json", summary(per_seed, done, timings, params))
        table = render(read_json(RESULTS / f"{args.name}.json"))
        write_text(RESULTS / f"{args.name}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
