"""`wbc classify` against a service that requires auth: the token opens it, the specimen groups the cells."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from review_helpers import Service

from service.client import ClientError, classify_files
from service.main import create_app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def live_url(service: Service):
    """The same settings and database as `service`, behind a real uvicorn on a free port."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service.settings), host="127.0.0.1", port=port,
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "service not ready"
        time.sleep(0.2)
    yield url
    server.should_exit = True
    thread.join(timeout=15)


def test_client_sends_token_and_specimen(service: Service, live_url: str, barcelona_cells, tmp_path: Path):
    paths = []
    for name, data, _ in barcelona_cells[:2]:
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)

    with pytest.raises(ClientError, match="401"):
        classify_files(paths, live_url)

    token = service.add_token()["Authorization"].removeprefix("Bearer ")
    body = classify_files(paths, live_url, token=token, specimen="BCN-CLIENT-1")
    assert [r["filename"] for r in body["results"]] == [p.name for p in paths]

    reviewer = service.add_user("rev-client", "reviewer")
    service.login(*reviewer)
    specimens = service.client.get("/v1/review/specimens").json()
    listed = specimens["specimens"] if isinstance(specimens, dict) else specimens
    assert any("BCN-CLIENT-1" in str(s) for s in listed), listed
