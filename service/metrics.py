"""Prometheus metrics: HTTP requests by route and status, latencies, predictions by class, image errors.

Each app owns its own `CollectorRegistry` (not prometheus-client's global one), so several apps in one
process (tests, a later blue/green swap) never clash over metric names. Routes are labelled with their
template (`/v1/classify`), never the raw path, so label cardinality stays bounded.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds; CPU inference of one small CNN batch is milliseconds, a full request with decoding can be 1 s+.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "wbc_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "wbc_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.predictions = Counter(
            "wbc_predictions", "Images classified, by answered label", ["model", "version", "label"], registry=r
        )
        self.image_errors = Counter(
            "wbc_image_errors", "Uploaded files refused, by reason", ["code"], registry=r
        )
        self.preprocess_seconds = Histogram(
            "wbc_preprocess_duration_seconds", "Decode + contract preprocessing of one request's files",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inference_seconds = Histogram(
            "wbc_inference_duration_seconds", "ONNX Runtime time for one batch",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "wbc_inference_batch_size", "Images per ONNX Runtime batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.model_ready = Gauge("wbc_model_ready", "1 while a model is loaded and served", registry=r)
        self.model_info = Gauge(
            "wbc_model_info", "The served model (value 1)", ["model", "version", "architecture"], registry=r
        )

    def set_model(self, name: str, version: int, architecture: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, str(version), architecture).set(1)
        self.model_ready.set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streamed bodies) counting every response."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.request_seconds.labels(method, template).observe(time.perf_counter() - start)
