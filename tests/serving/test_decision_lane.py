"""The decision lane answers the decision routes exactly as the FastAPI routes would."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.decision_lane import DecisionLane
from serving.settings import Settings
from tests.serving.conftest import customer, in_one_utc_hour

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
    # a chunked body past the size limit: refused for its size with a key, and without one
    # refused for the key before any of it is read (401, not 413)
    "chunked body too large": (
        "/v1/decisions/batch",
        "decide",
        {"chunks": [b'{"customers": [', b" " * 4096, b"]}"]},
    ),
    "chunked body too large, no key": (
        "/v1/decisions/batch",
        None,
        {"chunks": [b'{"customers": [', b" " * 4096, b"]}"]},
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
    settings = api_settings.model_copy(update={"max_batch": 5, "max_body_bytes": 2048})
    other = settings.model_copy(update={"state_dir": settings.state_dir.parent / "no-lane"})
    with TestClient(create_app(settings)) as lane, TestClient(_without_lane(other)) as plain:
        yield lane, plain


@pytest.fixture
def handled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the requests FastAPI's router handed to a route (the lane's never are)."""
    paths: list[str] = []
    original = APIRoute.handle

    async def counting(self: APIRoute, scope: Any, receive: Any, send: Any) -> None:
        paths.append(self.path)
        await original(self, scope, receive, send)

    monkeypatch.setattr(APIRoute, "handle", counting)
    return paths


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_post_bad_decision_request_lane_answers_as_the_route(
    clients: tuple[TestClient, TestClient], auth: dict[str, dict[str, str]], case: str
) -> None:
    path, scope, request = BAD_REQUESTS[case]
    answers = []
    for client in clients:
        kwargs = dict(request)
        headers = {**kwargs.pop("headers", {}), **(auth[scope] if scope else {})}
        if "chunks" in kwargs:  # a generator body is sent chunked, once: one per client
            kwargs["content"] = iter(kwargs.pop("chunks"))
            headers["Content-Type"] = "application/json"
        answers.append(client.post(path, headers=headers, **kwargs))
    lane, plain = answers
    assert lane.status_code == plain.status_code
    assert lane.status_code >= 400
    assert lane.json() == plain.json()
    assert sorted(lane.headers.items()) == sorted(plain.headers.items())


def test_post_bad_chunked_body_without_key_is_401(
    clients: tuple[TestClient, TestClient],
) -> None:
    chunks = iter([b'{"customers": [', b" " * 4096, b"]}"])
    response = clients[0].post("/v1/decisions/batch", content=chunks)
    assert response.status_code == 401


def test_post_decision_without_model_lane_answers_503_as_the_route(
    api_settings: Settings, auth: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    settings = api_settings.model_copy(update={"model_uri": str(broken)})
    other = settings.model_copy(update={"state_dir": tmp_path / "no-lane"})
    body = {"customer": customer()}
    with TestClient(create_app(settings)) as lane, TestClient(_without_lane(other)) as plain:
        answers = [
            c.post("/v1/decisions", json=body, headers=auth["decide"]) for c in (lane, plain)
        ]
    assert answers[0].status_code == answers[1].status_code == 503
    assert answers[0].json() == answers[1].json()


def test_post_decision_unexpected_error_is_500_counted_under_the_route(
    api_settings: Settings, auth: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.service import ScoringService

    async def broken(self: ScoringService, request: Any) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ScoringService, "decide_json", broken)
    app = create_app(api_settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(
            "/v1/decisions", json={"customer": customer()}, headers=auth["decide"]
        )
        metrics = client.get("/metrics", headers=auth["metrics"]).text
    assert response.status_code == 500
    assert 'route="/v1/decisions",status="500"' in metrics


def test_post_decision_under_a_root_path_served_by_the_lane(
    api_settings: Settings, auth: dict[str, dict[str, str]], handled: list[str]
) -> None:
    with TestClient(create_app(api_settings), root_path="/api") as client:
        response = client.post(
            "/api/v1/decisions", json={"customer": customer()}, headers=auth["decide"]
        )
    assert response.status_code == 200
    assert handled == []


@pytest.mark.parametrize("path", ["/v1/decisions", "/v1/decisions/batch"])
def test_post_decision_lane_answers_without_fastapi_routing(
    clients: tuple[TestClient, TestClient],
    auth: dict[str, dict[str, str]],
    handled: list[str],
    path: str,
) -> None:
    def both(attempt: int) -> tuple[httpx.Response, list[str], httpx.Response, list[str]]:
        """The lane's answer and the plain app's, each with the routes handled until then
        (both in one hour: the local hour is a feature)."""
        handled.clear()
        body = (
            {"customer": customer(customer_id=f"lane-{attempt}"), "k": 2}
            if path == "/v1/decisions"
            else {
                "customers": [customer(customer_id=f"{c}-{attempt}") for c in "ab"],
                "k": 2,
            }
        )
        lane = clients[0].post(path, json=body, headers=auth["decide"])
        after_lane = list(handled)
        plain = clients[1].post(path, json=body, headers=auth["decide"])
        return lane, after_lane, plain, list(handled)

    lane, after_lane, plain, after_plain = in_one_utc_hour(both)
    assert after_lane == []
    assert after_plain == [path]
    assert lane.status_code == plain.status_code == 200
    lane_body, plain_body = lane.json(), plain.json()
    assert lane_body.keys() == plain_body.keys()
    if path == "/v1/decisions":  # same model, rules and seed: the same ranking
        assert [r["action"] for r in lane_body["ranked"]] == [
            r["action"] for r in plain_body["ranked"]
        ]
    else:
        assert len(lane_body["decisions"]) == len(plain_body["decisions"]) == 2


def _hang_up_mid_body(app: FastAPI, key: str) -> list[dict[str, Any]]:
    """Send ``app`` the start of a decision body, then the client's disconnect; the ASGI
    messages it answers with."""
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

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/decisions",
        "raw_path": b"/v1/decisions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-api-key", key.encode()), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, receive, send))
    return sent


def test_post_decision_client_gone_mid_body_lane_answers_as_the_route(
    api_settings: Settings, api_keys: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    other = api_settings.model_copy(update={"state_dir": tmp_path / "no-lane"})
    statuses = []
    for app in (create_app(api_settings), _without_lane(other)):
        with TestClient(app):  # runs the lifespan: the service is up
            sent = _hang_up_mid_body(app, api_keys[1]["decide"])
            statuses.append(sent[0]["status"])
    assert statuses == [499, 499]


def test_create_lane_without_the_decision_routes_is_refused() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    with pytest.raises(ValueError, match="/v1/decisions"):
        DecisionLane(app, [])
