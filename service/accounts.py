"""Reviewer and admin accounts, laboratory-system API tokens, browser sessions: created, checked, revoked.

Passwords are stored as argon2id hashes with argon2-cffi's default (RFC 9106 low-memory) cost. API
tokens are `wbc_<public id>_<secret>`: the public id finds the row, the 256-bit random secret is
checked against an argon2id hash with a light cost (a secret that long cannot be guessed, so a slow
hash would only slow every classify request). Browser sessions keep the SHA-256 of the cookie value.
Nothing here returns or logs a secret except the one time a token or session is created.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service import audit
from service.audit import AuditLog
from service.db.models import USER_ROLES, ApiToken, User, WebSession, utcnow

MIN_PASSWORD_LENGTH = 12
TOKEN_PREFIX = "wbc"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

PASSWORDS = PasswordHasher()
TOKEN_SECRETS = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
# Checked when the user name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = PASSWORDS.hash(secrets.token_urlsafe(16))
# Each password check allocates the hash's 64 MiB and burns CPU: at most this many at once, so a burst of
# sign-ins or of wrong Basic credentials costs 2 x 64 MiB, not 64 MiB per concurrent request (measured on
# PostgreSQL: 24 concurrent wrong passwords peaked the service at ~1.1 GB without this, tests/reliability).
PASSWORD_CHECKS = threading.BoundedSemaphore(2)


class AccountError(ValueError):
    """A request about accounts that cannot be done as asked; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who is asking: `name` is what the audit log and reviews record."""

    name: str
    role: str  # lab | reviewer | admin | anonymous
    kind: str  # user | token | anonymous | cli
    csrf_token: str | None = None  # set for browser sessions; their posts must echo it


def _check_name(kind: str, name: str) -> str:
    if not _NAME_RE.fullmatch(name or ""):
        raise AccountError(
            f"{kind} name {name!r}: 1-64 letters, digits or _ . @ -, starting with a letter or digit"
        )
    return name


def _verify(hasher: PasswordHasher, stored: str, given: str) -> bool:
    try:
        if hasher is PASSWORDS:
            with PASSWORD_CHECKS:
                return hasher.verify(stored, given)
        return hasher.verify(stored, given)
    except (VerificationError, InvalidHashError):
        return False


# ---- users ---------------------------------------------------------------------------------------------
def create_user(session: Session, log: AuditLog, username: str, password: str, role: str, actor: str) -> User:
    _check_name("user", username)
    if role not in USER_ROLES:
        raise AccountError(f"role {role!r}: one of {USER_ROLES}")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"password too short: at least {MIN_PASSWORD_LENGTH} characters")
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise AccountError(f"user {username!r} already exists")
    user = User(username=username, password_hash=PASSWORDS.hash(password), role=role, active=True)
    session.add(user)
    session.flush()
    log.append(
        session,
        actor=actor,
        action=audit.USER_CREATED,
        subject=f"user:{user.id}",
        details={"username": username, "role": role},
    )
    return user


def disable_user(session: Session, log: AuditLog, username: str, actor: str) -> User:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise AccountError(f"no user {username!r}")
    user.active = False
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    log.append(
        session,
        actor=actor,
        action=audit.USER_DISABLED,
        subject=f"user:{user.id}",
        details={"username": username},
    )
    return user


def authenticate_password(session: Session, username: str, password: str) -> User | None:
    user = session.scalar(select(User).where(User.username == username))
    if user is None or not user.active:
        _verify(PASSWORDS, _DUMMY_HASH, password)
        return None
    if not _verify(PASSWORDS, user.password_hash, password):
        return None
    if PASSWORDS.check_needs_rehash(user.password_hash):
        user.password_hash = PASSWORDS.hash(password)
    return user


def user_principal(user: User, csrf_token: str | None = None) -> Principal:
    return Principal(name=user.username, role=user.role, kind="user", csrf_token=csrf_token)


# ---- API tokens for laboratory systems -----------------------------------------------------------------
def create_token(session: Session, log: AuditLog, name: str, actor: str) -> tuple[ApiToken, str]:
    """A new token for a laboratory system; returns the row and the token text (shown once, never stored)."""
    _check_name("token", name)
    if session.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
        raise AccountError(f"a token named {name!r} already exists (revoke it, or pick another name)")
    public_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    row = ApiToken(name=name, public_id=public_id, secret_hash=TOKEN_SECRETS.hash(secret), created_by=actor)
    session.add(row)
    session.flush()
    log.append(
        session, actor=actor, action=audit.TOKEN_CREATED, subject=f"token:{row.id}", details={"name": name}
    )
    return row, f"{TOKEN_PREFIX}_{public_id}_{secret}"


def revoke_token(session: Session, log: AuditLog, name: str, actor: str) -> ApiToken:
    row = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if row is None:
        raise AccountError(f"no token named {name!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        log.append(
            session,
            actor=actor,
            action=audit.TOKEN_REVOKED,
            subject=f"token:{row.id}",
            details={"name": name},
        )
    return row


def authenticate_token(session: Session, token: str) -> Principal | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.public_id == parts[1]))
    if row is None or row.revoked_at is not None or not _verify(TOKEN_SECRETS, row.secret_hash, parts[2]):
        return None
    return Principal(name=f"token:{row.name}", role="lab", kind="token")


# ---- browser sessions --------------------------------------------------------------------------------------
def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def start_web_session(session: Session, user: User, lifetime: timedelta) -> tuple[str, WebSession]:
    """Returns the cookie value (only its hash is stored) and the session row (with its CSRF token)."""
    now = datetime.now(UTC)
    session.execute(delete(WebSession).where(WebSession.expires_at < now))  # keep the table small
    cookie = secrets.token_urlsafe(32)
    row = WebSession(
        token_sha256=_sha256(cookie),
        csrf_token=secrets.token_urlsafe(24),
        user_id=user.id,
        created_at=now,
        expires_at=now + lifetime,
    )
    session.add(row)
    session.flush()
    return cookie, row


def web_session_principal(session: Session, cookie: str) -> Principal | None:
    row = session.scalar(select(WebSession).where(WebSession.token_sha256 == _sha256(cookie)))
    if row is None or row.expires_at <= datetime.now(UTC) or not row.user.active:
        return None
    return user_principal(row.user, row.csrf_token)


def end_web_session(session: Session, cookie: str) -> None:
    session.execute(delete(WebSession).where(WebSession.token_sha256 == _sha256(cookie)))
