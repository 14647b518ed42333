import random
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from upload_helpers import files_field, png_header_only, reencode

from models.contract import SHARED_CLASSES
from service.config import Settings
from service.main import create_app


def assert_prediction(entry: dict, filename: str) -> None:
    assert entry["filename"] == filename
    assert list(entry["probabilities"]) == list(SHARED_CLASSES)
    assert sum(entry["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert entry["label"] in SHARED_CLASSES
    assert entry["confidence"] == pytest.approx(entry["probabilities"][entry["label"]])


def test_one_image(client: TestClient, jpeg_bytes: bytes) -> None:
    response = client.post("/v1/classify", files=files_field(("cell.jpg", jpeg_bytes)))
    assert response.status_code == 200
    body = response.json()
    assert (body["model"], body["version"], body["classified"], body["failed"]) == ("wbc-test", 1, 1, 0)
    assert_prediction(body["results"][0], "cell.jpg")


def test_many_images_keep_their_order(client: TestClient, cell_images: dict[str, bytes], jpeg_bytes: bytes) -> None:
    named = [*cell_images.items(), ("cell.bmp", reencode(jpeg_bytes, "BMP")),
             ("cell.tif", reencode(jpeg_bytes, "TIFF"))]
    response = client.post("/v1/classify", files=files_field(*named))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [name for name, _ in named]
    for entry, (name, _) in zip(results, named):
        assert_prediction(entry, name)
    # The same pixels in another container give the same answer.
    assert results[-1]["probabilities"] == pytest.approx(results[-2]["probabilities"], abs=1e-6)


def test_bad_file_beside_good_ones_is_207(client: TestClient, jpeg_bytes: bytes, png_bytes: bytes) -> None:
    files = files_field(("a.jpg", jpeg_bytes), ("notes.txt", b"not an image\n"), ("b.png", png_bytes))
    response = client.post("/v1/classify", files=files)
    assert response.status_code == 207
    body = response.json()
    assert (body["classified"], body["failed"]) == (2, 1)
    good_a, bad, good_b = body["results"]
    assert_prediction(good_a, "a.jpg")
    assert_prediction(good_b, "b.png")
    assert bad == {"filename": "notes.txt",
                   "error": {"code": "unsupported_type",
                             "message": "text, not an image; send JPEG, PNG, BMP, TIFF or DICOM"}}


@pytest.mark.parametrize(
    "name, make, code",
    [
        ("empty.jpg", lambda jpg: b"", "empty"),
        ("cut.jpg", lambda jpg: jpg[: len(jpg) // 2], "truncated"),
        ("report.txt", lambda jpg: b"WBC count 7.2\n", "unsupported_type"),
        ("bomb.png", lambda jpg: png_header_only(20_000, 20_000), "too_many_pixels"),
    ],
)
def test_only_bad_files_is_422_naming_each(client: TestClient, jpeg_bytes: bytes, name: str, make, code: str) -> None:
    response = client.post("/v1/classify", files=files_field((name, make(jpeg_bytes))))
    assert response.status_code == 422
    body = response.json()
    assert name in body["detail"]
    assert [(e["filename"], e["error"]["code"]) for e in body["errors"]] == [(name, code)]


def test_several_bad_files_are_all_named(client: TestClient) -> None:
    response = client.post("/v1/classify", files=files_field(("a.txt", b"hello"), ("b.jpg", b"")))
    assert response.status_code == 422
    assert {e["filename"]: e["error"]["code"] for e in response.json()["errors"]} == {
        "a.txt": "unsupported_type", "b.jpg": "empty"}


def test_no_files_is_422(client: TestClient) -> None:
    response = client.post("/v1/classify", data={"other": "x"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "files"]


def test_not_multipart_is_4xx(client: TestClient) -> None:
    response = client.post("/v1/classify", content=b"\xff\xd8\xff", headers={"content-type": "image/jpeg"})
    assert 400 <= response.status_code < 500


def test_limits(registry_root: Path, jpeg_bytes: bytes) -> None:
    settings = Settings(registry=registry_root, model_name="wbc-test", max_files=2,
                        max_file_bytes=len(jpeg_bytes), max_request_bytes=4 * len(jpeg_bytes) + 2048,
                        max_pixels=150 * 150)
    with TestClient(create_app(settings)) as client:
        too_many = client.post("/v1/classify", files=files_field(*[(f"{i}.jpg", jpeg_bytes) for i in range(3)]))
        assert too_many.status_code == 413 and "at most 2" in too_many.json()["detail"]

        big_body = client.post("/v1/classify", files=files_field(("big.jpg", jpeg_bytes * 5)))
        assert big_body.status_code == 413 and "WBC_MAX_REQUEST_BYTES" in big_body.json()["detail"]

        big_file = client.post("/v1/classify", files=files_field(("big.jpg", jpeg_bytes + b"\x00")))
        assert big_file.status_code == 422
        assert big_file.json()["errors"][0]["error"]["code"] == "too_large"

        # The tehran-lisc crops are 224 x 224 = 50,176 pixels, over this app's 22,500.
        many_pixels = client.post("/v1/classify", files=files_field(("cell.jpg", jpeg_bytes)))
        assert many_pixels.status_code == 422
        assert many_pixels.json()["errors"][0]["error"]["code"] == "too_many_pixels"


def test_chunked_body_over_limit_is_413(registry_root: Path, jpeg_bytes: bytes) -> None:
    settings = Settings(registry=registry_root, model_name="wbc-test", max_file_bytes=1000, max_request_bytes=1000)
    boundary = "wbcboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg_bytes + f"\r\n--{boundary}--\r\n".encode()

    def chunks():  # a generator body has no Content-Length: it goes out chunked
        for i in range(0, len(body), 512):
            yield body[i : i + 512]

    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/classify", content=chunks(),
                               headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413


def test_no_model_is_503_not_500(tmp_path: Path, jpeg_bytes: bytes) -> None:
    settings = Settings(registry=tmp_path, model_name="absent")
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/classify", files=files_field(("cell.jpg", jpeg_bytes)))
    assert response.status_code == 503
    assert "no versions" in response.json()["detail"]


def test_openapi_documents_the_status_policy(client: TestClient) -> None:
    responses = client.get("/openapi.json").json()["paths"]["/v1/classify"]["post"]["responses"]
    assert {"200", "207", "413", "422", "503"} <= set(responses)


def test_damaged_images_never_give_5xx(client: TestClient, jpeg_bytes: bytes, png_bytes: bytes) -> None:
    """Real crops in every supported container with random bytes flipped or cut: each file gets an
    answer or a named error, and the request a 2xx/422, never a 5xx."""
    rng = random.Random(7)
    originals = [jpeg_bytes, png_bytes, reencode(jpeg_bytes, "BMP"), reencode(jpeg_bytes, "TIFF"),
                 reencode(png_bytes, "TIFF", compression="tiff_lzw")]
    for round_ in range(3):
        named = []
        for i in range(20):
            data = bytearray(rng.choice(originals))
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                data = data[: rng.randrange(1, len(data))]
            named.append((f"r{round_}-{i}.bin", bytes(data)))
        response = client.post("/v1/classify", files=files_field(*named))
        assert response.status_code in (200, 207, 422), response.text
        entries = response.json().get("results") or response.json()["errors"]
        for entry, (name, _) in zip(entries, named, strict=True):
            assert entry["filename"] == name and ("error" in entry or "probabilities" in entry)
