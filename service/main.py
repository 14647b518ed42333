"""The inference service: `create_app(settings)` builds the FastAPI app, `run(...)` serves it (`wbc serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from service.batching import DynamicBatcher
from service.config import Settings
from service.inference import LoadedModel, ModelSlot
from service.limits import RequestSizeLimit
from service.metrics import MetricsMiddleware, ServiceMetrics
from service.pipeline import Pipeline
from service.ratelimit import RateLimit
from service.review import wiring as review_wiring
from service.routes import admin, classify, health, metrics, v2
from service.watch import watch_registry

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service_metrics = ServiceMetrics()

    def on_load(model: LoadedModel) -> None:
        service_metrics.set_model(model.name, model.version, model.contract.architecture, model.precision,
                                  model.provider)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        slot: ModelSlot = app.state.model_slot
        await run_in_threadpool(review_wiring.start, app)  # database migrated to head, or no start
        # A missing or refused model does not stop the process: ready answers 503 with the reason.
        # Only WBC_DEVICE=cuda without a GPU does (DeviceUnavailableError propagates).
        await run_in_threadpool(slot.load)
        batcher = DynamicBatcher(settings.max_batch_size, settings.max_queue_delay_ms / 1000.0,
                                 settings.max_queue_images, service_metrics)
        app.state.pipeline = Pipeline(batcher, settings.preprocess_workers, service_metrics, settings.max_pixels,
                                      settings.site_cell_diameter, settings.site_granule_reference)
        watcher = (asyncio.create_task(watch_registry(slot, service_metrics, settings.watch_seconds))
                   if settings.watch_seconds > 0 else None)
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await run_in_threadpool(app.state.pipeline.close)
            await run_in_threadpool(review_wiring.stop, app)

    app = FastAPI(
        title="WBC classifier",
        summary="White-blood-cell crops → per-class probabilities from the registry's ONNX model",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = service_metrics
    app.state.prediction_sink = None  # service.sink: persistence plugs in here
    app.state.model_slot = ModelSlot(settings, on_load=on_load)
    app.include_router(classify.router)
    app.include_router(v2.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(admin.router)
    review_wiring.attach(app, settings)  # database, prediction sink, auth, review pages, audit
    # The last added is outermost: metrics see every answer, including the size guard's 413s.
    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)
    if settings.rate_limit:  # before the size guard and the credential check: a flood costs neither
        app.add_middleware(RateLimit, limits=settings.rate_limit)
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
