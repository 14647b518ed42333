"""The inference service: `create_app(settings)` builds the FastAPI app, `run(...)` serves it (`wbc serve`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from anyio import CapacityLimiter
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from service.config import Settings
from service.inference import ModelSlot
from service.limits import RequestSizeLimit
from service.metrics import MetricsMiddleware, ServiceMetrics
from service.routes import classify, health, metrics

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service_metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.inference_limiter = CapacityLimiter(1)
        # A missing or refused model does not stop the process: ready answers 503 with the reason.
        await run_in_threadpool(app.state.model_slot.load)
        yield

    app = FastAPI(
        title="WBC classifier",
        summary="White-blood-cell crops → per-class probabilities from the registry's ONNX model",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = service_metrics
    app.state.model_slot = ModelSlot(
        settings, on_load=lambda m: service_metrics.set_model(m.name, m.version, m.contract.architecture)
    )
    app.include_router(classify.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    # The last added is outermost: metrics see every answer, including the size guard's 413s.
    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=service_metrics)
    return app


def run(
    registry: str | Path | None = None,
    port: int | None = None,
    host: str | None = None,
    version: int | str | None = None,
) -> None:
    """Serve with uvicorn; arguments left as None come from WBC_* variables (see service.config)."""
    import uvicorn

    given = {"registry": registry, "port": port, "host": host, "version": version}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)
