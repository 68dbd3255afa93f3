"""The DVC workspace every pipeline run goes through: params.yaml, dvc.yaml and ``dvc repro``.

One rule for every entry point (``grappa run``, the Airflow tasks, a user's ``dvc repro``): the
outputs are what ``dvc.yaml`` computes from ``params.yaml``. So

- a run-time override (``grappa run --set``/``--params FILE``, an Airflow run conf) is first written
  into ``params.yaml``, as ``dvc exp run --set-param`` does, and ``dvc.lock`` records it; it stays
  until changed back (``git diff params.yaml`` shows it);
- the ``snapshot`` stage depends on the data roots of ``data.sources`` (a manifest's folder, an
  image folder, an ``s3://`` prefix) as DVC external dependencies, and ``index`` on those of
  ``index.sources``, so ``dvc status`` sees images land, change or vanish. DVC cannot derive those
  paths from params.yaml (it interpolates no lists into ``deps``), so :func:`sync_data_deps` writes
  ``dvc.yaml`` as the step registry generates it (grappa.dvc_yaml) with those roots; every entry
  point calls it and ``grappa check`` reports a drift;
- likewise the ``extract@<i>-of-<n>`` stages (one per part of ``extract.shards``) and the merge's
  deps on those parts are written out in ``dvc.yaml``: a changed shard count is a drift too.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from grappa.config import ConfigError, Params, parse_params
from grappa.dvc_yaml import render as render_dvc_yaml
from grappa.io.sources import MANIFEST_EXTENSIONS
from grappa.io.storage import is_s3
from grappa.registry import STEPS

CODE_PREFIXES = ("grappa/", "pipeline_steps/")  # deps that are code, not data roots
SHARDED = [step.stage for step in STEPS if step.mapped == "shard"]  # extract: one stage per part
# the stages whose dvc.yaml entry depends on extract.shards: the parts and the merge of the parts
SHARD_DEPENDENT = SHARDED + [step.stage for step in STEPS if step.mapped != "shard"
                             and any("{shard}" in path for path in (*step.deps, *(o.path for o in step.outs)))]
UP_TO_DATE_EXIT = 99  # Airflow's skip_on_exit_code default: a task with nothing to do shows as skipped


def _yaml():
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments, key order and flow style survive an edit
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)  # "  - item" under its key, as in our YAML files
    return yaml


def _load(path: Path):
    return _yaml().load(path.read_text())


def _dump(path: Path, document) -> None:
    from grappa.io.artifacts import write_text

    buffer = io.StringIO()
    _yaml().dump(document, buffer)
    write_text(path, buffer.getvalue())


# --------------------------------------------------------------------------- params.yaml


def _leaves(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for key, value in obj.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def _set(document, dotted: str, value) -> None:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    *parents, leaf = dotted.split(".")
    node = document
    for part in parents:
        if part not in node or node[part] is None:
            node[part] = CommentedMap()
        node = node[part]
    old = node.get(leaf)
    if isinstance(value, list):
        seq = CommentedSeq(value)
        if isinstance(old, CommentedSeq) and old.fa.flow_style():
            seq.fa.set_flow_style()
        value = seq
    node[leaf] = value


def record_params(path: Path, target: Params) -> list[str]:
    """Make ``path`` (params.yaml) say ``target``; returns one line per changed key ("key: old -> new").

    Only differing keys are rewritten, so the file's comments and layout stay.
    """
    document = _load(path) if path.is_file() else None
    if document is None:
        from ruamel.yaml.comments import CommentedMap

        document = CommentedMap()
    current = parse_params(_plain(document)).model_dump(mode="json") if len(document) else {}
    wanted = target.model_dump(mode="json")
    before, after = _leaves(current), _leaves(wanted)
    changed = [key for key in after if key not in before or before[key] != after[key]]
    for key in changed:
        _set(document, key, after[key])
    if changed:
        _dump(path, document)
    return [f"{key}: {before.get(key, '(default)')!r} -> {after[key]!r}" for key in changed]


def _plain(node):
    """ruamel's commented containers -> plain dicts/lists (what pydantic validates)."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


# --------------------------------------------------------------------------- dvc.yaml


def data_roots(sources: list[str]) -> list[str]:
    """What DVC must watch for each source: a manifest's folder (its images live below it), an image
    folder, an s3 prefix (with a trailing slash), in order and without repeats."""
    roots: list[str] = []
    for source in sources:
        if PurePosixPath(source).suffix.lower() in MANIFEST_EXTENSIONS:
            root = source.rsplit("/", 1)[0] + "/" if is_s3(source) else (os.path.dirname(source) or ".")
        else:
            root = source.rstrip("/") + "/" if is_s3(source) else source.rstrip("/") or "/"
        if root not in roots:
            roots.append(root)
    return roots


def _key(params: Params, dotted: str):
    value = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def watched_roots(params: Params) -> dict[str, list[str]]:
    """The stages that read image sources, and the data roots of those sources DVC must watch."""
    return {step.stage: data_roots(_key(params, step.reads_sources)) for step in STEPS if step.reads_sources}


def generated(params: Params, roots: dict[str, list[str]] | None = None) -> str:
    """The dvc.yaml the registry generates for ``params``: its sources' data roots (``roots``, when
    the caller has them: :func:`watched_roots`), its shard count."""
    return render_dvc_yaml(watched_roots(params) if roots is None else roots, params.extract.shards)


def _declared_stages(dvc_yaml: Path) -> dict:
    import yaml

    return (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {} if dvc_yaml.is_file() else {}


def _declared_shards(dvc_yaml: Path) -> int | None:
    """How many parts the extract stages of an existing dvc.yaml run (their foreach), None if unknown."""
    declared = _declared_stages(dvc_yaml)
    counts = {len(foreach) for stage in SHARDED
              if isinstance(foreach := (declared.get(stage) or {}).get("foreach"), list)}
    return counts.pop() if len(counts) == 1 else None


def _declared_roots(dvc_yaml: Path, stages: list[str]) -> dict[str, list[str]]:
    """The data roots ``stages`` of an existing dvc.yaml list (their deps outside code and outputs)."""
    declared = _declared_stages(dvc_yaml)
    return {stage: [d for d in (declared.get(stage) or {}).get("deps") or []
                    if isinstance(d, str) and not d.startswith(CODE_PREFIXES) and "${" not in d]
            for stage in stages}


def check_outputs_inside(workspace: Path, params: Params) -> None:
    """DVC 3 tracks outputs only inside the project: out_dir must be a relative folder in it."""
    out = Path(params.out_dir)
    if out.is_absolute() or ".." in out.parts:
        raise ConfigError(f"out_dir: '{params.out_dir}' is outside the DVC workspace {workspace}; "
                          "use a relative folder (e.g. outputs)")


def check_sources_exist(workspace: Path, params: Params, roots: dict[str, list[str]] | None = None) -> None:
    """A ConfigError naming the first local source (data.sources, index.sources) that is not there
    (``roots``: :func:`watched_roots`, when the caller has them)."""
    for stage, roots in (watched_roots(params) if roots is None else roots).items():
        for root in roots:
            if not is_s3(root) and not (workspace / root).exists():
                raise ConfigError(f"source not found: {root} (listed for the {stage} stage)")


def sync_data_deps(workspace: Path, params: Params) -> list[str]:
    """Write dvc.yaml as the registry generates it, watching the data roots of ``params``' sources.

    Returns the data roots added and removed ("snapshot deps + root" / "index deps - root"), the
    shard count's change ("extract stages: 1 -> 4 shards"), or that the stages were regenerated (the
    registry or the imports changed); empty means in sync.
    """
    wanted = watched_roots(params)
    check_sources_exist(workspace, params, wanted)
    dvc_yaml = workspace / "dvc.yaml"
    declared = _declared_roots(dvc_yaml, list(wanted))
    changes = []
    for stage, roots in wanted.items():
        changes += [f"{stage} deps + {r}" for r in roots if r not in declared[stage]]
        changes += [f"{stage} deps - {r}" for r in declared[stage] if r not in roots]
    shards = _declared_shards(dvc_yaml)
    if shards is not None and shards != params.extract.shards:
        changes.append(f"extract stages: {shards} -> {params.extract.shards} shards")
    text = generated(params, wanted)
    if not dvc_yaml.is_file() or dvc_yaml.read_text() != text:
        from grappa.io.artifacts import write_text

        write_text(dvc_yaml, text)
        changes = changes or ["stages regenerated from grappa/registry.py and the steps' imports"]
    return changes


def prepare(workspace: Path, params: Params, echo=print) -> None:
    """Write ``params`` into params.yaml and the data roots into dvc.yaml (the run-time override rule)."""
    check_outputs_inside(workspace, params)
    for line in record_params(workspace / "params.yaml", params):
        echo(f"params.yaml: {line}")
    for line in sync_data_deps(workspace, params):
        echo(f"dvc.yaml: {line}")


def drift(workspace: Path, params: Params) -> str | None:
    """None when dvc.yaml is what the registry generates for ``params``' sources, else what differs."""
    wanted = watched_roots(params)
    for stage, declared in _declared_roots(workspace / "dvc.yaml", list(wanted)).items():
        if declared != wanted[stage]:
            return (f"dvc.yaml's {stage} stage watches {declared} but params.yaml's sources need {wanted[stage]}; "
                    "run 'grappa prepare' (grappa run and the Airflow DAG do it themselves)")
    shards = _declared_shards(workspace / "dvc.yaml")
    if shards is not None and shards != params.extract.shards:
        return (f"dvc.yaml's extract stages run {shards} shard(s) but params.yaml's extract.shards is "
                f"{params.extract.shards}; run 'grappa prepare' (grappa run and the Airflow DAG do it themselves)")
    if (workspace / "dvc.yaml").read_text() != generated(params, wanted):
        return "dvc.yaml is not what grappa/registry.py and the code's imports generate; run 'grappa prepare'"
    return None


# --------------------------------------------------------------------------- one run at a time

LOCK_FILE = ".grappa-run.lock"  # beside dvc.yaml (not in .dvc/: a workspace may not be initialised yet)


@contextlib.contextmanager
def exclusive(workspace: Path, what: str, wait: bool = False):
    """Hold the workspace for ``what`` (a pipeline run, a params rewrite): a second one gets a
    one-line ConfigError naming the holder, never an interleaved params.yaml or dvc.lock. With
    ``wait`` it queues instead (two tasks handed to one worker's workspace run one after the other)."""
    import fcntl

    path = workspace / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise ConfigError(f"the workspace {workspace} is busy: {holder}; wait for it to finish "
                              "(two runs in one workspace would interleave params.yaml and dvc.lock)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{what} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


PINNED_PREFIX = "params.yaml sha256: "  # the line `grappa prepare` ends with


def params_sha256(workspace: Path) -> str:
    """What an Airflow run pins after writing its conf: the sha256 of the workspace's params.yaml."""
    import hashlib

    return hashlib.sha256((workspace / "params.yaml").read_bytes()).hexdigest()


def check_pinned(workspace: Path, pinned: str | None) -> None:
    """A task of a run refuses params.yaml other than the one its run started with."""
    if pinned and params_sha256(workspace) != pinned:
        raise ConfigError("params.yaml changed since this run started (another run or an edit wrote it); "
                          "this task does not run on params its run did not plan; trigger a new run")


# --------------------------------------------------------------------------- dvc repro


@dataclass
class Repro:
    """What one ``dvc repro`` did: stages run (with seconds), skipped as up to date, restored from the run cache."""

    returncode: int
    ran: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)


_RUNNING = re.compile(r"^Running stage '([^']+)'")
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping")
_RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run")


def dvc_command() -> list[str]:
    """The dvc of this interpreter's environment (the stage commands' ``python`` is put beside it)."""
    bindir = Path(sys.executable).parent
    dvc = bindir / "dvc"
    return [str(dvc) if dvc.exists() else "dvc"]


def dvc_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a dvc call: ``python`` in its stages is this interpreter."""
    bindir = str(Path(sys.executable).parent)
    child_env = {**os.environ, **(env or {}), "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    child_env.setdefault("DVC_NO_ANALYTICS", "1")
    return child_env


def repro(workspace: Path, stage: str | None = None, env: dict[str, str] | None = None,
          echo=print, pull: bool = False) -> Repro:
    """``dvc repro`` (one stage with ``stage``) in ``workspace``, streaming its output through ``echo``;
    with ``pull``, missing inputs and run-cache entries come from the DVC remote first."""
    argv = [*dvc_command(), "--wait-for-lock", "repro", *(["--pull"] if pull else []),
            *(["--single-item", stage] if stage else [])]
    child_env = dvc_env(env)
    result = Repro(returncode=0)
    current, started = None, 0.0
    try:
        proc = subprocess.Popen(argv, cwd=workspace, env=child_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
    except OSError as err:
        raise ConfigError(f"cannot run dvc ({err.strerror}); is DVC installed in this environment?") from None
    assert proc.stdout is not None
    for line in proc.stdout:
        echo(line.rstrip("\n"))
        stripped = line.strip()
        for pattern, bucket in ((_RUNNING, None), (_SKIPPED, result.skipped), (_RESTORED, result.restored)):
            match = pattern.match(stripped)
            if not match:
                continue
            if current is not None:
                result.ran[current] = time.perf_counter() - started
                current = None
            if bucket is None:
                current, started = match.group(1), time.perf_counter()
            else:
                bucket.append(match.group(1))
    result.returncode = proc.wait()
    if current is not None:
        result.ran[current] = time.perf_counter() - started
    return result
