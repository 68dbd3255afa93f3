"""``dvc.yaml`` generated from the step registry and the code's imports, so it cannot drift.

Per stage: the command is the step's CLI verb; the params are the keys the step reads; the deps are
its layout inputs, the data roots of its image sources, and its code: its module in ``pipeline_steps/``
and that module's import closure inside ``grappa/`` (lazy imports included), minus the modules that cannot change what it
computes (:data:`NOT_CODE_DEPS`). Editing the CLI, tracking or the registry reruns no stage;
editing e.g. ``io/plots.py`` reruns only ``evaluate``.

A mapped step is a ``foreach`` stage: over ``${cluster.ks}`` (DVC reads the k list from params.yaml)
or over the labels of the ``extract.shards`` parts, written out (``[0-of-2, 1-of-2]``: DVC cannot
make a list from a count), so this file is generated for one shard count and ``grappa prepare``
rewrites it when ``extract.shards`` changes. A ``{shard}`` template of a step that is not mapped
over shards (the merge) is one dep per part.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

from grappa.io.layout import shards as shards_of
from grappa.registry import STEPS, Out, Step

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent
# The CLI only dispatches (which step runs is the stage's cmd), the registry's content is this file,
# tracking records a step after it has written its outputs, and pipeline_steps/__init__.py is the
# steps' contract in a docstring.
NOT_CODE_DEPS = ("grappa/__init__.py", "grappa/__main__.py", "grappa/cli.py", "grappa/registry.py",
                 "grappa/tracking/", "pipeline_steps/__init__.py")

HEADER = """\
# GENERATED from grappa/registry.py (the steps) and the imports of pipeline_steps/ (the code deps).
# Do not edit: change the registry and run `grappa prepare` (`grappa run` and the Airflow DAG do it
# themselves; tests/test_dvc.py fails when this file is stale). `dvc repro` reruns exactly the stages
# whose code, data, inputs or params changed; stage names equal the Airflow task ids.
#
# - extract@<i>-of-<n>: one stage per part of the snapshot, n = extract.shards (written out here, so
#   `grappa prepare` regenerates this file when it changes); merge_features joins the parts;
# - train_adaptor@<k>: one stage per k of cluster.ks;
# - code deps: the step's module in pipeline_steps/ and its import closure inside grappa/, without
#   the CLI, the registry and tracking (they dispatch and record; they compute nothing a stage writes);
# - params: the params.yaml keys the step reads;
# - the data roots of data.sources / index.sources (a manifest's folder, an image folder, an s3://
#   prefix) are deps of snapshot / index, so DVC sees images land, change or vanish there;
# - not DVC outs on purpose (they must survive DVC removing outs before a rerun): extract.cache_dir
#   (content-hash feature cache) and ${out_dir}/checkpoints (resume).
"""


def _module_file(dotted: str) -> Path | None:
    base = ROOT / Path(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> frozenset[str]:
    """Every ``grappa.*`` module ``path`` imports, at module level or inside functions."""
    return _imports_of(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _imports_of(path: Path, mtime_ns: int) -> frozenset[str]:  # parsed once per version of the file
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("grappa."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("grappa"):
            # `from grappa.io import servable` names a module; `from grappa.io.layout import Layout` a symbol
            found.update(f"{node.module}.{a.name}" if _module_file(f"{node.module}.{a.name}") else node.module
                         for a in node.names)
    return frozenset(found)


def code_deps(module: str) -> list[str]:
    """Repository-relative files of ``module``'s import closure inside the package, sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        dotted = todo.pop()
        path = _module_file(dotted)
        if path is None or dotted in seen:
            continue
        seen.add(dotted)
        todo += _imports(path)
    files = {str(_module_file(m).relative_to(ROOT)) for m in seen}
    return sorted(f for f in files if not any(f == x or (x.endswith("/") and f.startswith(x)) for x in NOT_CODE_DEPS))


# The foreach of a stage mapped over a list param: DVC interpolates it from params.yaml.
FOREACH = {"k": "${cluster.ks}"}


def _paths(template: str, step: Step, shards: int) -> list[str]:
    """The dvc.yaml paths of a layout template in ``step``'s stage: its own axis is ``${item}``; a
    ``{shard}`` the step is not mapped over is one path per part."""
    path = "${out_dir}/" + (template.replace("{" + step.mapped + "}", "${item}") if step.mapped else template)
    if "{shard}" in path:
        return [path.replace("{shard}", shard.label) for shard in shards_of(shards)]
    return [path]


def _flow(items: list[str]):
    from ruamel.yaml.comments import CommentedSeq

    seq = CommentedSeq(items)
    seq.fa.set_flow_style()
    return seq


def _foreach(step: Step, shards: int):
    if step.mapped == "shard":  # a count: the labels of its parts, written out
        return _flow([shard.label for shard in shards_of(shards)])
    return FOREACH[step.mapped]


def _outs(outs: list[Out], step: Step, shards: int, indent: int):
    """A stage's outs/metrics/plots list: a path, or {path: flags}, under the out's note."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    seq = CommentedSeq()
    for out in outs:
        flags = {**({"persist": True} if out.persist else {}), **({"cache": False} if not out.cache else {})}
        if out.note:
            seq.yaml_set_comment_before_after_key(len(seq), before=out.note, indent=indent)
        seq += [CommentedMap({path: CommentedMap(flags)}) if flags else path for path in _paths(out.path, step, shards)]
    return seq


def stage(step: Step, data_roots: list[str], shards: int):
    """One stage as YAML nodes (a ``foreach``/``do`` stage when the step is mapped)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    indent = 6 if step.mapped else 4  # the column of the stage's keys, for the outs' notes
    body = CommentedMap(cmd=f"python -m grappa {step.verb}" + (f" --{step.mapped} ${{item}}" if step.mapped else ""))
    body["deps"] = CommentedSeq([*code_deps(step.module),
                                 *(path for template in step.deps for path in _paths(template, step, shards)),
                                 *data_roots])
    body["params"] = CommentedSeq(step.params)
    for kind in ("outs", "metrics", "plots"):
        outs = [out for out in step.outs if out.kind == kind]
        if outs:
            body[kind] = _outs(outs, step, shards, indent + 2)
    return CommentedMap(foreach=_foreach(step, shards), do=body) if step.mapped else body


def render(data_roots: dict[str, list[str]], shards: int) -> str:
    """The whole dvc.yaml; ``data_roots`` maps a stage to the data folders it watches, ``shards`` is
    ``extract.shards``. Emitted by the YAML serializer (ruamel), never pasted together: a path that
    holds ``#``, quotes, a colon or non-ASCII is quoted as YAML needs and cannot start a new stage."""
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    stages = CommentedMap()
    for i, step in enumerate(STEPS):
        stages[step.stage] = stage(step, data_roots.get(step.stage, []), shards)
        stages.yaml_set_comment_before_after_key(step.stage, before=("\n" if i else "") + step.summary, indent=2)
    document = CommentedMap(stages=stages)
    yaml = YAML()
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    return HEADER + "\n" + buffer.getvalue()  # the header is a constant comment
