"""``POST /v1/deliveries``: contacts the platform made, shared by every worker's rules."""

from __future__ import annotations

from fastapi import APIRouter, Request

from serving.deps import RewardKey, ServiceDep, json_body, parse_body
from serving.schemas import (
    DeliveryRequest,
    DeliveryResponse,
    ErrorResponse,
    ValidationErrorResponse,
)

router = APIRouter(prefix="/v1/deliveries", tags=["contacts"])


@router.post(
    "",
    response_model=DeliveryResponse,
    responses={
        400: {"model": ErrorResponse, "description": "Unknown channel or offer."},
        401: {"model": ErrorResponse, "description": "Missing or unknown API key."},
        403: {"model": ErrorResponse, "description": "The API key lacks the `reward` scope."},
        409: {"model": ErrorResponse, "description": "The decision was for another customer."},
        413: {"model": ErrorResponse, "description": "Body too large."},
        422: {"model": ValidationErrorResponse, "description": "Schema violations."},
    },
    openapi_extra=json_body(DeliveryRequest),
    summary="Report a delivered contact",
)
async def record_delivery(
    request: Request, service: ServiceDep, _key: RewardKey
) -> DeliveryResponse:
    """Count a delivered contact towards the customer's caps and minimum gaps (a delivery of
    a recommended contact replaces the recommendation: counted once)."""
    body = parse_body(DeliveryRequest, await request.body())
    return await service.record_delivery(body)
