"""Prometheus metrics: HTTP requests by route and status, latencies, predictions by class, image errors.

Names are stable (alert rules and the Grafana dashboard in k8s/monitoring/ use them):
    wbc_http_requests_total{method,route,status}           requests by status
    wbc_http_request_duration_seconds{method,route}        total latency (histogram)
    wbc_preprocess_duration_seconds                        decode + preprocessing, per image (histogram)
    wbc_queue_wait_seconds                                 enqueue → batch start, per image (histogram)
    wbc_inference_duration_seconds                         ONNX Runtime, per batch (histogram)
    wbc_inference_batch_size                               images per batch (histogram)
    wbc_queue_depth                                        images waiting for inference (gauge)
    wbc_predictions_total{model,version,label}             answers by label (incl. "unidentified")
    wbc_prediction_confidence{model,version}               top-class probability (histogram)
    wbc_abstentions_total{model,version}                   answers "unidentified"
    wbc_image_errors_total{code}                           refused files by reason
    wbc_model_info{model,version,architecture,precision,provider}   the served model (value 1)
    wbc_model_ready                                        1 while a model is served
    wbc_model_swaps_total{trigger,result}                  swap attempts (result: swapped|unchanged|failed)

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
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


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
            "wbc_predictions", "Images classified, by answered label", ["model", "version", "label"],
            registry=r,
        )
        self.image_errors = Counter(
            "wbc_image_errors", "Uploaded files refused, by reason", ["code"], registry=r
        )
        self.preprocess_seconds = Histogram(
            "wbc_preprocess_duration_seconds", "Decode + contract preprocessing of one image",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_seconds = Histogram(
            "wbc_queue_wait_seconds", "Time an image waited for the inference runner",
            buckets=QUEUE_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("wbc_queue_depth", "Images waiting for inference", registry=r)
        self.confidence = Histogram(
            "wbc_prediction_confidence", "Top-class probability of each answered image", ["model", "version"],
            buckets=CONFIDENCE_BUCKETS, registry=r,
        )
        self.abstentions = Counter(
            "wbc_abstentions", "Images answered 'unidentified' (below the abstain threshold)",
            ["model", "version"], registry=r,
        )
        self.swaps = Counter(
            "wbc_model_swaps", "Model swap attempts", ["trigger", "result"], registry=r
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
            "wbc_model_info", "The served model (value 1)",
            ["model", "version", "architecture", "precision", "provider"], registry=r,
        )

    def set_model(self, name: str, version: int, architecture: str, precision: str = "fp32",
                  provider: str = "CPUExecutionProvider") -> None:
        self.model_info.clear()
        self.model_info.labels(name, str(version), architecture, precision, provider).set(1)
        self.model_ready.set(1)

    def record_prediction(
        self, model: str, version: int, label: str, confidence: float, abstained: bool
    ) -> None:
        v = str(version)
        self.predictions.labels(model, v, label).inc()
        self.confidence.labels(model, v).observe(confidence)
        if abstained:
            self.abstentions.labels(model, v).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (BaseHTTPMiddleware would buffer streamed bodies) counting every response."""

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
