"""KServe v2 health probes: live = the process answers; ready = a model is loaded and can be used."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.deps import ModelSlotDep

router = APIRouter(prefix="/v2/health", tags=["health"])


@router.get("/live")
async def live() -> dict[str, bool]:
    """200 while the process serves HTTP (no model needed)."""
    return {"live": True}


@router.get(
    "/ready",
    responses={
        200: {"description": "A model is loaded; the body names it and the session options"},
        503: {"description": "No model loaded; `reason` says why (empty registry, checksum, contract mismatch)"},
    },
)
async def ready(slot: ModelSlotDep) -> Any:
    """200 only when a model is loaded. While none is, each probe may retry the registry (at most every
    WBC_MODEL_RETRY_SECONDS), so a service started before the first registration becomes ready by itself."""
    model = slot.current or await run_in_threadpool(slot.ensure_loaded)
    if model is None:
        return JSONResponse({"ready": False, "reason": slot.last_error}, status_code=503)
    return {"ready": True, **model.describe()}
