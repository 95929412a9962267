"""``POST /v1/rewards``: the outcome of a decision."""

from __future__ import annotations

from fastapi import APIRouter, Request

from serving.deps import RewardKey, ServiceDep, error_responses, json_body, parse_body
from serving.schemas import RewardRequest, RewardResponse

router = APIRouter(prefix="/v1/rewards", tags=["rewards"])


@router.post(
    "",
    response_model=RewardResponse,
    responses=error_responses(
        "reward",
        {
            400: "Outcome dated before its decision.",
            404: "No decision with this id.",
            410: "The decision was archived: its outcome is not recorded (an opt-out or "
            "complaint in it still binds).",
            409: "A different outcome is already stored.",
        },
    ),
    openapi_extra=json_body(RewardRequest),
    summary="Record the outcome of a decision",
)
async def record_reward(request: Request, service: ServiceDep, _key: RewardKey) -> RewardResponse:
    """Store the outcome once per decision id: the same outcome again answers the stored
    reward with ``duplicate: true``; an outcome after the attribution window is stored and
    flagged ``late``."""
    body = parse_body(RewardRequest, await request.body())
    return await service.record_reward(body)
