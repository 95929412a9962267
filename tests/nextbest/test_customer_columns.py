"""Customer columns: the batch form of CustomerContext, its checks, and its ContextBatch."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pydantic_core
import pytest
from customers import make_customer
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nextbest.catalog import ActionCatalog, load_catalog
from nextbest.context import (
    MAX_COUNT,
    MAX_DAYS,
    BehaviourEvents,
    ContactHistory,
    ContextBatch,
    CustomerContext,
    parse_customer,
)
from nextbest.customer_columns import (
    CONTEXT_FIELDS,
    PER_NAME_FIELDS,
    CustomerColumns,
    columns_of_objects,
    context_batch,
)

# The strategies need the catalogue at collection time, before fixtures exist.
CATALOG = load_catalog()
NOW = datetime(2026, 1, 5, 13, 30, tzinfo=UTC)  # Monday; 21:30 in Asia/Shanghai

CUSTOMER_ZONES = [
    "Asia/Shanghai",
    "UTC",
    "Asia/Kolkata",  # half-hour offset
    "Europe/London",  # daylight saving time
    "America/New_York",
    "Pacific/Kiritimati",  # UTC+14: a day ahead of most
]
FIXED_OFFSETS = [
    UTC,
    timezone(timedelta(hours=8)),
    timezone(timedelta(hours=5, minutes=30)),
    timezone(timedelta(hours=-3, minutes=-30)),
]
"""Offsets of event times that survive a JSON round trip as equal datetimes."""
DST_ZONES = [ZoneInfo("Europe/London"), ZoneInfo("America/New_York")]
EDGE_INSTANTS = [
    datetime(2026, 1, 4, 16, 0, tzinfo=UTC),  # midnight in Asia/Shanghai
    datetime(2026, 1, 4, 18, 30, tzinfo=UTC),  # midnight in Asia/Kolkata
    datetime(2026, 1, 5, 0, 0, tzinfo=UTC),  # midnight in London (winter)
    datetime(2026, 1, 5, 5, 0, tzinfo=UTC),  # midnight in New York (winter)
    datetime(2026, 1, 4, 10, 0, tzinfo=UTC),  # midnight in Kiritimati
    datetime(2026, 3, 29, 1, 0, tzinfo=UTC),  # London springs forward
    datetime(2025, 10, 26, 1, 0, tzinfo=UTC),  # London falls back
    datetime(2025, 6, 30, 23, 0, tzinfo=UTC),  # midnight in London (summer)
]


@st.composite
def decision_instants(draw: st.DrawFn) -> datetime:
    """An aware ``now``: any instant of 2025-2026, or one within a minute of a local midnight
    or a DST switch, written in UTC or in Shanghai time."""
    instant = draw(
        st.one_of(
            st.datetimes(
                min_value=datetime(2025, 1, 1),
                max_value=datetime(2027, 1, 1),
                timezones=st.just(UTC),
            ),
            st.builds(
                lambda edge, us: edge + timedelta(microseconds=us),
                st.sampled_from(EDGE_INSTANTS),
                st.integers(-60_000_000, 60_000_000),
            ),
        )
    )
    return instant.astimezone(draw(st.sampled_from([UTC, ZoneInfo("Asia/Shanghai")])))


@st.composite
def event_times(draw: st.DrawFn, now: datetime, zones: list[Any]) -> datetime | None:
    """None, a time within days of ``now`` (some in the future), or one decades away."""
    kind = draw(st.sampled_from(["none", "near", "far"]))
    if kind == "none":
        return None
    if kind == "near":
        us = draw(st.integers(-5 * 86_400_000_000, 2 * 86_400_000_000))
        instant = now + timedelta(microseconds=us)
    else:
        instant = draw(
            st.datetimes(
                min_value=datetime(1700, 1, 1),
                max_value=datetime(2300, 1, 1),
                timezones=st.just(UTC),
            )
        )
    return instant.astimezone(draw(st.sampled_from(zones)))


def _counts() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 30), st.integers(0, MAX_COUNT))


def _days() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 30), st.integers(0, MAX_DAYS))


@st.composite
def customers(
    draw: st.DrawFn, now: datetime, zones: list[Any], timezone_name: str | None
) -> CustomerContext:
    """A valid customer with every field drawn (None or a value, empty or full)."""
    channels = st.sampled_from(CATALOG.channel_names)
    offers = st.sampled_from(CATALOG.offer_names)
    month = draw(st.dictionaries(channels, _counts(), max_size=4))
    last_contact = draw(event_times(now, zones))
    if last_contact is None:  # counted contacts need a last one: without it, none are
        month = {}
    week = {
        name: draw(st.integers(0, count)) for name, count in month.items() if draw(st.booleans())
    }
    assessed: date | None = None
    if draw(st.booleans()):
        # around the decision date: "tomorrow" in the customer's zone must clamp at 0
        assessed = now.astimezone(UTC).date() + timedelta(days=draw(st.integers(-800, 2)))
    tz_name = timezone_name or draw(st.sampled_from(CUSTOMER_ZONES))
    data: dict[str, Any] = {
        "customer_id": draw(st.text(min_size=1, max_size=12)),
        "age": draw(st.integers(0, 120)),
        "aum_cny": draw(st.floats(0, 1e13)),
        "income_band": draw(st.sampled_from(["low", "middle", "high", "very_high"])),
        "risk_tolerance": None if assessed is None else draw(st.sampled_from(["C1", "C3", "C5"])),
        "risk_assessed_on": assessed,
        "lifecycle_stage": draw(st.sampled_from(["new", "growth", "mature", "decline"])),
        "tenure_months": draw(st.integers(0, 1500)),
        "app_logins_30d": draw(st.integers(0, 10_000)),
        "holdings": draw(st.lists(offers, max_size=4)),
        "consented_channels": draw(st.lists(channels, max_size=6)),
        "opt_outs": draw(st.lists(channels, max_size=2)),
        "opted_out_all": draw(st.booleans()),
        "litigation": draw(st.booleans()),
        "dishonest_debtor": draw(st.booleans()),
        "last_complaint_at": draw(event_times(now, zones)),
        "contact_history": {
            "contacts_7d": week,
            "contacts_30d": month,
            "last_contact_at": last_contact,
        },
        "timezone": tz_name,
        "events": {
            "mortgage_page_views_7d": draw(_counts()),
            "days_to_product_maturity": draw(st.none() | _days()),
            "days_since_last_login": draw(st.none() | _days()),
            "offer_views_30d": draw(st.dictionaries(offers, _counts(), max_size=3)),
            "usual_login_hour": draw(st.none() | st.integers(0, 23)),
        },
    }
    return parse_customer(data, CATALOG)


@st.composite
def batches(
    draw: st.DrawFn, zones: list[Any] | None = None
) -> tuple[list[CustomerContext], datetime]:
    """1..10 customers (one time zone for all, or one each) and the decision instant."""
    now = draw(decision_instants())
    shared_zone = draw(st.none() | st.sampled_from(CUSTOMER_ZONES))
    contexts = draw(
        st.lists(
            customers(now, zones or FIXED_OFFSETS + DST_ZONES, shared_zone),
            min_size=1,
            max_size=10,
        )
    )
    return contexts, now


def assert_same_batch(actual: ContextBatch, expected: ContextBatch) -> None:
    """Every column equal, with the same dtype, in the same order, read-only."""
    assert list(actual.columns) == list(expected.columns)
    assert (actual.n, actual.n_channels, actual.n_offers) == (
        expected.n,
        expected.n_channels,
        expected.n_offers,
    )
    for name, column in expected.columns.items():
        assert actual[name].dtype == column.dtype, name
        np.testing.assert_array_equal(actual[name], column, err_msg=name)
        assert not actual[name].flags.writeable, name


@settings(max_examples=200, deadline=None)
@given(batch=batches())
def test_context_batch_equals_from_contexts(batch: tuple[list[CustomerContext], datetime]) -> None:
    contexts, now = batch
    columns = CustomerColumns.from_contexts(contexts)
    assert len(columns) == len(contexts)
    assert_same_batch(
        context_batch(columns, CATALOG, now), ContextBatch.from_contexts(contexts, CATALOG, now)
    )


@settings(max_examples=100, deadline=None)
@given(batch=batches(zones=FIXED_OFFSETS))
def test_json_round_trip_equal(batch: tuple[list[CustomerContext], datetime]) -> None:
    contexts, now = batch
    columns = CustomerColumns.from_contexts(contexts)
    again = CustomerColumns.model_validate_json(
        columns.model_dump_json(), context={"catalog": CATALOG}
    )
    assert again == columns
    # the JSON path (pydantic's own tzinfo objects) converts the same way
    assert_same_batch(
        context_batch(again, CATALOG, now), ContextBatch.from_contexts(contexts, CATALOG, now)
    )


def _as_objects(contexts: list[CustomerContext], dropped: list[set[str]]) -> list[Any]:
    """The contexts as a JSON body's customer objects, each without the optional keys (top
    level or nested) named in its ``dropped`` set."""
    objects = json.loads(json.dumps([c.model_dump(mode="json") for c in contexts]))
    for obj, keys in zip(objects, dropped, strict=False):
        for key in keys:
            outer, _, inner = key.partition(".")
            if inner:
                obj.get(outer, {}).pop(inner, None)
            else:
                obj.pop(outer, None)
    return objects


OPTIONAL_KEYS = [
    *(path for path, _ in CONTEXT_FIELDS.values() if "." in path),
    *(name for name, field in CustomerContext.model_fields.items() if not field.is_required()),
]
"""Keys a customer object may leave out (nested ones as ``outer.inner``)."""


@settings(max_examples=200, deadline=None)
@given(
    batch=batches(),
    dropped=st.lists(st.sets(st.sampled_from(OPTIONAL_KEYS)), max_size=10),
)
def test_objects_as_columns_equal_the_objects(
    batch: tuple[list[CustomerContext], datetime], dropped: list[set[str]]
) -> None:
    """Customer objects turned into columns are accepted exactly when the objects are (the
    objects validated from JSON, the columns from the parsed JSON, as the service does), and
    give the batch the objects give, keys left out (the CustomerContext default) included."""
    contexts, now = batch
    objects = _as_objects(contexts, dropped)
    # as a service reads a body: the columns from the parsed JSON, the objects from the JSON
    data = columns_of_objects(pydantic_core.from_json(json.dumps(objects)))
    assert data is not None
    try:
        expected = [
            CustomerContext.model_validate_json(json.dumps(obj), context={"catalog": CATALOG})
            for obj in objects
        ]
    except ValidationError:  # a risk tolerance without its date, or the reverse
        with pytest.raises(ValidationError):
            CustomerColumns.model_validate(data, context={"catalog": CATALOG})
        return
    columns = CustomerColumns.model_validate(data, context={"catalog": CATALOG})
    assert_same_batch(
        context_batch(columns, CATALOG, now), ContextBatch.from_contexts(expected, CATALOG, now)
    )


@pytest.mark.parametrize(
    "change",
    [
        lambda o: o.update(unknown=1),
        lambda o: o.pop("age"),
        lambda o: o.update(contact_history=None),
        lambda o: o.update(events=[]),
        lambda o: o["events"].update(what=1),
        lambda o: o["contact_history"].update(contacts_7d=[1]),
        lambda o: o["events"].update(offer_views_30d="3"),
    ],
    ids=[
        "unknown key",
        "required key missing",
        "nested part null",
        "nested part a list",
        "unknown nested key",
        "per-name counts a list",
        "per-name counts a text",
    ],
)
def test_objects_not_shaped_as_customers_are_not_columns(change: Any) -> None:
    """An object that is not shaped like a customer gives no columns: the caller validates
    the objects themselves, whose errors name the customer."""
    objects = _as_objects([make_customer(CATALOG)] * 2, [])
    assert columns_of_objects(objects) is not None
    change(objects[1])
    assert columns_of_objects(objects) is None
    assert columns_of_objects([*objects[:1], "a customer"]) is None
    assert columns_of_objects([]) is None


def test_columns_mirror_customer_context_fields() -> None:
    # CustomerContext with contact_history and events flattened: one column per field
    nested = {"contact_history": ContactHistory, "events": BehaviourEvents}
    flat: list[str] = []
    for name in CustomerContext.model_fields:
        flat += list(nested[name].model_fields) if name in nested else [name]
    assert sorted(CustomerColumns.model_fields) == sorted(flat) == sorted(CONTEXT_FIELDS)
    assert set(PER_NAME_FIELDS) <= set(flat)


def _body(catalog: ActionCatalog) -> dict[str, Any]:
    """Four valid customers, every column given."""
    return {
        "customer_id": ["c0", "c1", "c2", "c3"],
        "age": [30, 41, 52, 63],
        "aum_cny": [0.0, 1e5, 2.5e6, 1e7],
        "income_band": ["low", "middle", "high", "very_high"],
        "risk_tolerance": ["C1", None, "C3", "C5"],
        "risk_assessed_on": ["2025-01-02", None, "2026-01-05", "2026-01-06"],
        "lifecycle_stage": ["new", "growth", "mature", "decline"],
        "tenure_months": [1, 12, 60, 300],
        "app_logins_30d": [0, 3, 9, 30],
        "holdings": [[], ["fund_sip"], ["fund_sip", "car_loan"], []],
        "consented_channels": [list(catalog.channel_names), ["sms"], [], ["app_push", "wechat"]],
        "opt_outs": [[], [], ["sms"], []],
        "opted_out_all": [False, False, False, True],
        "litigation": [False, True, False, False],
        "dishonest_debtor": [False, False, True, False],
        "last_complaint_at": [None, "2026-01-01T09:00:00+08:00", None, None],
        "timezone": ["Asia/Shanghai", "Asia/Kolkata", "Europe/London", "UTC"],
        "contacts_30d": {"sms": [0, 2, 4, 1], "app_push": [1, 0, 0, 0]},
        "contacts_7d": {"sms": [0, 2, 1, 0]},
        "last_contact_at": [
            "2026-01-03T09:00:00+08:00",
            "2026-01-04T19:30:00+08:00",
            "2026-01-05T10:00:00Z",
            "2025-12-20T12:00:00Z",
        ],
        "mortgage_page_views_7d": [0, 0, 3, 0],
        "days_to_product_maturity": [None, 12, None, 0],
        "days_since_last_login": [2, None, 0, 400],
        "offer_views_30d": {"fund_sip": [0, 1, 0, 5]},
        "usual_login_hour": [None, 8, 21, 0],
    }


def _contexts_of(body: dict[str, Any], catalog: ActionCatalog) -> list[CustomerContext]:
    """The customers of a (raw) columns body, one CustomerContext each: the row form."""
    contexts = []
    for i in range(len(body["customer_id"])):
        data: dict[str, Any] = {"contact_history": {}, "events": {}}
        for column, (path, _) in CONTEXT_FIELDS.items():
            if column not in body:
                continue
            value = body[column]
            if column in PER_NAME_FIELDS:
                entry = {name: counts[i] for name, counts in value.items()}
            else:
                entry = value if isinstance(value, str) else value[i]
            *parent, leaf = path.split(".")
            (data[parent[0]] if parent else data)[leaf] = entry
        contexts.append(parse_customer(data, catalog))
    return contexts


def test_validate_body_gives_batch_of_its_contexts(catalog: ActionCatalog) -> None:
    body = _body(catalog)
    columns = CustomerColumns.model_validate(body, context={"catalog": catalog})
    contexts = _contexts_of(body, catalog)
    assert columns == CustomerColumns.from_contexts(contexts)
    assert_same_batch(
        context_batch(columns, catalog, NOW), ContextBatch.from_contexts(contexts, catalog, NOW)
    )


REQUIRED_COLUMNS = ["customer_id", "age", "aum_cny", "income_band"]
REQUIRED_COLUMNS += ["lifecycle_stage", "tenure_months", "app_logins_30d"]


def test_validate_required_columns_only_gives_defaults(catalog: ActionCatalog) -> None:
    body = {name: _body(catalog)[name] for name in REQUIRED_COLUMNS}
    columns = CustomerColumns.model_validate(body, context={"catalog": catalog})
    contexts = _contexts_of(body, catalog)
    assert contexts[0].timezone == "Asia/Shanghai"
    assert_same_batch(
        context_batch(columns, catalog, NOW), ContextBatch.from_contexts(contexts, catalog, NOW)
    )


def test_from_contexts_leaves_default_columns_out(catalog: ActionCatalog) -> None:
    body = {name: _body(catalog)[name][:2] for name in REQUIRED_COLUMNS}
    dumped = CustomerColumns.from_contexts(_contexts_of(body, catalog)).model_dump(
        exclude_none=True
    )
    assert dumped == body | {
        "timezone": "Asia/Shanghai",
        "contacts_30d": {},
        "contacts_7d": {},
        "offer_views_30d": {},
    }


def test_validate_one_time_zone_for_all(catalog: ActionCatalog) -> None:
    body = _body(catalog)
    listed = CustomerColumns.model_validate({**body, "timezone": ["Asia/Kolkata"] * 4})
    shared = CustomerColumns.model_validate({**body, "timezone": "Asia/Kolkata"})
    assert shared.timezone == "Asia/Kolkata"
    assert_same_batch(context_batch(shared, catalog, NOW), context_batch(listed, catalog, NOW))
    assert context_batch(shared, catalog, NOW)["local_hour"].tolist() == [19] * 4


def _edit(path: tuple[Any, ...], value: Any):
    """Set ``body[path[0]][path[1]]...`` to ``value``."""

    def edit(body: dict[str, Any]) -> None:
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _drop(name: str):
    def edit(body: dict[str, Any]) -> None:
        del body[name]

    return edit


def _all_empty(body: dict[str, Any]) -> None:
    for name, value in body.items():
        if isinstance(value, list):
            body[name] = []
        elif isinstance(value, dict):
            body[name] = {key: [] for key in value}


# (edit of the valid body, error location, message pattern)
BAD_BODIES = [
    pytest.param(
        _edit(("age",), [30, 41, 52]),
        ("age",),
        "column age has 3 entries but customer_id has 4",
        id="column_too_short",
    ),
    pytest.param(
        _edit(("contacts_30d", "sms"), [0, 2, 4, 1, 0]),
        ("contacts_30d",),
        r"column contacts_30d\['sms'\] has 5 entries but customer_id has 4",
        id="per_name_column_too_long",
    ),
    pytest.param(_edit(("age", 3), 121), ("age", 3), "less than or equal to 120", id="age_121"),
    pytest.param(
        _edit(("aum_cny", 1), float("nan")), ("aum_cny", 1), "finite number", id="nan_aum"
    ),
    pytest.param(
        _edit(("income_band", 2), "rich"), ("income_band", 2), "'low'", id="unknown_income_band"
    ),
    pytest.param(
        _edit(("last_contact_at", 2), "2026-01-05T10:00:00"),
        ("last_contact_at",),
        "row 2: must include a time zone offset",
        id="naive_last_contact_time",
    ),
    pytest.param(
        _edit(("last_complaint_at", 3), "2026-01-01T09:00:00"),
        ("last_complaint_at",),
        "row 3: must include a time zone offset",
        id="naive_complaint_time",
    ),
    pytest.param(
        _edit(("timezone", 1), "Mars/Olympus_Mons"),
        ("timezone",),
        "row 1: unknown time zone 'Mars/Olympus_Mons'",
        id="unknown_timezone_in_list",
    ),
    pytest.param(
        _edit(("timezone",), "Mars/Olympus_Mons"),
        ("timezone",),
        "unknown time zone 'Mars/Olympus_Mons'",
        id="unknown_timezone_for_all",
    ),
    pytest.param(
        _edit(("consented_channels", 2), ["sms", "telegram"]),
        ("consented_channels",),
        "row 2: unknown channel 'telegram'",
        id="consent_unknown_channel",
    ),
    pytest.param(
        _edit(("opt_outs", 1), ["telegram"]),
        ("opt_outs",),
        "row 1: unknown channel 'telegram'",
        id="opt_out_unknown_channel",
    ),
    pytest.param(
        _edit(("holdings", 3), ["bitcoin"]),
        ("holdings",),
        "row 3: unknown offer 'bitcoin'",
        id="holding_unknown_offer",
    ),
    pytest.param(
        _edit(("contacts_7d", "telegram"), [0, 0, 0, 0]),
        ("contacts_7d",),
        "unknown channel 'telegram'",
        id="contacts_unknown_channel",
    ),
    pytest.param(
        _edit(("offer_views_30d", "bitcoin"), [0, 1, 0, 0]),
        ("offer_views_30d",),
        "unknown offer 'bitcoin'",
        id="views_of_unknown_offer",
    ),
    pytest.param(
        _edit(("contacts_7d", "sms", 2), 5),
        ("contacts_7d",),
        r"row 2: contacts_7d\['sms'\]=5 exceeds contacts_30d \(4\)",
        id="contacts_7d_above_30d",
    ),
    pytest.param(
        _edit(("contacts_7d", "wechat"), [0, 0, 0, 1]),
        ("contacts_7d",),
        r"row 3: contacts_7d\['wechat'\]=1 exceeds contacts_30d \(0\)",
        id="contacts_7d_without_30d",
    ),
    pytest.param(
        _edit(("risk_assessed_on", 2), None),
        ("risk_assessed_on",),
        "row 2: risk_assessed_on is required when risk_tolerance is set",
        id="tolerance_without_date",
    ),
    pytest.param(
        _drop("risk_assessed_on"),
        ("risk_assessed_on",),
        "row 0: risk_assessed_on is required when risk_tolerance is set",
        id="tolerance_without_date_column",
    ),
    pytest.param(
        _edit(("risk_tolerance", 0), None),
        ("risk_assessed_on",),
        "row 0: risk_assessed_on is given but risk_tolerance is missing",
        id="date_without_tolerance",
    ),
    pytest.param(
        _edit(("contacts_30d", "sms", 1), -1),
        ("contacts_30d", "sms", 1),
        "greater than or equal to 0",
        id="negative_contact_count",
    ),
    pytest.param(
        _edit(("mortgage_page_views_7d", 2), -1),
        ("mortgage_page_views_7d", 2),
        "greater than or equal to 0",
        id="negative_event_count",
    ),
    pytest.param(
        _edit(("usual_login_hour", 1), 24),
        ("usual_login_hour", 1),
        "less than or equal to 23",
        id="login_hour_24",
    ),
    pytest.param(_all_empty, ("customer_id",), "at least 1 item", id="no_customers"),
    pytest.param(
        _edit(("wealth",), [1, 2, 3, 4]),
        ("wealth",),
        "Extra inputs are not permitted",
        id="unknown_field",
    ),
    pytest.param(_drop("age"), ("age",), "Field required", id="missing_column"),
]


@pytest.mark.parametrize(("edit", "loc", "message"), BAD_BODIES)
def test_validate_bad_body_names_field_and_row(
    catalog: ActionCatalog, edit: Any, loc: tuple[Any, ...], message: str
) -> None:
    body = _body(catalog)
    edit(body)
    with pytest.raises(ValidationError, match=message) as info:
        CustomerColumns.model_validate(body, context={"catalog": catalog})
    assert [e["loc"] for e in info.value.errors()] == [loc]


def test_validate_json_bad_body_names_field_and_row(catalog: ActionCatalog) -> None:
    body = _body(catalog)
    body["last_contact_at"][3] = "2026-01-05T10:00:00"
    body["age"][1] = -1
    text = json.dumps(body)
    with pytest.raises(ValidationError) as info:
        CustomerColumns.model_validate_json(text, context={"catalog": catalog})
    assert [(e["loc"], e["msg"]) for e in info.value.errors()] == [
        (("age", 1), "Input should be greater than or equal to 0"),
        (
            ("last_contact_at",),
            "Value error, row 3: must include a time zone offset "
            "(for example 2026-01-31T09:00:00+08:00)",
        ),
    ]


def test_validate_without_catalog_skips_names(catalog: ActionCatalog) -> None:
    # As for CustomerContext: only a catalogue in the context checks names; the batch refuses
    body = _body(catalog)
    body["consented_channels"][2] = ["telegram"]
    columns = CustomerColumns.model_validate(body)
    with pytest.raises(ValueError, match="row 2: unknown channel or offer 'telegram'"):
        context_batch(columns, catalog, NOW)


def test_build_batch_unknown_per_name_column_raises(catalog: ActionCatalog) -> None:
    body = _body(catalog)
    body["contacts_30d"]["telegram"] = [0, 0, 0, 0]
    columns = CustomerColumns.model_validate(body)
    with pytest.raises(ValueError, match="contacts_30d: unknown channel or offer 'telegram'"):
        context_batch(columns, catalog, NOW)


def test_build_batch_naive_now_raises(catalog: ActionCatalog) -> None:
    columns = CustomerColumns.model_validate(_body(catalog))
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        context_batch(columns, catalog, datetime(2026, 1, 5, 13, 30))


def test_from_contexts_empty_raises() -> None:
    with pytest.raises(ValidationError, match="at least 1 item"):
        CustomerColumns.from_contexts([])
