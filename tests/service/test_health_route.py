from pathlib import Path

from fastapi.testclient import TestClient

from models.contract import ModelContract
from models.registry import Registry
from service.config import Settings
from service.main import create_app


def test_live_and_ready_with_a_model(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert (body["ready"], body["model"], body["version"]) == (True, "wbc-test", 1)
    assert body["architecture"] == "test_efficientnet" and body["input_size"] == 64
    assert body["session"]["providers"] == ["CPUExecutionProvider"]


def test_empty_registry_is_live_but_not_ready(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(registry=tmp_path, model_name="absent"))) as client:
        assert client.get("/v2/health/live").status_code == 200
        ready = client.get("/v2/health/ready")
    assert ready.status_code == 503
    assert ready.json()["ready"] is False and "no versions" in ready.json()["reason"]


def test_becomes_ready_when_the_first_version_is_registered(
    tmp_path: Path, exported_onnx: Path, model_contract: ModelContract
) -> None:
    settings = Settings(registry=tmp_path, model_name="late", model_retry_seconds=0)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/health/ready").status_code == 503
        Registry(tmp_path, "late").register(exported_onnx, model_contract, {})
        ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json()["version"] == 1


def test_contract_mismatch_is_not_ready_with_the_reason(
    tmp_path: Path, exported_onnx: Path, model_contract: ModelContract
) -> None:
    # The registry stamps whatever contract it is given; this one does not describe the 64-px graph.
    Registry(tmp_path, "wrong").register(exported_onnx, model_contract.with_updates(input_size=128), {})
    with TestClient(create_app(Settings(registry=tmp_path, model_name="wrong"))) as client:
        ready = client.get("/v2/health/ready")
    assert ready.status_code == 503 and "128×128" in ready.json()["reason"]


def test_pinned_version_is_served(tmp_path: Path, exported_onnx: Path, model_contract: ModelContract) -> None:
    registry = Registry(tmp_path, "pinned")
    for _ in range(2):
        registry.register(exported_onnx, model_contract, {})
    with TestClient(create_app(Settings(registry=tmp_path, model_name="pinned", version="1"))) as client:
        assert client.get("/v2/health/ready").json()["version"] == 1
    with TestClient(create_app(Settings(registry=tmp_path, model_name="pinned"))) as client:
        assert client.get("/v2/health/ready").json()["version"] == 2  # no production alias: latest
