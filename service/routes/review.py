"""The review worklist (server-rendered page) and the JSON API its script calls; reviewers only.

Pages:  GET /review                                   worklist (filters as query parameters)
        GET /review/cells/{id}/image                  the stored image (converted to PNG if a browser
                                                      cannot show the original, e.g. TIFF or DICOM)
API:    GET  /v1/review/cells                         same filters, JSON
        GET  /v1/review/specimens[/{id}]              counts per specimen, whether it can be signed off
        POST /v1/review/cells/{id}  {"label": L}      confirm (L = current label) or reclassify
        POST /v1/review/specimens/{id}/sign-off       409 while a cell is unreviewed or unidentified

URLs carry internal specimen ids, never the laboratory's accession, so access logs hold no patient data.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from service.auth import ReviewerDep, authorize
from service.db.models import Cell
from service.review import queries, workflow
from service.review.images import BROWSER_TYPES
from service.review.queries import Status, WorklistFilter
from service.review.workflow import ReviewError

TEMPLATES = Jinja2Templates(directory=Path(__file__).resolve().parents[1] / "review" / "templates")
PAGE_SIZE = 120
# Row ids are INTEGER columns (32-bit on PostgreSQL): a larger number is refused as 422 here instead of
# overflowing in the database (found by schemathesis, tests/reliability).
MAX_ROW_ID = 2**31 - 1
RowId = Annotated[int, PathParam(ge=1, le=MAX_ROW_ID)]
# Pages hold patient-related images: no caching, no framing, no third-party anything.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

pages = APIRouter(prefix="/review", tags=["review"], include_in_schema=False)
api = APIRouter(prefix="/v1/review", tags=["review"])


def _state(request: Request) -> Any:
    return request.app.state


def _filter(
    specimen: str | None,
    predicted: str | None,
    unidentified: bool,
    low_confidence: bool,
    status: Status,
    include_signed: bool,
) -> WorklistFilter:
    spec = (specimen or "").strip()
    if spec and not (spec.isascii() and spec.isdigit() and int(spec) <= MAX_ROW_ID):
        raise HTTPException(422, f"specimen must be a specimen id (a number), not {spec[:40]!r}")
    return WorklistFilter(
        specimen=int(spec) if spec else None,
        predicted=(predicted or "").strip() or None,
        unidentified=unidentified,
        low_confidence=low_confidence,
        status=status,
        include_signed=include_signed,
    )


def _raise(error: ReviewError) -> HTTPException:
    return HTTPException(error.status, error.message)


# ---- pages -------------------------------------------------------------------------------------------------
@pages.get("")
def worklist_page(
    request: Request,
    specimen: str | None = None,
    predicted: str | None = None,
    unidentified: bool = False,
    low_confidence: bool = False,
    status: Status = "all",
    include_signed: bool = False,
    page: int = Query(1, ge=1, le=MAX_ROW_ID // PAGE_SIZE),
) -> Response:
    try:
        principal = authorize(request, "review")
    except HTTPException as exc:
        if exc.status_code == 401:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            # Relative: behind a TLS-terminating proxy an absolute URL would name the wrong scheme.
            return RedirectResponse(f"/review/login?{urlencode({'next': target})}", 303)
        return TEMPLATES.TemplateResponse(
            request,
            "error.html",
            {"title": "Not allowed", "message": exc.detail},
            status_code=exc.status_code,
            headers=PAGE_HEADERS,
        )
    state = _state(request)
    settings = state.settings
    f = _filter(specimen, predicted, unidentified, low_confidence, status, include_signed)
    with state.db.transaction() as session:
        cells, total = queries.worklist(
            session, f, settings.low_confidence, PAGE_SIZE, (page - 1) * PAGE_SIZE
        )
        views = [queries.cell_view(c, settings.low_confidence, settings.extra_review_labels) for c in cells]
        specimens = queries.specimen_summaries(session, include_signed=f.include_signed)
        selected = None
        if f.specimen is not None:
            selected = next(iter(queries.specimen_summaries(session, specimen_id=f.specimen)), None)
        predicted_labels = queries.predicted_labels(session)
    context = {
        "principal": principal,
        "settings": settings,
        "filter": f,
        "cells": views,
        "total": total,
        "page": page,
        "pages": max(1, -(-total // PAGE_SIZE)),
        "specimens": specimens,
        "selected": selected,
        "predicted_labels": predicted_labels,
        "low_percent": round(settings.low_confidence * 100),
        "query_args": f.query_args(),
    }
    return TEMPLATES.TemplateResponse(request, "worklist.html", context, headers=PAGE_HEADERS)


@pages.get("/cells/{cell_id}/image")
def cell_image(cell_id: RowId, request: Request, _: ReviewerDep) -> Response:
    state = _state(request)
    with state.db.transaction() as session:
        cell = session.get(Cell, cell_id)
        if cell is None:
            raise HTTPException(404, f"no cell {cell_id}")
        relative, media_type = cell.image_path, cell.media_type
    try:
        data = state.images.read(relative)
    except OSError:
        raise HTTPException(410, f"the image of cell {cell_id} is no longer in the image store") from None
    if media_type not in BROWSER_TYPES:
        data, media_type = _as_png(data, state.settings.max_pixels), "image/png"
    return Response(
        data,
        media_type=media_type,
        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


def _as_png(data: bytes, max_pixels: int) -> bytes:
    from service import decoding

    decode = getattr(decoding, "decode_upload", None)  # DICOM-aware decoder, when present
    image = (
        decode(data, max_pixels=max_pixels).image
        if decode
        else decoding.decode_image(data, max_pixels=max_pixels)
    )
    out = io.BytesIO()
    image.convert("RGB").save(out, "PNG")
    return out.getvalue()


# ---- JSON API ----------------------------------------------------------------------------------------------
class ReviewDecision(BaseModel):
    label: str = Field(description="The cell's label: its current label confirms it, another reclassifies it")


@api.get("/cells")
def list_cells(
    request: Request,
    _: ReviewerDep,
    specimen: str | None = None,
    predicted: str | None = None,
    unidentified: bool = False,
    low_confidence: bool = False,
    status: Status = "all",
    include_signed: bool = False,
    limit: int = Query(PAGE_SIZE, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_ROW_ID),
) -> dict[str, Any]:
    """Cells matching the filters, oldest specimen first: `{total, cells: [...]}`."""
    state = _state(request)
    f = _filter(specimen, predicted, unidentified, low_confidence, status, include_signed)
    with state.db.transaction() as session:
        cells, total = queries.worklist(session, f, state.settings.low_confidence, limit, offset)
        views = [
            queries.cell_view(c, state.settings.low_confidence, state.settings.extra_review_labels)
            for c in cells
        ]
    return {"total": total, "cells": views}


@api.post(
    "/cells/{cell_id}",
    responses={
        404: {},
        409: {"description": "The specimen is signed off"},
        422: {"description": "A label the reviewer may not give"},
    },
)
def review_cell(
    cell_id: RowId, decision: ReviewDecision, request: Request, principal: ReviewerDep
) -> dict[str, Any]:
    """Confirm or reclassify one cell; recorded with who, when, the old and the new label."""
    state = _state(request)
    try:
        with state.db.transaction() as session:
            cell = workflow.review_cell(
                session,
                state.audit,
                cell_id,
                decision.label,
                principal.name,
                state.settings.extra_review_labels,
            )
            return queries.cell_view(cell, state.settings.low_confidence, state.settings.extra_review_labels)
    except ReviewError as exc:
        raise _raise(exc) from None


@api.get("/specimens")
def list_specimens(request: Request, _: ReviewerDep, include_signed: bool = False) -> list[dict[str, Any]]:
    with _state(request).db.transaction() as session:
        return [_summary(s) for s in queries.specimen_summaries(session, include_signed=include_signed)]


@api.get("/specimens/{specimen_id}", responses={404: {}})
def get_specimen(specimen_id: RowId, request: Request, _: ReviewerDep) -> dict[str, Any]:
    with _state(request).db.transaction() as session:
        found = queries.specimen_summaries(session, specimen_id=specimen_id)
    if not found:
        raise HTTPException(404, f"no specimen {specimen_id}")
    return _summary(found[0])


@api.post(
    "/specimens/{specimen_id}/sign-off",
    responses={404: {}, 409: {"description": "Cells unreviewed or unidentified, or already signed off"}},
)
def sign_off(specimen_id: RowId, request: Request, principal: ReviewerDep) -> dict[str, Any]:
    """Sign off a specimen whose every cell is reviewed and none is unidentified."""
    state = _state(request)
    try:
        with state.db.transaction() as session:
            workflow.sign_off(session, state.audit, specimen_id, principal.name)
    except ReviewError as exc:
        raise _raise(exc) from None
    with state.db.transaction() as session:
        return _summary(queries.specimen_summaries(session, specimen_id=specimen_id)[0])


def _summary(s: queries.SpecimenSummary) -> dict[str, Any]:
    return {
        "id": s.id,
        "name": s.name,
        "cells": s.cells,
        "unreviewed": s.unreviewed,
        "unidentified": s.unidentified,
        "corrected": s.corrected,
        "signed_off_by": s.signed_off_by,
        "signed_off_at": s.signed_off_at,
        "can_sign_off": s.can_sign_off,
    }
