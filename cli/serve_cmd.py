"""`wbc serve` and `wbc classify`: the inference service and its command-line client."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from service.client import classify_command


def serve(
    registry: Annotated[Path | None, typer.Option(help="Registry root (default: WBC_REGISTRY or var/registry).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: WBC_PORT or 8000).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: WBC_HOST or 127.0.0.1).")] = None,
    version: Annotated[str | None, typer.Option(
        help="Version number, 'latest', 'production' or 'candidate' (default: production, else latest).")] = None,
) -> None:
    """Serve the registry's model over HTTP: /v1/classify, /v2/health/*, /metrics."""
    from service.main import run

    run(registry=registry, port=port, host=host, version=version)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("classify")(classify_command)
