"""``dvc.yaml`` generated from the step registry and the code's imports, so it cannot drift.

Per stage: the command is the step's CLI verb; the params are the keys the step reads; the deps are
its layout inputs, the data roots of its image sources, and its code: the import closure of its
module inside ``grappa/`` (lazy imports included), minus the modules that cannot change what it
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
from pathlib import Path

from grappa.io.layout import shards as shards_of
from grappa.registry import STEPS, Out, Step

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent
# The CLI only dispatches (which step runs is the stage's cmd), the registry's content is this file,
# and tracking records a step after it has written its outputs.
NOT_CODE_DEPS = ("grappa/__init__.py", "grappa/__main__.py", "grappa/cli.py", "grappa/registry.py",
                 "grappa/tracking/")

HEADER = """\
# GENERATED from grappa/registry.py (the steps) and the imports of grappa/steps/ (the code deps).
# Do not edit: change the registry and run `grappa prepare` (`grappa run` and the Airflow DAG do it
# themselves; tests/test_dvc.py fails when this file is stale). `dvc repro` reruns exactly the stages
# whose code, data, inputs or params changed; stage names equal the Airflow task ids.
#
# - extract@<i>-of-<n>: one stage per part of the snapshot, n = extract.shards (written out here, so
#   `grappa prepare` regenerates this file when it changes); merge_features joins the parts;
# - train_adaptor@<k>: one stage per k of cluster.ks;
# - code deps: the step module's import closure inside grappa/, without the CLI, the registry and
#   tracking (they dispatch and record; they compute nothing a stage writes);
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


def _imports(path: Path) -> set[str]:
    """Every ``grappa.*`` module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("grappa."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("grappa"):
            # `from grappa.io import servable` names a module; `from grappa.io.layout import Layout` a symbol
            found.update(f"{node.module}.{a.name}" if _module_file(f"{node.module}.{a.name}") else node.module
                         for a in node.names)
    return found


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


def _out_lines(out: Out, step: Step, shards: int, pad: str) -> list[str]:
    lines = [f"{pad}# {out.note}"] if out.note else []
    flags = ([f"{pad}    persist: true"] if out.persist else []) + ([f"{pad}    cache: false"] if not out.cache else [])
    for path in _paths(out.path, step, shards):
        lines += [f"{pad}- {path}:", *flags] if flags else [f"{pad}- {path}"]
    return lines


def _foreach(step: Step, shards: int) -> str:
    if step.mapped == "shard":  # a count: the labels of its parts, written out
        return "[" + ", ".join(shard.label for shard in shards_of(shards)) + "]"
    return FOREACH[step.mapped]


def stage_lines(step: Step, data_roots: list[str], shards: int) -> list[str]:
    pad = "      " if step.mapped else "    "
    cmd = f"python -m grappa {step.verb}" + (f" --{step.mapped} ${{item}}" if step.mapped else "")
    body = [f"{pad}cmd: {cmd}", f"{pad}deps:"]
    body += [f"{pad}  - {path}" for path in code_deps(step.module)]
    body += [f"{pad}  - {path}" for template in step.deps for path in _paths(template, step, shards)]
    body += [f"{pad}  - {root}" for root in data_roots]
    body += [f"{pad}params:", *[f"{pad}  - {key}" for key in step.params]]
    for kind in ("outs", "metrics", "plots"):
        outs = [out for out in step.outs if out.kind == kind]
        if outs:
            body.append(f"{pad}{kind}:")
            for out in outs:
                body += _out_lines(out, step, shards, pad + "  ")
    head = [f"  # {step.summary}", f"  {step.stage}:"]
    if step.mapped:
        head += [f"    foreach: {_foreach(step, shards)}", "    do:"]
    return head + body


def render(data_roots: dict[str, list[str]], shards: int) -> str:
    """The whole dvc.yaml; ``data_roots`` maps a stage to the data folders it watches, ``shards`` is
    ``extract.shards``."""
    lines = [HEADER.rstrip("\n"), "", "stages:"]
    for step in STEPS:
        lines += stage_lines(step, data_roots.get(step.stage, []), shards)
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
