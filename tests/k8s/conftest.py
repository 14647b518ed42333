"""Rendered manifests (real kubectl/kustomize), the test tools, and the inference service started exactly as
the rendered Deployment starts it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from k8s_helpers import (
    OVERLAYS,
    SETUP_HINT,
    VENV_BIN,
    DeployedService,
    container_env,
    expand,
    find,
    find_tool,
    free_port,
    pod_spec,
    port_is_free,
    render,
    shadow_training_modules,
)


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = find_tool("kubectl")
    if path is None:
        pytest.skip(f"kubectl (kustomize) not found; {SETUP_HINT}")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    path = find_tool("promtool")
    if path is None:
        pytest.skip(f"promtool not found (Debian package prometheus); {SETUP_HINT}")
    return path


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(kubectl, overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A real, tiny timm network exported by models.export (≈100k parameters), and its contract."""
    torch = pytest.importorskip("torch", reason="exporting the tiny test model needs the train extra (torch)")
    timm = pytest.importorskip("timm", reason="exporting the tiny test model needs the train extra (timm)")
    from models.contract import SHARED_CLASSES, ModelContract
    from models.export import export_onnx

    contract = ModelContract(architecture="test_efficientnet", class_names=SHARED_CLASSES, input_size=64,
                             mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    torch.manual_seed(0)
    net = timm.create_model(contract.architecture, pretrained=False, num_classes=contract.num_classes)
    return export_onnx(net, contract, tmp_path_factory.mktemp("k8s-export") / "model.onnx"), contract


@pytest.fixture(scope="session")
def deployed_service(rendered: dict[str, list[dict[str, Any]]], tiny_model: tuple[Path, Any],
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployedService]:
    """`wbc serve` with the command, args and environment of the cpu overlay's rendered Deployment.

    What differs, and why: volume mount paths become local folders (the registry folder holds a real
    model promoted to production under the ConfigMap's model name), secrets get test values (the
    manifests only reference them), training-only packages cannot be imported (as in the serving image),
    and the port moves only if the manifest's port is taken on this machine."""
    from models.registry import Registry

    objects = rendered["cpu"]
    deployment = find(objects, "Deployment", "wbc-inference")
    spec = pod_spec(deployment)
    container = next(c for c in spec["containers"] if c["name"] == "inference")
    work = tmp_path_factory.mktemp("k8s-inference")
    secrets = {
        ("wbc-inference", "database-url"): f"sqlite:///{work / 'wbc.db'}",
        ("wbc-inference", "audit-key"): "k8s-test-audit-key-0123456789abcdef",
        ("wbc-inference", "admin-token"): "k8s-test-admin-token-0123456789abcdef",
    }
    env = container_env(objects, container, secrets)

    # Volumes → local folders; the registry gets the tiny model under the name the ConfigMap serves.
    onnx_path, contract = tiny_model
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    local = {}
    for path, mount in mounts.items():
        folder = work / "volumes" / mount["name"]
        folder.mkdir(parents=True, exist_ok=True)
        local[path] = folder
    registry_mount = next(p for p, m in mounts.items() if m["name"] == "registry")
    registry = Registry(local[registry_mount], env["WBC_MODEL_NAME"])
    info = registry.register(onnx_path, contract, {"lineage": {"run_id": "k8s-tests"}})
    registry.set_alias("production", info.version, reason="k8s test", actor="tests/k8s")
    for key, value in list(env.items()):
        for path in sorted(local, key=len, reverse=True):
            if value == path or value.startswith(path + "/"):
                env[key] = str(local[path]) + value[len(path):]
                break

    manifest_port = int(env["WBC_PORT"])
    port = manifest_port if port_is_free(manifest_port) else free_port()
    env["WBC_PORT"] = str(port)
    shadow = shadow_training_modules(work / "no-training-packages")
    process_env = {
        "PATH": f"{VENV_BIN}{os.pathsep}/usr/bin:/bin",  # the image's PATH starts with its venv
        "HOME": str(local.get("/tmp", work)),
        "PYTHONPATH": str(shadow),
        "LANG": "C.UTF-8",
        **env,
    }
    argv = [expand(a, env) for a in container["command"] + container.get("args", [])]
    executable = shutil.which(argv[0], path=process_env["PATH"])
    assert executable, f"{argv[0]} is not installed beside {sys.executable}"
    log = work / "service.log"
    cwd = work / "workdir"
    cwd.mkdir()
    with log.open("wb") as fh:
        proc = subprocess.Popen([executable, *argv[1:]], cwd=cwd, env=process_env, stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        yield DeployedService(url, port, manifest_port, container, env, argv, log, secrets)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


