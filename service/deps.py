"""Request dependencies as `Annotated` aliases (the full-stack template's `api/deps.py`).

Every dependency is `async def` on purpose: FastAPI runs a plain `def` dependency on its thread pool,
one thread hop per dependency per request. Access control plugs in here: `get_requester` names the system that sent a classification (default:
the `X-Requesting-System` header, unauthenticated) and `require_admin` guards /v1/admin/* (default: a
bearer token equal to WBC_ADMIN_TOKEN, else 403). Replace them (or override them with
`app.dependency_overrides`) to use real authentication; the routes only see the returned names.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from service.config import Settings
from service.inference import ModelSlot
from service.metrics import ServiceMetrics
from service.pipeline import Pipeline
from service.sink import PredictionSink


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_model_slot(request: Request) -> ModelSlot:
    return request.app.state.model_slot


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def get_pipeline(request: Request) -> Pipeline:
    return request.app.state.pipeline


async def get_prediction_sink(request: Request) -> PredictionSink | None:
    return getattr(request.app.state, "prediction_sink", None)


async def get_requester(request: Request) -> str | None:
    """Who sent the images (recorded with each prediction). Unauthenticated default: a header."""
    return request.headers.get("x-requesting-system")


async def require_admin(request: Request) -> str:
    """The acting administrator's name, else 401/403. Default: `Authorization: Bearer $WBC_ADMIN_TOKEN`."""
    token = request.app.state.settings.admin_token
    if token is None:
        raise HTTPException(403, "admin endpoints are disabled: set WBC_ADMIN_TOKEN")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise HTTPException(401, "admin endpoints need 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise HTTPException(403, "wrong admin token")
    return "admin"


SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelSlotDep = Annotated[ModelSlot, Depends(get_model_slot)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
PredictionSinkDep = Annotated[PredictionSink | None, Depends(get_prediction_sink)]
RequesterDep = Annotated[str | None, Depends(get_requester)]
AdminDep = Annotated[str, Depends(require_admin)]
