"""``POST /v1/consents``: a customer consented again, lifting the opt-outs the service stored."""

from __future__ import annotations

from fastapi import APIRouter, Request

from serving.deps import ConsentKey, ServiceDep, error_responses, json_body, parse_body
from serving.schemas import ConsentRequest, ConsentResponse

router = APIRouter(prefix="/v1/consents", tags=["contacts"])


@router.post(
    "",
    response_model=ConsentResponse,
    responses=error_responses("consent", {400: "Unknown channel."}),
    openapi_extra=json_body(ConsentRequest),
    summary="Report a customer's renewed consent",
)
async def record_consent(
    request: Request, service: ServiceDep, principal: ConsentKey
) -> ConsentResponse:
    """Opt-outs the service stored from reported outcomes (``POST /v1/rewards``) stop
    binding the consented channels (default: every channel) where they were both dated and
    reported before the consent (which counts from the earlier of ``given_at`` and its
    receipt); a later opt-out binds again. The request's own ``opt_outs`` and
    ``consented_channels`` stay the platform's to keep: this lifts only what the service
    stored. Every consent is logged with the API key that reported it, for the audit
    trail."""
    body = parse_body(ConsentRequest, await request.body())
    return await service.record_consent(body, principal.key_id)
