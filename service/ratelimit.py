"""Request rate limit per credential: 429 with Retry-After once a caller is over WBC_RATE_LIMIT.

The counting is the `limits` library's (sliding-window counters in process memory, so each replica
counts its own requests: with N replicas a caller gets up to N times the limit). A caller is the
credential it sends — the whole Authorization header or session cookie, hashed, so a forged token that
borrows a real token's public id does not use up that laboratory's budget — or, without credentials,
its client address. Health probes and /metrics are never limited: a throttled probe would take a
healthy pod out of service.

The limit is checked before the body is read and before the credential is verified, so a flood of
requests costs neither the upload nor an argon2 check beyond the limit.
"""

from __future__ import annotations

import hashlib
import math
import time

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import SESSION_COOKIE

UNLIMITED_PREFIXES = ("/v2/health/", "/metrics")


def parse_rate_limit(text: str) -> list[RateLimitItem]:
    """'20/second;1000/minute' → the library's items; ValueError with the text for anything else."""
    try:
        items = parse_many(text)
    except ValueError as exc:
        raise ValueError(f"rate limit {text!r}: {exc}; e.g. '20/second' or '20/second;1000/minute'") from None
    if not items:
        raise ValueError(f"rate limit {text!r} names no limit; e.g. '20/second'")
    return items


def caller_key(scope: Scope) -> str:
    """Who is counted: a hash of the credential sent, else the client address."""
    headers = dict(scope.get("headers") or [])
    credential = headers.get(b"authorization", b"").strip()
    if not credential:
        for part in headers.get(b"cookie", b"").split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name == SESSION_COOKIE.encode() and value:
                credential = b"cookie:" + value
                break
    if credential:
        return "credential:" + hashlib.sha256(credential).hexdigest()[:32]
    client = scope.get("client")
    return f"address:{client[0] if client else 'unknown'}"


class RateLimit:
    """ASGI middleware: at most `limits` requests per caller (all of them must hold)."""

    def __init__(self, app: ASGIApp, limits: str):
        self.app = app
        self.items = parse_rate_limit(limits)
        self.limiter = SlidingWindowCounterRateLimiter(MemoryStorage())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(UNLIMITED_PREFIXES):
            await self.app(scope, receive, send)
            return
        key = caller_key(scope)
        for item in self.items:
            if not self.limiter.hit(item, key):
                reset = self.limiter.get_window_stats(item, key).reset_time
                retry_after = max(1, math.ceil(reset - time.time()))
                detail = (
                    f"rate limit of {item.amount} requests per {item.get_expiry()} s exceeded for this "
                    f"credential (WBC_RATE_LIMIT); retry after {retry_after} s"
                )
                response = JSONResponse(
                    {"detail": detail}, status_code=429, headers={"Retry-After": str(retry_after)}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
