"""Request dependencies as `Annotated` aliases (the full-stack template's `api/deps.py`)."""

from __future__ import annotations

from typing import Annotated

from anyio import CapacityLimiter
from fastapi import Depends, Request

from service.config import Settings
from service.inference import ModelSlot
from service.metrics import ServiceMetrics


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_model_slot(request: Request) -> ModelSlot:
    return request.app.state.model_slot


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


def get_inference_limiter(request: Request) -> CapacityLimiter:
    return request.app.state.inference_limiter


SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelSlotDep = Annotated[ModelSlot, Depends(get_model_slot)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
InferenceLimiterDep = Annotated[CapacityLimiter, Depends(get_inference_limiter)]
