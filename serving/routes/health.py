"""``GET /healthz``, ``GET /readyz``, ``GET /metrics`` and ``POST /v1/admin/reload``."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from serving import metrics
from serving.deps import AdminKey, MetricsKey, ServiceDep, error_responses
from serving.schemas import Health, Readiness, ReloadResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    """The process answers."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "No model loaded."}},
    summary="Readiness",
)
async def readyz(service: ServiceDep, response: Response) -> Readiness:
    """A model is loaded (503 otherwise); the model version and the last load error (a
    broken model file keeps the previous model serving and is reported here)."""
    ready = service.readiness()
    if not ready.ready:
        response.status_code = 503
    return ready


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus exposition format."},
        **error_responses("metrics", body=False),
    },
    summary="Prometheus metrics",
)
async def prometheus_metrics(_key: MetricsKey) -> Response:
    """Requests, latency histograms, model version, actions served per channel, blocks per
    rule (no customer key in any label)."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResponse,
    responses=error_responses("admin", body=False),
    summary="Reload the model now",
)
async def reload_model(service: ServiceDep, _key: AdminKey) -> ReloadResponse:
    """Load the model again (the registry alias may have moved); requests in flight finish
    on the model they started with, and a broken model keeps the old one serving."""
    return await run_in_threadpool(service.reload_model)
