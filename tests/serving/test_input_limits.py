"""Inputs at and past their limits: a clear 422 naming the field, never a 500 or a score
that is not a number."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from conftest import customer, in_one_utc_hour
from fastapi.testclient import TestClient

from nextbest.catalog import ActionCatalog
from nextbest.compliance import RuleEngine
from nextbest.context import MAX_COUNT, ContextBatch, parse_customer
from nextbest.features import ContextEncoder
from nextbest.privacy import message_key
from serving.app import create_app
from serving.decision_engine import DecisionEngine
from serving.settings import Settings

IN_TWO_DAYS = (datetime.now(UTC) + timedelta(days=2)).isoformat()


@pytest.mark.parametrize(
    ("overrides", "loc"),
    [
        ({"events": {"mortgage_page_views_7d": MAX_COUNT + 1}}, "mortgage_page_views_7d"),
        ({"events": {"days_since_last_login": 10**400}}, "days_since_last_login"),
        ({"events": {"offer_views_30d": {"mortgage_rate": 10**39}}}, "offer_views_30d"),
        (
            {"contact_history": {"contacts_7d": {"sms": 10**39}, "contacts_30d": {"sms": 10**39}}},
            "contacts_7d",
        ),
        ({"aum_cny": 1e39}, "aum_cny"),
    ],
)
def test_counts_and_amounts_past_their_limits_are_422(
    api_client: TestClient, auth: dict[str, dict[str, str]], overrides: dict, loc: str
) -> None:
    response = api_client.post(
        "/v1/decisions", json={"customer": customer(**overrides)}, headers=auth["decide"]
    )
    assert response.status_code == 422, response.text
    assert loc in str(response.json()["detail"][0]["loc"])


def test_counts_at_their_limit_are_decided(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    big = customer(
        events={"mortgage_page_views_7d": MAX_COUNT, "days_since_last_login": 36_500},
        contact_history={
            "contacts_7d": {"sms": MAX_COUNT},
            "contacts_30d": {"sms": MAX_COUNT},
            "last_contact_at": "2026-01-01T09:00:00+08:00",
        },
        aum_cny=1e15,
    )
    response = api_client.post("/v1/decisions", json={"customer": big}, headers=auth["decide"])
    assert response.status_code == 200, response.text
    assert all(np.isfinite(r["score"]) for r in response.json()["ranked"])


TWO_CUSTOMERS = {
    "customer_id": ["a", "b"],
    "age": [30, 40],
    "aum_cny": [1e4, 1e5],
    "income_band": ["low", "middle"],
    "lifecycle_stage": ["growth", "mature"],
    "tenure_months": [3, 40],
    "app_logins_30d": [1, 2],
}
"""The required columns of a two-customer batch."""


def test_columns_past_the_count_limit_are_422(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    columns = {**TWO_CUSTOMERS, "contacts_30d": {"sms": [0, 10**39]}}
    response = api_client.post(
        "/v1/decisions/batch", json={"columns": columns}, headers=auth["decide"]
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][:4] == ["body", "columns", "contacts_30d", "sms"]


def test_counted_contacts_without_a_last_contact_time_are_422(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    """The minimum gap is measured from the last contact: counts without its time would
    let a contact a minute after the last one through."""
    counted = customer(contact_history={"contacts_7d": {"sms": 1}, "contacts_30d": {"sms": 1}})
    single = api_client.post("/v1/decisions", json={"customer": counted}, headers=auth["decide"])
    assert single.status_code == 422, single.text
    assert "last_contact_at is required" in single.text
    columns = {
        **TWO_CUSTOMERS,
        "contacts_30d": {"sms": [0, 2]},
        "last_contact_at": ["2026-01-01T09:00:00+08:00", None],
    }
    batch = api_client.post(
        "/v1/decisions/batch", json={"columns": columns}, headers=auth["decide"]
    )
    assert batch.status_code == 422, batch.text
    assert "row 1: last_contact_at is required" in batch.text
    columns["last_contact_at"] = [None, "2026-01-01T09:00:00+08:00"]  # row 0 counts none
    fine = api_client.post("/v1/decisions/batch", json={"columns": columns}, headers=auth["decide"])
    assert fine.status_code == 200, fine.text


@pytest.mark.parametrize("n", [1, 3])
def test_scores_that_are_not_numbers_still_rank_every_allowed_action(
    catalog: ActionCatalog, engine: RuleEngine, n: int
) -> None:
    """NaN and infinite scores (a model gone wrong; the model store refuses such files, the
    engine does not rely on it) rank as the lowest and highest finite floats: every allowed
    action keeps a rank and the chosen one is allowed."""
    raw = np.zeros((n, catalog.n_actions), np.float32)
    raw[:, 1::2] = np.nan
    raw[:, 2] = np.inf
    raw[:, 4] = -np.inf
    model = SimpleNamespace(
        scorer=SimpleNamespace(scores=lambda features: raw.copy()),
        version="broken",
        spec_version=ContextEncoder(catalog).spec.version,
    )
    decisions = DecisionEngine(catalog, engine, models=None, epsilon=0.0, seed=0)  # type: ignore[arg-type]
    now = datetime.now(UTC)
    batch = ContextBatch.from_contexts(
        [parse_customer(customer(customer_id=f"n{i}"), catalog) for i in range(n)], catalog, now
    )
    result = decisions.decide(batch, k=catalog.n_actions, model=model)  # type: ignore[arg-type]
    assert np.isfinite(result.scores).all() and np.isfinite(result.ranked_scores).all()
    assert result.allowed[np.arange(n), result.action].all()
    assert ((result.ranked >= 0).sum(axis=1) == result.allowed.sum(axis=1)).all()


def test_campaign_id_with_a_nul_is_422_when_any_campaign_is_accepted(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    settings = api_settings.model_copy(update={"campaigns_path": None})
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/decisions",
            json={"customer": customer(), "campaign_id": "spring\u0000x"},
            headers=auth["decide"],
        )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "campaign_id"]


def _alone_and_second_in_a_batch(
    client: TestClient, auth: dict[str, dict[str, str]], **fields: object
) -> tuple[httpx.Response, httpx.Response]:
    """The answers to a customer with ``fields`` decided alone, and second of two in a batch
    of customer objects."""
    single = client.post(
        "/v1/decisions", json={"customer": customer(**fields)}, headers=auth["decide"]
    )
    batch = client.post(
        "/v1/decisions/batch",
        json={"customers": [customer(customer_id="p"), customer(customer_id="f", **fields)]},
        headers=auth["decide"],
    )
    return single, batch


def test_risk_assessment_dated_in_the_future_is_422(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    def refused(attempt: int) -> tuple[httpx.Response, httpx.Response]:
        """The day after tomorrow, refused alone and in a batch (checked in one hour: after
        UTC midnight it would be the service's tomorrow, and accepted)."""
        future = (datetime.now(UTC).date() + timedelta(days=2)).isoformat()
        return _alone_and_second_in_a_batch(api_client, auth, risk_assessed_on=future)

    single, batch = in_one_utc_hour(refused)
    assert single.status_code == 422
    assert "risk_assessed_on" in single.text and "in the future" in single.text
    assert [e["loc"] for e in single.json()["detail"]] == [["body", "customer"]]
    assert batch.status_code == 422
    assert "row 1" in batch.text
    assert [e["loc"] for e in batch.json()["detail"]] == [["body", "customers"]]
    tomorrow = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    ok = api_client.post(
        "/v1/decisions",
        json={"customer": customer(risk_assessed_on=tomorrow)},
        headers=auth["decide"],
    )
    assert ok.status_code == 200  # today somewhere on earth


def test_a_complaint_dated_in_the_future_is_422_in_every_form(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    """The complaint rule counts its days from it: a typo in the year would suppress the
    customer for years. A few minutes ahead (another clock) is accepted."""
    ahead = (datetime.now(UTC) + timedelta(days=400)).isoformat()
    single, objects = _alone_and_second_in_a_batch(api_client, auth, last_complaint_at=ahead)
    assert single.status_code == 422
    assert "last_complaint_at" in single.text and "in the future" in single.text
    assert objects.status_code == 422 and "row 1" in objects.text
    columns = {**TWO_CUSTOMERS, "last_complaint_at": [None, ahead]}
    columnar = api_client.post(
        "/v1/decisions/batch", json={"columns": columns}, headers=auth["decide"]
    )
    assert columnar.status_code == 422, columnar.text
    assert "row 1" in columnar.text and "last_complaint_at" in columnar.text
    assert [e["loc"] for e in columnar.json()["detail"]] == [["body", "columns"]]
    skewed = (datetime.now(UTC) + timedelta(minutes=2)).isoformat()
    ok = api_client.post(
        "/v1/decisions",
        json={"customer": customer(last_complaint_at=skewed), "explain": True},
        headers=auth["decide"],
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["chosen"]["channel"] is None  # suppressed, as a complaint of now is


@pytest.mark.parametrize("ids", [{}, {"decision_id": "0" * 32, "message_id": "m-1"}])
def test_a_delivery_needs_exactly_one_of_decision_id_and_message_id(
    api_client: TestClient, auth: dict[str, dict[str, str]], ids: dict[str, str]
) -> None:
    delivery = {
        "customer_id": "c",
        "channel": "sms",
        "delivered_at": datetime.now(UTC).isoformat(),
        **ids,
    }
    response = api_client.post("/v1/deliveries", json=delivery, headers=auth["reward"])
    assert response.status_code == 422
    got = "both" if ids else "neither"
    assert "`decision_id` (a contact the service decided) and `message_id`" in response.text
    assert f"got {got}" in response.text


def test_a_repeated_delivery_reports_nothing_recorded(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    delivery = {
        "customer_id": "delivered-twice",
        "message_id": "msg-twice",
        "channel": "sms",
        "delivered_at": datetime.now(UTC).isoformat(),
    }
    first = api_client.post("/v1/deliveries", json=delivery, headers=auth["reward"])
    again = api_client.post("/v1/deliveries", json=delivery, headers=auth["reward"])
    assert (first.json()["recorded"], again.json()["recorded"]) == (True, False)


def test_a_message_id_is_stored_pseudonymised(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    """Platforms build message ids from customer numbers: the contact store keeps a keyed
    hash of one, never its text; the same id reported again is still the same contact."""
    marker = "msg-110101199003071234"
    delivery = {
        "customer_id": "c-110101199003071234",
        "message_id": marker,
        "channel": "sms",
        "delivered_at": datetime.now(UTC).isoformat(),
    }
    with TestClient(create_app(api_settings)) as client:
        first = client.post("/v1/deliveries", json=delivery, headers=auth["reward"]).json()
        again = client.post("/v1/deliveries", json=delivery, headers=auth["reward"]).json()
    assert first == {"contact_id": marker, "recorded": True}  # the caller's id, echoed
    assert again == {"contact_id": marker, "recorded": False}
    stored = api_settings.state_dir / "contacts.db"
    with sqlite3.connect(stored) as conn:
        ids = [r[0] for r in conn.execute("SELECT contact_id FROM contact_events")]
    assert ids == [message_key(marker, api_settings.pseudonym_key)]
    files = b"".join(p.read_bytes() for p in api_settings.state_dir.iterdir() if p.is_file())
    assert b"110101199003071234" not in files


@pytest.mark.parametrize("when", ["1969-12-31T23:00:00+00:00", IN_TWO_DAYS])
def test_delivery_dated_before_1970_or_in_the_future_is_422(
    api_client: TestClient, auth: dict[str, dict[str, str]], when: str
) -> None:
    delivery = {
        "customer_id": "c",
        "message_id": "m",
        "channel": "sms",
        "delivered_at": when,
    }
    response = api_client.post("/v1/deliveries", json=delivery, headers=auth["reward"])
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "delivered_at"]


def test_a_delivery_cannot_move_a_contact_to_another_customer_or_back_in_time(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    settings = api_settings.model_copy(update={"epsilon": 0.0})
    body = {"customer": customer(customer_id="owner"), "candidates": ["sms:health_insurance:now"]}
    with TestClient(create_app(settings)) as client:
        first = client.post("/v1/decisions", json=body, headers=auth["decide"]).json()
        assert first["chosen"]["action"] == "sms:health_insurance:now"  # else nothing to test
        delivery = {
            "decision_id": first["decision_id"],
            "customer_id": "someone-else",
            "channel": "sms",
            "delivered_at": datetime.now(UTC).isoformat(),
        }
        other = client.post("/v1/deliveries", json=delivery, headers=auth["reward"])
        assert other.status_code == 409, other.text
        backdated = {
            **delivery,
            "customer_id": "owner",
            "delivered_at": (datetime.now(UTC) - timedelta(days=40)).isoformat(),
        }
        assert client.post("/v1/deliveries", json=backdated, headers=auth["reward"]).json()[
            "recorded"
        ]
        again = client.post("/v1/decisions", json=body, headers=auth["decide"]).json()
    assert again["chosen"]["action"] == "no_contact"  # the gap still counts from the decision


def test_a_boolean_for_a_number_is_422_naming_the_field(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    """Lax validation read ``"age": true`` as age 1 (and an assessment-free minor)."""
    single = api_client.post(
        "/v1/decisions", json={"customer": customer(age=True)}, headers=auth["decide"]
    )
    assert single.status_code == 422, single.text
    assert single.json()["detail"][0]["loc"][-1] == "age"
    columns = {**TWO_CUSTOMERS, "tenure_months": [3, False]}
    batch = api_client.post(
        "/v1/decisions/batch", json={"columns": columns}, headers=auth["decide"]
    )
    assert batch.status_code == 422, batch.text
    assert batch.json()["detail"][0]["loc"][:4] == ["body", "columns", "tenure_months", 1]


def test_a_flood_of_bad_entries_is_refused_briefly(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    """Every bad entry used to become an error in the answer: a 1.2 MB body of 400,000 bad
    ages made a 47 MB answer and ~560 MB of memory. Columns stop at the batch cap and the
    answer names at most 20 errors, then counts the rest."""
    flood = {**TWO_CUSTOMERS, "age": [-1] * 400_000}
    batch = api_client.post("/v1/decisions/batch", json={"columns": flood}, headers=auth["decide"])
    assert batch.status_code == 422, batch.text[:300]
    assert len(batch.content) < 5_000
    assert batch.json()["detail"][0]["loc"][:3] == ["body", "columns", "age"]
    many = customer(holdings=[1] * 300_000)  # one customer's list: capped too
    single = api_client.post("/v1/decisions", json={"customer": many}, headers=auth["decide"])
    assert single.status_code == 422 and len(single.content) < 5_000
    n = 30  # 30 customers, each with a bad age: 30 errors, 20 named and 10 counted
    thirty = {name: [values[0]] * n for name, values in TWO_CUSTOMERS.items()}
    thirty.update(customer_id=[f"c{i}" for i in range(n)], age=[-1] * n)
    refused = api_client.post(
        "/v1/decisions/batch", json={"columns": thirty}, headers=auth["decide"]
    )
    detail = refused.json()["detail"]
    assert refused.status_code == 422 and len(detail) == 21
    assert detail[-1] == {"loc": ["body"], "msg": "and 10 more", "type": "more_errors"}


def test_unknown_time_zones_are_refused_without_a_lookup_each(
    api_client: TestClient, auth: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each unknown name was looked up on disk (~60 us): a column of 150,000 distinct
    unknown names held the worker for 9 s. Names are checked against the known set."""
    import nextbest.context

    looked_up: list[str] = []
    real = nextbest.context.ZoneInfo

    def counting(name: str):  # type: ignore[no-untyped-def]
        looked_up.append(name)
        return real(name)

    monkeypatch.setattr(nextbest.context, "ZoneInfo", counting)
    zones = [f"Nowhere/Zone{i}" for i in range(2)]
    columns = {**TWO_CUSTOMERS, "timezone": zones}
    refused = api_client.post(
        "/v1/decisions/batch", json={"columns": columns}, headers=auth["decide"]
    )
    assert refused.status_code == 422, refused.text
    assert "unknown time zone 'Nowhere/Zone0'" in refused.text
    assert not any(name.startswith("Nowhere/") for name in looked_up)
