"""``POST /v1/rewards``: the outcome of a decision."""

from __future__ import annotations

from fastapi import APIRouter, Request

from serving.deps import RewardKey, ServiceDep, json_body, parse_body
from serving.schemas import ErrorResponse, RewardRequest, RewardResponse, ValidationErrorResponse

router = APIRouter(prefix="/v1/rewards", tags=["rewards"])


@router.post(
    "",
    response_model=RewardResponse,
    responses={
        400: {"model": ErrorResponse, "description": "Outcome dated before its decision."},
        401: {"model": ErrorResponse, "description": "Missing or unknown API key."},
        403: {"model": ErrorResponse, "description": "The API key lacks the `reward` scope."},
        404: {"model": ErrorResponse, "description": "No decision with this id."},
        409: {"model": ErrorResponse, "description": "A different outcome is already stored."},
        413: {"model": ErrorResponse, "description": "Body too large."},
        422: {"model": ValidationErrorResponse, "description": "Schema violations."},
    },
    openapi_extra=json_body(RewardRequest),
    summary="Record the outcome of a decision",
)
async def record_reward(request: Request, service: ServiceDep, _key: RewardKey) -> RewardResponse:
    """Store the outcome once per decision id: the same outcome again answers the stored
    reward with ``duplicate: true``; an outcome after the attribution window is stored and
    flagged ``late``."""
    body = parse_body(RewardRequest, await request.body())
    return await service.record_reward(body)
