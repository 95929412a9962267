"""``POST /v1/decisions`` and ``POST /v1/decisions/batch``: the documented API.

In the running app :class:`serving.decision_lane.DecisionLane` answers these two routes
without FastAPI's routing (the same checks, calls and error bodies; a test holds the two to
the same answers); these handlers answer whenever the lane is not installed.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from serving.deps import (
    api_key_security,
    authorize,
    error_responses,
    json_body,
    parse_batch,
    parse_body,
)
from serving.schemas import (
    BatchDecisionColumnsResponse,
    BatchDecisionRequest,
    BatchDecisionResponse,
    DecisionRequest,
    DecisionResponse,
)

router = APIRouter(prefix="/v1/decisions", tags=["decisions"])

_ERRORS = error_responses(
    "decide",
    {400: "Unknown action id, channel or campaign.", 413: "Body or batch too large."},
)


@router.post(
    "",
    response_model=DecisionResponse,
    responses=_ERRORS,
    openapi_extra=json_body(DecisionRequest) | api_key_security(),
    summary="Decide the next best action for one customer",
)
async def decide(request: Request) -> Response:
    """Rank the actions the compliance rules allow for the customer by model score, draw the
    action to take with the configured exploration (its propensity is returned and logged),
    and journal the decision before answering. With ``explain``, every blocked action is
    listed with the rule that blocked it."""
    service = authorize(request, "decide")
    body = parse_body(DecisionRequest, await request.body(), service.validation_context)
    return Response(await service.decide_json(body), media_type="application/json")


@router.post(
    "/batch",
    response_model=BatchDecisionResponse | BatchDecisionColumnsResponse,
    responses=_ERRORS,
    openapi_extra=json_body(BatchDecisionRequest) | api_key_security(),
    summary="Decide for up to 10,000 customers in one call",
)
async def decide_batch(request: Request) -> Response:
    """The same decision for every customer of a campaign, in request order; every decision
    is journalled before the answer. The answer lists one object per customer, or with
    ``"answer": "columns"`` one array per field."""
    service = authorize(request, "decide")
    body = parse_batch(service.batch_request, await request.body(), service.validation_context)
    return Response(await service.decide_batch(body), media_type="application/json")
