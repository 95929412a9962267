"""The decision lane: ``POST /v1/decisions`` and ``/v1/decisions/batch`` served as plain ASGI.

The decision routes are the service's hot path: a marketing platform calls them for every
customer it is about to contact. Going through FastAPI's exception middleware, router,
request and response objects costs about as much CPU as the decision itself (the engine,
the journal and the contact store), so :class:`DecisionLane` answers these two routes
directly and hands every other request to the application unchanged.

Same behaviour as the routes in :mod:`serving.routes.decisions` (which stay the documented
API, and answer whenever the lane is not installed): the API key is checked before the body
is read, the body is validated in one pass, the same service calls answer, and every error
is answered by the application's own exception handlers (so a 401, 413, 422 or 503 has the
status, body and headers the routes give it, and a handler added later applies to both).
The lane sits inside the metrics and body-size middleware, so requests are counted and
size-limited exactly as before; it sets ``scope["route"]`` so metrics label them by the
route's template. Not done here: FastAPI's own route telemetry (an OpenTelemetry span would
be named by the method only, without ``http.route``).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.deps import authorize_key, parse_batch, parse_body
from serving.schemas import DecisionRequest
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

    Raises
    ------
    ValueError
        If ``routes`` lacks one of the two decision paths.
    """

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        by_path = {getattr(r, "path", None): r for r in routes}
        missing = [p for p in (SINGLE, BATCH) if p not in by_path]
        if missing:
            raise ValueError(f"no route for {missing[0]} among the routes given to the lane")
        self.routes = {SINGLE: by_path[SINGLE], BATCH: by_path[BATCH]}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _route_path(scope) if scope["type"] == "http" else None
        if path not in self.routes or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = self.routes[path]
        try:
            service: ScoringService = scope["app"].state.service
            authorize_key(service, _api_key(scope), "decide")  # before reading any body
            body = await _read_body(receive)
            if path == SINGLE:
                request = parse_body(DecisionRequest, body, service.validation_context)
                answer = await service.decide_json(request)
            else:
                batch = parse_batch(service.batch_request, body, service.validation_context)
                answer = await service.decide_batch(batch)
        except Exception as exc:
            handler = _handler(scope, exc)
            if handler is None:
                raise  # the server-error middleware answers 500
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(answer)).encode()), *_JSON],
            }
        )
        await send({"type": "http.response.body", "body": answer})


def _route_path(scope: Scope) -> str:
    """The path the router matches: ``path`` without the ``root_path`` prefix (as Starlette
    strips it), so the lane serves an app mounted under a prefix too."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


def _handler(scope: Scope, exc: Exception) -> Any:
    """The application's exception handler for ``exc`` (by class, most specific first, as
    Starlette's exception middleware looks it up), or None."""
    handlers = scope["app"].exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None


def _api_key(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _HEADER:
            return value.decode("latin-1")
    return None


async def _read_body(receive: Receive) -> bytes:
    """The whole request body; :class:`~starlette.requests.ClientDisconnect` if the caller
    hangs up first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
