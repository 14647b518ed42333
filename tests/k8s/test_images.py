"""Dockerfiles, checked statically (no Docker engine runs on this machine or in CI): hadolint, multi-stage,
a non-root USER, only the project's code copied in (no data, weights or secrets), and the serving images
install the `cpu` / `gpu` extra only, never the `train` one."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from k8s_helpers import ROOT, SETUP_HINT, find_tool

DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
ALLOWED_SOURCES = {"pyproject.toml", "README.md", "./", "models/", "federation/", "service/", "cli/"}


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_there_are_cpu_gpu_and_training_images() -> None:
    assert {p.name for p in DOCKERFILES} == {"serve-cpu.Dockerfile", "serve-gpu.Dockerfile", "train.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip(f"hadolint not found; {SETUP_HINT}")
    out = subprocess.run([hadolint, "--failure-threshold", "info", str(dockerfile)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_non_root_and_nothing_private(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2 and " AS " in froms[0].upper(), "multi-stage: a build stage, then the runtime"
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the last USER must not be root"
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM"):]
    assert all("--from=build" in rest for word, rest in final if word == "COPY"), "runtime copies only build output"
    for word, rest in steps:
        if word in ("COPY", "ADD"):
            assert word == "COPY", "ADD fetches URLs and unpacks archives: COPY only"
            if "--from=" not in rest:
                sources = rest.split()[:-1]
                assert set(sources) <= ALLOWED_SOURCES, f"copies {sources}"
        if word in ("ENV", "ARG"):
            assert not re.search(r"(PASSWORD|TOKEN|SECRET|DATABASE_URL|AUDIT_KEY)\w*=", rest, re.IGNORECASE), rest


@pytest.mark.parametrize("name,extra", [("serve-cpu.Dockerfile", "cpu"), ("serve-gpu.Dockerfile", "gpu")])
def test_serving_images_install_no_training_extra(name: str, extra: str) -> None:
    runs = " ".join(rest for word, rest in instructions(ROOT / "docker" / name) if word == "RUN")
    installs = re.findall(r'"\.\[([^\]]*)\]"', runs)
    assert installs == [extra], installs
    assert "torch" not in runs and "train" not in runs


def test_dockerignore_lets_only_code_in() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "whitelist: ignore everything, then allow the project's code"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "models/", "federation/", "service/", "cli/"}
    for pattern in ("**/*.onnx", "**/*.key", "**/.env"):
        assert pattern in lines
