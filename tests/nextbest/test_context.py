"""Customer context: field-level validation, and the columnar batch derived from it."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from customers import base_customer, make_customer, make_row_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nextbest.catalog import ActionCatalog
from nextbest.context import (
    CONTEXT_COLUMNS,
    ContextBatch,
    CustomerContext,
    parse_customer,
    time_zone,
)
from nextbest.synthetic import midday_timezone

NOW = datetime(2026, 1, 5, 13, 30, tzinfo=UTC)  # Monday; 21:30 in Asia/Shanghai


def _with(catalog: ActionCatalog, **overrides: Any) -> dict[str, Any]:
    data = base_customer(catalog)
    data.update(overrides)
    return data


# (overrides of the base customer, error location, message pattern)
BAD_CUSTOMERS = [
    pytest.param({"aum_cny": -1.0}, ("aum_cny",), "greater than or equal to 0", id="negative_aum"),
    pytest.param({"aum_cny": float("nan")}, ("aum_cny",), "finite number", id="nan_aum"),
    pytest.param({"age": 200}, ("age",), "less than or equal to 120", id="age_200"),
    pytest.param({"age": -1}, ("age",), "greater than or equal to 0", id="negative_age"),
    pytest.param(
        {"consented_channels": ["sms", "telegram"]},
        ("consented_channels",),
        "unknown channel 'telegram'",
        id="consent_unknown_channel",
    ),
    pytest.param(
        {"opt_outs": ["telegram"]},
        ("opt_outs",),
        "unknown channel 'telegram'",
        id="opt_out_unknown",
    ),
    pytest.param(
        {"holdings": ["fund_sip", "bitcoin"]},
        ("holdings",),
        "unknown offer 'bitcoin'",
        id="holding_unknown_offer",
    ),
    pytest.param(
        {"last_complaint_at": "2026-01-01T09:00:00"},
        ("last_complaint_at",),
        "must include a time zone offset",
        id="naive_complaint_time",
    ),
    pytest.param(
        {"contact_history": {"last_contact_at": "2026-01-01T09:00:00"}},
        ("contact_history", "last_contact_at"),
        "must include a time zone offset",
        id="naive_last_contact_time",
    ),
    pytest.param(
        {"timezone": "Mars/Olympus_Mons"},
        ("timezone",),
        "unknown time zone 'Mars/Olympus_Mons'",
        id="unknown_timezone",
    ),
    pytest.param(
        {"risk_tolerance": "C9"}, ("risk_tolerance",), "'C1', 'C2'", id="unknown_risk_tolerance"
    ),
    pytest.param({"income_band": "rich"}, ("income_band",), "'low'", id="unknown_income_band"),
    pytest.param({"wealth": 1}, ("wealth",), "Extra inputs are not permitted", id="unknown_field"),
    pytest.param(
        {"contact_history": {"contacts_7d": {"sms": 3}, "contacts_30d": {"sms": 2}}},
        ("contact_history",),
        r"contacts_7d\['sms'\]=3 exceeds contacts_30d \(2\)",
        id="contacts_7d_above_30d",
    ),
    pytest.param(
        {"contact_history": {"contacts_7d": {"sms": 1}}},
        ("contact_history",),
        r"contacts_7d\['sms'\]=1 exceeds contacts_30d \(0\)",
        id="contacts_7d_without_30d",
    ),
    pytest.param(
        {"contact_history": {"contacts_30d": {"sms": -1}}},
        ("contact_history", "contacts_30d"),
        "count for 'sms' must not be negative, got -1",
        id="negative_contact_count",
    ),
    pytest.param(
        {"contact_history": {"contacts_30d": {"telegram": 1}}},
        ("contact_history", "contacts_30d"),
        "unknown channel 'telegram'",
        id="contacts_unknown_channel",
    ),
    pytest.param(
        {"events": {"mortgage_page_views_7d": -1}},
        ("events", "mortgage_page_views_7d"),
        "greater than or equal to 0",
        id="negative_event_count",
    ),
    pytest.param(
        {"events": {"offer_views_30d": {"bitcoin": 2}}},
        ("events", "offer_views_30d"),
        "unknown offer 'bitcoin'",
        id="views_of_unknown_offer",
    ),
    pytest.param(
        {"events": {"offer_views_30d": {"fund_sip": -3}}},
        ("events", "offer_views_30d"),
        "must not be negative",
        id="negative_offer_views",
    ),
    pytest.param(
        {"events": {"usual_login_hour": 24}},
        ("events", "usual_login_hour"),
        "less than or equal to 23",
        id="login_hour_24",
    ),
]


@pytest.mark.parametrize(("overrides", "loc", "message"), BAD_CUSTOMERS)
def test_parse_customer_bad_field_names_location(
    catalog: ActionCatalog, overrides: dict[str, Any], loc: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        parse_customer(_with(catalog, **overrides), catalog)
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [loc]


def test_parse_customer_missing_age_names_field(catalog: ActionCatalog) -> None:
    data = base_customer(catalog)
    del data["age"]
    with pytest.raises(ValidationError, match="Field required") as info:
        parse_customer(data, catalog)
    assert [(e["loc"], e["type"]) for e in info.value.errors()] == [(("age",), "missing")]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(
            {"risk_assessed_on": None},
            "risk_assessed_on is required when risk_tolerance is set",
            id="tolerance_without_date",
        ),
        pytest.param(
            {"risk_tolerance": None},
            "risk_assessed_on is given but risk_tolerance is missing",
            id="date_without_tolerance",
        ),
    ],
)
def test_parse_customer_assessment_pair_required(
    catalog: ActionCatalog, overrides: dict[str, Any], message: str
) -> None:
    # A model-level check: pydantic reports it at the model (empty loc); the message names
    # both fields.
    with pytest.raises(ValidationError, match=message) as info:
        parse_customer(_with(catalog, **overrides), catalog)
    assert [e["loc"] for e in info.value.errors()] == [()]


def test_parse_customer_reports_every_bad_field(catalog: ActionCatalog) -> None:
    with pytest.raises(ValidationError) as info:
        parse_customer(_with(catalog, age=200, aum_cny=-1, timezone="Nowhere/Town"), catalog)
    assert {e["loc"] for e in info.value.errors()} == {("age",), ("aum_cny",), ("timezone",)}


def test_parse_customer_base_customer_valid(catalog: ActionCatalog) -> None:
    customer = parse_customer(base_customer(catalog), catalog)
    assert customer.age == 40
    assert customer.consented_channels == list(catalog.channel_names)
    assert customer.contact_history.last_contact_at is None


def test_validate_customer_without_catalog_skips_names() -> None:
    # Only parse_customer (which passes the catalogue) checks names; the batch then refuses.
    customer = CustomerContext.model_validate(
        {
            "customer_id": "c",
            "age": 30,
            "aum_cny": 0,
            "income_band": "low",
            "lifecycle_stage": "new",
            "tenure_months": 0,
            "app_logins_30d": 0,
            "consented_channels": ["telegram"],
        }
    )
    assert customer.consented_channels == ["telegram"]


def test_build_contexts_unknown_channel_raises(catalog: ActionCatalog) -> None:
    customer = make_customer(catalog).model_copy(update={"consented_channels": ["telegram"]})
    with pytest.raises(ValueError, match="context 0: unknown channel or offer 'telegram'"):
        ContextBatch.from_contexts([customer], catalog, NOW)


def test_build_contexts_naive_now_raises(catalog: ActionCatalog) -> None:
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        ContextBatch.from_contexts([make_customer(catalog)], catalog, datetime(2026, 1, 5, 13, 30))


@pytest.mark.parametrize(
    ("timezone", "hour", "weekday"),
    [
        pytest.param("Asia/Shanghai", 21, 0, id="shanghai"),
        pytest.param("UTC", 13, 0, id="utc"),
        pytest.param("America/New_York", 8, 0, id="new_york_winter"),
        pytest.param("Asia/Kolkata", 19, 0, id="kolkata_half_hour"),
        pytest.param("Pacific/Kiritimati", 3, 1, id="kiritimati_next_day"),
    ],
)
def test_build_contexts_local_hour_from_timezone(
    catalog: ActionCatalog, timezone: str, hour: int, weekday: int
) -> None:
    batch = make_row_batch(catalog, NOW, timezone=timezone)
    assert batch["local_hour"].tolist() == [hour]
    assert batch["local_weekday"].tolist() == [weekday]


def test_build_contexts_elapsed_times(catalog: ActionCatalog) -> None:
    batch = make_row_batch(
        catalog,
        NOW,
        last_complaint_at=NOW - timedelta(days=2, hours=12),
        risk_tolerance="C3",
        risk_assessed_on=date(2025, 1, 5),
        contact_history={"last_contact_at": NOW - timedelta(hours=36, minutes=30)},
    )
    assert batch["days_since_complaint"][0] == pytest.approx(2.5)
    assert batch["risk_assessment_age_days"][0] == 365
    assert batch["risk_tolerance"][0] == 3
    assert batch["hours_since_last_contact"][0] == pytest.approx(36.5)


def test_build_contexts_elapsed_times_across_offsets(catalog: ActionCatalog) -> None:
    # The same instant written with another offset gives the same elapsed time.
    complaint = datetime(2026, 1, 3, 21, 30, tzinfo=UTC).astimezone(
        datetime.fromisoformat("2026-01-01T00:00:00+08:00").tzinfo
    )
    batch = make_row_batch(catalog, NOW, last_complaint_at=complaint.isoformat())
    assert batch["days_since_complaint"][0] == pytest.approx(40 / 24)


def test_build_contexts_assessment_age_uses_local_date(catalog: ActionCatalog) -> None:
    # 13:30 UTC on 5 January is already 6 January in Kiritimati (UTC+14).
    batch = make_row_batch(
        catalog,
        NOW,
        timezone="Pacific/Kiritimati",
        risk_tolerance="C2",
        risk_assessed_on=date(2025, 1, 5),
    )
    assert batch["risk_assessment_age_days"][0] == 366


def test_build_contexts_missing_history_is_infinite(catalog: ActionCatalog) -> None:
    batch = make_row_batch(catalog, NOW, risk_tolerance=None, risk_assessed_on=None)
    for name in (
        "days_since_complaint",
        "hours_since_last_contact",
        "risk_assessment_age_days",
        "days_to_product_maturity",
        "days_since_last_login",
    ):
        assert np.isinf(batch[name][0]), name
    assert batch["risk_tolerance"][0] == 0


def test_build_contexts_future_complaint_clamped_to_zero(catalog: ActionCatalog) -> None:
    batch = make_row_batch(catalog, NOW, last_complaint_at=NOW + timedelta(hours=5))
    assert batch["days_since_complaint"][0] == 0.0


def test_build_contexts_channel_and_offer_columns(catalog: ActionCatalog) -> None:
    batch = make_row_batch(
        catalog,
        NOW,
        consented_channels=["sms", "wechat"],
        opt_outs=["wechat"],
        holdings=["fund_sip", "car_loan"],
        contact_history={
            "contacts_7d": {"sms": 1, "app_push": 2},
            "contacts_30d": {"sms": 3, "app_push": 2, "branch_invite": 1},
            "last_contact_at": NOW - timedelta(days=2),
        },
    )
    ch = catalog.channel_names
    assert [ch[i] for i in np.flatnonzero(batch["consent"][0])] == ["sms", "wechat"]
    assert [ch[i] for i in np.flatnonzero(batch["opt_out"][0])] == ["wechat"]
    assert [catalog.offer_names[i] for i in np.flatnonzero(batch["holds"][0])] == [
        "fund_sip",
        "car_loan",
    ]
    assert batch["contacts_7d"][0, ch.index("app_push")] == 2
    assert batch["contacts_30d"][0, ch.index("branch_invite")] == 1
    assert batch["contacts_7d_total"][0] == 3
    assert batch["contacts_30d_total"][0] == 6


def test_build_contexts_shapes_and_dtypes(catalog: ActionCatalog) -> None:
    customers = [make_customer(catalog, customer_id=f"c{i}", age=20 + i) for i in range(3)]
    batch = ContextBatch.from_contexts(customers, catalog, NOW)
    assert len(batch) == batch.n == 3
    width = {"scalar": (), "channel": (catalog.n_channels,), "offer": (catalog.n_offers,)}
    for name, spec in CONTEXT_COLUMNS.items():
        assert batch[name].shape == (3, *width[spec.axis]), name
        assert batch[name].dtype == spec.dtype, name
    assert batch["age"].tolist() == [20, 21, 22]


def test_build_contexts_empty_list_gives_empty_batch(catalog: ActionCatalog) -> None:
    batch = ContextBatch.from_contexts([], catalog, NOW)
    assert batch.n == 0
    assert batch["consent"].shape == (0, catalog.n_channels)


def test_read_row_plain_python_values(catalog: ActionCatalog) -> None:
    row = make_row_batch(catalog, NOW).row(0)
    assert set(row) == set(CONTEXT_COLUMNS)
    assert type(row["age"]) is float
    assert type(row["local_hour"]) is int
    assert type(row["opted_out_all"]) is bool
    assert isinstance(row["consent"], tuple)
    assert len(row["consent"]) == catalog.n_channels
    assert all(type(v) is bool for v in row["consent"])


def test_take_rows_selected(catalog: ActionCatalog) -> None:
    customers = [make_customer(catalog, customer_id=f"c{i}", age=20 + i) for i in range(4)]
    batch = ContextBatch.from_contexts(customers, catalog, NOW)
    sub = batch.take([3, 1])
    assert sub.n == 2
    assert sub["age"].tolist() == [23, 21]
    assert sub.row(0) == batch.row(3)


def test_replace_columns_updates_only_those_given(catalog: ActionCatalog) -> None:
    batch = make_row_batch(catalog, NOW)
    counts = np.full((1, catalog.n_channels), 2.0)
    merged = batch.replace(contacts_7d=counts, hours_since_last_contact=np.array([5.0]))
    assert merged["contacts_7d"].tolist() == counts.tolist()
    assert merged["contacts_7d"].dtype == batch["contacts_7d"].dtype
    assert not merged["contacts_7d"].flags.writeable
    assert merged["hours_since_last_contact"].tolist() == [5.0]
    assert merged["age"] is batch["age"]  # shared, not copied
    assert batch["contacts_7d"].tolist() != counts.tolist()  # the original is unchanged


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("contacts_7d", np.full((1, 2), 1.0), "shape"),
        ("contacts_30d", None, "outside"),
        ("hours_since_last_contact", np.array([np.nan]), "outside"),
        ("shoe_size", np.array([42.0]), "unknown"),
    ],
)
def test_replace_columns_bad_value_names_the_column(
    catalog: ActionCatalog, column: str, values: np.ndarray | None, message: str
) -> None:
    if values is None:
        values = np.full((1, catalog.n_channels), -1.0)
    with pytest.raises(ValueError, match=message) as err:
        make_row_batch(catalog, NOW).replace(**{column: values})
    assert column in str(err.value)


def _columns(catalog: ActionCatalog) -> dict[str, np.ndarray]:
    """Writable copies of the columns of the one-customer base batch."""
    return {name: np.array(arr) for name, arr in make_row_batch(catalog, NOW).columns.items()}


def test_build_columns_round_trip(catalog: ActionCatalog) -> None:
    batch = make_row_batch(catalog, NOW)
    again = ContextBatch.from_columns(catalog, **batch.columns)
    assert again.row(0) == batch.row(0)


def test_build_columns_arrays_read_only(catalog: ActionCatalog) -> None:
    batch = ContextBatch.from_columns(catalog, **_columns(catalog))
    with pytest.raises(ValueError, match="read-only"):
        batch["aum_cny"][0] = 1.0


def _drop(name: str):
    def edit(cols: dict[str, np.ndarray], catalog: ActionCatalog) -> None:
        del cols[name]

    return edit


def _set(name: str, value: Any):
    def edit(cols: dict[str, np.ndarray], catalog: ActionCatalog) -> None:
        cols[name] = value(catalog) if callable(value) else np.asarray(value)

    return edit


# (edit of the base customer's columns, message pattern)
BAD_COLUMNS = [
    pytest.param(_drop("aum_cny"), r"missing column\(s\) \['aum_cny'\]", id="missing_column"),
    pytest.param(_set("wealth", [1.0]), r"unknown column\(s\) \['wealth'\]", id="unknown_column"),
    pytest.param(
        _set("consent", lambda c: np.ones((1, c.n_channels - 1), bool)),
        r"column 'consent' has shape \(1, 5\), expected \(1, 6\)",
        id="channel_column_too_narrow",
    ),
    pytest.param(
        _set("holds", lambda c: np.zeros((1, c.n_channels), bool)),
        r"column 'holds' has shape \(1, 6\), expected \(1, 20\)",
        id="offer_column_channel_wide",
    ),
    pytest.param(
        _set("aum_cny", [1.0, 2.0]),
        r"column 'aum_cny' has shape \(2,\), expected \(1,\)",
        id="scalar_column_too_long",
    ),
    pytest.param(
        _set("local_hour", [[12]]),
        r"column 'local_hour' has shape \(1, 1\), expected \(1,\)",
        id="scalar_column_two_dims",
    ),
    pytest.param(
        _set("aum_cny", [-1.0]), r"column 'aum_cny' has value .*outside \[0, inf\]", id="neg_aum"
    ),
    pytest.param(_set("age", [121.0]), r"column 'age' has value", id="age_121"),
    pytest.param(_set("age", [np.nan]), r"column 'age' has value .*nan", id="age_nan"),
    pytest.param(
        _set("risk_tolerance", [6]), r"column 'risk_tolerance' has value", id="tolerance_6"
    ),
    pytest.param(_set("local_hour", [24]), r"column 'local_hour' has value", id="hour_24"),
    pytest.param(_set("local_weekday", [7]), r"column 'local_weekday' has value", id="weekday_7"),
    pytest.param(
        _set("hours_since_last_contact", [-0.5]),
        r"column 'hours_since_last_contact' has value",
        id="negative_gap",
    ),
    pytest.param(
        _set("days_since_complaint", [np.nan]),
        r"column 'days_since_complaint' has value .*nan",
        id="nan_complaint",
    ),
    pytest.param(
        _set("contacts_7d", lambda c: np.full((1, c.n_channels), -1.0)),
        r"column 'contacts_7d' has value .* at \[0, 0\]",
        id="negative_channel_count",
    ),
]


@pytest.mark.parametrize(("edit", "message"), BAD_COLUMNS)
def test_build_columns_bad_input_raises(catalog: ActionCatalog, edit, message: str) -> None:
    cols = _columns(catalog)
    edit(cols, catalog)
    with pytest.raises(ValueError, match=f"^ContextBatch: {message}"):
        ContextBatch.from_columns(catalog, **cols)


# At 13a7f79 these were accepted: int64 input wrapped to int8 (268 -> 12) before the check.
@pytest.mark.parametrize(("name", "value"), [("local_hour", 268), ("risk_tolerance", 259)])
def test_build_columns_out_of_range_int_raises(
    catalog: ActionCatalog, name: str, value: int
) -> None:
    cols = _columns(catalog)
    cols[name] = np.array([value], np.int64)
    with pytest.raises(ValueError, match=name):
        ContextBatch.from_columns(catalog, **cols)


def test_build_contexts_assessment_dated_ahead_of_local_date(catalog: ActionCatalog) -> None:
    # Assessed on 6 January (a Shanghai branch date) for a New York customer; at 02:00 UTC on
    # 6 January it is still 5 January in New York. parse_customer accepts the context, so the
    # batch must too (a future complaint time is clamped to 0 in the same way).
    customer = make_customer(
        catalog, timezone="America/New_York", risk_tolerance="C3", risk_assessed_on="2026-01-06"
    )
    batch = ContextBatch.from_contexts([customer], catalog, datetime(2026, 1, 6, 2, 0, tzinfo=UTC))
    assert 0 <= batch["risk_assessment_age_days"][0] < 1


TIMEZONES = ["Asia/Shanghai", "UTC", "America/New_York", "Pacific/Kiritimati", "Pacific/Pago_Pago"]


@settings(max_examples=200, deadline=None)
@given(
    timezone=st.sampled_from(TIMEZONES),
    now=st.datetimes(
        min_value=datetime(2025, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)
    ),
    assessed_days_ago=st.one_of(st.none(), st.sampled_from([0, 1, 365, 366]), st.integers(0, 400)),
    complaint_hours_ago=st.one_of(st.none(), st.floats(-48, 2000)),
    contact_hours_ago=st.one_of(st.none(), st.floats(-48, 2000)),
)
def test_build_contexts_accepts_every_parsed_customer(
    catalog: ActionCatalog,
    timezone: str,
    now: datetime,
    assessed_days_ago: int | None,
    complaint_hours_ago: float | None,
    contact_hours_ago: float | None,
) -> None:
    """Whatever parse_customer accepts, from_contexts turns into a batch at any aware ``now``,
    one that passes every check of ``from_columns``.

    The assessment date is a UTC date on or before ``now`` (which may be ahead of the
    customer's local date); event times are drawn around ``now``, a little into the future
    too (clocks differ between the bank's systems).
    """
    overrides: dict[str, Any] = {"timezone": timezone, "contact_history": {}}
    if assessed_days_ago is None:
        overrides.update(risk_tolerance=None, risk_assessed_on=None)
    else:
        overrides["risk_assessed_on"] = (now.date() - timedelta(days=assessed_days_ago)).isoformat()
    if complaint_hours_ago is not None:
        overrides["last_complaint_at"] = now - timedelta(hours=complaint_hours_ago)
    if contact_hours_ago is not None:
        overrides["contact_history"]["last_contact_at"] = now - timedelta(hours=contact_hours_ago)
    customer = make_customer(catalog, **overrides)
    batch = ContextBatch.from_contexts([customer], catalog, now)
    for name in ("risk_assessment_age_days", "days_since_complaint", "hours_since_last_contact"):
        assert batch[name][0] >= 0, name
    # from_contexts skips from_columns' checks: they must hold for what it builds
    assert ContextBatch.from_columns(catalog, **batch.columns).row(0) == batch.row(0)
    assert 0 <= batch["local_hour"][0] <= 23


@pytest.mark.parametrize("hour", range(24))
def test_midday_timezone_puts_every_utc_hour_at_local_noon(hour: int) -> None:
    now = datetime(2026, 3, 1, hour, 59, tzinfo=UTC)
    assert now.astimezone(time_zone(midday_timezone(now))).hour == 12


def test_time_zones_are_looked_up_once_per_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """ZoneInfo keeps only a few zones itself: every request reads its customers' zones,
    so the service's cache must hold them (a decorator misplaced once dropped it: 29 us a
    call for 40 zones instead of 0.08)."""
    import nextbest.context

    calls: list[str] = []
    real = nextbest.context.ZoneInfo
    monkeypatch.setattr(nextbest.context, "ZoneInfo", lambda n: calls.append(n) or real(n))
    nextbest.context.time_zone.cache_clear()
    zones = sorted(nextbest.context.known_time_zones())[:40]
    for _ in range(3):
        for name in zones:
            nextbest.context.time_zone(name)
    assert calls == zones  # once each
    nextbest.context.time_zone.cache_clear()
