"""Dynamic batching, abstention, the prediction sink hook and the latency / prediction metrics."""

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from upload_helpers import files_field

from models.contract import UNIDENTIFIED, ModelContract
from models.registry import Registry
from service.config import Settings
from service.main import create_app
from service.sink import ClassifiedCell


def metric_samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_concurrent_requests_are_batched(settings: Settings, cell_images: dict[str, bytes]) -> None:
    """While a batch runs, later images queue; the runner takes them together (batch size > 1)."""
    images = list(cell_images.items())
    with TestClient(create_app(settings.model_copy(update={"max_queue_delay_ms": 20.0}))) as client:
        statuses: list[int] = []

        def send(i: int) -> None:
            name, data = images[i % len(images)]
            statuses.append(client.post("/v1/classify", files=files_field((name, data))).status_code)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        found = metric_samples(client)
    assert statuses == [200] * 12
    batches = found[("wbc_inference_batch_size_count", ())]
    assert found[("wbc_inference_batch_size_sum", ())] == 12 and batches < 12
    assert found[("wbc_queue_wait_seconds_count", ())] == 12
    assert found[("wbc_preprocess_duration_seconds_count", ())] == 12


def test_full_queue_answers_503_with_retry_after(settings: Settings) -> None:
    """Three tensors submitted at once to a queue that holds two: refused whole, with Retry-After."""
    with TestClient(create_app(settings.model_copy(update={"max_queue_images": 2}))) as client:
        s = client.get("/v2/health/ready").json()["input_size"]
        request = {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [3, 3, s, s], "data": [0.0] * (3 * 3 * s * s)}
            ]
        }
        refused = client.post("/v2/models/wbc-test/infer", json=request)
        request["inputs"][0].update(shape=[2, 3, s, s], data=[0.0] * (2 * 3 * s * s))
        accepted = client.post("/v2/models/wbc-test/infer", json=request)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "WBC_MAX_QUEUE_IMAGES" in refused.json()["error"]
    assert accepted.status_code == 200


@pytest.fixture()
def abstaining_settings(tmp_path: Path, exported_onnx: Path, model_contract: ModelContract) -> Settings:
    strict = model_contract.with_updates(abstain_threshold=0.99)
    Registry(tmp_path, "strict").register(exported_onnx, strict, {})
    return Settings(registry=tmp_path, model_name="strict", intra_op_threads=1)


def test_below_threshold_is_unidentified_with_probabilities(
    abstaining_settings: Settings, jpeg_bytes: bytes
) -> None:
    with TestClient(create_app(abstaining_settings)) as client:
        body = client.post("/v1/classify", files=files_field(("a.jpg", jpeg_bytes))).json()
        found = metric_samples(client)
    [result] = body["results"]
    assert result["label"] == UNIDENTIFIED and result["confidence"] < 0.99
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert found[("wbc_abstentions_total", (("model", "strict"), ("version", "1")))] == 1
    assert (
        found[("wbc_predictions_total", (("label", UNIDENTIFIED), ("model", "strict"), ("version", "1")))]
        == 1
    )
    assert found[("wbc_prediction_confidence_count", (("model", "strict"), ("version", "1")))] == 1


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[list[ClassifiedCell]] = []
        self.thread_names: list[str] = []

    def __call__(self, cells: Sequence[ClassifiedCell]) -> list[str]:
        self.calls.append(list(cells))
        self.thread_names.append(threading.current_thread().name)
        return [f"cell-{len(self.calls)}-{i}" for i in range(len(cells))]


def test_every_classified_cell_reaches_the_sink(settings: Settings, cell_images: dict[str, bytes]) -> None:
    sink = RecordingSink()
    app = create_app(settings)
    with TestClient(app) as client:
        app.state.prediction_sink = sink
        files = files_field(*cell_images.items(), ("notes.txt", b"not an image"))
        body = client.post("/v1/classify", files=files, headers={"X-Requesting-System": "lab-lis-3"}).json()
    [cells] = sink.calls
    assert [c.filename for c in cells] == list(cell_images)  # the refused file is not recorded
    assert all(c.data == cell_images[c.filename] and c.requested_by == "lab-lis-3" for c in cells)
    assert all(
        c.model_name == "wbc-test" and c.model_version == 1 and c.route == "/v1/classify" for c in cells
    )
    assert [r.get("id") for r in body["results"]] == [f"cell-1-{i}" for i in range(len(cells))] + [None]
    assert [c.label for c in cells] == [r["label"] for r in body["results"][:-1]]
    assert sink.thread_names[0] != threading.main_thread().name  # off the event loop


def test_a_failing_sink_answers_503_and_no_result(settings: Settings, jpeg_bytes: bytes) -> None:
    def broken(cells: Sequence[ClassifiedCell]) -> None:
        raise ConnectionError("database is down")

    app = create_app(settings)
    with TestClient(app) as client:
        app.state.prediction_sink = broken
        response = client.post("/v1/classify", files=files_field(("a.jpg", jpeg_bytes)))
    assert response.status_code == 503 and "could not be recorded" in response.json()["detail"]
    assert "results" not in response.json()
