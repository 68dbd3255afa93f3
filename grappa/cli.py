"""``grappa <verb>``: the single entry point used by dvc.yaml, the Airflow DAG and the containers.

Verbs: the steps (``snapshot`` ... ``index``, as grappa/registry.py declares them; one DVC stage
each, or one per item for a mapped step: ``extract --shard I/N``, ``train-adaptor --k K``, every
item in turn without the option), ``run`` (the whole pipeline through ``dvc repro``), ``repro
STAGE`` (one stage through DVC, as an Airflow task runs it), ``embed`` and ``search`` (use the
model), ``check``, ``open-run``/``close-run`` (MLflow parent runs).

User mistakes (bad params, missing inputs, unreadable sources) end with one line on stderr and a
non-zero exit code, never a traceback: 2 params/sources, 3 storage, 4 tracking (MLflow), 130 interrupted;
``repro`` exits 99 (Airflow's "skipped") when the stage was already up to date.
With tracking on (``tracking:`` in params.yaml, see grappa/tracking/) each step is also recorded as an MLflow
run once its outputs are on disk.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
import uuid
from pathlib import Path

import yaml

from grappa import registry, tracking
from grappa.config import ConfigError, Params, load_params
from grappa.io.sources import SourceError
from grappa.io.storage import StorageError

# CLI verb of every step, in pipeline order (grappa/registry.py declares them)
VERBS = tuple(step.verb for step in registry.STEPS)  # the step verbs, in pipeline order


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


MAX_TOP_K = 10_000  # a search result is printed; more rows than this is a typo, not a query


def _bounded_int(low: int, high: int):
    """An argparse type: an integer in [low, high], else argparse's one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, got {value}")
        return value

    return parse


def _execute(verb: str, params: Params, item=None) -> dict:
    """Run the step's module and write what it returns to the report file the registry declares
    (every step's report is written here, after its other outputs, so a report on disk means done)."""
    from grappa.io.artifacts import write_json
    from grappa.io.layout import layout

    step = registry.step(verb)
    # Imported on use: `grappa --help` and param validation must not pay for torch/faiss.
    module = importlib.import_module(step.module)
    report = module.run(params, item) if step.mapped else module.run(params)
    write_json(step.report_file(layout(params), item), report)
    return report


def run_step(step: str, params: Params, item=None, tracker=None) -> dict:
    """Run one pure step (of a mapped step, one item: a k, a :class:`~grappa.io.layout.Shard`); with a
    tracker, record it as an MLflow (child) run *after* its outputs exist."""
    started = time.time()
    try:
        result = _execute(step, params, item)
    except BaseException as err:
        if tracker is not None and not isinstance(err, KeyboardInterrupt):
            with contextlib.suppress(Exception):  # best effort: the step's own error is what matters
                tracker.log_step(step, params, item, started, error=err)
        raise
    publishes = registry.step(step).publishes
    if publishes:  # this run's model serves until publishing says otherwise (and if tracking fails)
        _record_champion(params)
    decision = tracker.log_step(step, params, item, started) if tracker is not None else None
    if publishes and decision is not None and decision.serves is not None:
        _record_champion(params, decision.serves)
    return result


def _record_champion(params: Params, serves: tuple[str, str, str] | None = None) -> None:
    """champion.json, its one writer: the registered version that serves (publishing's
    ``Decision.serves``), else this run's own model."""
    from grappa.io import servable
    from grappa.io.layout import layout

    if serves is None:
        model = layout(params).model
        serves = (servable.read_config(model)["weights_sha256"], str(model), None)
    servable.write_champion(params, *serves)


def run_all(params: Params, tracker=None, until: str = VERBS[-1]) -> dict[str, float]:
    """The steps in order in this process, without DVC (benchmarks and tests), every item of a mapped
    step in turn; returns each run's seconds by stage name (``extract@0-of-2``, ``train_adaptor@64``, ``cluster``)."""
    timings: dict[str, float] = {}
    for step in registry.STEPS[: VERBS.index(until) + 1]:
        for item in step.items(params):
            name = step.stage_name(item)
            print(f"==> {name}", flush=True)
            t0 = time.perf_counter()
            run_step(step.verb, params, item, tracker)
            timings[name] = time.perf_counter() - t0
            print(f"<== {name} done in {timings[name]:.1f}s", flush=True)
    return timings


def step_items(step: registry.Step, params: Params, given: str | int | None) -> list:
    """The items a step verb runs: the one its option names, or all of them in turn (``[None]`` for
    an unmapped step). A malformed item is a ConfigError (one line, exit 2)."""
    if step.axis is None or given is None:
        return step.items(params)
    try:
        return [step.axis.parse(given)]
    except ValueError as err:
        raise ConfigError(f"--{step.mapped}: {err}") from None


def _run_step_verb(verb: str, params: Params, given, tracker) -> None:
    step = registry.step(verb)
    _check_as_dvc_stage(params)
    items = step_items(step, params, given)
    for item in items:
        if len(items) > 1:
            print(f"==> {step.stage_name(item)}", flush=True)
        run_step(verb, params, item, tracker)


def _check_as_dvc_stage(params: Params) -> None:
    """As a stage of `dvc repro` or `dvc exp run` (DVC sets DVC_ROOT): refuse params that dvc.yaml
    does not spell out yet (data.sources' roots, extract.shards), which `dvc exp run -S` cannot
    change, before any work; what DVC templates from params.yaml (cluster.ks) passes."""
    if not os.environ.get("DVC_ROOT"):
        return
    from grappa import workspace

    # DVC runs a stage in its dvc.yaml's folder (DVC_ROOT is the repo's root, or an outer run's)
    here = Path.cwd()
    if not (here / "dvc.yaml").is_file():
        return
    problem = workspace.drift(here, params)
    if problem:
        raise ConfigError(f"{problem}. `dvc exp run -S` cannot change this: run 'grappa run --set KEY=VALUE', "
                          "or edit params.yaml, 'grappa prepare', then 'dvc exp run'")


# --------------------------------------------------------------------------- through DVC


def _workspace() -> Path:
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file():
        raise ConfigError(f"no dvc.yaml in {root}: run this from the project folder")
    return root


def _run_pipeline(params: Params) -> int:
    """`grappa run`: `dvc repro` of the whole pipeline, one MLflow parent run around the stages that ran."""
    from grappa import workspace

    started = time.perf_counter()
    root = _workspace()
    with workspace.exclusive(root, "a 'grappa run'"):
        return _run_pipeline_held(root, params, started)


def _run_pipeline_held(root: Path, params: Params, started: float) -> int:
    from grappa import workspace

    workspace.prepare(root, params)
    tracker = tracking.from_params(params)
    env = {}
    if tracker is not None:  # the first stage that runs opens the parent; none runs: no empty MLflow run
        env[tracking.ENV_RUN_KEY] = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    result = workspace.repro(root, env=env)
    parent = tracker.find_parent(env[tracking.ENV_RUN_KEY]) if tracker is not None else None
    if parent is not None:
        tracker.close_parent(parent, "FINISHED" if result.returncode == 0 else "FAILED")
        print(f"tracking: pipeline run {parent} at {tracker.safe_uri}")
    if result.returncode != 0:
        print(f"grappa: error: dvc repro failed (exit {result.returncode}); see the stage output above",
              file=sys.stderr)
        return 1
    if result.ran:
        print("step timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in result.ran.items()))
        print(f"wall time (s): {time.perf_counter() - started:.1f}")
    if result.skipped:
        print(f"up to date (skipped): {', '.join(result.skipped)}")
    if not result.ran and not result.restored:
        print("nothing to do: data, params and code are unchanged since the last run (dvc.lock)")
    return 0


def _repro_stage(params: Params, stage: str, pinned: str | None = None, pull: bool = False) -> int:
    """`grappa repro STAGE`: one stage through DVC; exit 99 when DVC found it up to date. With
    ``pinned`` (the sha256 of params.yaml its Airflow run planned with), other params are refused."""
    from grappa import workspace

    root = _workspace()
    workspace.check_pinned(root, pinned)
    # the stages dvc.yaml spells out from params.yaml: the data roots they watch, the shards they run
    if stage in workspace.watched_roots(params) or stage.partition("@")[0] in workspace.SHARD_DEPENDENT:
        problem = workspace.drift(root, params)
        if problem:
            raise ConfigError(problem)
    result = workspace.repro(root, stage=stage, pull=pull)
    if result.returncode != 0:
        print(f"grappa: error: stage '{stage}' failed (dvc exit {result.returncode})", file=sys.stderr)
        return 1
    if stage in result.skipped:
        print(f"grappa: stage '{stage}' is up to date: its data, params and code are unchanged since dvc.lock")
        return workspace.UP_TO_DATE_EXIT
    return 0


def _start_run(args, overrides: dict) -> int:
    """`grappa start-run NAME`: the run's params on its experiment ref (what the DAG's plan task does)."""
    from grappa import experiments, workspace

    root = _workspace()
    name = experiments.run_name(args.name)
    with workspace.exclusive(root, f"the start of run {name}", wait=True):
        experiments.start(root, name, lambda: load_params(args.params, overrides), args.baseline)
    return 0


def _task(args, overrides: dict) -> int:
    """`grappa task STAGE --run NAME`: one stage of a run in this workspace, by the contract every runner
    keeps (grappa/experiments.py); exit 99 when the stage is up to date."""
    from grappa import experiments, workspace

    if overrides:
        raise ConfigError("task runs on the params its run committed; pass --set to 'grappa start-run'")
    root = _workspace()
    name = experiments.run_name(args.run)
    with workspace.exclusive(root, f"task {args.stage} of run {name}", wait=True):
        ref = experiments.checkout_run(root, name)
        params = load_params(args.params, {})
        experiments.pull_inputs(root, args.stage)
        code = _repro_stage(params, args.stage, pull=True)
        if code == 0:
            experiments.publish(root, name, ref, args.stage, params)
    return code


# --------------------------------------------------------------------------- parser


# `grappa --help` lists the verbs in these groups; open-run and close-run are the DAG's plumbing, not listed
HELP_GROUPS = {
    "run the pipeline": ("run", *VERBS, "repro"),
    "run across workers": ("start-run", "task"),
    "use the model": ("embed", "search", "serve"),
    "admin": ("check", "prepare"),
}
EXAMPLES = """\
examples:
  grappa run                                 adapt the model to the images of params.yaml's data.sources
  grappa run --set cluster.ks=[256,1024]     the same with other granularities (reruns what they change)
  grappa search query.jpg --top-k 10         the 10 catalogue images nearest to query.jpg
  grappa serve --port 8000                   visual search in a browser at http://127.0.0.1:8000/
  grappa check                               validate params.yaml and dvc.yaml before a long run"""


def _verb_listing(summaries: dict[str, str]) -> str:
    width = max(len(name) for names in HELP_GROUPS.values() for name in names) + 2
    blocks = []
    for title, names in HELP_GROUPS.items():
        blocks.append(f"{title}:\n" + "\n".join(f"  {name:<{width}}{summaries[name]}" for name in names))
    return "\n\n".join(blocks)


def build_parser() -> argparse.ArgumentParser:
    from grappa import __version__

    # --params/--set work before or after the verb (`grappa --params p.yaml check` = `grappa check --params p.yaml`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", dest="params_after", default=None, metavar="FILE",
                        help="params file (default: params.yaml)")
    common.add_argument("--set", dest="set_after", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set cluster.ks=[8,32] (repeatable)")
    parser = argparse.ArgumentParser(
        prog="grappa", usage="grappa [--params FILE] [--set KEY=VALUE] <verb> [options]",
        description="Adapt one image-retrieval model to many domains from unlabeled images (Grappa), and use it.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", metavar="FILE", help="params file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set cluster.ks=[8,32] (repeatable)")
    parser.add_argument("--version", action="version", version=f"grappa {__version__}")
    sub = parser.add_subparsers(dest="step", required=True, metavar="<verb>", help=argparse.SUPPRESS, prog="grappa")
    summaries: dict[str, str] = {}

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        summaries[name] = help
        return sub.add_parser(name, description=help, parents=[common])

    for step in registry.STEPS:
        parser_of_step = verb(step.verb, help=step.summary)
        if step.axis is not None:  # parsed by step_items: a malformed item is a one-line error
            parser_of_step.add_argument(f"--{step.mapped}", dest="item", default=None, metavar=step.axis.metavar,
                                        help=step.axis.help)
    verb("run", help="the whole pipeline through dvc repro (reruns only what changed)")
    repro = verb("repro", help="one DVC stage (what an Airflow task runs); exit 99 if up to date")
    repro.add_argument("stage", help="a dvc.yaml stage, e.g. cluster, extract@0-of-2 or train_adaptor@64")
    repro.add_argument("--params-sha256", default=None, metavar="SHA256",
                       help="refuse to run unless params.yaml has this sha256 (the one its Airflow run pinned)")
    starter = verb("start-run", help="start a pipeline run on a git remote, as a DVC experiment its tasks "
                   "commit to (what the DAG's plan task does)")
    starter.add_argument("name", help="the run's name, e.g. the Airflow run id")
    starter.add_argument("--baseline", default=None, metavar="REV",
                         help="the commit of the remote the run starts from (default: the remote's HEAD)")
    task = verb("task", help="one stage of a started run in this workspace: pull inputs, dvc repro, push; "
                "exit 99 if up to date")
    task.add_argument("stage", help="a dvc.yaml stage, e.g. cluster, extract@0-of-2 or train_adaptor@64")
    task.add_argument("--run", required=True, help="the run's name, as given to start-run")
    embed = verb("embed", help="embeddings of images (folders, manifests, s3:// prefixes) as Parquet")
    embed.add_argument("sources", nargs="+", help="image sources, like data.sources")
    embed.add_argument("--out", required=True, help="Parquet file to write")
    embed.add_argument("--model", default=None, help="model folder or models:/name@alias (default: the champion)")
    search = verb("search", help="nearest catalogue images of query images")
    search.add_argument("images", nargs="+", help="query image paths or s3:// URIs")
    search.add_argument("--top-k", type=_bounded_int(1, MAX_TOP_K), default=5, metavar="K",
                        help=f"neighbours per query, 1 to {MAX_TOP_K} (default 5)")
    search.add_argument("--index", default=None, help="index folder (default: <out_dir>/index)")
    search.add_argument("--model", default=None, help="model to embed the queries with (default: the index's own)")
    search.add_argument("--html", default=None, metavar="FILE",
                        help="also write a page of the queries and their neighbours as thumbnails (self-contained)")
    serve = verb("serve", help="visual search in a browser (an upload page) and as a JSON API, on 127.0.0.1")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_bounded_int(0, 65535), default=8000, help="port (default 8000)")
    serve.add_argument("--index", default=None, help="index folder (default: <out_dir>/index)")
    serve.add_argument("--model", default=None, help="model to embed the queries with (default: the index's own)")
    verb("check", help="validate params.yaml, and that dvc.yaml is as generated, watching the sources' folders")
    verb("prepare", help="write --params/--set into params.yaml and the sources' folders into dvc.yaml "
                         "(run and the Airflow DAG do it themselves)")
    opener = verb("open-run", help="create the MLflow parent run of a pipeline run and print its id "
                  f"(pass it to the steps as {tracking.ENV_PARENT})")
    opener.add_argument("--name", default=None, help="run name (default: the Airflow run id or a timestamp)")
    closer = verb("close-run", help="set the final status and summary metrics of a parent run")
    closer.add_argument("--run-id", default=None, help=f"parent run id (default: ${tracking.ENV_PARENT})")
    closer.add_argument("--run-key", default=None, help=f"or the pipeline run key (default: ${tracking.ENV_RUN_KEY} "
                        "or, under Airflow, the DAG run id)")
    closer.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    parser.epilog = f"{_verb_listing(summaries)}\n\n'grappa <verb> --help' tells more of a verb.\n\n{EXAMPLES}"
    return parser


def _check(params: Params, args) -> int:
    """What would fail later, now: the params, the sources, the backbone's weights, the index settings, dvc.yaml."""
    from grappa import workspace
    from grappa.core.backbones import create_backbone
    from grappa.io import catalogue

    print(f"{args.params}: ok")
    root = Path.cwd()
    workspace.check_sources_exist(root, params)
    print("sources: every local folder or manifest of data.sources and index.sources is there")
    backbone, _, _ = create_backbone(params.backbone)
    dim = backbone.embed_dim
    catalogue.check(params.index.factory, params.index.search_params, dim)
    print(f"backbone {params.backbone.name} (weights: {params.backbone.weights}): {dim}-d embeddings; index.factory "
          f"'{params.index.factory}'" + (f" with '{params.index.search_params}'" if params.index.search_params else "")
          + " applies")
    # dvc.yaml must agree with the params file it runs (this folder's params.yaml), not with any other
    if (root / "dvc.yaml").is_file() and Path(args.params).resolve() == (root / "params.yaml").resolve():
        problem = workspace.drift(root, params)
        if problem:
            raise ConfigError(problem)
        print("dvc.yaml: as grappa/registry.py generates it, watching the data roots of the sources")
    return 0


def _close_run(tracker, args) -> int:
    if tracker is None:
        return 0
    run_id = args.run_id or os.environ.get(tracking.ENV_PARENT)
    key = args.run_key or tracking.pipeline_run_key()
    if not run_id and key:
        run_id = tracker.find_parent(key)
        if run_id is None:
            print(f"tracking: no step of pipeline run '{key}' was recorded (nothing ran); nothing to close")
            return 0
    if not run_id:
        raise ConfigError(f"close-run: pass --run-id or --run-key, or set {tracking.ENV_PARENT}")
    summary = tracker.close_parent(run_id, args.status)
    print(f"tracking: closed {run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(summary.items())))
    return 0


def _dispatch(args, params: Params) -> int:
    if args.step == "check":
        return _check(params, args)
    if args.step == "run":
        return _run_pipeline(params)
    if args.step == "prepare":
        from grappa import workspace

        root = _workspace()
        with workspace.exclusive(root, "a 'grappa prepare'"):
            workspace.prepare(root, params)
            # read while the workspace is still held: what an Airflow run pins its tasks to
            print(f"{workspace.PINNED_PREFIX}{workspace.params_sha256(root)}")
        return 0
    if args.step == "repro":
        return _repro_stage(params, args.stage, args.params_sha256)
    if args.step in ("embed", "search"):
        from grappa import use

        if args.step == "embed":
            use.embed_command(params, args.sources, args.out, args.model)
        else:
            use.search_command(params, args.images, args.top_k, args.index, args.model, args.html)
        return 0
    if args.step == "serve":
        from grappa import serve

        serve.serve_command(params, args.host, args.port, args.index, args.model)
        return 0
    tracker = tracking.from_params(params)
    if args.step == "open-run":
        print(tracker.open_parent(args.name) if tracker else "")
    elif args.step == "close-run":
        return _close_run(tracker, args)
    else:
        _run_step_verb(args.step, params, getattr(args, "item", None), tracker)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.params = args.params_after or args.params
    if not sys.stderr.isatty():  # logs (DVC, Airflow, CI): one progress line every 30 s, not every batch
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    try:
        overrides = _parse_set(args.set + args.set_after)
        if args.step in ("start-run", "task"):  # the params are the run's, read once it is checked out
            return (_start_run if args.step == "start-run" else _task)(args, overrides)
        params = load_params(args.params, overrides)
        return _dispatch(args, params)
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


if __name__ == "__main__":
    sys.exit(main())
