"""Adds the review loop to the service app: database, image store, audit log, prediction sink, accounts.

`attach(app, settings)` (in create_app) sets app.state.db / images / audit / prediction_sink /
audit_event, plugs real authentication into service.deps (the requesting system of /v1/classify and
the admin guard of /v1/admin/*) when auth is on, and adds the routers and static files.
`start(app)` (in the lifespan, on a worker thread) migrates the database to head; `stop(app)` closes it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from service import auth, deps
from service.audit import AuditLog
from service.config import Settings
from service.db.session import Database
from service.review.images import ImageStore
from service.review.recorder import PredictionRecorder
from service.routes import accounts as accounts_routes
from service.routes import auth as auth_routes
from service.routes import review as review_routes

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"


def attach(app: FastAPI, settings: Settings) -> None:
    db = Database(settings.database_url.get_secret_value())
    audit_log = AuditLog(settings.audit_key.get_secret_value() if settings.audit_key else None)
    images = ImageStore(settings.image_store)
    app.state.db, app.state.audit, app.state.images = db, audit_log, images
    if settings.record_predictions:
        app.state.prediction_sink = PredictionRecorder(db, images, audit_log, settings.site)

    def audit_event(
        actor: str, action: str, subject: str = "", details: dict[str, Any] | None = None
    ) -> None:
        """For other routes (e.g. promote/rollback): one audit entry in its own transaction (blocking)."""
        with db.transaction() as session:
            audit_log.append(session, actor=actor, action=action, subject=subject, details=details)

    app.state.audit_event = audit_event
    # A lost or refused database connection (or an exhausted pool) anywhere, including the credential
    # check every request makes, is answered 503 + Retry-After, not 500: the transaction was rolled back.
    for error in (OperationalError, InterfaceError, PoolTimeoutError):
        app.add_exception_handler(error, database_unavailable)
    if settings.auth_enabled:
        app.dependency_overrides[deps.get_requester] = auth.requesting_system
        app.dependency_overrides[deps.require_admin] = auth.admin_name
    for router in (
        auth_routes.pages,
        auth_routes.api,
        review_routes.pages,
        review_routes.api,
        accounts_routes.router,
    ):
        app.include_router(router)
    app.mount("/review/static", StaticFiles(directory=STATIC), name="review-static")


async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Only the error's type: its text can hold SQL, and the path is enough to find the route.
    cause = getattr(exc, "orig", None) or exc
    log.warning("database unavailable (%s) during %s %s", type(cause).__name__, request.method, request.url.path)
    return JSONResponse(
        {"detail": f"the database is unavailable ({type(cause).__name__}); nothing was done, send the request again"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


def start(app: FastAPI) -> None:
    settings, db = app.state.settings, app.state.db
    db.upgrade()
    log.info(
        "review database %s at revision %s; images in %s; site %s",
        db.describe(),
        db.current_revision(),
        app.state.images.root,
        settings.site,
    )
    if not settings.auth_enabled:
        log.warning(
            "authentication is OFF (loopback host, WBC_AUTH_REQUIRED unset or false): anyone on this "
            "machine may classify, review and administer as 'anonymous'"
        )
    if settings.audit_key is None:
        log.warning(
            "WBC_AUDIT_KEY is not set: the audit chain detects edits, but someone with write access "
            "to the database could recompute it"
        )


def stop(app: FastAPI) -> None:
    app.state.db.dispose()
