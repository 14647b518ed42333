"""Zero-downtime model swap: admin promote / rollback and the registry watch, under concurrent load."""

import asyncio
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from server_helpers import running_server
from upload_helpers import files_field

from models.contract import ModelContract
from models.registry import Registry
from service.config import Settings
from service.main import create_app

TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def three_versions(tmp_path: Path, exported_onnx: Path, model_contract: ModelContract) -> Path:
    """Versions 1-3 of one model: the same graph registered three times, each with its own stamp + sha256."""
    registry = Registry(tmp_path, "swap")
    for run in range(3):
        registry.register(exported_onnx, model_contract, {"lineage": {"run_id": f"run-{run}"}})
    registry.set_alias("production", 1, reason="first")
    return tmp_path


def test_swaps_under_load_fail_no_request(three_versions: Path, jpeg_bytes: bytes) -> None:
    env = {"WBC_ADMIN_TOKEN": TOKEN, "WBC_WATCH_SECONDS": "0.2"}
    with running_server(three_versions, "swap", env=env) as server:
        stop = threading.Event()
        answers: Counter = Counter()
        failures: list[str] = []
        lock = threading.Lock()

        def client() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                while not stop.is_set():
                    try:
                        r = http.post("/v1/classify", files=files_field(("cell.jpg", jpeg_bytes)))
                        if r.status_code == 200:
                            with lock:
                                answers[r.json()["version"]] += 1
                        else:
                            failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    except httpx.HTTPError as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")

        def served(http: httpx.Client) -> int:
            return http.get("/v2/health/ready").json()["version"]

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                time.sleep(0.6)
                # 1. admin promotion: loaded and warmed before the switch, answered once switched
                r = http.post(
                    "/v1/admin/model/promote", json={"version": 2, "reason": "better"}, headers=ADMIN
                )
                assert r.status_code == 200 and r.json()["changed"] and served(http) == 2
                time.sleep(0.6)
                # 2. promotion by another party (the registry itself): the watch picks it up
                Registry(three_versions, "swap").set_alias("production", 3, reason="federation", actor="ci")
                deadline = time.monotonic() + 10
                while served(http) != 3:
                    assert time.monotonic() < deadline, "the watch did not swap to v3"
                    time.sleep(0.05)
                time.sleep(0.6)
                # 3. rollback by version
                r = http.post("/v1/admin/model/rollback", json={"version": 1}, headers=ADMIN)
                assert r.status_code == 200 and r.json()["current"]["version"] == 1 and served(http) == 1
                time.sleep(0.6)
                metrics = http.get("/metrics").text
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert failures == []
    assert set(answers) == {1, 2, 3} and sum(answers.values()) > 50
    assert 'wbc_model_swaps_total{result="swapped",trigger="admin"} 2.0' in metrics
    assert 'wbc_model_swaps_total{result="swapped",trigger="watch"} 1.0' in metrics
    history = Registry(three_versions, "swap").aliases()["history"]
    assert [(h["to"], h["actor"]) for h in history] == [(1, "system"), (2, "admin"), (3, "ci"), (1, "admin")]


@pytest.fixture()
def admin_client(three_versions: Path) -> TestClient:
    settings = Settings(registry=three_versions, model_name="swap", intra_op_threads=1, admin_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        yield client


def test_in_flight_requests_finish_on_the_model_they_started_with(admin_client: TestClient) -> None:
    app = admin_client.app
    slot, pipeline = app.state.model_slot, app.state.pipeline
    old = slot.current
    assert old.version == 1
    s = old.contract.input_size
    arrays = [np.full((3, s, s), v, np.float32) for v in (-1.0, 0.0, 1.0)]

    async def swap_while_queued() -> list[np.ndarray]:
        pending = asyncio.ensure_future(pipeline.batcher.probabilities(old, arrays))
        await asyncio.to_thread(slot.move_alias, "production", 2, reason="test", actor="test")
        return await pending

    rows = admin_client.portal.call(swap_while_queued)
    assert slot.current.version == 2 and slot.current is not old
    np.testing.assert_allclose(np.stack(rows), old.classifier.probabilities(np.stack(arrays)), atol=1e-6)


def test_admin_needs_the_token(admin_client: TestClient) -> None:
    assert admin_client.get("/v1/admin/model").status_code == 401
    assert admin_client.get("/v1/admin/model", headers={"Authorization": "Bearer nope"}).status_code == 403
    state = admin_client.get("/v1/admin/model", headers=ADMIN).json()
    assert state["serving"]["version"] == 1 and [v["version"] for v in state["versions"]] == [1, 2, 3]


def test_admin_disabled_without_a_token(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/admin/model/reload", headers=ADMIN)
    assert r.status_code == 403 and "WBC_ADMIN_TOKEN" in r.json()["detail"]


def test_broken_version_is_refused_and_nothing_moves(admin_client: TestClient, three_versions: Path) -> None:
    broken = Registry(three_versions, "swap").get(3).onnx_path
    shutil.copy(broken, broken.with_suffix(".bak"))
    broken.write_bytes(broken.read_bytes()[:-10])  # sha256 no longer matches
    r = admin_client.post("/v1/admin/model/promote", json={"version": 3}, headers=ADMIN)
    assert r.status_code == 409 and "sha256" in r.json()["detail"]
    assert Registry(three_versions, "swap").aliases()["production"] == 1
    assert admin_client.get("/v2/health/ready").json()["version"] == 1
    assert admin_client.post("/v1/admin/model/promote", json={"version": 9}, headers=ADMIN).status_code == 404


def test_rollback_without_version_returns_to_the_previous_production(admin_client: TestClient) -> None:
    assert admin_client.post("/v1/admin/model/rollback", json={}, headers=ADMIN).status_code == 409
    assert admin_client.post("/v1/admin/model/promote", json={"version": 2}, headers=ADMIN).json()["changed"]
    r = admin_client.post("/v1/admin/model/rollback", json={"reason": "drift"}, headers=ADMIN)
    assert (
        r.status_code == 200 and r.json()["current"]["version"] == 1 and r.json()["previous"]["version"] == 2
    )


def test_candidate_alias_moves_without_a_swap(admin_client: TestClient) -> None:
    r = admin_client.post("/v1/admin/model/promote", json={"version": 3, "alias": "candidate"}, headers=ADMIN)
    assert r.status_code == 200 and not r.json()["changed"] and "note" in r.json()
    assert admin_client.get("/v2/health/ready").json()["version"] == 1
