"""POST /v1/rewards, /v1/deliveries and /v1/consents: idempotent outcomes, late flags, contact
history, opt-outs and the consents that lift them."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta

import pytest
from conftest import customer
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.settings import Settings


def _decide(client: TestClient, headers: dict[str, str], **overrides: object) -> dict:
    response = client.post(
        "/v1/decisions", json={"customer": customer(**overrides), "k": 3}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_post_reward_is_idempotent(
    api_client: TestClient, api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    decision = _decide(api_client, auth["decide"])
    reward = {"decision_id": decision["decision_id"], "converted": True, "value_cny": 300.0}
    first = api_client.post("/v1/rewards", json=reward, headers=auth["reward"])
    again = api_client.post("/v1/rewards", json=reward, headers=auth["reward"])
    assert first.status_code == again.status_code == 200
    assert first.json()["duplicate"] is False and again.json()["duplicate"] is True
    assert first.json()["reward"] == again.json()["reward"]
    assert first.json()["late"] is False
    with sqlite3.connect(api_settings.state_dir / "journal.db") as conn:
        (rows,) = conn.execute("SELECT count(*) FROM rewards").fetchone()
    assert rows == 1


def test_post_reward_different_outcome_is_409(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    decision = _decide(api_client, auth["decide"])
    reward = {"decision_id": decision["decision_id"], "converted": True, "value_cny": 300.0}
    assert api_client.post("/v1/rewards", json=reward, headers=auth["reward"]).status_code == 200
    changed = {**reward, "complaint": True}
    response = api_client.post("/v1/rewards", json=changed, headers=auth["reward"])
    assert response.status_code == 409
    assert "complaint" in response.json()["detail"]


def test_post_reward_unknown_decision_is_404(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    reward = {"decision_id": "0" * 32, "converted": False}
    assert api_client.post("/v1/rewards", json=reward, headers=auth["reward"]).status_code == 404


def test_post_reward_after_window_is_flagged_late(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    settings = api_settings.model_copy(update={"attribution_window": timedelta(seconds=1)})
    with TestClient(create_app(settings)) as client:
        decision = _decide(client, auth["decide"])
        time.sleep(1.2)  # past the one-second window
        reward = {"decision_id": decision["decision_id"], "converted": True}
        response = client.post("/v1/rewards", json=reward, headers=auth["reward"])
    assert response.status_code == 200
    assert response.json()["late"] is True


@pytest.mark.parametrize(
    "occurred_at",
    [
        "1969-12-31T23:59:59+00:00",
        "0001-01-01T00:00:00+23:59",
        (datetime.now(UTC) + timedelta(days=1)).isoformat(),
    ],
)
def test_post_reward_dated_before_1970_or_in_the_future_is_422(
    api_client: TestClient, auth: dict[str, dict[str, str]], occurred_at: str
) -> None:
    decision = _decide(api_client, auth["decide"])
    reward = {"decision_id": decision["decision_id"], "occurred_at": occurred_at}
    response = api_client.post("/v1/rewards", json=reward, headers=auth["reward"])
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "occurred_at"]


def test_post_reward_before_decision_is_400(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    decision = _decide(api_client, auth["decide"])
    earlier = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    reward = {"decision_id": decision["decision_id"], "occurred_at": earlier}
    assert api_client.post("/v1/rewards", json=reward, headers=auth["reward"]).status_code == 400


def test_post_reward_schema_violation_names_fields(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    reward = {"decision_id": "not-an-id", "value_cny": "lots", "occurred_at": "2026-01-01T00:00"}
    response = api_client.post("/v1/rewards", json=reward, headers=auth["reward"])
    assert response.status_code == 422
    locs = {tuple(e["loc"]) for e in response.json()["detail"]}
    assert {("body", "decision_id"), ("body", "value_cny"), ("body", "occurred_at")} <= locs


def test_post_delivery_counts_towards_contact_caps(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    now = datetime.now(UTC)
    for i in range(8):
        delivery = {
            "customer_id": "capped-customer",
            "message_id": f"msg-{i}",
            "channel": "app_push",
            "offer": "market_report",
            "delivered_at": (now - timedelta(hours=30 + i)).isoformat(),
        }
        response = api_client.post("/v1/deliveries", json=delivery, headers=auth["reward"])
        assert response.status_code == 200, response.text
    payload = {
        "customer": customer(customer_id="capped-customer"),
        "channels": ["app_push"],
        "k": 50,
        "explain": True,
    }
    body = api_client.post("/v1/decisions", json=payload, headers=auth["decide"]).json()
    assert body["chosen"]["action"] == "no_contact"
    rules = {b["rule"] for b in body["blocked"] if b["action"].startswith("app_push:")}
    assert rules & {"contact_cap_channel_7d", "contact_cap_total_7d"}


def test_post_delivery_unknown_channel_is_400(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    delivery = {
        "customer_id": "c-1",
        "message_id": "m-1",
        "channel": "fax",
        "delivered_at": datetime.now(UTC).isoformat(),
    }
    assert (
        api_client.post("/v1/deliveries", json=delivery, headers=auth["reward"]).status_code == 400
    )


def test_post_delivery_message_id_with_nul_is_422(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    """A NUL would cut the id short in the contact store (two deliveries would collide)."""
    delivery = {
        "customer_id": "c-1",
        "message_id": "m-1\x00copy",
        "channel": "sms",
        "delivered_at": datetime.now(UTC).isoformat(),
    }
    response = api_client.post("/v1/deliveries", json=delivery, headers=auth["reward"])
    assert response.status_code == 422
    assert ["body", "message_id"] in [e["loc"] for e in response.json()["detail"]]


def _explained(client: TestClient, headers: dict[str, str], customer_id: str) -> dict:
    response = client.post(
        "/v1/decisions",
        json={"customer": customer(customer_id=customer_id), "k": 50, "explain": True},
        headers=headers,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_an_opt_out_reported_with_an_outcome_blocks_that_channel_at_once_on_every_worker(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    """The platform's own record (the request's ``opt_outs``) may lag: the service honours
    an opt-out it was told of from the next decision on, on any worker and endpoint."""
    # recommendations not counted, so the minimum gap does not block the next decision
    settings = api_settings.model_copy(update={"count_recommended": False})
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as other:
        first = _explained(one, auth["decide"], "opting-out")
        channel = first["chosen"]["channel"]
        assert channel is not None
        reward = {"decision_id": first["decision_id"], "opted_out": True}
        for _ in range(2):  # a retried report stores nothing twice and still answers
            assert one.post("/v1/rewards", json=reward, headers=auth["reward"]).status_code == 200
        after = _explained(other, auth["decide"], "opting-out")
        assert all(r["channel"] != channel for r in after["ranked"])
        rules = {b["rule"] for b in after["blocked"] if b["action"].startswith(f"{channel}:")}
        assert "channel_opt_out" in rules
        assert after["ranked"], "the other channels stay open"
        batch = other.post(
            "/v1/decisions/batch",
            json={"customers": [customer(customer_id="opting-out")], "k": 50},
            headers=auth["decide"],
        )
        assert batch.status_code == 200, batch.text
        (decided,) = batch.json()["decisions"]
        assert all(not a.startswith(f"{channel}:") for a in decided["ranked"])
        # another customer is not touched
        bystander = _explained(other, auth["decide"], "not-opting-out")
        assert "channel_opt_out" not in {b["rule"] for b in bystander["blocked"]}


def test_a_complaint_reported_with_an_outcome_suppresses_every_contact(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    settings = api_settings.model_copy(update={"count_recommended": False})
    with TestClient(create_app(settings)) as client:
        first = _explained(client, auth["decide"], "complaining")
        assert first["chosen"]["channel"] is not None
        reward = {"decision_id": first["decision_id"], "complaint": True}
        assert client.post("/v1/rewards", json=reward, headers=auth["reward"]).status_code == 200
        after = _explained(client, auth["decide"], "complaining")
    assert after["chosen"]["channel"] is None  # only "no contact" is left
    assert [r["channel"] for r in after["ranked"]] == [None]
    assert "complaint_suppression" in {b["rule"] for b in after["blocked"]}


def test_every_served_decision_can_be_traced_to_its_rules_afterwards(
    api_client: TestClient, api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    """Traceability after the fact: the journal says which rule blocked which action for
    each decision, as the answer's ``explain`` said it, and ``nextbest trace`` prints it."""
    from typer.testing import CliRunner

    from nextbest.cli import app
    from nextbest.decision_journal import decision_trace

    asked = customer(customer_id="traced", consented_channels=["app_push", "sms", "wechat"])
    response = api_client.post(
        "/v1/decisions",
        json={
            "customer": asked,
            "k": 3,
            "explain": True,
            "channels": ["app_push"],
        },
        headers=auth["decide"],
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    found = decision_trace(api_settings.state_dir, answer["decision_id"])
    explained: dict[str, list[str]] = {}
    for blocked in answer["blocked"]:
        explained.setdefault(blocked["rule"], []).append(blocked["action"])
    names = [a.name for a in api_client.app.state.service.catalog.actions]
    assert {r: [names[a] for a in acts] for r, acts in found.blocked().items()} == explained
    assert "consent" in explained  # calls, managers, branches: no consent
    assert found.left_out()  # SMS and WeChat: the rules allowed them, the request did not
    assert all(names[a].split(":")[0] in {"sms", "wechat"} for a in found.left_out())
    assert names[found.action] == answer["chosen"]["action"]
    assert found.customer_key.startswith("cust_") and "traced" not in found.customer_key
    batch = api_client.post(
        "/v1/decisions/batch",
        json={"customers": [customer(customer_id=f"traced-{i}") for i in range(3)]},
        headers=auth["decide"],
    )
    assert batch.status_code == 200, batch.text
    for decision in batch.json()["decisions"]:
        traced = decision_trace(api_settings.state_dir, decision["decision_id"])
        assert names[traced.action] == decision["action"] and traced.blocked_by is not None
    printed = CliRunner().invoke(
        app, ["trace", answer["decision_id"], "--journal", str(api_settings.state_dir), "--all"]
    )
    assert printed.exit_code == 0, printed.output
    text = " ".join(printed.output.split())
    assert answer["chosen"]["action"] in text and "consent" in text
    assert "left out by the request" in text
    unknown = CliRunner().invoke(app, ["trace", "0" * 32, "--journal", str(api_settings.state_dir)])
    assert unknown.exit_code == 1 and "unknown decision" in unknown.output


def test_an_opt_out_in_a_refused_report_still_binds(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    """A second, different report (409) or one dated before its decision (400) is not
    journalled, but the customer's opt-out in it holds from the next decision on."""
    settings = api_settings.model_copy(update={"count_recommended": False})
    with TestClient(create_app(settings)) as client:
        first = _explained(client, auth["decide"], "changing-mind")
        channel = first["chosen"]["channel"]
        reward = {"decision_id": first["decision_id"], "converted": False}
        assert client.post("/v1/rewards", json=reward, headers=auth["reward"]).status_code == 200
        later = {**reward, "opted_out": True}
        refused = client.post("/v1/rewards", json=later, headers=auth["reward"])
        assert refused.status_code == 409, refused.text
        after = _explained(client, auth["decide"], "changing-mind")
        assert all(r["channel"] != channel for r in after["ranked"])
        second = _explained(client, auth["decide"], "early-report")
        early = {
            "decision_id": second["decision_id"],
            "complaint": True,
            "occurred_at": "2020-01-01T00:00:00+00:00",
        }
        refused = client.post("/v1/rewards", json=early, headers=auth["reward"])
        assert refused.status_code == 400, refused.text
        suppressed = _explained(client, auth["decide"], "early-report")
    assert suppressed["chosen"]["channel"] is None
    assert "complaint_suppression" in {b["rule"] for b in suppressed["blocked"]}


def test_an_opt_out_for_a_decision_of_another_catalogue_blocks_every_channel(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    """Action ids may move between catalogue versions: the channel of an older decision
    cannot be read from the current catalogue, so its opt-out is of every channel."""
    settings = api_settings.model_copy(update={"count_recommended": False})
    with TestClient(create_app(settings)) as client:
        first = _explained(client, auth["decide"], "old-catalogue")
        with sqlite3.connect(api_settings.state_dir / "journal.db") as conn:
            conn.execute("UPDATE versions SET catalog_version = 'older'")
        reward = {"decision_id": first["decision_id"], "opted_out": True}
        assert client.post("/v1/rewards", json=reward, headers=auth["reward"]).status_code == 200
        after = _explained(client, auth["decide"], "old-catalogue")
    assert after["chosen"]["channel"] is None
    assert "opted_out_all" in {b["rule"] for b in after["blocked"]}


def _opted_out_rules(answer: dict, channel: str) -> set[str]:
    """The rules an explained answer names as blocking actions on ``channel``."""
    return {b["rule"] for b in answer["blocked"] if b["action"].startswith(f"{channel}:")}


def _now(minutes: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat()


def test_a_consent_lifts_the_stored_opt_out_on_every_worker_and_is_logged(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    """A customer who opted out (reported with an outcome) and consents again is offered
    the channel again, on any worker; a consent given before the opt-out lifts nothing."""
    settings = api_settings.model_copy(update={"count_recommended": False})
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as other:
        first = _explained(one, auth["decide"], "returning")
        channel = first["chosen"]["channel"]
        assert channel is not None
        reward = {"decision_id": first["decision_id"], "opted_out": True, "occurred_at": _now()}
        assert one.post("/v1/rewards", json=reward, headers=auth["reward"]).status_code == 200
        assert "channel_opt_out" in _opted_out_rules(
            _explained(other, auth["decide"], "returning"), channel
        )

        consent = {"customer_id": "returning", "channels": [channel], "given_at": _now()}
        # lifting a compliance block takes its own scope: the platform's reward key cannot
        assert one.post("/v1/consents", json=consent, headers=auth["reward"]).status_code == 403
        assert one.post("/v1/consents", json=consent).status_code == 401
        early = {**consent, "given_at": _now(-60)}
        stale = one.post("/v1/consents", json=early, headers=auth["consent"])
        assert stale.status_code == 200, stale.text
        assert stale.json()["lifted"] == [] and stale.json()["still_opted_out"] == [channel]
        assert "channel_opt_out" in _opted_out_rules(
            _explained(other, auth["decide"], "returning"), channel
        )

        given = one.post("/v1/consents", json=consent, headers=auth["consent"])
        assert given.status_code == 200, given.text
        key_id = one.app.state.service.api_keys.authenticate(
            auth["consent"]["X-API-Key"], "consent"
        ).key_id
        assert given.json()["lifted"] == [channel] and given.json()["still_opted_out"] == []
        after = _explained(other, auth["decide"], "returning")
        assert "channel_opt_out" not in _opted_out_rules(after, channel)
        assert any(r["channel"] == channel for r in after["ranked"])
        # the request's own opt-out is the platform's: a consent never lifts it
        own = other.post(
            "/v1/decisions",
            json={"customer": customer(customer_id="returning", opt_outs=[channel]), "k": 50},
            headers=auth["decide"],
        )
        assert own.status_code == 200 and all(r["channel"] != channel for r in own.json()["ranked"])
    with sqlite3.connect(api_settings.state_dir / "contacts.db") as conn:
        kinds = sorted(k for (k,) in conn.execute("SELECT kind FROM restrictions"))
        logged = conn.execute(
            "SELECT given_us, received_us, reported_by FROM consent_log"
        ).fetchall()
    assert kinds == [0, 2]  # the state: the opt-out and the latest consent
    # the audit trail: both consents, each with when it was given, received, and by which key
    assert [r[2] for r in logged] == [key_id, key_id]
    assert logged[0][0] < logged[1][0] and all(r[0] <= r[1] + 1_000_000 for r in logged)


@pytest.mark.parametrize(
    ("consent_minutes", "opt_out_minutes", "first"),
    [
        (4.0, 0.1, "consent"),  # a consent dated ahead of the service's clock, then an opt-out
        (2.0, 3.0, "opt_out"),  # a consent given before the opt-out, reported after it
        (0.0, 0.0, "consent"),  # an opt-out just before the consent, reported after it
    ],
    ids=["consent-dated-ahead", "consent-given-before", "opt-out-reported-after"],
)
def test_an_opt_out_dated_or_reported_after_the_consent_keeps_binding(
    api_settings: Settings,
    auth: dict[str, dict[str, str]],
    consent_minutes: float,
    opt_out_minutes: float,
    first: str,
) -> None:
    """A consent lifts only an opt-out both dated and reported before it: clocks differ and
    reports arrive late, and a customer's STOP must never be lost to either. (Times are
    minutes after the decision, which an outcome cannot precede; the service accepts
    reports up to five minutes ahead of its clock.)"""
    settings = api_settings.model_copy(update={"count_recommended": False})
    with TestClient(create_app(settings)) as client:
        decided = _explained(client, auth["decide"], "ordering")
        channel = decided["chosen"]["channel"]
        assert channel is not None
        reports = {  # built in this order: at equal offsets the opt-out is the earlier
            "opt_out": (
                "/v1/rewards",
                {
                    "decision_id": decided["decision_id"],
                    "opted_out": True,
                    "occurred_at": _now(opt_out_minutes),
                },
                "reward",
            ),
            "consent": (
                "/v1/consents",
                {
                    "customer_id": "ordering",
                    "channels": [channel],
                    "given_at": _now(consent_minutes),
                },
                "consent",
            ),
        }
        for name in (first, ({"opt_out", "consent"} - {first}).pop()):
            path, body, scope = reports[name]
            answer = client.post(path, json=body, headers=auth[scope])
            assert answer.status_code == 200, answer.text
        single = _explained(client, auth["decide"], "ordering")
        assert "channel_opt_out" in _opted_out_rules(single, channel)
        batch = client.post(
            "/v1/decisions/batch",
            json={"customers": [customer(customer_id="ordering")], "k": 50},
            headers=auth["decide"],
        )
        assert batch.status_code == 200, batch.text
        ranked = batch.json()["decisions"][0]["ranked"]
        assert ranked and not any(a.startswith(f"{channel}:") for a in ranked), ranked


def test_a_consent_to_one_channel_after_an_opt_out_of_every_channel_frees_that_one(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    settings = api_settings.model_copy(update={"count_recommended": False})
    with TestClient(create_app(settings)) as client:
        first = _explained(client, auth["decide"], "all-out")
        with sqlite3.connect(api_settings.state_dir / "journal.db") as conn:
            conn.execute("UPDATE versions SET catalog_version = 'older'")  # every channel
        reward = {"decision_id": first["decision_id"], "opted_out": True}
        assert client.post("/v1/rewards", json=reward, headers=auth["reward"]).status_code == 200
        consent = {"customer_id": "all-out", "channels": ["app_push"], "given_at": _now()}
        given = client.post("/v1/consents", json=consent, headers=auth["consent"])
        assert given.status_code == 200, given.text
        channels = list(client.app.state.service.catalog.channel_names)
        assert given.json()["lifted"] == ["app_push"]
        assert given.json()["still_opted_out"] == [c for c in channels if c != "app_push"]
        after = _explained(client, auth["decide"], "all-out")
        assert "opted_out_all" not in {b["rule"] for b in after["blocked"]}
        assert "channel_opt_out" in _opted_out_rules(after, "sms")
        assert "channel_opt_out" not in _opted_out_rules(after, "app_push")
        assert {r["channel"] for r in after["ranked"]} <= {"app_push", None}
        everything = client.post(
            "/v1/consents",
            json={"customer_id": "all-out", "given_at": _now()},
            headers=auth["consent"],
        )
        assert everything.status_code == 200, everything.text
        assert everything.json()["still_opted_out"] == []
        assert set(everything.json()["lifted"]) == set(channels) - {"app_push"}


GIVEN = "2026-01-08T10:30:00+08:00"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"customer_id": "c-1", "channels": ["fax"], "given_at": GIVEN}, 400, None),
        ({"customer_id": "c-1", "channels": [], "given_at": GIVEN}, 422, "channels"),
        ({"customer_id": "", "given_at": GIVEN}, 422, "customer_id"),
        ({"customer_id": "c-1"}, 422, "given_at"),
        ({"customer_id": "c-1", "given_at": "2026-01-08T10:30:00"}, 422, "given_at"),
        ({"customer_id": "c-1", "given_at": "2999-01-01T00:00:00+00:00"}, 422, "given_at"),
        ({"customer_id": "c-1", "given_at": GIVEN, "scope": "all"}, 422, "scope"),
    ],
)
def test_post_consent_bad_input_is_refused_and_names_the_field(
    api_client: TestClient,
    api_settings: Settings,
    auth: dict[str, dict[str, str]],
    body: dict,
    status: int,
    field: str | None,
) -> None:
    response = api_client.post("/v1/consents", json=body, headers=auth["consent"])
    assert response.status_code == status, response.text
    if field is None:
        assert "fax" in response.json()["detail"]
    else:
        assert ["body", field] in [e["loc"][:2] for e in response.json()["detail"]]
    with sqlite3.connect(api_settings.state_dir / "contacts.db") as conn:
        assert conn.execute("SELECT count(*) FROM restrictions").fetchone() == (0,)


def test_an_opt_out_the_journal_holds_binds_even_if_its_first_write_failed(
    api_settings: Settings, auth: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal stores the report, storing the opt-out fails (500), and the platform
    retries with another body (409): the opt-out the journal holds still binds."""
    settings = api_settings.model_copy(update={"count_recommended": False})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        decided = _explained(client, auth["decide"], "unlucky")
        channel = decided["chosen"]["channel"]
        assert channel is not None
        store = client.app.state.service.contacts
        real, calls = store.restrict, []

        def fail_once(restrictions):  # the contact store busy, the worker restarting ...
            calls.append(restrictions)
            if len(calls) == 1:
                raise sqlite3.OperationalError("database is locked")
            return real(restrictions)

        monkeypatch.setattr(store, "restrict", fail_once)
        reward = {"decision_id": decided["decision_id"], "opted_out": True}
        assert client.post("/v1/rewards", json=reward, headers=auth["reward"]).status_code == 500
        retry = {"decision_id": decided["decision_id"], "converted": True, "value_cny": 10.0}
        refused = client.post("/v1/rewards", json=retry, headers=auth["reward"])
        assert refused.status_code == 409, refused.text
        after = _explained(client, auth["decide"], "unlucky")
    assert "channel_opt_out" in _opted_out_rules(after, channel)


def test_a_refused_reports_opt_out_keeps_its_date_against_a_consent(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    """An opt-out in a refused (409) report dated a few minutes ahead binds against a
    consent dated before it, as an accepted report's would."""
    settings = api_settings.model_copy(update={"count_recommended": False})
    with TestClient(create_app(settings)) as client:
        decided = _explained(client, auth["decide"], "refused-ahead")
        channel = decided["chosen"]["channel"]
        assert channel is not None
        first = {"decision_id": decided["decision_id"], "converted": False}
        assert client.post("/v1/rewards", json=first, headers=auth["reward"]).status_code == 200
        ahead = {**first, "opted_out": True, "occurred_at": _now(4)}
        refused = client.post("/v1/rewards", json=ahead, headers=auth["reward"])
        assert refused.status_code == 409, refused.text
        consent = {"customer_id": "refused-ahead", "channels": [channel], "given_at": _now(2)}
        given = client.post("/v1/consents", json=consent, headers=auth["consent"])
        assert given.status_code == 200 and given.json()["lifted"] == [], given.text
        after = _explained(client, auth["decide"], "refused-ahead")
    assert "channel_opt_out" in _opted_out_rules(after, channel)


def test_an_opt_out_reported_for_an_archived_decision_is_410_and_binds(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    """``nextbest archive`` moved the decision out of the live journal: its outcome cannot
    be recorded any more (410), but the customer's STOP in it binds."""
    from nextbest.journal_archive import archive_journal

    settings = api_settings.model_copy(update={"count_recommended": False})
    with TestClient(create_app(settings)) as client:
        old = _explained(client, auth["decide"], "long-ago")
        channel = old["chosen"]["channel"]
        assert channel is not None
        _explained(client, auth["decide"], "bystander")  # the newest part always stays
        later = datetime.now(UTC) + timedelta(days=40)
        moved = archive_journal(
            api_settings.state_dir,
            datetime.now(UTC),
            api_settings.state_dir.parent / "archive",
            timedelta(days=30),
            now=later,
        )
        assert moved.decisions == 1
        # dated before its decision (the platform's mistake): the complaint counts from now
        reward = {
            "decision_id": old["decision_id"],
            "opted_out": True,
            "complaint": True,
            "occurred_at": "2020-01-01T00:00:00+00:00",
        }
        gone = client.post("/v1/rewards", json=reward, headers=auth["reward"])
        assert gone.status_code == 410 and "archived" in gone.json()["detail"], gone.text
        after = _explained(client, auth["decide"], "long-ago")
        assert after["chosen"]["channel"] is None
        assert "complaint_suppression" in {b["rule"] for b in after["blocked"]}
        unknown = {"decision_id": "0" * 32, "opted_out": True}
        assert client.post("/v1/rewards", json=unknown, headers=auth["reward"]).status_code == 404
    with sqlite3.connect(api_settings.state_dir / "contacts.db") as conn:
        kinds = sorted(k for (k,) in conn.execute("SELECT kind FROM restrictions"))
    assert kinds == [0, 1]  # the opt-out (first rule: the complaint's, above) and the complaint


def test_a_complaint_in_a_409_dated_before_its_decision_counts_from_receipt(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    """Every refused report is dated by one rule: as reported, unless before its decision."""
    settings = api_settings.model_copy(update={"count_recommended": False})
    with TestClient(create_app(settings)) as client:
        decided = _explained(client, auth["decide"], "conflicting")
        first = {"decision_id": decided["decision_id"], "converted": False}
        assert client.post("/v1/rewards", json=first, headers=auth["reward"]).status_code == 200
        early = {**first, "complaint": True, "occurred_at": "2020-01-01T00:00:00+00:00"}
        refused = client.post("/v1/rewards", json=early, headers=auth["reward"])
        assert refused.status_code == 409, refused.text
        after = _explained(client, auth["decide"], "conflicting")
    assert after["chosen"]["channel"] is None
    assert "complaint_suppression" in {b["rule"] for b in after["blocked"]}
