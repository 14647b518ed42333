"""The bad-input corpus and abusive bodies against a real server process: no 5xx, the process survives,
and its resident memory stays bounded (VmHWM, the peak, read from /proc).

The server runs the preprocessing the federation's models use (cell crop + white balance), where a big
image costs the most, with two preprocessing workers (what a 2-core pod gets). The worst legitimate load
is images right at the pixel limit: their decoded copies, not the request bodies, set the peak.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from corpus import build_corpus
from PIL import Image
from procstat import load_average, peak_rss_mib, rss_mib
from server_helpers import running_server
from upload_helpers import files_field

MODEL_NAME = "wbc-test"  # tests/service/conftest.py registers the test network under this name

MiB = 1024 * 1024
# The inference pod's memory limit (k8s/base/inference/deployment.yaml) and what the test allows the
# server to peak at: the limit less room for the ingress of a full request body and the DB client.
POD_LIMIT_MIB = 2048
PEAK_BOUND_MIB = 1536
MAX_PIXELS = 25_000_000  # the service's default WBC_MAX_PIXELS


def raw_request(url: str, head: bytes, body: bytes = b"", read_timeout: float = 30.0) -> bytes:
    """Send bytes as they are (a client that lies in its headers); return what the server answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def largest_allowed_cell(jpeg: bytes) -> bytes:
    """A real crop scaled to 5000 x 5000 = exactly WBC_MAX_PIXELS (allowed), as a JPEG of ~1-2 MB."""
    side = int(MAX_PIXELS**0.5)
    cell = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    cell.save(out, "JPEG", quality=85)
    return out.getvalue()


def bad_input_and_huge_bodies(
    registry: Path, jpeg_bytes: bytes, png_bytes: bytes, big_requests: int, big_per_request: int
) -> None:
    corpus = build_corpus(jpeg_bytes, png_bytes)
    huge_cell = largest_allowed_cell(jpeg_bytes)
    env = {"WBC_PREPROCESS_THREADS": "2", "WBC_MAX_PIXELS": str(MAX_PIXELS)}
    statuses: list[int] = []
    with (
        running_server(registry, MODEL_NAME, env=env) as server,
        httpx.Client(base_url=server.url, timeout=120) as http,
    ):
        pid = server.proc.pid
        for _ in range(3):  # warm: model, decoders, first requests
            assert http.post("/v1/classify", files=files_field(("cell.jpg", jpeg_bytes))).status_code == 200
        start = rss_mib(pid)

        # 1. the corpus, 32 files a request
        for i in range(0, len(corpus), 32):
            r = http.post("/v1/classify", files=files_field(*((c.name, c.data) for c in corpus[i : i + 32])))
            statuses.append(r.status_code)
        after_corpus = rss_mib(pid)

        # 2. bodies over the 64 MiB limit: declared (answered before the body is read) and chunked
        #    (counted as it arrives: 200 MiB streamed, refused at the first byte over)
        declared = raw_request(
            server.url,
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=x\r\nContent-Length: 10737418240\r\n\r\n",
            b"--x\r\n",
        )
        statuses.append(status_of(declared))

        def two_hundred_mib():
            yield b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'
            for _ in range(200):
                yield b"\0" * MiB

        try:
            chunked = http.post(
                "/v1/classify",
                content=two_hundred_mib(),
                headers={"content-type": "multipart/form-data; boundary=x"},
            )
            statuses.append(chunked.status_code)
        except httpx.WriteError:  # the server answered 413 and closed while the client still wrote
            statuses.append(413)
        for bad_length in (b"-1", b"abc", b"1e9"):
            statuses.append(
                status_of(
                    raw_request(
                        server.url,
                        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: "
                        + bad_length
                        + b"\r\n\r\n",
                    )
                )
            )
        # 1 MB of headers on a probe: answered (uvicorn's httptools parser sets no header limit), not a 5xx
        padded = status_of(
            raw_request(
                server.url,
                b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1_000_000 + b"\r\n\r\n",
            )
        )

        # 3. 5,000 files in one request
        many = http.post(
            "/v1/classify", files=files_field(*((f"{i}.jpg", jpeg_bytes[:100]) for i in range(5000)))
        )
        statuses.append(many.status_code)
        after_abuse = rss_mib(pid)

        # 4. the worst legitimate load: concurrent requests of images right at the pixel limit
        big: list[int] = []

        def send_big() -> None:
            with httpx.Client(base_url=server.url, timeout=300) as own:
                r = own.post(
                    "/v1/classify",
                    files=files_field(*((f"big-{i}.jpg", huge_cell) for i in range(big_per_request))),
                )
                big.append(r.status_code)

        started = time.perf_counter()
        senders = [threading.Thread(target=send_big) for _ in range(big_requests)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        big_seconds = time.perf_counter() - started
        end, peak = rss_mib(pid), peak_rss_mib(pid)
        assert http.get("/v2/health/ready").status_code == 200  # still serving
        assert server.proc.poll() is None
        log = server.log()

    n_big = big_requests * big_per_request
    print(
        f"\nRSS MiB: warm {start:.0f}, after corpus {after_corpus:.0f}, after huge bodies {after_abuse:.0f}, "
        f"after {n_big} images at {MAX_PIXELS:,} px {end:.0f}; peak (VmHWM) {peak:.0f}; "
        f"{n_big} max-pixel images in {big_seconds:.1f} s; {load_average()}"
    )
    assert all(s < 500 for s in statuses + big), statuses + big
    assert statuses[: len(range(0, len(corpus), 32))] == [207] * len(range(0, len(corpus), 32))
    abuse = statuses[len(range(0, len(corpus), 32)) :]
    assert abuse[:2] == [413, 413] and all(400 <= s < 500 for s in abuse), abuse
    assert big == [200] * big_requests and padded in (200, 400, 413, 431)
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    # The body of a refused request is never kept: bad input alone leaves the process where it was.
    assert after_abuse - start < 100, (start, after_abuse)
    assert peak < PEAK_BOUND_MIB, f"peak RSS {peak:.0f} MiB (pod limit {POD_LIMIT_MIB} MiB)"


def test_bad_input_and_huge_bodies_keep_memory_bounded(
    production_like_registry: Path, jpeg_bytes: bytes, png_bytes: bytes
) -> None:
    """Two concurrent max-pixel images: both preprocessing workers busy with the largest allowed image."""
    bad_input_and_huge_bodies(
        production_like_registry, jpeg_bytes, png_bytes, big_requests=2, big_per_request=1
    )


@pytest.mark.slow
def test_bad_input_and_huge_bodies_keep_memory_bounded_many_big_images(
    production_like_registry: Path, jpeg_bytes: bytes, png_bytes: bytes
) -> None:
    """Three concurrent requests of two max-pixel images each: more queued than there are workers."""
    bad_input_and_huge_bodies(
        production_like_registry, jpeg_bytes, png_bytes, big_requests=3, big_per_request=2
    )
