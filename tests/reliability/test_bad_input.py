"""Bad input: the generated corpus (tests/reliability/corpus.py) and abusive requests against the real app.

Every file gets a prediction or a named per-file error, every request a 2xx or a clear 4xx: never a 5xx,
never an exception (the in-process client re-raises anything the app does not handle). The memory bound
is measured on a real server process in test_memory.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from corpus import OK, Case, build_corpus
from fastapi.testclient import TestClient
from upload_helpers import files_field

from service.config import Settings
from service.main import create_app


@pytest.fixture(scope="module")
def corpus(jpeg_bytes: bytes, png_bytes: bytes) -> list[Case]:
    return build_corpus(jpeg_bytes, png_bytes)


def outcome_of(entry: dict) -> str:
    return entry["error"]["code"] if "error" in entry else OK


def test_every_corpus_file_alone_gets_its_answer(client: TestClient, corpus: list[Case]) -> None:
    """One request per file: 200 with a prediction, or 422 naming the file and a stable error code."""
    wrong = []
    for case in corpus:
        response = client.post("/v1/classify", files=files_field((case.name, case.data)))
        if response.status_code == 200:
            [entry] = response.json()["results"]
        elif response.status_code == 422:
            [entry] = response.json()["errors"]
            assert case.name in response.json()["detail"]
            assert entry["error"]["message"], case.name
        else:
            wrong.append(f"{case.name}: HTTP {response.status_code} {response.text[:200]}")
            continue
        assert entry["filename"] == case.name
        if not case.allows(outcome_of(entry)):
            wrong.append(
                f"{case.name}: {outcome_of(entry)} (expected {sorted(case.expect)}) "
                f"{entry.get('error', {}).get('message', '')[:160]}"
            )
    groups = Counter(case.group for case in corpus)
    print(f"\n{len(corpus)} corpus files: {dict(groups)}")
    assert not wrong, "\n".join(wrong)


def test_corpus_in_full_requests_is_207_in_order(
    client: TestClient, corpus: list[Case], jpeg_bytes: bytes
) -> None:
    """The corpus 31 files at a time plus one good crop per request: 207, one entry per file, in order."""
    for start in range(0, len(corpus), 31):
        chunk = corpus[start : start + 31]
        named = [(c.name, c.data) for c in chunk] + [("good.jpg", jpeg_bytes)]
        response = client.post("/v1/classify", files=files_field(*named))
        assert response.status_code in (200, 207), response.text[:300]
        results = response.json()["results"]
        assert [r["filename"] for r in results] == [name for name, _ in named]
        assert outcome_of(results[-1]) == OK
        for case, entry in zip(chunk, results):
            assert case.allows(outcome_of(entry)), (case.name, entry)


def _multipart(parts: list[tuple[str, str, bytes]], boundary: str = "wbc-fuzz-boundary") -> tuple[bytes, str]:
    """(field name, file name or "", payload) parts → a multipart/form-data body and its content type."""
    body = b""
    for field, filename, payload in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + payload + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_thousands_of_files_in_one_request(client: TestClient, jpeg_bytes: bytes) -> None:
    """Thousands of files in one body: refused as a whole with a clear 4xx, before any is decoded.
    Over 1,000 parts the form parser answers 400; up to that, WBC_MAX_FILES answers 413."""
    body, content_type = _multipart([("files", f"{i}.jpg", jpeg_bytes[:64]) for i in range(5000)])
    response = client.post("/v1/classify", content=body, headers={"content-type": content_type})
    assert response.status_code == 400 and "Too many files" in response.json()["detail"]
    body, content_type = _multipart([("files", f"{i}.jpg", jpeg_bytes[:64]) for i in range(900)])
    response = client.post("/v1/classify", content=body, headers={"content-type": content_type})
    assert response.status_code == 413 and "WBC_MAX_FILES" in response.json()["detail"]
    # 5,000 plain form fields beside one file: the form parser's field limit answers.
    fields, content_type = _multipart(
        [("files", "a.jpg", jpeg_bytes)] + [(f"f{i}", "", b"x") for i in range(5000)]
    )
    response = client.post("/v1/classify", content=fields, headers={"content-type": content_type})
    assert response.status_code == 400 and "Too many fields" in response.json()["detail"]


@pytest.mark.parametrize(
    "content_type, body",
    [
        ("image/jpeg", "JPEG"),  # the image as the raw body, not multipart
        ("application/json", b'{"files": ["x"]}'),
        ("application/x-www-form-urlencoded", b"files=abc"),
        ("text/plain", b"hello"),
        ("multipart/form-data", b"--x\r\n\r\n"),  # no boundary parameter
        (
            "multipart/form-data; boundary=x",
            (b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n\xff\xd8\xff'),
        ),  # never closed
        ("multipart/form-data; boundary=x", b"garbage without any boundary"),
        ("multipart/form-data; boundary=" + "b" * 5000, b"--" + b"b" * 5000 + b"--\r\n"),
        ("multipart/mixed; boundary=x", b"--x--\r\n"),
        ("", b""),
    ],
    ids=[
        "raw-jpeg",
        "json",
        "urlencoded",
        "text",
        "no-boundary",
        "unclosed",
        "no-parts",
        "long-boundary",
        "mixed",
        "empty",
    ],
)
def test_wrong_content_types_are_a_clear_4xx(
    client: TestClient, jpeg_bytes: bytes, content_type: str, body: bytes | str
) -> None:
    data = jpeg_bytes if body == "JPEG" else body
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/classify", content=data, headers=headers)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.json()["detail"]


def test_part_content_type_is_not_trusted(client: TestClient, jpeg_bytes: bytes) -> None:
    """The bytes decide, not the declared type: a JPEG declared as text is classified, a text file
    declared as image/jpeg is refused as text."""
    files = [
        ("files", ("cell.txt", jpeg_bytes, "text/plain")),
        ("files", ("cell.jpg", b"definitely not a jpeg\n", "image/jpeg")),
        ("files", ("cell.dcm", jpeg_bytes, "application/dicom")),
    ]
    response = client.post("/v1/classify", files=files)
    assert response.status_code == 207
    assert [outcome_of(r) for r in response.json()["results"]] == [OK, "unsupported_type", OK]


def test_oversized_form_fields_and_names(client: TestClient, jpeg_bytes: bytes) -> None:
    too_long = client.post(
        "/v1/classify", files=files_field(("a.jpg", jpeg_bytes)), data={"specimen": "S" * 10_000}
    )
    assert too_long.status_code == 422 and too_long.json()["detail"][0]["loc"] == ["body", "specimen"]
    long_name = "n" * 1000 + ".jpg"
    named = client.post("/v1/classify", files=files_field((long_name, jpeg_bytes)))
    assert named.status_code == 200 and named.json()["results"][0]["filename"] == long_name
    # A part header over the form parser's limit (8 KiB here) is refused as a malformed body.
    huge_header = client.post("/v1/classify", files=files_field(("n" * 20_000 + ".jpg", jpeg_bytes)))
    assert huge_header.status_code == 400 and huge_header.json()["detail"]


def test_limits_are_configurable(registry_root: Path, jpeg_bytes: bytes, png_bytes: bytes) -> None:
    """WBC_MAX_FILES / _FILE_BYTES / _REQUEST_BYTES / _PIXELS each move the line (tests/service covers
    each limit alone; here they are read from the environment, as a deployment sets them)."""
    env = {
        "WBC_MAX_FILES": "3",
        "WBC_MAX_FILE_BYTES": str(len(jpeg_bytes)),
        "WBC_MAX_REQUEST_BYTES": str(len(jpeg_bytes) * 3 + 4096),
        "WBC_MAX_PIXELS": "10000",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        settings = Settings(registry=registry_root, model_name="wbc-test", intra_op_threads=1)
    assert (settings.max_files, settings.max_pixels) == (3, 10_000)
    with TestClient(create_app(settings)) as small:
        assert small.post("/v1/classify", files=files_field(*[("a.jpg", b"x")] * 4)).status_code == 413
        over = small.post(
            "/v1/classify",
            content=b"x" * (len(jpeg_bytes) * 3 + 5000),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert over.status_code == 413 and "WBC_MAX_REQUEST_BYTES" in over.json()["detail"]
        codes = [
            outcome_of(e)
            for e in small.post(
                "/v1/classify", files=files_field(("big.jpg", jpeg_bytes + b"\0"), ("cell.jpg", jpeg_bytes))
            ).json()["errors"]
        ]
        assert codes == ["too_large", "too_many_pixels"]  # 224 x 224 > 10,000 pixels
