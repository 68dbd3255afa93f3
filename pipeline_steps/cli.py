"""``grappa <step>``: the single entry point used by dvc.yaml, the Airflow DAG and the containers.

User mistakes (bad params, missing inputs, unreadable sources) end with one line on stderr and a
non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
import time

import yaml

from .config import ConfigError, Params, load_params
from .data import SourceError
from .storage import StorageError

STEPS = ("extract", "cluster", "train-adaptor", "train-fusion", "evaluate")


def _parse_set(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        overrides[key] = yaml.safe_load(value)
    return overrides


def run_step(step: str, params: Params, k: int | None = None) -> dict:
    # Imports stay inside: `grappa --help` and param validation must not pay for torch/faiss.
    if step == "extract":
        from .extract import run
    elif step == "cluster":
        from .cluster import run
    elif step == "train-adaptor":
        from .train_adaptor import run

        return run(params, k)
    elif step == "train-fusion":
        from .train_fusion import run
    else:
        from .evaluate import run
    return run(params)


def run_all(params: Params) -> dict[str, float]:
    """The whole pipeline in order on this machine; returns the wall time of each step."""
    timings: dict[str, float] = {}
    for step in STEPS:
        for k in params.cluster.ks if step == "train-adaptor" else [None]:
            name = step if k is None else f"{step}@{k}"
            print(f"==> {name}", flush=True)
            t0 = time.perf_counter()
            run_step(step, params, k)
            timings[name] = time.perf_counter() - t0
            print(f"<== {name} done in {timings[name]:.1f}s", flush=True)
    return timings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grappa", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set cluster.ks=[8,32] (repeatable)")
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("extract", help="step 1: frozen backbone features (cached by content hash)")
    sub.add_parser("cluster", help="step 2: spherical k-means at every k")
    train = sub.add_parser("train-adaptor", help="step 3: one adaptor set on the k pseudo-labels")
    train.add_argument("--k", type=int, required=True)
    sub.add_parser("train-fusion", help="step 4: granularity fusion on neighbour pairs")
    sub.add_parser("evaluate", help="step 5: retrieval metrics, table and plots")
    sub.add_parser("run", help="all five steps in order, locally")
    sub.add_parser("check", help="validate params.yaml and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params, _parse_set(args.set))
        if args.step == "check":
            print(f"{args.params}: ok")
        elif args.step == "run":
            timings = run_all(params)
            print("step timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
        else:
            run_step(args.step, params, getattr(args, "k", None))
    except (ConfigError, SourceError) as err:
        print(f"grappa: error: {err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"grappa: error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("grappa: interrupted; finished artifacts and checkpoints are kept, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
