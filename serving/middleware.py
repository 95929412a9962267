"""Request body size limit: HTTP 413 before an oversized body is read into memory."""

from __future__ import annotations

from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body without (or with a false) Content-Length grows past
    the limit; FastAPI's exception handler turns it into a 413 response."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class BodySizeLimit:
    """ASGI middleware refusing request bodies larger than ``max_bytes`` with HTTP 413.

    A declared ``Content-Length`` over the limit is refused at once; a chunked body is
    counted as it arrives.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    status, detail = (
                        (413, f"request body larger than {self.max_bytes} bytes")
                        if declared > self.max_bytes
                        else (400, "malformed Content-Length header")
                    )
                    response = JSONResponse({"detail": detail}, status_code=status)
                    await response(scope, receive, send)
                    return
                # a declared length within the limit: the server enforces it
                await self.app(scope, receive, send)
                return
        received = 0
        limit = self.max_bytes

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)
