from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from upload_helpers import files_field


def samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_requests_predictions_and_errors_are_counted(client: TestClient, jpeg_bytes: bytes) -> None:
    client.post("/v1/classify", files=files_field(("a.jpg", jpeg_bytes), ("b.txt", b"text")))
    client.post("/v1/classify", files=files_field(("c.jpg", jpeg_bytes)))
    client.get("/no/such/page")
    found = samples(client)

    def value(name: str, **labels: str) -> float:
        return found.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("wbc_http_requests_total", method="POST", route="/v1/classify", status="207") == 1
    assert value("wbc_http_requests_total", method="POST", route="/v1/classify", status="200") == 1
    assert value("wbc_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert value("wbc_http_request_duration_seconds_count", method="POST", route="/v1/classify") == 2
    predicted = {dict(labels)["label"]: v for (name, labels), v in found.items() if name == "wbc_predictions_total"}
    assert sum(predicted.values()) == 2 and len(predicted) == 1  # the same image twice: one label
    assert value("wbc_image_errors_total", code="unsupported_type") == 1
    assert value("wbc_inference_batch_size_count") == 2
    assert value("wbc_model_ready") == 1
    assert value("wbc_model_info", model="wbc-test", version="1", architecture="test_efficientnet",
                 precision="fp32", provider="CPUExecutionProvider") == 1
