"""Run the service in its own process on a free port, keeping everything it logs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_server(
    registry: Path,
    model_name: str,
    env: dict[str, str] | None = None,
    log_level: str = "info",
    timeout: float = 60.0,
) -> Iterator[RunningServer]:
    """`uvicorn service.main:create_app` with WBC_* settings from `env`; stdout+stderr go to a file."""
    port = free_port()
    full_env = {
        **os.environ,
        "WBC_REGISTRY": str(registry),
        "WBC_MODEL_NAME": model_name,
        "WBC_INTRA_OP_THREADS": "1",
        "WBC_PORT": str(port),
        **(env or {}),
    }
    code = (
        "import logging, uvicorn\n"
        f"logging.basicConfig(level=logging.{log_level.upper()})\n"
        "from service.main import create_app\n"
        f"uvicorn.run(create_app(), host='127.0.0.1', port={port}, log_level={log_level!r})\n"
    )
    log_file = tempfile.NamedTemporaryFile("w", prefix="wbc-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=full_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = RunningServer(f"http://127.0.0.1:{port}", proc, Path(log_file.name))
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/v2/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start within {timeout} s:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
        server.log_path.unlink(missing_ok=True)
