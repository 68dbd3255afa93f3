"""What one ``grappa_pipeline`` run does: the step commands for its conf and runner, the workspace
preparation and ``dvc status`` (local runner), and the asset events that triggered it.

Imported by the DAG processor on every parse: standard library + yaml at module level.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

import runners
import watchers


def _params_file(conf: dict) -> str | None:
    """The run's params file: the conf's ``params_file`` (a file inside the workspace: whoever
    triggers a run names it), else env GRAPPA_PARAMS (the deployment's), else none."""
    name = conf.get("params_file")
    if name:
        if not isinstance(name, str) or "\x00" in name:
            raise ValueError(f"run conf params_file must be a path inside the workspace, got {name!r}")
        inside = runners.REPO.resolve()
        if not (inside / name).resolve().is_relative_to(inside):
            raise ValueError(f"run conf params_file {name!r} is outside the workspace {inside}")
        return name
    return os.environ.get("GRAPPA_PARAMS") or None


def _sources(conf: dict) -> list[str]:
    """The run conf's ``sources``, each checked as params.yaml checks them (one line, paths or s3://)."""
    from grappa.config import check_source  # at task time, on a worker holding the workspace

    sources = conf["sources"]
    if isinstance(sources, str) or not isinstance(sources, list):
        raise ValueError(f"run conf sources must be a list of paths or s3:// URIs, got {sources!r}")
    return [check_source(source) for source in sources]


def override_args(conf: dict) -> list[str]:
    """The run conf as CLI options: ``params_file`` (else env GRAPPA_PARAMS), ``sources``, ``ks``, ``shards``."""
    argv = []
    params_file = _params_file(conf)
    if params_file:
        argv += ["--params", str(params_file)]
    if conf.get("sources"):
        argv += ["--set", "data.sources=" + json.dumps(_sources(conf))]
    if conf.get("ks"):
        argv += ["--set", "cluster.ks=" + json.dumps([int(k) for k in conf["ks"]])]
    if conf.get("shards") is not None:
        argv += ["--set", f"extract.shards={int(conf['shards'])}"]
    return argv


def _file_params(conf: dict, missing: str) -> dict:
    """The run's params file as a dict; ``missing`` names the conf key that would have spared reading it."""
    path = runners.REPO / (_params_file(conf) or "params.yaml")
    if not path.is_file():
        raise ValueError(f"{path} not readable from the Airflow worker: pass '{missing}' in the run conf")
    return yaml.safe_load(path.read_text()) or {}


def planned_ks(conf: dict) -> list[int]:
    ks = conf.get("ks")
    if not ks:
        ks = (_file_params(conf, "ks").get("cluster") or {}).get("ks")
    ks = sorted(int(k) for k in ks or [])
    # Fail here, before any step starts, on what the CLI would reject anyway.
    if len(ks) < 2 or len(set(ks)) != len(ks) or ks[0] < 2:
        raise ValueError(f"cluster.ks must hold at least two distinct values >= 2, got {ks}")
    return ks


def planned_shards(conf: dict) -> int:
    """How many parts extract runs as: the conf's ``shards``, else the params file's extract.shards (1 if unset)."""
    shards = conf.get("shards")
    if shards is None:
        shards = (_file_params(conf, "shards").get("extract") or {}).get("shards", 1)
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"extract.shards must be an integer >= 1, got {shards!r}")
    return shards


def plan(conf: dict, runner: str, run_id: str | None = None) -> dict:
    """The command of every step for this run, in the runner's format; a mapped step (``runners.MAPPED``)
    has a list, one command per item (per shard of ``shards``, per k of ``ks``).

    Local runs go through DVC: ``prepare`` writes the run conf into the workspace's params.yaml
    (and the watched folders and the shard stages into dvc.yaml), then each task is ``grappa repro
    <stage>`` (``extract@0-of-2``, ``train_adaptor@8``), so dvc.lock records what the DAG computed.
    Containers on the shared workspace run the step CLI with the conf as ``--set`` options
    (``extract --shard 0/2``). With own workspaces (``GRAPPA_WORKSPACE_MODE=own``) ``start`` starts
    the run on the git remote and every task, for every runner, is ``grappa task --run NAME <stage>``.
    """
    overrides = override_args(conf)  # first: refuses a conf that could inject or escape before reading any file
    ks, shards = planned_ks(conf), planned_shards(conf)
    values = {"cluster.ks": ks, "extract.shards": shards}  # the params the axes' items come from
    mapped = [runners.registry.step(task_id) for task_id in runners.MAPPED]
    if runners.workspace_mode(runner) == "own":
        # each worker's clone: the run's state on the git and DVC remotes (grappa/experiments.py)
        from grappa.experiments import run_name  # at task time, on a worker holding a clone

        name = run_name(run_id or "manual")
        commands = {task_id: render(runner, ["task", "--run", name, task_id]) for task_id in runners.VERBS}
        for step in mapped:
            commands[step.stage] = [render(runner, ["task", "--run", name, step.stage_name(item)])
                                    for item in step.axis.items_of(values[step.axis.key])]
        return {"ks": ks, "shards": shards, "prepare": None, "start": render(runner, [*overrides, "start-run", name]),
                "close_run": render(runner, ["close-run"]), **commands}
    if runner == "local":
        commands = {task_id: render(runner, ["repro", task_id]) for task_id in runners.VERBS}
        for step in mapped:
            commands[step.stage] = [render(runner, ["repro", step.stage_name(item)])
                                    for item in step.axis.items_of(values[step.axis.key])]
        return {"ks": ks, "shards": shards, "prepare": render(runner, [*overrides, "prepare"]), "start": None,
                "close_run": render(runner, ["close-run"]), **commands}
    argv = overrides
    if "--params" not in argv:
        argv = ["--params", "params.yaml", *argv]
    commands = {task_id: render(runner, [*argv, verb]) for task_id, verb in runners.VERBS.items()}
    for step in mapped:
        commands[step.stage] = [render(runner, [*argv, step.verb, f"--{step.mapped}", step.axis.arg(item)])
                                for item in step.axis.items_of(values[step.axis.key])]
    return {"ks": ks, "shards": shards, "prepare": None, "start": None,
            "close_run": render(runner, [*argv, "close-run"]), **commands}


def render(runner: str, argv: list[str]) -> str | list[str]:
    if runner == "local":
        python = os.environ.get("GRAPPA_PYTHON") or sys.executable
        return shlex.join([python, "-m", "grappa", *argv])
    return argv  # the image's ENTRYPOINT is `python -m grappa`


def prepare_workspace(command: str) -> str:
    """Run ``grappa prepare`` (shared workspace) or ``grappa start-run`` (own workspaces) in the repo;
    returns what it printed, or raises with its error."""
    done = subprocess.run(command, shell=True, cwd=runners.REPO, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError((done.stderr or done.stdout).strip().splitlines()[-1])
    return done.stdout


def pinned_digest(prepare_output: str) -> str:
    """The sha256 of params.yaml that ``grappa prepare`` read while it still held the workspace."""
    from grappa.workspace import PINNED_PREFIX  # at task time, on a worker holding the workspace

    lines = [line for line in prepare_output.splitlines() if line.startswith(PINNED_PREFIX)]
    if not lines:
        raise RuntimeError("grappa prepare did not report the sha256 of the params.yaml it wrote")
    return lines[-1][len(PINNED_PREFIX):].strip()


def pin_params(commands: dict, digest: str) -> dict:
    """The local runner's ``repro`` commands, each pinned to ``digest`` (the sha256 of params.yaml
    as its run's ``prepare`` wrote it): a task refuses params another run or an edit wrote since.
    The option goes before the stage, which stays the last word (the mapped tasks' label)."""
    def pin(command):
        if isinstance(command, list):
            return [pin(c) for c in command]
        argv = shlex.split(command)
        if "repro" not in argv:
            return command
        at = argv.index("repro") + 1
        return shlex.join([*argv[:at], "--params-sha256", digest, *argv[at:]])

    return {name: pin(command) if name in runners.VERBS else command for name, command in commands.items()}


def stale_stages(runner: str) -> list[str] | None:
    """The stages `dvc status` finds out of date in the shared workspace (local runner), None where
    DVC does not run the steps there (each task of an own-workspace run finds it out itself). An
    empty list: this run has nothing to do."""
    if runner != "local" or runners.workspace_mode(runner) == "own":
        return None
    dvc = Path(os.environ.get("GRAPPA_PYTHON") or sys.executable).parent / "dvc"
    done = subprocess.run([str(dvc) if dvc.exists() else "dvc", "status", "--json"], cwd=runners.REPO,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"dvc status failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return sorted(json.loads(done.stdout or "{}"))


def trigger_events(triggering_asset_events) -> list[dict]:
    """(source, fingerprint) of every asset event that triggered this run (none for a manual run)."""
    events = []
    for asset_events in (triggering_asset_events or {}).values():
        for event in asset_events:
            extra = dict(getattr(event, "extra", None) or {})
            if extra.get("source"):
                events.append({"source": str(extra["source"]), "fingerprint": str(extra.get("fingerprint", ""))})
    return events


def record_started(events: list[dict]) -> None:
    """Remember, per source, the fingerprint a pipeline run has started on (watchers compare to it)."""
    from airflow.sdk import Variable

    for event in events:
        Variable.set(watchers.variable_key(event["source"]), event["fingerprint"],
                     description=f"listing fingerprint of {event['source']} the last pipeline run started on")
