"""``POST /v1/deliveries``: contacts the platform made, shared by every worker's rules."""

from __future__ import annotations

from fastapi import APIRouter, Request

from serving.deps import RewardKey, ServiceDep, error_responses, json_body, parse_body
from serving.schemas import DeliveryRequest, DeliveryResponse

router = APIRouter(prefix="/v1/deliveries", tags=["contacts"])


@router.post(
    "",
    response_model=DeliveryResponse,
    responses=error_responses(
        "reward",
        {400: "Unknown channel or offer.", 409: "The decision was for another customer."},
    ),
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
