"""Incremental adaptation against a full retrain, on the bundled data: cost and quality.

    python -m benchmarks.incremental                  # seeds 0 1 2: writes results/incremental.json and .md
    python -m benchmarks.incremental --arms full increment   # then --arms chain: finished runs are read back

Per seed, on the demo's unlabeled pool (params.yaml's sources and per-domain caps; the query_db
images are the same in every run, so every model is scored on the same validation and test classes):

- ``increment``: a full run on the pool without a seeded ``--held`` share (10%), then those images land
  and the next run is incremental (``adapt.mode: auto`` picks it: the champion of the first run has
  the same recipe, the new share is below ``adapt.max_new_share``);
- ``full``: a full retrain on the whole pool (``adapt.mode: full``);
- ``chain``: a full run without ``--chain-steps`` x ``--chain-share`` of the pool, then the chunks land
  one at a time, each run incremental from the champion of the one before. The chunks default to
  ``--held`` / ``--chain-steps`` (5 x 2%): the chain starts from the increment's pool and ends on the
  full retrain's. (5 x 5% would start from 75% of the demo pool, 1,725 images, fewer than
  k = 2048 of the shipped recipe.)

Each arm runs in ``outputs/bench/<name>/seed<S>/<arm>`` (``--name``, default ``incremental``; a name holds
the runs of one set of settings, another is refused) with its own MLflow registry (a sqlite DB
there), the pipeline in-process (``run_all``) with tracking on as in production. The sources of each
run are manifests written beside hard links of the images (``outputs/bench/incremental/data``): the
image ids are the demo's, so the content-hash feature cache is shared and extraction is paid once.

``seconds_ratio`` is the incremental run's adaptation (warm-start, cluster, the adaptor sets, fusion)
over the full retrain's, both measured on this machine (by one invocation, or by several with
``--arms``: the runs record their load average); ``total_ratio`` includes snapshot, extraction and
evaluate (the full arm runs first and pays any cold feature cache). An increment whose run fell back
to full is listed in ``runs`` but left out of the means. ``map_at_r_diff`` is incremental minus
full, test classes, mean over domains, in points (validation beside it); the chain's last run may have
stayed ``candidate``, so ``serving_map_at_r_diff`` scores the version that serves at its end. Every
finished run writes its figures to ``<arm>/run<i>.json`` at once, and the results files are rewritten
after each: an interrupted benchmark resumes where it stopped (an arm whose run was cut mid-way
restarts that arm).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from grappa import tracking
from grappa.cli import _parse_set, run_all
from grappa.config import Params, load_params
from grappa.core.evaluation import markdown_table
from grappa.io.artifacts import read_json, write_json, write_text
from grappa.io.champion import run_mode
from grappa.io.layout import WARM_DECISION, layout
from pipeline_steps.snapshot import select_records

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path("outputs/bench")  # each --name runs in ROOT/<name>; the images are linked once, in DATA
DATA = ROOT / "incremental" / "data"
ARMS = ("full", "increment", "chain")  # in the order they run: the increment and the chain compare with full
ADAPTATION = ("warm_start", "cluster", "train_adaptor", "train_fusion")  # stage names, before any "@"
TARGETS = {"seconds_ratio": 0.25, "increment_map_at_r_diff": -0.3, "chain_map_at_r_diff": -0.5}


# --------------------------------------------------------------------------- data


def link_images(records: list, data: Path) -> dict[str, str]:
    """Hard links of every image under ``data/<domain>/``, named by its image id; {image_id: path in manifests}."""
    paths = {}
    for rec in records:
        rel = rec.image_id.split("/", 1)[1]
        target = data / rec.domain / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(rec.uri, target)
            except OSError:  # another filesystem
                shutil.copy2(rec.uri, target)
        paths[rec.image_id] = rel
    return paths


def write_manifests(records: list, paths: dict[str, str], data: Path, name: str) -> list[str]:
    """One manifest per domain of ``records`` at ``data/<domain>/<name>.csv``; their paths."""
    by_domain: dict[str, list] = {}
    for rec in records:
        by_domain.setdefault(rec.domain, []).append(rec)
    out = []
    for domain, recs in sorted(by_domain.items()):
        path = data / domain / f"{name}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "domain", "class_id", "split"])
            writer.writerows([paths[r.image_id], domain, r.label or "", r.split] for r in recs)
        out.append(str(path))
    return out


def splits(records: list, seed: int, held: float, chain_steps: int, chain_share: float) -> dict[str, list]:
    """The runs' sources as record lists, from one seeded order of the unlabeled pool: base / grown for the
    increment, the chain's start and its chunks."""
    labelled = [r for r in records if r.split != "unlabeled"]
    unlabeled = sorted((r for r in records if r.split == "unlabeled"), key=lambda r: r.image_id)
    order = [unlabeled[i] for i in np.random.default_rng(seed).permutation(len(unlabeled))]
    n_held, n_chunk = round(held * len(order)), round(chain_share * len(order))
    chain_start = len(order) - chain_steps * n_chunk
    return {"increment": [labelled + order[:len(order) - n_held], labelled + order],
            "full": [labelled + order],
            "chain": [labelled + order[:chain_start + i * n_chunk] for i in range(chain_steps + 1)]}


# --------------------------------------------------------------------------- runs


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """``values`` in os.environ for the block, the previous values (or none) restored after it."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_once(params: Params, name: str) -> dict:
    """The pipeline up to evaluate with tracking on (a parent run per run, as `grappa run`); its figures."""
    tracker = tracking.Tracker(params)
    tracker.parent_run_id = tracker.open_parent(name)
    t0 = time.perf_counter()
    ok = False
    try:
        timings = run_all(params, tracker, until="evaluate")
        ok = True
    finally:
        tracker.close_parent(tracker.parent_run_id, "FINISHED" if ok else "FAILED")
    out = layout(params)
    metrics, decision = read_json(out.evaluation), read_json(out.path(WARM_DECISION))
    adaptation = sum(s for stage, s in timings.items() if stage.split("@")[0] in ADAPTATION)
    # the version that serves after this run: its own when the gate promoted it, else the champion before it
    serves = read_json(out.champion).get("version")
    return {"mode": run_mode(params)["mode"], "decision": decision, "serves": serves,
            "test_map_at_r": metrics["methods"]["grappa"]["mean"]["map_at_r"],
            "val_map_at_r": metrics["validation"]["methods"]["grappa"]["mean"]["map_at_r"],
            "adaptation_s": adaptation, "total_s": time.perf_counter() - t0, "timings_s": timings,
            "load_average": os.getloadavg()}


def finished(root: Path, arm: str, seed: int, runs: int) -> list[dict]:
    """The arm's runs an earlier invocation finished in ``root``, in order, up to the first missing one."""
    done = []
    for i in range(runs):
        result = root / f"seed{seed}" / arm / f"run{i}.json"
        if not result.exists():
            break
        done.append(read_json(result))
    return done


def run_arm(base: dict, arm: str, sources: list[list[str]], seed: int, full: bool) -> list[dict]:
    """The arm's runs in order, each read back when an earlier invocation finished it."""
    folder = base["root"] / f"seed{seed}" / arm
    done = finished(base["root"], arm, seed, len(sources))
    for i, run_sources in enumerate(sources[len(done):], start=len(done)):
        result = folder / f"run{i}.json"
        if (folder / f"run{i}.started").exists():  # cut mid-way: its outputs and registry are half-updated
            print(f"{arm} seed {seed}: run {i} was interrupted; the arm starts over")
            shutil.rmtree(folder)
            return run_arm(base, arm, sources, seed, full)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"run{i}.started").touch()
        params = load_params(base["params"], {**base["overrides"], "seed": seed, "out_dir": str(folder / "outputs"),
                                              "data.sources": run_sources, "data.max_unlabeled_per_domain": None,
                                              "data.max_query_db_per_domain": None,
                                              "adapt.mode": "full" if full else "auto",
                                              "tracking.enabled": True})
        print(f"==== {arm} seed {seed}: run {i + 1} of {len(sources)}", flush=True)
        # the arm's own registry (artifacts beside it): its champion is what the next run warm-starts from
        # (mlflow exports the registry URI it was last given: set both)
        db = f"sqlite:///{(folder / 'mlflow.db').resolve()}"
        with environment({"MLFLOW_TRACKING_URI": db, "MLFLOW_REGISTRY_URI": db, tracking.ENV_SWITCH: "1"}):
            figures = run_once(params, f"bench {arm} seed {seed} run {i}")
        print(f"==== {arm} seed {seed}: run {i + 1}: {figures['mode']}, test mAP@R {100 * figures['test_map_at_r']:.2f}, "
              f"adaptation {figures['adaptation_s']:.0f} s", flush=True)
        write_json(result, figures)
        done.append(figures)
    return done


# --------------------------------------------------------------------------- results


def summarise(per_seed: dict[int, dict], settings: dict) -> dict:
    """results/incremental.json: the issue's keys (increment.seconds_ratio and map_at_r_diff, chain.map_at_r_diff,
    seeds) as means over the seeds where both sides finished, and every run's figures."""
    increment, chain = {}, {}
    for seed, arms in per_seed.items():
        if not arms.get("full"):
            continue
        full = arms["full"][0]
        # an increment that fell back to full is kept in "runs" but is no incremental figure
        if len(arms.get("increment", [])) == 2 and arms["increment"][1]["mode"] == "incremental":
            inc = arms["increment"][1]
            increment[seed] = {"seconds_ratio": inc["adaptation_s"] / full["adaptation_s"],
                               "total_ratio": inc["total_s"] / full["total_s"],
                               "map_at_r_diff": 100 * (inc["test_map_at_r"] - full["test_map_at_r"]),
                               "val_map_at_r_diff": 100 * (inc["val_map_at_r"] - full["val_map_at_r"]),
                               "mode": inc["mode"]}
        if len(arms.get("chain", [])) == settings["chain_steps"] + 1:
            last = arms["chain"][-1]
            # the arm has a registry of its own: run i registered version i + 1
            serving = arms["chain"][int(last["serves"]) - 1] if last.get("serves") else None  # None: not recorded
            chain[seed] = {"map_at_r_diff": 100 * (last["test_map_at_r"] - full["test_map_at_r"]),
                           "val_map_at_r_diff": 100 * (last["val_map_at_r"] - full["val_map_at_r"]),
                           "serving_map_at_r_diff": None if serving is None else
                           100 * (serving["test_map_at_r"] - full["test_map_at_r"]),
                           "serves": last.get("serves"),
                           "modes": [run["mode"] for run in arms["chain"]],
                           "seconds_ratio": float(np.mean([r["adaptation_s"] for r in arms["chain"][1:]])) / full["adaptation_s"]}

    def mean(rows: dict, key: str) -> float | None:
        values = [r[key] for r in rows.values() if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    def spread(rows: dict, key: str) -> float | None:
        return float(np.std([r[key] for r in rows.values()])) if rows else None

    return {
        "increment": {"seconds_ratio": mean(increment, "seconds_ratio"), "total_ratio": mean(increment, "total_ratio"),
                      "map_at_r_diff": mean(increment, "map_at_r_diff"), "map_at_r_diff_std": spread(increment, "map_at_r_diff"),
                      "val_map_at_r_diff": mean(increment, "val_map_at_r_diff"), "seeds": sorted(increment),
                      "per_seed": {str(s): v for s, v in increment.items()}},
        "chain": {"map_at_r_diff": mean(chain, "map_at_r_diff"), "map_at_r_diff_std": spread(chain, "map_at_r_diff"),
                  "serving_map_at_r_diff": mean(chain, "serving_map_at_r_diff"),
                  "val_map_at_r_diff": mean(chain, "val_map_at_r_diff"), "seconds_ratio": mean(chain, "seconds_ratio"),
                  "seeds": sorted(chain), "per_seed": {str(s): v for s, v in chain.items()}},
        "seeds": sorted(set(increment) | set(chain)),
        "targets": TARGETS,
        "settings": settings,
        "runs": {str(s): arms for s, arms in per_seed.items()},
    }


def render(results: dict) -> str:
    def cell(value, fmt):
        return "–" if value is None else format(value, fmt)

    inc, chain = results["increment"], results["chain"]
    rows = [["increment (+{:.0%})".format(results["settings"]["held"]), cell(inc["seconds_ratio"], ".3f"),
             cell(inc["total_ratio"], ".3f"), cell(inc["map_at_r_diff"], "+.2f"), cell(inc["val_map_at_r_diff"], "+.2f"),
             ", ".join(map(str, inc["seeds"])) or "–"],
            ["chain ({} x +{:.0%})".format(results["settings"]["chain_steps"], results["settings"]["chain_share"]),
             cell(chain["seconds_ratio"], ".3f"), "–", cell(chain["map_at_r_diff"], "+.2f"),
             cell(chain["val_map_at_r_diff"], "+.2f"), ", ".join(map(str, chain["seeds"])) or "–"],
            ["chain: the version that serves at its end", "–", "–", cell(chain.get("serving_map_at_r_diff"), "+.2f"), "–",
             ", ".join(map(str, chain["seeds"])) or "–"]]
    return markdown_table("Incremental run against a full retrain on the same grown pool (mean over seeds; "
                          "targets: seconds ratio < 0.25, test mAP@R diff > -0.3 points, chain > -0.5)",
                          ["run", "adaptation seconds ratio", "whole-run seconds ratio", "test mAP@R diff (points)",
                           "val mAP@R diff (points)", "seeds"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--held", type=float, default=0.10, help="share of the pool that lands in the increment")
    parser.add_argument("--chain-steps", type=int, default=5)
    parser.add_argument("--chain-share", type=float, default=None,
                        help="share of the pool each chain step lands (default: --held / --chain-steps)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS,
                        help="the arms to run (the others' finished runs are read back)")
    parser.add_argument("--name", default="incremental",
                        help="results file name; the runs go to outputs/bench/<name>")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.chain_share is None:
        args.chain_share = args.held / args.chain_steps
    overrides = _parse_set(args.set)
    params = load_params(args.params, overrides)
    records = select_records(params)[0]  # the demo's images, as its snapshot picks them
    paths = link_images(records, DATA)
    settings = {"held": args.held, "chain_steps": args.chain_steps, "chain_share": args.chain_share,
                "adapt": params.adapt.model_dump(), "images": len(records),
                "unlabeled": sum(r.split == "unlabeled" for r in records), "cpu_count": os.cpu_count(),
                **({"overrides": overrides} if overrides else {})}  # --set changes the runs as much as --held
    base = {"params": args.params, "overrides": overrides, "root": ROOT / args.name}
    # finished runs are read back by seed and arm: runs of other settings must not be taken for these
    recorded_settings = base["root"] / "settings.json"
    if recorded_settings.exists() and read_json(recorded_settings) != settings:
        parser.error(f"{base['root']} holds runs of other settings ({recorded_settings}): "
                     "give another --name, or remove that folder")
    write_json(recorded_settings, settings)
    runs = {seed: splits(records, seed, args.held, args.chain_steps, args.chain_share) for seed in args.seeds}
    # every seed's finished runs first: a results file written mid-way (or by a run cut short) holds them
    # all, not only the seeds this invocation has reached. Runs whose outputs are gone (a fresh clone) are
    # read from the results file when it was written with the same settings.
    results_file = args.results_dir / f"{args.name}.json"
    committed = read_json(results_file) if results_file.exists() else {}
    recorded = committed.get("runs", {}) if committed.get("settings") == settings else {}
    per_seed = {seed: {arm: finished(base["root"], arm, seed, len(runs[seed][arm])) or recorded.get(str(seed), {}).get(arm, [])
                       for arm in ARMS} for seed in args.seeds}
    results = summarise(per_seed, settings)
    for seed in args.seeds:
        for arm in (arm for arm in ARMS if arm in args.arms):
            sources = [write_manifests(recs, paths, DATA, f"{args.name}_seed{seed}_{arm}_{i}") for i, recs in enumerate(runs[seed][arm])]
            per_seed[seed][arm] = run_arm(base, arm, sources, seed, full=arm == "full")
            results = summarise(per_seed, settings)
            write_json(results_file, results)
            write_text(args.results_dir / f"{args.name}.md", render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
