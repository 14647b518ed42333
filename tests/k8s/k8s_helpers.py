"""Helpers for tests/k8s: tools, rendering, a container's environment resolved the way the kubelet does,
and the training-only packages shadowed as the serving image lacks them."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("cpu", "gpu", "site")
VENV_BIN = Path(sys.executable).parent
SETUP_HINT = "scripts/setup.sh (dev extra) and scripts/install-test-tools.sh install it"


def find_tool(name: str) -> str | None:
    """The venv's pinned binary first (dev extra), then PATH."""
    pinned = VENV_BIN / name
    return str(pinned) if pinned.is_file() and os.access(pinned, os.X_OK) else shutil.which(name)


def render(kubectl: str, overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def config_map(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    """A ConfigMap by its name before kustomize's hash suffix."""
    hits = [o for o in objects if o["kind"] == "ConfigMap"
            and (o["metadata"]["name"] == name or o["metadata"]["name"].rsplit("-", 1)[0] == name)]
    assert len(hits) == 1, f"expected one ConfigMap {name}, found {len(hits)}"
    return hits[0].get("data", {})


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


# ---- the container's environment, resolved the way the kubelet resolves it ---------------------------
def cpu_quantity(text: str | float) -> float:
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def container_env(objects: list[dict[str, Any]], container: dict[str, Any],
                  secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """envFrom, then env (later wins), as the kubelet builds it. Secrets come from `secrets` (the manifests
    hold none); an optional secret key missing there is left unset, a required one fails the test."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_map(objects, source["configMapRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        ref = var["valueFrom"]
        if "configMapKeyRef" in ref:
            env[var["name"]] = config_map(objects, ref["configMapKeyRef"]["name"])[ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            key = (ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
            if key in secrets:
                env[var["name"]] = secrets[key]
            else:
                assert ref["secretKeyRef"].get("optional"), f"required secret {key} not supplied by the test"
        elif "resourceFieldRef" in ref:
            field_ref = ref["resourceFieldRef"]
            kind, resource = field_ref["resource"].split(".", 1)
            amount = cpu_quantity(container["resources"][kind][resource])
            env[var["name"]] = str(math.ceil(amount / cpu_quantity(field_ref.get("divisor", "1"))))
        else:
            raise AssertionError(f"unhandled valueFrom in {var}")
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values ($$ escapes; unknown names stay)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and ")" in text[i:]:
            end = text.index(")", i)
            name = text[i + 2:end]
            out.append(env.get(name, text[i:end + 1]))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# ---- the inference service as deployed ---------------------------------------------------------------
TRAINING_ONLY = ("torch", "torchvision", "timm", "onnx", "onnxscript", "flwr", "matplotlib")


def training_only_modules() -> list[str]:
    """Import names of the `train` extra (torch, timm, flwr, ...): absent from the serving images."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = set(TRAINING_ONLY)
    for requirement in extras["train"]:
        name = requirement.split(";")[0].split("[")[0]
        for sep in "=<>!~ ":
            name = name.split(sep)[0]
        names.add(name.strip().replace("-", "_").lower())
    return sorted(names)


def shadow_training_modules(folder: Path) -> Path:
    """A PYTHONPATH entry on which importing any training-only package fails, as it does in the image."""
    for module in training_only_modules():
        package = folder / module
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(
            f"raise ImportError('{module} is not installed in the serving image (train extra only)')\n")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@dataclass
class DeployedService:
    url: str
    port: int
    manifest_port: int
    container: dict[str, Any]
    env: dict[str, str]
    argv: list[str]
    log: Path
    secrets: dict[tuple[str, str], str] = field(default_factory=dict)


def wait_for(url: str, log: Path, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError as exc:
            last = exc
            time.sleep(0.2)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s ({last}); service log:\n{log.read_text()[-4000:]}")
