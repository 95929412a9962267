"""The decision lane: ``POST /v1/decisions`` and ``/v1/decisions/batch`` served as plain ASGI.

The decision routes are the service's hot path: a marketing platform calls them for every
customer it is about to contact. Going through FastAPI's exception middleware, router,
request and response objects costs about as much CPU as the decision itself (the engine,
the journal and the contact store), so :class:`DecisionLane` answers these two routes
directly and hands every other request to the application unchanged.

Same behaviour as the routes in :mod:`serving.routes.decisions` (which stay the documented
API, and answer whenever the lane is not installed): the same API-key check, one-pass body
validation, service calls and error bodies (``{"detail": ...}`` for HTTP errors, the field
list of :func:`validation_detail` for 422). The lane sits inside the metrics and body-size
middleware, so requests are counted and size-limited exactly as before, and it sets
``scope["route"]`` so metrics label them by the route's template.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic_core import to_json
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.deps import authorize_key, parse_body, validation_detail
from serving.schemas import BatchDecisionRequest, DecisionRequest
from serving.security import API_KEY_HEADER
from serving.service import ScoringService

SINGLE, BATCH = "/v1/decisions", "/v1/decisions/batch"
_HEADER = API_KEY_HEADER.lower().encode("latin-1")
_JSON = [(b"content-type", b"application/json")]


class DecisionLane:
    """ASGI middleware answering ``POST`` on the two decision paths itself.

    Parameters
    ----------
    app : ASGIApp
        The rest of the application (FastAPI's stack), for every other request.
    routes : list of routes
        The decision routes (:data:`serving.routes.decisions.router`'s), to label the lane's
        requests with the same route objects (``scope["route"]``) as FastAPI would.
    """

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        by_path = {getattr(r, "path", None): r for r in routes}
        missing = [p for p in (SINGLE, BATCH) if p not in by_path]
        if missing:
            raise ValueError(f"no route for {missing[0]} among the routes given to the lane")
        self.routes = {SINGLE: by_path[SINGLE], BATCH: by_path[BATCH]}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in self.routes:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.routes[path]
        try:
            body = await _read_body(receive)
            service: ScoringService = scope["app"].state.service
            authorize_key(service, _api_key(scope), "decide")
            if path == SINGLE:
                request = parse_body(DecisionRequest, body, {"catalog": service.catalog})
                answer = await service.decide_json(request)
            else:
                batch = parse_body(BatchDecisionRequest, body, {"catalog": service.catalog})
                answer = await service.decide_batch(batch)
        except HTTPException as exc:
            await _respond(send, exc.status_code, {"detail": exc.detail}, exc.headers)
            return
        except RequestValidationError as exc:
            await _respond(send, 422, {"detail": validation_detail(exc)})
            return
        except ClientDisconnect:  # the caller hung up while sending its body: nothing decided
            await _send_json(send, 499, b"", content_type=False)
            return
        await _send_json(send, 200, answer)


def _api_key(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _HEADER:
            return value.decode("latin-1")
    return None


async def _read_body(receive: Receive) -> bytes:
    """The whole request body; :class:`ClientDisconnect` if the caller hangs up first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(
    send: Send, status: int, content: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    await _send_json(send, status, to_json(content), headers)


async def _send_json(
    send: Send,
    status: int,
    body: bytes,
    headers: dict[str, str] | None = None,
    content_type: bool = True,
) -> None:
    raw = [(b"content-length", str(len(body)).encode())]
    if content_type:
        raw += _JSON
    if headers:
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
