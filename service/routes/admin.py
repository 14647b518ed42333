"""Model administration: what is served, reload, promote, roll back, without downtime.

    GET  /v1/admin/model            served model, the slot's reference, registry versions and aliases
    POST /v1/admin/model/reload     re-resolve the reference (as the registry watch does) and swap if changed
    POST /v1/admin/model/promote    {"version": N, "alias": "production", "reason": "..."}
    POST /v1/admin/model/rollback   {"version": N, "reason": "..."}; no version = production's previous one

Promotion and rollback move the registry alias (recorded with the acting admin in its history) and, when
this service follows that alias, load + warm the version first and switch only if that worked: a version
that cannot be served leaves the alias and the service as they were (409). Requests in flight finish on
the model they started with. Every route depends on `require_admin` (service.deps): replace it for real
authentication.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from models.registry import RegistryError
from service import audit
from service.deps import AdminDep, MetricsDep, ModelSlotDep
from service.inference import ModelLoadError, ModelSlot, SwapResult, variant_of

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class PromoteRequest(BaseModel):
    version: int = Field(ge=1)
    alias: Literal["production", "candidate"] = "production"
    reason: str = Field("", max_length=500)


class RollbackRequest(BaseModel):
    version: int | None = Field(None, ge=1, description="Unset: the version production pointed at before")
    reason: str = Field("", max_length=500)


def _state(slot: ModelSlot) -> dict[str, Any]:
    current = slot.current
    return {
        "serving": current.describe() if current else None,
        "not_serving_reason": None if current else slot.last_error,
        "reference": slot.reference or "production (else latest)",
        "pinned": slot.pinned,
        "precision": slot.settings.precision,
        "aliases": slot.registry.aliases(),
        "versions": [
            {
                "version": v.version,
                "variant": variant_of(v),
                "created": v.metadata.get("created"),
                "sha256": v.sha256,
                "quantized_from": v.metadata.get("quantization", {}).get("source_version"),
            }
            for v in slot.registry.versions()
        ],
        "swaps": slot.swaps,
    }


def _answer(slot: ModelSlot, result: SwapResult, note: str | None = None) -> dict[str, Any]:
    body = {**result.as_dict(), "serving": slot.current.describe() if slot.current else None}
    if note:
        body["note"] = note
    return body


async def _run(slot: ModelSlot, metrics: Any, trigger: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        result = await run_in_threadpool(call, *args, **kwargs)
    except RegistryError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=404)
    except ModelLoadError as exc:
        metrics.swaps.labels(trigger, "failed").inc()
        return JSONResponse(
            {"detail": f"not switched, still serving the previous model: {exc}"}, status_code=409
        )
    except OSError as exc:  # e.g. the registry is mounted read-only in this replica
        metrics.swaps.labels(trigger, "failed").inc()
        return JSONResponse(
            {"detail": f"the registry cannot be changed from here ({exc.strerror}): move the alias where it "
             "is writable (wbc registry …); replicas with WBC_WATCH_SECONDS follow it"},
            status_code=409,
        )
    metrics.swaps.labels(trigger, "swapped" if result.changed else "unchanged").inc()
    return result


def _pinned_note(slot: ModelSlot, alias: str) -> str | None:
    if slot.follows(alias):
        return None
    return (
        f"this service follows {slot.reference!r} (WBC_VERSION), not {alias!r}: the alias moved, "
        "the served model did not"
    )


@router.get("/model")
async def model_state(slot: ModelSlotDep, admin: AdminDep) -> dict[str, Any]:
    return await run_in_threadpool(_state, slot)


@router.post("/model/reload")
async def reload(slot: ModelSlotDep, metrics: MetricsDep, admin: AdminDep) -> Any:
    result = await _run(slot, metrics, "admin", slot.refresh, f"reload by {admin}")
    return result if isinstance(result, JSONResponse) else _answer(slot, result)


@router.post("/model/promote")
async def promote(
    body: PromoteRequest, slot: ModelSlotDep, metrics: MetricsDep, admin: AdminDep, request: Request
) -> Any:
    reason = body.reason or f"promoted by {admin}"
    result = await _run(
        slot, metrics, "admin", slot.move_alias, body.alias, body.version, reason=reason, actor=admin
    )
    if not isinstance(result, JSONResponse):
        await audit.record_from_request(
            request,
            admin,
            audit.MODEL_PROMOTED,
            f"model:{slot.settings.model_name}",
            {"alias": body.alias, "version": body.version, "reason": reason},
        )
    return (
        result if isinstance(result, JSONResponse) else _answer(slot, result, _pinned_note(slot, body.alias))
    )


@router.post("/model/rollback")
async def rollback(
    body: RollbackRequest, slot: ModelSlotDep, metrics: MetricsDep, admin: AdminDep, request: Request
) -> Any:
    version = body.version or await run_in_threadpool(slot.previous_production)
    if version is None:
        return JSONResponse(
            {"detail": "production has no earlier version to roll back to; name one"}, status_code=409
        )
    reason = body.reason or f"rollback to v{version} by {admin}"
    result = await _run(
        slot, metrics, "admin", slot.move_alias, "production", version, reason=reason, actor=admin
    )
    if not isinstance(result, JSONResponse):
        await audit.record_from_request(
            request,
            admin,
            audit.MODEL_ROLLED_BACK,
            f"model:{slot.settings.model_name}",
            {"alias": "production", "version": version, "reason": reason},
        )
    return (
        result
        if isinstance(result, JSONResponse)
        else _answer(slot, result, _pinned_note(slot, "production"))
    )
