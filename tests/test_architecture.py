"""Imports go one way: config <- core <- io (and the step registry) <- pipeline_steps <- tracking <- the
CLI and the DAG. A module never imports from a layer above its own, no step imports another step (what
two steps share lives in io or core), and tracking imports no step (it records what a step wrote), so a
DVC stage's code deps are its own module and what it builds on."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

LAYERS = {"config": 0, "core": 1, "io": 2, "registry": 2, "steps": 3, "tracking": 4}
TOP = 5  # grappa.cli, grappa.use, grappa.workspace, grappa.dvc_yaml, grappa.__main__


def _layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if parts[0] == "pipeline_steps":  # the containerized steps, a package of their own beside grappa/
        return "steps", LAYERS["steps"]
    return (parts[1], LAYERS.get(parts[1], TOP)) if len(parts) > 1 else ("grappa", TOP)


def _imports(path: Path) -> list[str]:
    """Every grappa module ``path`` imports, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            package = node.module in ("grappa", "grappa.core", "grappa.io", "pipeline_steps", "grappa.tracking")
            found += [f"{node.module}.{a.name}" if package else node.module for a in node.names]
    return [name for name in found if name.split(".")[0] in ("grappa", "pipeline_steps")]


def climbs(root: Path) -> list[str]:
    out = []
    for path in sorted([*(root / "grappa").rglob("*.py"), *(root / "pipeline_steps").rglob("*.py")]):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        (mine, level) = _layer(module)
        for name in _imports(path):
            (theirs, other) = _layer(name)
            if (other > level or (mine == theirs == "steps" and not name.startswith(module))
                    or (mine, theirs) == ("tracking", "steps")):  # tracking records steps, never runs their code
                out.append(f"{module} ({mine}) imports {name} ({theirs})")
    return out


def test_imports_only_go_down_and_no_step_imports_another_or_tracking():
    assert climbs(REPO) == []


def test_the_check_sees_a_climb(tmp_path):
    for rel, text in {"grappa/core/model.py": "from grappa.io.layout import layout\n",
                      "pipeline_steps/a.py": "def f():\n    from pipeline_steps.b import g\n",
                      "grappa/io/ok.py": "from grappa.core import model\n",
                      "grappa/tracking/up.py": "import pipeline_steps.evaluate\n",
                      "pipeline_steps/b.py": "from grappa.tracking import runs\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert climbs(tmp_path) == ["grappa.core.model (core) imports grappa.io.layout (io)",
                                "grappa.tracking.up (tracking) imports pipeline_steps.evaluate (steps)",
                                "pipeline_steps.a (steps) imports pipeline_steps.b (steps)",
                                "pipeline_steps.b (steps) imports grappa.tracking.runs (tracking)"]
