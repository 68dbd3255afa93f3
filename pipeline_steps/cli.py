"""``grappa <step>``: the single entry point used by dvc.yaml, the Airflow DAG and the containers.

User mistakes (bad params, missing inputs, unreadable sources) end with one line on stderr and a
non-zero exit code, never a traceback: 2 params/sources, 3 storage, 4 tracking (MLflow), 130 interrupted.
With tracking on (``tracking:`` in params.yaml, see tracking.py) each step is also recorded as an MLflow
run once its outputs are on disk; ``open-run``/``close-run`` bracket a pipeline run whose steps run apart.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import yaml

from . import tracking
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
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: not a valid YAML value: {str(err).splitlines()[0]}") from None
    return overrides


def _execute(step: str, params: Params, k: int | None = None) -> dict:
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


def run_step(step: str, params: Params, k: int | None = None, tracker=None) -> dict:
    """Run one pure step; with a tracker, record it as an MLflow (child) run *after* its outputs exist."""
    started = time.time()
    try:
        result = _execute(step, params, k)
    except BaseException as err:
        if tracker is not None and not isinstance(err, KeyboardInterrupt):
            with contextlib.suppress(Exception):  # best effort: the step's own error is what matters
                tracker.log_step(step, params, k, started, error=err)
        raise
    if tracker is not None:
        tracker.log_step(step, params, k, started)
        if step == "evaluate" and tracker.parent_from_airflow:
            tracker.close_parent(tracker.parent_run_id)  # the last step of a DAG run closes its parent
    return result


def run_all(params: Params, tracker=None) -> dict[str, float]:
    """The whole pipeline in order on this machine; returns the wall time of each step."""
    timings: dict[str, float] = {}
    for step in STEPS:
        for k in params.cluster.ks if step == "train-adaptor" else [None]:
            name = step if k is None else f"{step}@{k}"
            print(f"==> {name}", flush=True)
            t0 = time.perf_counter()
            run_step(step, params, k, tracker)
            timings[name] = time.perf_counter() - t0
            print(f"<== {name} done in {timings[name]:.1f}s", flush=True)
    return timings


def _run_tracked(params: Params, tracker) -> dict[str, float]:
    """`grappa run`: a parent run around the five steps (closed FAILED if a step fails)."""
    if tracker is None:
        return run_all(params)
    parent = tracker.parent_run_id or tracker.open_parent()
    own_parent = parent != os.environ.get(tracking.ENV_PARENT)
    try:
        timings = run_all(params, tracker)
    except BaseException as err:
        if own_parent:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            with contextlib.suppress(Exception):
                tracker.close_parent(parent, status)
        raise
    if own_parent:
        tracker.close_parent(parent, "FINISHED")
    print(f"tracking: pipeline run {parent} at {tracker.safe_uri}")
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
    opener = sub.add_parser("open-run", help="create the MLflow parent run of a pipeline run and print its id "
                            f"(pass it to the steps as {tracking.ENV_PARENT})")
    opener.add_argument("--name", default=None, help="run name (default: the Airflow run id or a timestamp)")
    closer = sub.add_parser("close-run", help="set the final status and summary metrics of a parent run")
    closer.add_argument("--run-id", default=None, help=f"parent run id (default: ${tracking.ENV_PARENT})")
    closer.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():  # logs (DVC, Airflow, CI): one progress line every 30 s, not every batch
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    try:
        params = load_params(args.params, _parse_set(args.set))
        if args.step == "check":
            print(f"{args.params}: ok")
            return 0
        tracker = tracking.from_params(params)
        if args.step == "open-run":
            print(tracker.open_parent(args.name) if tracker else "")
        elif args.step == "close-run":
            run_id = args.run_id or os.environ.get(tracking.ENV_PARENT)
            if tracker is not None:
                if not run_id:
                    raise ConfigError(f"close-run: pass --run-id or set {tracking.ENV_PARENT}")
                summary = tracker.close_parent(run_id, args.status)
                print(f"tracking: closed {run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(summary.items())))
        elif args.step == "run":
            timings = _run_tracked(params, tracker)
            print("step timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
        else:
            run_step(args.step, params, getattr(args, "k", None), tracker)
    except (ConfigError, SourceError) as err:
        print(f"grappa: error: {err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"grappa: error: {err}", file=sys.stderr)
        return 3
    except tracking.TrackingError as err:
        print(f"grappa: error: {err} (step outputs are kept; GRAPPA_TRACKING=0 runs without tracking)",
              file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("grappa: interrupted; finished artifacts and checkpoints are kept, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
