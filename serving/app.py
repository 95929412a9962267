"""The FastAPI application: ``create_app(settings)``.

Nothing heavy happens at import: the catalogue, rules, model, journal and contact store are
built in the lifespan (:meth:`ScoringService.start`), once per worker process.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic.json_schema import models_json_schema
from starlette.requests import ClientDisconnect

from nextbest.model_source import redacted
from serving.decision_lane import DecisionLane
from serving.metrics import RequestMetrics
from serving.middleware import BodySizeLimit
from serving.routes import consents, contacts, decisions, health, rewards
from serving.schemas import (
    BatchDecisionRequest,
    ConsentRequest,
    DecisionRequest,
    DeliveryRequest,
    RewardRequest,
)
from serving.service import ScoringService
from serving.settings import Settings, load_settings
from serving.supervision import follow_supervisor

log = logging.getLogger("nextbest.serving")

RAW_BODY_MODELS = (
    DecisionRequest,
    BatchDecisionRequest,
    RewardRequest,
    DeliveryRequest,
    ConsentRequest,
)
"""Request bodies validated from raw JSON by the routes (documented in the schema here)."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The scoring API for ``settings`` (default: from the ``NEXTBEST_`` environment)."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        follow_supervisor()  # a worker of `nextbest serve --workers N` ends with its supervisor
        service = await asyncio.to_thread(ScoringService.start, settings)
        app.state.service = service
        _tune_gc()
        loop = asyncio.get_running_loop()
        sighup = _install_sighup(loop, service)
        watcher = (
            asyncio.create_task(_watch_model(service, settings.reload_poll_seconds))
            if settings.reload_poll_seconds > 0
            else None
        )
        log.info(
            "serving model %s (rules %s, catalogue %s)",
            service.readiness().model_version,
            service.rules.version,
            service.catalog.version,
        )
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            if sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await asyncio.to_thread(service.close)

    app = FastAPI(
        title="nextbest scoring API",
        version="1.0.0",
        summary="Next-best-action decisions for retail-bank marketing, under compliance rules.",
        description=(
            "Ranks the channel x offer x timing actions the compliance rules allow for a "
            "customer, draws the action to take with logged propensity, journals every "
            "decision, and records outcomes. Customer ids are pseudonymised before anything "
            "is logged."
        ),
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
    )
    # the routers' own routes (the app's list holds included routers, without a path)
    routers = [module.router for module in (decisions, rewards, contacts, consents, health)]
    for router in routers:
        app.include_router(router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    # innermost first: the decision lane bypasses only FastAPI's own stack; metrics see the
    # 413s of the size limit too
    app.add_middleware(DecisionLane, routes=decisions.router.routes)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, routes=[r for router in routers for r in router.routes])
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


MAX_REPORTED_ERRORS = 20
"""Validation errors an answer names at most (then one entry counting the rest): a body of
many bad entries must not make a far larger answer."""


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 naming each offending field; the offending values are not echoed back (they may
    be personal data)."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    detail = [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in errors[:MAX_REPORTED_ERRORS]
    ]
    if len(errors) > MAX_REPORTED_ERRORS:
        more = len(errors) - MAX_REPORTED_ERRORS
        detail.append({"loc": ["body"], "msg": f"and {more} more", "type": "more_errors"})
    return JSONResponse({"detail": detail}, status_code=422)


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The caller hung up while sending its body: nothing was decided, nobody to answer."""
    return Response(status_code=499)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request bodies the routes validate from raw JSON."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        _, defs = models_json_schema(
            [(m, "validation") for m in RAW_BODY_MODELS],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        app.openapi_schema = schema
    return app.openapi_schema


def _tune_gc() -> None:
    """Move everything built at start-up out of the collector's sight and collect less often:
    a 10,000-customer batch allocates hundreds of thousands of short-lived objects, and the
    default thresholds rescan the long-lived heap many times per batch (measured: 1.4-1.8x
    faster batches, shorter pauses in the latency tail)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _install_sighup(loop: asyncio.AbstractEventLoop, service: ScoringService) -> bool:
    """SIGHUP reloads the model and a changed API keys file (in a thread: the loop keeps
    serving meanwhile)."""

    def reload() -> None:
        loop.run_in_executor(None, service.reload_model)
        loop.run_in_executor(None, service.refresh_api_keys)

    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
        return False
    return True


async def _watch_model(service: ScoringService, every_s: float) -> None:
    """Reload when the registry alias (or the file) points at a new version, and the API
    keys when their file changed."""
    failing: str | None = None  # the last failure logged: the same one is logged once
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(service.refresh_api_keys)
            if await asyncio.to_thread(service.models.changed):
                await asyncio.to_thread(service.reload_model)
            failing = None
        except Exception as exc:  # the watcher must outlive a registry that is briefly down
            reason = redacted(f"{type(exc).__name__}: {exc}")
            if reason != failing:
                log.warning("model watch failed (%s); the current model keeps serving", reason)
                failing = reason
