"""Signing in and out of the review pages, and asking who one is.

GET  /review/login     the form
POST /review/login     user name + password → session cookie (HttpOnly, SameSite=Strict) → the worklist
POST /review/logout    ends the session
GET  /v1/auth/whoami   the caller's name, role and kind (any credentials)
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from service import accounts
from service.auth import SESSION_COOKIE, authenticate
from service.routes.review import PAGE_HEADERS, TEMPLATES

pages = APIRouter(prefix="/review", tags=["auth"], include_in_schema=False)
api = APIRouter(prefix="/v1/auth", tags=["auth"])


def _safe_next(target: str | None) -> str:
    """Only a path on this server (no scheme, no //host): the login form must not redirect elsewhere."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/review"


@pages.get("/login", name="login_page")
def login_page(request: Request, next: str | None = None) -> Response:
    return TEMPLATES.TemplateResponse(
        request, "login.html", {"next": _safe_next(next), "error": None}, headers=PAGE_HEADERS
    )


@pages.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str | None, Form()] = None,
) -> Response:
    state = request.app.state
    with state.db.transaction() as session:
        user = accounts.authenticate_password(session, username, password)
        if user is None:
            context = {
                "next": _safe_next(next),
                "error": "Wrong user name or password.",
                "username": username,
            }
            return TEMPLATES.TemplateResponse(
                request, "login.html", context, status_code=401, headers=PAGE_HEADERS
            )
        cookie, _ = accounts.start_web_session(session, user, timedelta(hours=state.settings.session_hours))
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(state.settings.session_hours * 3600),
        path="/",
        httponly=True,
        samesite="strict",
        secure=state.settings.secure_cookies,
    )
    return response


@pages.post("/logout")
def logout(request: Request) -> Response:
    # No CSRF token needed: the cookie is SameSite=Strict, and a forged logout only ends a session.
    if cookie := request.cookies.get(SESSION_COOKIE):
        with request.app.state.db.transaction() as session:
            accounts.end_web_session(session, cookie)
    response = RedirectResponse("/review/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@api.get("/whoami", responses={401: {}})
def whoami(request: Request) -> dict[str, Any]:
    principal = authenticate(request)
    if principal is None:
        raise HTTPException(401, "no valid credentials", headers={"WWW-Authenticate": 'Bearer realm="wbc"'})
    return {"name": principal.name, "role": principal.role, "kind": principal.kind}
