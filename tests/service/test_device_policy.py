"""WBC_DEVICE: cpu, auto (GPU providers when ONNX Runtime offers them, else CPU), cuda (GPU or no start)."""

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from server_helpers import free_port

from service.config import Settings
from service.inference import DeviceUnavailableError, providers_for
from service.main import create_app

ROOT = Path(__file__).resolve().parents[2]
HAS_GPU_PROVIDER = "CUDAExecutionProvider" in ort.get_available_providers()


def test_cpu_policy_asks_for_the_cpu_only() -> None:
    assert providers_for("cpu") == ("CPUExecutionProvider",)


def test_auto_puts_gpu_providers_first_when_offered() -> None:
    offered = ort.get_available_providers()
    chosen = providers_for("auto")
    assert chosen[-1] == "CPUExecutionProvider"
    assert [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in offered] == list(
        chosen[:-1]
    )


def test_auto_reports_the_provider_it_got(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"device": "auto"}))) as client:
        ready = client.get("/v2/health/ready").json()
        metrics = client.get("/metrics").text
    assert ready["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")
    assert f'provider="{ready["provider"]}"' in metrics


@pytest.mark.skipif(
    HAS_GPU_PROVIDER, reason="this ONNX Runtime offers CUDA: the refusal path needs a CPU-only one"
)
def test_cuda_policy_refuses_to_start_without_a_gpu(settings: Settings, registry_root: Path) -> None:
    with pytest.raises(DeviceUnavailableError, match="WBC_DEVICE=cuda"):
        with TestClient(create_app(settings.model_copy(update={"device": "cuda"}))):
            pass
    # The real process exits instead of serving on the CPU.
    env = {
        **os.environ,
        "WBC_DEVICE": "cuda",
        "WBC_REGISTRY": str(registry_root),
        "WBC_MODEL_NAME": "wbc-test",
    }
    code = f"from service.main import run; run(port={free_port()})"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "WBC_DEVICE=cuda" in output and "Uvicorn running" not in output
