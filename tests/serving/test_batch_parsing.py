"""A batch of customer objects validated as columns (``serving.deps.parse_batch``): the same
requests accepted, decided alike, and refused with the same errors as objects."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from conftest import customer
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from nextbest.catalog import ActionCatalog
from nextbest.context import MAX_COUNT, ContextBatch
from nextbest.customer_columns import columns_of_objects, context_batch
from serving.deps import parse_batch, parse_body
from serving.schemas import BatchDecisionRequest, batch_request_model

MODEL = batch_request_model(5)
NOW = datetime.now(UTC)
FUTURE = (date.today() + timedelta(days=3)).isoformat()


def _outcome(parse: Any, body: dict[str, Any], catalog: ActionCatalog) -> Any:
    """What ``parse`` makes of ``body``: the customers' batch, or the 422's errors, or the
    HTTP status of another refusal."""
    try:
        request: BatchDecisionRequest = parse(
            MODEL, json.dumps(body).encode(), {"catalog": catalog}
        )
    except RequestValidationError as exc:
        return ("422", exc.errors())
    except HTTPException as exc:
        return (str(exc.status_code), exc.detail)
    if request.columns is not None:
        batch = context_batch(request.columns, catalog, NOW)
    else:
        batch = ContextBatch.from_contexts(request.customers or [], catalog, NOW)
    rest = request.model_dump(exclude={"customers", "columns"})
    return ("200", rest, {name: batch[name].tolist() for name in batch.columns})


def test_customer_objects_are_validated_as_columns(catalog: ActionCatalog) -> None:
    body = {"customers": [customer(customer_id="a"), customer(customer_id="b")], "k": 2}
    request = parse_batch(MODEL, json.dumps(body).encode(), {"catalog": catalog})
    assert request.customers is None and request.columns is not None
    assert request.customer_ids() == ["a", "b"] and request.k == 2
    assert request.answer == "decisions"  # the answer keeps the form asked for
    assert _outcome(parse_batch, body, catalog) == _outcome(parse_body, body, catalog)


def _with(path: str, value: Any) -> dict[str, Any]:
    """The second customer of a two-customer body, with ``path`` (``a.b`` nested) set."""
    second = customer(customer_id="second")
    outer, _, inner = path.partition(".")
    if inner:
        second.setdefault(outer, {})[inner] = value
    else:
        second[outer] = value
    return {"customers": [customer(customer_id="first"), second]}


CHANGES: dict[str, dict[str, Any]] = {
    "age negative": _with("age", -1),
    "age a text of digits": _with("age", "42"),
    "age a fraction": _with("age", 41.5),
    "age a boolean": _with("age", True),
    "aum infinite": _with("aum_cny", "inf"),
    "aum null": _with("aum_cny", None),
    "income band unknown": _with("income_band", "rich"),
    "risk tolerance unknown": _with("risk_tolerance", "C9"),
    "risk tolerance without its date": _with("risk_assessed_on", None),
    "risk assessed in the future": _with("risk_assessed_on", FUTURE),
    "risk assessed on no date": _with("risk_assessed_on", "2026-13-01"),
    "lifecycle unknown": _with("lifecycle_stage", "retired"),
    "tenure too long": _with("tenure_months", 1501),
    "holdings null": _with("holdings", None),
    "holdings unknown offer": _with("holdings", ["no_such_offer"]),
    "holdings a text": _with("holdings", "fund_sip"),
    "consent on an unknown channel": _with("consented_channels", ["fax"]),
    "opt-outs of numbers": _with("opt_outs", [1]),
    "opted out as text": _with("opted_out_all", "yes"),
    "opted out as a number": _with("opted_out_all", 2),
    "complaint time naive": _with("last_complaint_at", "2026-01-01T00:00:00"),
    "complaint time not a time": _with("last_complaint_at", "yesterday"),
    "complaint in the future": _with("last_complaint_at", FUTURE + "T00:00:00+00:00"),
    "time zone unknown": _with("timezone", "Mars/Olympus"),
    "time zone null": _with("timezone", None),
    "time zone a number": _with("timezone", 8),
    "week over month": _with("contact_history", {"contacts_7d": {"sms": 2}}),
    "negative count": _with("contact_history", {"contacts_30d": {"sms": -1}}),
    "count over the maximum": _with("contact_history", {"contacts_30d": {"sms": MAX_COUNT + 1}}),
    "count on an unknown channel": _with("contact_history", {"contacts_30d": {"fax": 1}}),
    "count a fraction": _with("contact_history", {"contacts_30d": {"sms": 1.5}}),
    "assets a boolean": _with("aum_cny", False),
    "logins a boolean": _with("app_logins_30d", True),
    "counts without a last contact": _with("contact_history", {"contacts_30d": {"sms": 1}}),
    "last contact naive": _with("contact_history.last_contact_at", "2026-01-01T00:00:00"),
    "login hour 24": _with("events.usual_login_hour", 24),
    "views of an unknown offer": _with("events.offer_views_30d", {"no_such_offer": 1}),
    "days since login negative": _with("events.days_since_last_login", -1),
    "page views as text": _with("events.mortgage_page_views_7d", "3"),
    "customer id empty": _with("customer_id", ""),
    "customer id a number": _with("customer_id", 7),
    "customer id repeated": _with("customer_id", "first"),
    "unknown key": _with("shoe_size", 42),
    "unknown nested key": _with("events.shoe_size", 42),
    "nested part null": _with("events", None),
    "required key missing": {"customers": [customer(), {**customer(customer_id="x"), "age": None}]},
    "k zero": {"customers": [customer()], "k": 0},
    "k a text": {"customers": [customer()], "k": "two"},
    "both forms": {"customers": [customer()], "columns": {"customer_id": ["a"]}},
    "objects with a columns answer": {"customers": [customer()], "answer": "columns"},
    "no customers": {"customers": []},
    "customers not a list": {"customers": {"a": customer()}},
    "a customer not an object": {"customers": [customer(), "second"]},
    "too many customers": {"customers": [customer(customer_id=str(i)) for i in range(6)]},
    "too many, one invalid": {
        "customers": [customer(customer_id=str(i), age=-i) for i in range(6)],
    },
}


@pytest.mark.parametrize("body", CHANGES.values(), ids=CHANGES.keys())
def test_batch_of_objects_parses_as_objects_do(
    body: dict[str, Any], catalog: ActionCatalog
) -> None:
    """Accepted (and decided on the same batch) or refused (with the same errors, located
    in the objects) exactly as when every object is validated as such; an accepted batch of
    objects is validated as columns."""
    expected = _outcome(parse_body, body, catalog)
    assert _outcome(parse_batch, body, catalog) == expected
    if expected[0] == "200" and "columns" not in json.dumps(body):
        request = parse_batch(MODEL, json.dumps(body).encode(), {"catalog": catalog})
        assert request.columns is not None and request.customers is None


def test_batch_accepted_as_objects_but_refused_as_columns_is_served_and_logged(
    catalog: ActionCatalog, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Were the two validations ever to disagree, the request is served as objects (the
    documented validation) and the disagreement is logged, without the customers' values."""

    def wrong_columns(customers: list[Any]) -> dict[str, Any] | None:
        data = columns_of_objects(customers)
        assert data is not None
        return {**data, "age": [-1] * len(customers)}

    monkeypatch.setattr("serving.deps.columns_of_objects", wrong_columns)
    body = {"customers": [customer(customer_id="a", age=33), customer(customer_id="b")]}
    with caplog.at_level("WARNING", logger="serving.deps"):
        request = parse_batch(MODEL, json.dumps(body).encode(), {"catalog": catalog})
    assert request.customers is not None and request.customers[0].age == 33
    assert "disagree" in caplog.text and "greater_than_equal" in caplog.text
    assert '"a"' not in caplog.text and "33" not in caplog.text


def test_batch_of_objects_keeps_the_values_given(catalog: ActionCatalog) -> None:
    """The columns carry each customer's own values, defaults where an object is silent."""
    first = customer(customer_id="first", age=30, holdings=["fund_sip"])
    second = {k: v for k, v in customer(customer_id="second", age=61).items() if k != "holdings"}
    second["events"] = {"usual_login_hour": 9, "offer_views_30d": {"wealth_r2": 4}}
    body = {"customers": [first, second]}
    request = parse_batch(MODEL, json.dumps(body).encode(), {"catalog": catalog})
    assert request.columns is not None
    assert request.columns.age == [30, 61]
    assert request.columns.holdings == [["fund_sip"], []]
    assert request.columns.offer_views_30d == {"wealth_r2": [3, 4]}  # the example's 3
    assert request.columns.usual_login_hour == [None, 9]
    assert _outcome(parse_batch, body, catalog) == _outcome(parse_body, body, catalog)
