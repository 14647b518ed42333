"""Who is calling, and may they: credentials → `Principal`, then a role check per permission.

Credentials, first match wins:
  Authorization: Bearer wbc_<id>_<secret>   a laboratory system's API token (role `lab`)
  Authorization: Basic <user:password>      a reviewer or admin account (scripts, curl)
  Cookie wbc_session=<value>                a browser signed in at /review/login

Permissions: `classify` is for lab tokens only, `review` for reviewers, `admin` (promote/rollback,
tokens, accounts) for admins. No or unknown credentials → 401; known but the wrong role → 403. A browser
session's unsafe requests must also carry its CSRF token in the X-CSRF-Token header.

With auth off (WBC_AUTH_REQUIRED=false, or unset on a loopback host; see service.config) requests
without credentials act as `anonymous` with every permission; credentials that are sent still count,
so a signed-in reviewer's decisions carry their name.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request

from service import accounts
from service.accounts import Principal

Permission = Literal["classify", "review", "admin"]
PERMITTED_ROLES: dict[str, tuple[str, ...]] = {
    "classify": ("lab",),
    "review": ("reviewer",),
    "admin": ("admin",),
}
SESSION_COOKIE = "wbc_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
ANONYMOUS = Principal(name="anonymous", role="anonymous", kind="anonymous")


def _basic(value: str) -> tuple[str, str] | None:
    try:
        username, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (username, password) if sep else None


def authenticate(request: Request) -> Principal | None:
    """The caller's principal from the credentials sent, or None (blocking: call off the event loop)."""
    db = request.app.state.db
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    value = value.strip()
    if scheme:
        with db.transaction() as session:
            if scheme.lower() == "bearer" and value:
                return accounts.authenticate_token(session, value)
            if scheme.lower() == "basic" and (pair := _basic(value)):
                user = accounts.authenticate_password(session, *pair)
                return accounts.user_principal(user) if user else None
        return None
    if cookie := request.cookies.get(SESSION_COOKIE):
        with db.transaction() as session:
            return accounts.web_session_principal(session, cookie)
    return None


def authorize(request: Request, permission: Permission) -> Principal:
    """The principal allowed to do `permission`, else HTTPException 401 / 403."""
    principal = authenticate(request)
    if principal is None:
        if not request.app.state.settings.auth_enabled and not _sent_credentials(request):
            return ANONYMOUS
        raise HTTPException(
            401,
            "credentials required: a lab-system API token (Authorization: Bearer) or "
            "a reviewer/admin account",
            headers={"WWW-Authenticate": 'Bearer realm="wbc"'},
        )
    if principal.role not in PERMITTED_ROLES[permission]:
        raise HTTPException(
            403,
            f"{principal.kind} {principal.name!r} has role {principal.role!r}; "
            f"{permission!r} needs {' or '.join(PERMITTED_ROLES[permission])}",
        )
    if principal.csrf_token and request.method not in SAFE_METHODS:
        given = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode(), principal.csrf_token.encode()):
            raise HTTPException(403, f"missing or wrong {CSRF_HEADER} header for this browser session")
    request.state.principal = principal
    return principal


def _sent_credentials(request: Request) -> bool:
    return bool(request.headers.get("authorization") or request.cookies.get(SESSION_COOKIE))


def require(permission: Permission) -> Callable[[Request], Principal]:
    """A dependency (sync, so FastAPI runs it on a worker thread: hashing and DB stay off the loop)."""

    def dependency(request: Request) -> Principal:
        return authorize(request, permission)

    dependency.__name__ = f"require_{permission}"
    return dependency


ClassifierDep = Annotated[Principal, Depends(require("classify"))]
ReviewerDep = Annotated[Principal, Depends(require("review"))]
AdminDep = Annotated[Principal, Depends(require("admin"))]


# ---- plugged into service.deps (the routes of /v1/classify, KServe v2 and /v1/admin use these) ------
def requesting_system(request: Request) -> str:
    """Override of service.deps.get_requester: the lab token's name; with auth off, the
    X-Requesting-System header (or 'anonymous')."""
    principal = authorize(request, "classify")
    if principal is ANONYMOUS:
        return request.headers.get("x-requesting-system") or ANONYMOUS.name
    return principal.name


def admin_name(request: Request) -> str:
    """Override of service.deps.require_admin: an admin account's name."""
    return authorize(request, "admin").name
