"""A service process that can be stopped and started again on the same port (tests/service's
running_server picks a new port each time, which a restart test cannot use)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


class ServiceProcess:
    def __init__(self, port: int, env: dict[str, str], log_path: Path):
        self.port, self.env, self.log_path = port, env, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, wait_live: float = 90.0) -> None:
        """Start and wait until the port answers (uvicorn binds after the lifespan ran: model loaded
        or its absence recorded)."""
        code = (
            "import logging, uvicorn\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "from service.main import create_app\n"
            f"uvicorn.run(create_app(), host='127.0.0.1', port={self.port}, log_level='info')\n"
        )
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log.close()
        deadline = time.monotonic() + wait_live
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/v2/health/live", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start within {wait_live} s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
