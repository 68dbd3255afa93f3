"""Every pipeline run is a DVC experiment shared through git, and every runner keeps one task contract.

A run's state lives on the git remote (``GRAPPA_GIT_REMOTE``, default ``origin``) and the DVC remote,
never on a shared disk, so any workspace (a clone of the repo: a Celery worker's, a container's, a
pod's) can run any stage of it:

- :func:`start` (``grappa start-run NAME``, the DAG's plan task) commits the run's params (its conf
  written by :func:`grappa.workspace.prepare`) on the experiment ref ``refs/exps/<baseline>/NAME``,
  over the remote's HEAD, with the ``dvc.lock`` and uncached outs of the last run, so what did not
  change is skipped, as in a workspace that stayed;
- :func:`checkout_run` + :func:`pull_inputs` + ``dvc repro --pull --single-item STAGE`` +
  :func:`publish` (``grappa task STAGE --run NAME``, every step task) fetch the run's ref, pull the
  stage's inputs in the run's versions, run the stage (up to date: skipped), push its outputs and
  run-cache to the DVC remote, and commit its ``dvc.lock`` entry (and uncached outs) on the ref.

``dvc exp show`` lists the runs side by side once their refs are fetched (``dvc exp pull origin
NAME``) and ``dvc exp apply NAME`` restores one. Tasks of one run that run at once (one per k) commit
on the same ref: a push that lost the race is redone on the new tip with this stage's entry merged in;
commits are built with a private index, so a workspace's files are never merged.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import yaml

from grappa import registry
from grappa.config import ConfigError, Params
from grappa.workspace import dvc_command, dvc_env

LAST_RUN = "refs/grappa/last-run"  # the tip of the run that committed last: the next run starts from its dvc.lock
LOCK = "dvc.lock"
PUSH_TRIES = 30
IDENTITY = {"GIT_AUTHOR_NAME": "grappa", "GIT_AUTHOR_EMAIL": "grappa@localhost",
            "GIT_COMMITTER_NAME": "grappa", "GIT_COMMITTER_EMAIL": "grappa@localhost"}


def git_remote() -> str:
    """A remote of the workspace's clone, or a URL (a container's workspace has no remote configured)."""
    return os.environ.get("GRAPPA_GIT_REMOTE", "origin")


def run_name(run_id: str) -> str:
    """A run id (Airflow's ``manual__2026-12-06T22:17:12.5+00:00``) as an experiment name git accepts."""
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", str(run_id))).strip(".-")
    if name.endswith(".lock"):
        name = name[: -len(".lock")] + "-lock"
    if not name:
        raise ConfigError(f"run name {run_id!r} has no letter or digit git can name a ref with")
    return name[:200]


def exp_ref(baseline: str, name: str) -> str:
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"


def _run(root: Path, argv: list[str], data: bytes | None = None, env: dict | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess:
    """``argv`` in ``root``; stdout and stderr kept as bytes (a blob's content goes in as ``data``)."""
    return subprocess.run(argv, cwd=root, input=data, capture_output=True, env={**os.environ, **(env or {})},
                          timeout=timeout)


def _last_line(done: subprocess.CompletedProcess) -> str:
    """What a failed command said last (its stderr, else its stdout)."""
    lines = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


def _git(root: Path, *args: str, data: bytes | None = None, env: dict | None = None) -> str:
    done = _run(root, ["git", *args], data, env)
    if done.returncode != 0:
        raise ConfigError(f"git {args[0]} failed in {root}: {_last_line(done)}")
    return done.stdout.decode().strip()


def _identity(root: Path) -> dict[str, str]:
    """Who commits: the git config's user, else ``grappa`` (a worker's clone rarely has one)."""
    configured = _run(root, ["git", "config", "user.email"]).stdout.strip()
    return {} if configured else {k: os.environ.get(k, v) for k, v in IDENTITY.items()}


def _fetch(root: Path, what: str) -> str | None:
    """The commit ``what`` (a ref or a commit) names on the git remote, fetched; None when it has none."""
    done = _run(root, ["git", "fetch", "-q", git_remote(), what])
    if done.returncode != 0:
        if b"couldn't find remote ref" in done.stderr or b"not our ref" in done.stderr:
            return None
        raise ConfigError(f"git fetch {git_remote()} {what} failed in {root}: {_last_line(done)}")
    return _git(root, "rev-parse", "FETCH_HEAD")


def find_run(root: Path, name: str) -> str | None:
    """The experiment ref of run ``name`` on the git remote (None if no run has that name)."""
    listing = _git(root, "ls-remote", git_remote(), "refs/exps/*")
    refs = [line.split("\t")[1] for line in listing.splitlines() if line.endswith(f"/{name}")]
    refs = [ref for ref in refs if ref.count("/") == 4]  # refs/exps/ab/cdef.../NAME
    if len(refs) > 1:
        raise ConfigError(f"run {name} names {len(refs)} experiments on {git_remote()}: {', '.join(refs)}")
    return refs[0] if refs else None


def _show(root: Path, commit: str, path: str) -> bytes | None:
    done = _run(root, ["git", "show", f"{commit}:{path}"])
    return done.stdout if done.returncode == 0 else None


def _commit(root: Path, parent: str, files: dict[str, bytes], message: str) -> str:
    """A commit of ``parent``'s tree with ``files`` (path -> content) replaced, built in a private
    index: the workspace's files and index are not touched, git-ignored paths are fine."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index"), **_identity(root)}
        _git(root, "read-tree", parent, env=env)
        for path, content in files.items():
            blob = _git(root, "hash-object", "-w", "--stdin", data=content, env=env)
            _git(root, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
        tree = _git(root, "write-tree", env=env)
        return _git(root, "commit-tree", tree, "-p", parent, "-m", message, env=env)


def _push(root: Path, commit: str, ref: str, force: bool = False) -> bool:
    """Push ``commit`` to ``ref``; False when the remote's ref moved on (not a fast-forward)."""
    done = _run(root, ["git", "push", "-q", *(["-f"] if force else []), git_remote(), f"{commit}:{ref}"])
    if done.returncode == 0:
        return True
    if any(word in done.stderr for word in (b"rejected", b"non-fast-forward", b"fetch first")):
        return False
    raise ConfigError(f"git push {git_remote()} {ref} failed: {_last_line(done)}")


def uncached_outs(params: Params, stage: str | None = None) -> list[str]:
    """The outs DVC keeps in git rather than in its cache (the champion pointer, the metrics), of one
    stage or of all: they travel in the run's commits."""
    steps = [registry.step(stage)] if stage else registry.STEPS
    return [f"{params.out_dir}/{out.path}" for step in steps for out in step.outs if not out.cache]


def _detach(root: Path, commit: str) -> None:
    """Check ``commit`` out, detached. A workspace on a branch with changes is a person's checkout:
    refused rather than overwritten; a detached one is a worker's, whose leftovers are discarded."""
    attached = _run(root, ["git", "symbolic-ref", "-q", "HEAD"]).returncode == 0
    if attached and _git(root, "status", "--porcelain", "--untracked-files=no"):
        raise ConfigError(f"{root} has uncommitted changes on a branch; run pipeline tasks in a clone of their own "
                          "(they check the run's commits out over the working tree)")
    _git(root, "checkout", "-q", "-f", "--detach", commit)


def use_dvc_remote(root: Path) -> None:
    """``GRAPPA_DVC_REMOTE`` (a URL: s3://bucket/prefix, a path), when set, as the workspace's default
    DVC remote (in .dvc/config.local, with AWS_ENDPOINT_URL for an S3 endpoint other than AWS): how a
    container or pod, whose workspace is new, is told where the run's data is."""
    url = os.environ.get("GRAPPA_DVC_REMOTE")
    if not url:
        return
    lines = ["[core]", "    remote = grappa", "['remote \"grappa\"']", f"    url = {url}"]
    if url.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        lines.append(f"    endpointurl = {os.environ['AWS_ENDPOINT_URL']}")
    (root / ".dvc").mkdir(exist_ok=True)
    (root / ".dvc" / "config.local").write_text("\n".join(lines) + "\n")


def checkout_run(root: Path, name: str) -> str:
    """Check the tip of run ``name`` out in ``root`` (code, params.yaml, dvc.yaml, dvc.lock); its ref."""
    ref = find_run(root, name)
    if ref is None:
        raise ConfigError(f"no run '{name}' on git remote {git_remote()}: start it with 'grappa start-run {name}'")
    _detach(root, _fetch(root, ref))
    use_dvc_remote(root)
    return ref


def start(root: Path, name: str, load_params, baseline: str | None = None, echo=print) -> str:
    """Commit run ``name``'s params on its experiment ref (created over ``baseline``, default the
    remote's HEAD) and push it; the ref. ``load_params()`` reads the checked-out params.yaml with the
    run's overrides. Starting a run that exists keeps it (a retried plan task)."""
    from grappa import workspace

    ref = find_run(root, name)
    if ref is not None:  # checked out as a first start leaves it: the plan reads the run's params here
        _detach(root, _fetch(root, ref))
        echo(f"run {name}: already started at {ref}")
        return ref
    base = _fetch(root, baseline or "HEAD")
    if base is None:
        raise ConfigError(f"git remote {git_remote()} has no {baseline or 'HEAD'} to start run {name} from")
    _detach(root, base)
    use_dvc_remote(root)
    params: Params = load_params()
    files = {}
    last = _fetch(root, LAST_RUN)
    if last is not None:  # what the last run computed: its stages are skipped where nothing changed
        for path in (LOCK, *uncached_outs(params)):
            content = _show(root, last, path)
            if content is not None:
                files[path] = content
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                (root / path).write_bytes(content)
    workspace.prepare(root, params, echo)
    files.update({path: (root / path).read_bytes() for path in ("params.yaml", "dvc.yaml")})
    ref = exp_ref(base, name)
    commit = _commit(root, base, files, f"grappa run {name}: params" + (f", dvc.lock of {last[:8]}" if last else ""))
    if not _push(root, commit, ref):
        raise ConfigError(f"run {name} was started by someone else meanwhile ({ref})")
    _detach(root, commit)
    echo(f"run {name}: started at {ref} over {base[:8]}" + (f", from the dvc.lock of {last[:8]}" if last else ""))
    return ref


def _dvc(root: Path, *args: str) -> None:
    done = _run(root, [*dvc_command(), *args], env=dvc_env(), timeout=6 * 3600)
    if done.returncode != 0:
        raise ConfigError(f"dvc {' '.join(args)} failed: {_last_line(done)}")


def pull_inputs(root: Path, stage: str) -> None:
    """The run's versions of ``stage``'s inputs (and of its outputs where the run has them) from the
    DVC remote, replacing what an earlier task left in this workspace."""
    _dvc(root, "pull", "--with-deps", "--allow-missing", "--force", stage)


def publish(root: Path, name: str, ref: str, stage: str, params: Params, echo=print) -> str:
    """Push ``stage``'s outputs and run-cache to the DVC remote, then commit its dvc.lock entry and
    uncached outs on the run's ref (retried on the new tip when another task pushed first); the commit."""
    _dvc(root, "push", "-q", "--run-cache", stage)
    entry = yaml.safe_load((root / LOCK).read_text())["stages"][stage]
    own = {path: (root / path).read_bytes() for path in uncached_outs(params, stage) if (root / path).is_file()}
    for _ in range(PUSH_TRIES):
        tip = _fetch(root, ref)
        lock = yaml.safe_load(_show(root, tip, LOCK) or b"") or {"schema": "2.0", "stages": {}}
        lock.setdefault("stages", {})[stage] = entry
        files = {LOCK: yaml.safe_dump(lock, sort_keys=False).encode(), **own}
        commit = _commit(root, tip, files, f"grappa run {name}: {stage}")
        if _push(root, commit, ref):
            _push(root, commit, LAST_RUN, force=True)
            _detach(root, commit)
            echo(f"run {name}: {stage} recorded at {commit[:8]} on {ref}")
            return commit
    raise ConfigError(f"run {name}: {PUSH_TRIES} pushes of {stage}'s dvc.lock entry lost the race; retry the task")
