"""The inference service started locally with the exact command, arguments and environment of the cpu
overlay's rendered Deployment (see conftest.deployed_service for the few substitutions and why), probed on
the same paths and port the kubelet uses; and the serving image's Python needs no training package."""

from __future__ import annotations

import subprocess
import sys

import httpx
from k8s_helpers import ROOT, DeployedService, shadow_training_modules, training_only_modules, wait_for


def probe_url(service: DeployedService, probe: str) -> str:
    get = service.container[probe]["httpGet"]
    port = get["port"]
    if isinstance(port, str):  # a named port: the container's port of that name
        port = next(p["containerPort"] for p in service.container["ports"] if p["name"] == port)
    assert port == service.manifest_port, f"{probe} probes port {port}, the service listens on {service.manifest_port}"
    return f"{service.url}{get['path']}"


def test_the_deployment_starts_and_answers_its_probes(deployed_service: DeployedService) -> None:
    service = deployed_service
    assert service.argv == ["wbc", "serve"], "the test runs what the manifest runs"
    assert service.env["WBC_HOST"] == "0.0.0.0", "probes come from the kubelet, not from loopback"
    startup = service.container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    first = wait_for(probe_url(service, "startupProbe"), service.log, timeout=min(budget, 90))
    assert first.status_code == 200, first.text
    assert httpx.get(probe_url(service, "livenessProbe"), timeout=5).status_code == 200
    ready = httpx.get(probe_url(service, "readinessProbe"), timeout=5)
    assert ready.status_code == 200, f"not ready: {ready.text}\n{service.log.read_text()[-3000:]}"
    body = ready.json()
    assert body["ready"] is True
    text = ready.text
    assert service.env["WBC_MODEL_NAME"] in text and '"version":1' in text.replace(" ", ""), text


def test_serving_code_imports_without_training_packages(tmp_path) -> None:
    """The serving images install the `cpu` or `gpu` extra only: no torch, timm, flwr or onnx."""
    assert {"torch", "timm", "flwr", "onnx"} <= set(training_only_modules())
    shadow = shadow_training_modules(tmp_path / "shadow")
    code = ("import service.main, cli.main\n"
            "from service.config import Settings\n"
            "service.main.create_app(Settings(registry='/nonexistent'))\n"
            f"import sys; bad = sorted(m for m in sys.modules if m.split('.')[0] in {training_only_modules()!r})\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(shadow), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
