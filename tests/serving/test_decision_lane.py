"""The decision lane answers the decision routes exactly as the FastAPI routes would."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.decision_lane import DecisionLane
from serving.routes import decisions
from serving.settings import Settings
from tests.serving.conftest import customer

BAD_REQUESTS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    # case: (path, scope of the key sent or None, request)
    "no key": ("/v1/decisions", None, {"json": {"customer": customer()}}),
    "unknown key": (
        "/v1/decisions",
        None,
        {"json": {"customer": customer()}, "headers": {"X-API-Key": "nb_nope"}},
    ),
    "wrong scope": ("/v1/decisions", "reward", {"json": {"customer": customer()}}),
    "malformed json": (
        "/v1/decisions",
        "decide",
        {"content": b'{"customer": ', "headers": {"Content-Type": "application/json"}},
    ),
    "schema violation": (
        "/v1/decisions",
        "decide",
        {"json": {"customer": customer(age=-3), "k": 0}},
    ),
    "unknown action": (
        "/v1/decisions",
        "decide",
        {"json": {"customer": customer(), "candidates": ["sms:moon:now"]}},
    ),
    "unknown campaign": (
        "/v1/decisions",
        "decide",
        {"json": {"customer": customer(), "campaign_id": "no_such_campaign"}},
    ),
    "unknown channel": (
        "/v1/decisions",
        "decide",
        {"json": {"customer": customer(), "channels": ["fax"]}},
    ),
    "batch too large": (
        "/v1/decisions/batch",
        "decide",
        {"json": {"customers": [customer(customer_id=f"c-{i}") for i in range(6)]}},
    ),
    "batch schema violation": (
        "/v1/decisions/batch",
        "decide",
        {"json": {"customers": [], "k": 99}},
    ),
}


def _without_lane(settings: Settings) -> FastAPI:
    app = create_app(settings)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not DecisionLane]
    return app


@pytest.fixture
def clients(api_settings: Settings) -> Iterator[tuple[TestClient, TestClient]]:
    """A client of the app as served (with the lane) and one of the same app without it,
    over separate state directories."""
    settings = api_settings.model_copy(update={"max_batch": 5})
    other = settings.model_copy(update={"state_dir": settings.state_dir.parent / "no-lane"})
    with TestClient(create_app(settings)) as lane, TestClient(_without_lane(other)) as plain:
        yield lane, plain


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_post_bad_decision_request_lane_answers_as_the_route(
    clients: tuple[TestClient, TestClient], auth: dict[str, dict[str, str]], case: str
) -> None:
    path, scope, request = BAD_REQUESTS[case]
    request = dict(request)
    headers = {**request.pop("headers", {}), **(auth[scope] if scope else {})}
    lane = clients[0].post(path, headers=headers, **request)
    plain = clients[1].post(path, headers=headers, **request)
    assert lane.status_code == plain.status_code
    assert lane.status_code >= 400
    assert lane.json() == plain.json()
    assert lane.headers.get("www-authenticate") == plain.headers.get("www-authenticate")
    assert lane.headers["content-type"] == plain.headers["content-type"]


@pytest.mark.parametrize("path", ["/v1/decisions", "/v1/decisions/batch"])
def test_post_decision_lane_answers_without_fastapi_routing(
    clients: tuple[TestClient, TestClient],
    auth: dict[str, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    handled: list[str] = []
    original = APIRoute.handle

    async def counting(self: APIRoute, scope: Any, receive: Any, send: Any) -> None:
        handled.append(self.path)
        await original(self, scope, receive, send)

    monkeypatch.setattr(APIRoute, "handle", counting)
    body = (
        {"customer": customer(), "k": 2}
        if path == "/v1/decisions"
        else {"customers": [customer(customer_id="a"), customer(customer_id="b")], "k": 2}
    )
    lane = clients[0].post(path, json=body, headers=auth["decide"])
    assert handled == []
    plain = clients[1].post(path, json=body, headers=auth["decide"])
    assert handled == [path]
    assert lane.status_code == plain.status_code == 200
    lane_body, plain_body = lane.json(), plain.json()
    assert lane_body.keys() == plain_body.keys()
    if path == "/v1/decisions":  # same model, rules and seed: the same ranking
        assert [r["action"] for r in lane_body["ranked"]] == [
            r["action"] for r in plain_body["ranked"]
        ]
    else:
        assert len(lane_body["decisions"]) == len(plain_body["decisions"]) == 2


def test_post_decision_client_gone_mid_body_is_499_and_decides_nothing() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the lane must answer the decision route itself")

    lane = DecisionLane(app, decisions.router.routes)
    messages = iter(
        [
            {"type": "http.request", "body": b'{"cust', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/decisions", "headers": []}
    asyncio.run(lane(scope, receive, send))
    assert sent[0]["status"] == 499
    assert scope["route"].path == "/v1/decisions"


def test_create_lane_without_the_decision_routes_is_refused() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    with pytest.raises(ValueError, match="/v1/decisions"):
        DecisionLane(app, [])
