"""Refuse request bodies above `max_request_bytes` before they are parsed or spooled to disk.

A declared Content-Length over the limit is answered 413 at once. A chunked body is counted as it
arrives; the first byte over the limit raises an HTTPException, which FastAPI's body reader passes
through untouched, so the client gets the same JSON 413 instead of a parse error.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _too_large(limit: int) -> str:
    return f"request body larger than the {limit:,}-byte limit (WBC_MAX_REQUEST_BYTES); send fewer or smaller files"


class RequestSizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                status = 413 if declared.isdigit() else 400
                detail = _too_large(self.max_bytes) if status == 413 else "invalid Content-Length header"
                await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
                return
            # The server (h11/httptools) guarantees the body is exactly that long.
            await self.app(scope, receive, send)
            return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, _too_large(self.max_bytes))
            return message

        await self.app(scope, counting_receive, send)
