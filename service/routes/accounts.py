"""Admin API for credentials and the audit chain (admin accounts only).

GET    /v1/admin/tokens                 lab-system tokens (names, dates; never secrets)
POST   /v1/admin/tokens {name}          201 {name, token}: the token is shown this once
DELETE /v1/admin/tokens/{name}          revoke
GET    /v1/admin/users                  accounts
POST   /v1/admin/users {username, password, role}
POST   /v1/admin/users/{username}/disable
GET    /v1/admin/audit/verify           the chain check of `wbc audit verify`
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from service import accounts
from service.accounts import AccountError
from service.auth import AdminDep
from service.db.models import ApiToken, User

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class NewToken(BaseModel):
    name: str = Field(description="The laboratory system it is for, e.g. lis-barcelona")


class NewUser(BaseModel):
    username: str
    password: str = Field(min_length=accounts.MIN_PASSWORD_LENGTH, max_length=1024)
    role: Literal["reviewer", "admin"]


def _conflict(exc: AccountError) -> HTTPException:
    text = str(exc)
    return HTTPException(404 if text.startswith("no ") else 409 if "exists" in text else 422, text)


@router.get("/tokens")
def list_tokens(request: Request, _: AdminDep) -> list[dict[str, Any]]:
    with request.app.state.db.transaction() as session:
        return [
            {
                "name": t.name,
                "created_by": t.created_by,
                "created_at": t.created_at.isoformat(),
                "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
            }
            for t in session.scalars(select(ApiToken).order_by(ApiToken.id))
        ]


@router.post("/tokens", status_code=201)
def create_token(body: NewToken, request: Request, admin: AdminDep) -> dict[str, str]:
    state = request.app.state
    try:
        with state.db.transaction() as session:
            row, token = accounts.create_token(session, state.audit, body.name, admin.name)
    except AccountError as exc:
        raise _conflict(exc) from None
    return {"name": row.name, "token": token}


@router.delete("/tokens/{name}")
def revoke_token(name: str, request: Request, admin: AdminDep) -> dict[str, Any]:
    state = request.app.state
    try:
        with state.db.transaction() as session:
            row = accounts.revoke_token(session, state.audit, name, admin.name)
            return {"name": row.name, "revoked_at": row.revoked_at.isoformat()}
    except AccountError as exc:
        raise _conflict(exc) from None


@router.get("/users")
def list_users(request: Request, _: AdminDep) -> list[dict[str, Any]]:
    with request.app.state.db.transaction() as session:
        return [
            {
                "username": u.username,
                "role": u.role,
                "active": u.active,
                "created_at": u.created_at.isoformat(),
            }
            for u in session.scalars(select(User).order_by(User.id))
        ]


@router.post("/users", status_code=201)
def create_user(body: NewUser, request: Request, admin: AdminDep) -> dict[str, str]:
    state = request.app.state
    try:
        with state.db.transaction() as session:
            user = accounts.create_user(
                session, state.audit, body.username, body.password, body.role, admin.name
            )
            return {"username": user.username, "role": user.role}
    except AccountError as exc:
        raise _conflict(exc) from None


@router.post("/users/{username}/disable")
def disable_user(username: str, request: Request, admin: AdminDep) -> dict[str, Any]:
    state = request.app.state
    if username == admin.name:
        raise HTTPException(409, "an admin cannot disable their own account")
    try:
        with state.db.transaction() as session:
            user = accounts.disable_user(session, state.audit, username, admin.name)
            return {"username": user.username, "active": user.active}
    except AccountError as exc:
        raise _conflict(exc) from None


@router.get("/audit/verify")
def verify_audit(request: Request, _: AdminDep) -> dict[str, Any]:
    state = request.app.state
    with state.db.transaction() as session:
        report = state.audit.verify(session)
    return {
        "ok": report.ok,
        "entries": report.entries,
        "head_seq": report.head_seq,
        "head_hash": report.head_hash,
        "problems": report.problems,
        "truncated": report.truncated,
    }
