"""Prometheus exposition of the app's own metrics registry."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Request counts by route and status, latency histograms, predictions by class, image errors."""
    return Response(metrics.render(), media_type=metrics.content_type)
