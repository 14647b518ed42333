"""The service over real HTTP: `service.main.run` in its own process, the `wbc classify` client against it."""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner
from upload_helpers import files_field

from service.client import ClientError, classify_command, classify_files, print_results

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(registry_root: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "WBC_MODEL_NAME": "wbc-test", "WBC_INTRA_OP_THREADS": "1"}
    code = f"from service.main import run; run(registry={str(registry_root)!r}, port={port}, host='127.0.0.1')"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not become ready within 60 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_classify_over_http(server_url: str, cell_images: dict[str, bytes]) -> None:
    files = files_field(*cell_images.items(), ("empty.png", b""))
    response = httpx.post(f"{server_url}/v1/classify", files=files, timeout=30)
    assert response.status_code == 207
    body = response.json()
    assert (body["model"], body["classified"], body["failed"]) == ("wbc-test", len(cell_images), 1)
    assert body["results"][-1]["error"]["code"] == "empty"
    assert "wbc_predictions_total" in httpx.get(f"{server_url}/metrics").text


def test_client_prints_a_table(server_url: str, tmp_path: Path, cell_images: dict[str, bytes]) -> None:
    paths = []
    for name, data in cell_images.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    body = classify_files(paths, server_url)
    console = Console(record=True, width=200)
    assert print_results(body, console) == 0
    text = console.export_text()
    assert "wbc-test v1" in text and "neutrophil" in text
    for path in paths:
        assert path.name in text


def test_cli_command_exit_codes(server_url: str, tmp_path: Path, jpeg_bytes: bytes) -> None:
    app = typer.Typer()
    app.command()(classify_command)
    good, bad = tmp_path / "cell.jpg", tmp_path / "notes.txt"
    good.write_bytes(jpeg_bytes)
    bad.write_text("not an image")
    runner = CliRunner()

    ok = runner.invoke(app, [str(good), "--url", server_url])
    assert ok.exit_code == 0, ok.output
    partial = runner.invoke(app, [str(good), str(bad), "--url", server_url])
    assert partial.exit_code == 1 and "notes.txt" in partial.output and "text, not an image" in partial.output
    unreachable = runner.invoke(app, [str(good), "--url", f"http://127.0.0.1:{free_port()}"])
    assert unreachable.exit_code == 2


def test_client_reports_unreachable_service(tmp_path: Path, jpeg_bytes: bytes) -> None:
    good = tmp_path / "cell.jpg"
    good.write_bytes(jpeg_bytes)
    with pytest.raises(ClientError, match="/v1/classify"):
        classify_files([good], f"http://127.0.0.1:{free_port()}", timeout=2)
