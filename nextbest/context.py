"""The customer context: what is known about a customer at decision time.

Two forms, one meaning:

* :class:`CustomerContext` (pydantic) is what a caller sends for one customer; it is validated
  field by field (``age`` in 0..120, ``aum_cny`` not negative, channel names that exist ...).
* :class:`ContextBatch` is the columnar form of N customers at one instant ``now``: one numpy
  array per column of :data:`CONTEXT_COLUMNS`. The rule engine and the feature encoder read
  only this form; the simulator builds it directly from its state arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cache, lru_cache
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from nextbest.catalog import ActionCatalog
from nextbest.timestamps import elapsed_float32

RISK_TOLERANCES = ("C1", "C2", "C3", "C4", "C5")
INCOME_BANDS = ("low", "middle", "high", "very_high")
LIFECYCLE_STAGES = ("new", "growth", "mature", "decline")
DEFAULT_TIMEZONE = "Asia/Shanghai"


MAX_COUNT = 100_000
"""Largest contact count or page-view count accepted for one window: more is an input
error, and larger numbers would overflow the float32 features."""
MAX_DAYS = 36_500
"""Largest day count accepted (a century)."""
MAX_AUM_CNY = 1e15
"""Largest assets under management accepted, CNY."""


MAX_NAMES = 256
"""Names one customer may list (holdings, channels) or count by (per channel, per offer): far
above any catalogue's, far below what floods a validation with errors (each item past it is
not validated)."""


LAST_CONTACT_REQUIRED = (
    "last_contact_at is required when contacts are counted: the minimum gap between "
    "contacts is measured from it (without it the last contact could have been a minute ago)"
)


class ContactHistory(BaseModel):
    """Summary of recent contacts with the customer, per channel."""

    model_config = ConfigDict(extra="forbid")

    contacts_7d: dict[str, int] = Field(default_factory=dict, max_length=MAX_NAMES)
    """Contacts per channel over the last 7 days (channels not listed: 0)."""
    contacts_30d: dict[str, int] = Field(default_factory=dict, max_length=MAX_NAMES)
    """Contacts per channel over the last 30 days (channels not listed: 0)."""
    last_contact_at: datetime | None = None
    """Time of the last contact on any channel (timezone-aware), None if never contacted."""

    @field_validator("contacts_7d", "contacts_30d")
    @classmethod
    def _counts(cls, value: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        for channel, count in value.items():
            if count < 0:
                raise ValueError(f"count for {channel!r} must not be negative, got {count}")
            if count > MAX_COUNT:
                raise ValueError(f"count for {channel!r} must be at most {MAX_COUNT}, got {count}")
        check_channel_names(value.keys(), info)
        return value

    @field_validator("last_contact_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return require_aware(value)

    @model_validator(mode="after")
    def _windows(self) -> ContactHistory:
        for channel, count in self.contacts_7d.items():
            if count > self.contacts_30d.get(channel, 0):
                raise ValueError(
                    f"contacts_7d[{channel!r}]={count} exceeds contacts_30d "
                    f"({self.contacts_30d.get(channel, 0)}): "
                    "the 7-day window is inside the 30-day one"
                )
        if self.last_contact_at is None and any(self.contacts_30d.values()):
            raise ValueError(LAST_CONTACT_REQUIRED)
        return self


class BehaviourEvents(BaseModel):
    """Recent behaviour signals that trigger or shape marketing."""

    model_config = ConfigDict(extra="forbid")

    mortgage_page_views_7d: int = Field(default=0, ge=0, le=MAX_COUNT)
    """Views of the mortgage page in the last 7 days."""
    days_to_product_maturity: int | None = Field(default=None, ge=0, le=MAX_DAYS)
    """Days until a held product matures (None: nothing maturing)."""
    days_since_last_login: int | None = Field(default=None, ge=0, le=MAX_DAYS)
    """Days since the last app login (None: never logged in)."""
    offer_views_30d: dict[str, int] = Field(default_factory=dict, max_length=MAX_NAMES)
    """Product-page views per offer over the last 30 days (offers not listed: 0)."""
    usual_login_hour: int | None = Field(default=None, ge=0, le=23)
    """Local hour at which the customer usually logs in to the app (None: unknown)."""

    @field_validator("offer_views_30d")
    @classmethod
    def _views(cls, value: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        for offer, count in value.items():
            if count < 0:
                raise ValueError(f"views of {offer!r} must not be negative, got {count}")
            if count > MAX_COUNT:
                raise ValueError(f"views of {offer!r} must be at most {MAX_COUNT}, got {count}")
        check_offer_names(value, info)
        return value


class CustomerContext(BaseModel):
    """One customer at decision time.

    Channel and offer names are checked against the catalogue when one is passed in the
    validation context (``model_validate(data, context={"catalog": catalog})``), as
    :func:`parse_customer` does.
    """

    model_config = ConfigDict(extra="forbid")

    customer_id: str = Field(min_length=1, max_length=128)
    """The bank's customer identifier; pseudonymised before anything is logged."""
    # strict numbers: a boolean is refused (lax validation read "age": true as 1)
    age: int = Field(ge=0, le=120, strict=True)
    aum_cny: float = Field(ge=0, le=MAX_AUM_CNY, allow_inf_nan=False, strict=True)
    """Assets under management, CNY."""
    income_band: Literal["low", "middle", "high", "very_high"]
    risk_tolerance: Literal["C1", "C2", "C3", "C4", "C5"] | None = None
    """Assessed risk tolerance, None if never assessed."""
    risk_assessed_on: date | None = None
    """Date of the risk assessment; required with ``risk_tolerance``."""
    lifecycle_stage: Literal["new", "growth", "mature", "decline"]
    tenure_months: int = Field(ge=0, le=1500, strict=True)
    app_logins_30d: int = Field(ge=0, le=10_000, strict=True)
    holdings: list[str] = Field(default_factory=list, max_length=MAX_NAMES)
    """Offer names the customer already holds."""
    consented_channels: list[str] = Field(default_factory=list, max_length=MAX_NAMES)
    """Channels the customer has consented to be contacted on (PIPL)."""
    opt_outs: list[str] = Field(default_factory=list, max_length=MAX_NAMES)
    """Channels the customer has opted out of (honoured at once)."""
    opted_out_all: bool = False
    """The customer opted out of all marketing."""
    litigation: bool = False
    dishonest_debtor: bool = False
    last_complaint_at: datetime | None = None
    contact_history: ContactHistory = Field(default_factory=ContactHistory)
    timezone: str = DEFAULT_TIMEZONE
    """IANA time zone of the customer (quiet hours and timing are in local time)."""
    events: BehaviourEvents = Field(default_factory=BehaviourEvents)

    @field_validator("consented_channels", "opt_outs")
    @classmethod
    def _channels(cls, value: list[str], info: ValidationInfo) -> list[str]:
        check_channel_names(value, info)
        return value

    @field_validator("holdings")
    @classmethod
    def _offers(cls, value: list[str], info: ValidationInfo) -> list[str]:
        check_offer_names(value, info)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        time_zone(value)
        return value

    @field_validator("last_complaint_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return require_aware(value)

    @model_validator(mode="after")
    def _assessment(self) -> CustomerContext:
        if self.risk_tolerance is not None and self.risk_assessed_on is None:
            raise ValueError("risk_assessed_on is required when risk_tolerance is set")
        if self.risk_tolerance is None and self.risk_assessed_on is not None:
            raise ValueError("risk_assessed_on is given but risk_tolerance is missing")
        return self


def check_channel_names(names: Any, info: ValidationInfo) -> None:
    """Refuse a channel name the catalogue in the validation context lacks (no catalogue: ok)."""
    catalog = (info.context or {}).get("catalog")
    if catalog is None:
        return
    unknown = [c for c in names if c not in catalog.channel_names]
    if unknown:
        raise ValueError(f"unknown channel {unknown[0]!r}; known: {list(catalog.channel_names)}")


def check_offer_names(names: Any, info: ValidationInfo) -> None:
    """Refuse an offer name the catalogue in the validation context lacks (no catalogue: ok)."""
    catalog = (info.context or {}).get("catalog")
    if catalog is None:
        return
    unknown = [o for o in names if o not in catalog.offer_names]
    if unknown:
        raise ValueError(f"unknown offer {unknown[0]!r}")


def require_aware(value: datetime | None) -> datetime | None:
    """``value`` unchanged; a naive datetime raises ``ValueError``."""
    if value is not None and value.tzinfo is None:
        raise ValueError("must include a time zone offset (for example 2026-01-31T09:00:00+08:00)")
    return value


@cache
def known_time_zones() -> frozenset[str]:
    """The IANA zone names this system knows (read once)."""
    return frozenset(available_timezones())


@lru_cache(maxsize=1024)
def time_zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (cached); an unknown name raises ``ValueError``.

    Names are checked against :func:`known_time_zones` first: looking an unknown name up
    on disk takes ~60 us, and a request of many distinct unknown names held a worker for
    seconds."""
    if name not in known_time_zones():
        raise ValueError(f"unknown time zone {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def parse_customer(data: Mapping[str, Any], catalog: ActionCatalog) -> CustomerContext:
    """Validate a raw mapping as a :class:`CustomerContext`, names checked against ``catalog``.

    Raises
    ------
    pydantic.ValidationError
        With one entry per offending field.
    """
    return CustomerContext.model_validate(data, context={"catalog": catalog})


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """One column of a :class:`ContextBatch`."""

    dtype: type
    axis: Literal["scalar", "channel", "offer"]
    """``scalar``: shape (N,); ``channel``: (N, n_channels); ``offer``: (N, n_offers)."""
    description: str


CONTEXT_COLUMNS: dict[str, ColumnSpec] = {
    "age": ColumnSpec(np.float32, "scalar", "age in years"),
    "aum_cny": ColumnSpec(np.float64, "scalar", "assets under management, CNY"),
    "income_band": ColumnSpec(np.int8, "scalar", "index into INCOME_BANDS"),
    "risk_tolerance": ColumnSpec(np.int8, "scalar", "1..5 for C1..C5, 0 if never assessed"),
    "risk_assessment_age_days": ColumnSpec(
        np.float32, "scalar", "days since the risk assessment, inf if never assessed"
    ),
    "lifecycle_stage": ColumnSpec(np.int8, "scalar", "index into LIFECYCLE_STAGES"),
    "tenure_months": ColumnSpec(np.float32, "scalar", "months since the customer joined"),
    "app_logins_30d": ColumnSpec(np.float32, "scalar", "app logins over the last 30 days"),
    "litigation": ColumnSpec(np.bool_, "scalar", "customer is in litigation"),
    "dishonest_debtor": ColumnSpec(np.bool_, "scalar", "customer is on the dishonest-debtor list"),
    "opted_out_all": ColumnSpec(np.bool_, "scalar", "customer opted out of all marketing"),
    "days_since_complaint": ColumnSpec(
        np.float32, "scalar", "days since last complaint, inf if none"
    ),
    "hours_since_last_contact": ColumnSpec(
        np.float32, "scalar", "hours since the last contact on any channel, inf if none"
    ),
    "local_hour": ColumnSpec(np.int8, "scalar", "hour of day 0..23 in the customer's time zone"),
    "local_weekday": ColumnSpec(
        np.int8, "scalar", "weekday 0=Monday..6 in the customer's time zone"
    ),
    "mortgage_page_views_7d": ColumnSpec(np.float32, "scalar", "mortgage-page views, last 7 days"),
    "days_to_product_maturity": ColumnSpec(
        np.float32, "scalar", "days until a held product matures, inf if none"
    ),
    "days_since_last_login": ColumnSpec(
        np.float32, "scalar", "days since last app login, inf if never"
    ),
    "usual_login_hour": ColumnSpec(
        np.int8, "scalar", "usual local app-login hour 0..23, -1 if unknown"
    ),
    "contacts_7d_total": ColumnSpec(np.float32, "scalar", "contacts on all channels, last 7 days"),
    "contacts_30d_total": ColumnSpec(
        np.float32, "scalar", "contacts on all channels, last 30 days"
    ),
    "consent": ColumnSpec(np.bool_, "channel", "customer consented to the channel"),
    "opt_out": ColumnSpec(np.bool_, "channel", "customer opted out of the channel"),
    "contacts_7d": ColumnSpec(np.float32, "channel", "contacts on the channel, last 7 days"),
    "contacts_30d": ColumnSpec(np.float32, "channel", "contacts on the channel, last 30 days"),
    "holds": ColumnSpec(np.bool_, "offer", "customer holds the offer's product"),
    "offer_views_30d": ColumnSpec(
        np.float32, "offer", "product-page views of the offer, last 30 days"
    ),
}
"""The columns of a :class:`ContextBatch`; compliance rules may name the scalar and channel ones."""


class ContextBatch:
    """N customers at one instant, as columns (see :data:`CONTEXT_COLUMNS` for names and shapes).

    Construct with :meth:`from_columns` (arrays) or :meth:`from_contexts` (pydantic contexts).
    Arrays are read-only views; the batch is immutable.
    """

    __slots__ = ("_columns", "n", "n_channels", "n_offers")

    def __init__(self, columns: dict[str, np.ndarray], n_channels: int, n_offers: int) -> None:
        self._columns = columns
        self.n_channels = n_channels
        self.n_offers = n_offers
        self.n = len(columns["age"])

    @classmethod
    def from_columns(cls, catalog: ActionCatalog, **columns: np.ndarray) -> ContextBatch:
        """Build a batch from arrays, checking names, shapes and values.

        Raises
        ------
        ValueError
            For a missing or unknown column, a wrong shape, or an impossible value
            (negative AUM, age outside 0..120, risk tolerance outside 0..5, hours outside 0..23).
        """
        missing = [name for name in CONTEXT_COLUMNS if name not in columns]
        if missing:
            raise ValueError(f"ContextBatch: missing column(s) {missing}")
        unknown = [name for name in columns if name not in CONTEXT_COLUMNS]
        if unknown:
            raise ValueError(f"ContextBatch: unknown column(s) {unknown}")
        n = len(np.asarray(columns["age"]))
        width = {"scalar": None, "channel": catalog.n_channels, "offer": catalog.n_offers}
        out: dict[str, np.ndarray] = {}
        _check_ranges({name: np.asarray(columns[name]) for name in _RANGES})
        for name, spec in CONTEXT_COLUMNS.items():
            expected = (n,) if width[spec.axis] is None else (n, width[spec.axis])
            out[name] = _frozen_column(name, columns[name], expected)
        return cls(out, catalog.n_channels, catalog.n_offers)

    @classmethod
    def from_contexts(
        cls, contexts: Sequence[CustomerContext], catalog: ActionCatalog, now: datetime
    ) -> ContextBatch:
        """Columnar form of validated contexts at instant ``now`` (timezone-aware).

        Raises
        ------
        ValueError
            If ``now`` has no time zone, or a context names a channel or offer the catalogue
            does not have.
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        n = len(contexts)
        ch = {name: i for i, name in enumerate(catalog.channel_names)}
        of = {name: i for i, name in enumerate(catalog.offer_names)}
        cols: dict[str, np.ndarray] = {
            name: np.zeros(
                (n,)
                if s.axis == "scalar"
                else (n, catalog.n_channels if s.axis == "channel" else catalog.n_offers),
                s.dtype,
            )
            for name, s in CONTEXT_COLUMNS.items()
        }
        now_utc = now.astimezone(UTC)
        for i, c in enumerate(contexts):
            local = now_utc.astimezone(time_zone(c.timezone))
            cols["age"][i] = c.age
            cols["aum_cny"][i] = c.aum_cny
            cols["income_band"][i] = INCOME_BANDS.index(c.income_band)
            if c.risk_tolerance is not None and c.risk_assessed_on is not None:
                cols["risk_tolerance"][i] = RISK_TOLERANCES.index(c.risk_tolerance) + 1
                # an assessment dated "tomorrow" in the customer's zone is a fresh one
                cols["risk_assessment_age_days"][i] = max(
                    0, (local.date() - c.risk_assessed_on).days
                )
            else:
                cols["risk_assessment_age_days"][i] = np.inf
            cols["lifecycle_stage"][i] = LIFECYCLE_STAGES.index(c.lifecycle_stage)
            cols["tenure_months"][i] = c.tenure_months
            cols["app_logins_30d"][i] = c.app_logins_30d
            cols["litigation"][i] = c.litigation
            cols["dishonest_debtor"][i] = c.dishonest_debtor
            cols["opted_out_all"][i] = c.opted_out_all
            cols["days_since_complaint"][i] = _elapsed(now_utc, c.last_complaint_at, 86400.0)
            history = c.contact_history
            cols["hours_since_last_contact"][i] = _elapsed(now_utc, history.last_contact_at, 3600.0)
            cols["local_hour"][i] = local.hour
            cols["local_weekday"][i] = local.weekday()
            ev = c.events
            cols["mortgage_page_views_7d"][i] = ev.mortgage_page_views_7d
            cols["days_to_product_maturity"][i] = (
                np.inf if ev.days_to_product_maturity is None else ev.days_to_product_maturity
            )
            cols["days_since_last_login"][i] = (
                np.inf if ev.days_since_last_login is None else ev.days_since_last_login
            )
            cols["usual_login_hour"][i] = -1 if ev.usual_login_hour is None else ev.usual_login_hour
            try:
                for name in c.consented_channels:
                    cols["consent"][i, ch[name]] = True
                for name in c.opt_outs:
                    cols["opt_out"][i, ch[name]] = True
                for name, count in history.contacts_7d.items():
                    cols["contacts_7d"][i, ch[name]] = count
                for name, count in history.contacts_30d.items():
                    cols["contacts_30d"][i, ch[name]] = count
                for name in c.holdings:
                    cols["holds"][i, of[name]] = True
                for name, count in ev.offer_views_30d.items():
                    cols["offer_views_30d"][i, of[name]] = count
            except KeyError as exc:
                raise ValueError(f"context {i}: unknown channel or offer {exc.args[0]!r}") from None
        cols["contacts_7d_total"] = cols["contacts_7d"].sum(axis=1)
        cols["contacts_30d_total"] = cols["contacts_30d"].sum(axis=1)
        # every value comes from a validated context (pydantic checked the ranges; elapsed
        # times are clamped at 0) into arrays of the right dtype and shape: the checks of
        # from_columns would cost more than building the columns for a single customer
        for arr in cols.values():
            arr.flags.writeable = False
        return cls(cols, catalog.n_channels, catalog.n_offers)

    def replace(self, **columns: np.ndarray) -> ContextBatch:
        """A batch with some columns replaced, checked as :meth:`from_columns` checks them
        (name, shape, range) while the other columns are shared, unchecked again: the cheap
        way to update a few columns (merging stored contact counts) of a validated batch.

        Raises
        ------
        ValueError
            For an unknown column, a shape other than the replaced column's, or an
            impossible value.
        """
        unknown = [name for name in columns if name not in CONTEXT_COLUMNS]
        if unknown:
            raise ValueError(f"ContextBatch: unknown column(s) {unknown}")
        _check_ranges({name: np.asarray(v) for name, v in columns.items()})
        out = dict(self._columns)
        for name, values in columns.items():
            out[name] = _frozen_column(name, values, out[name].shape)
        return ContextBatch(out, self.n_channels, self.n_offers)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._columns[name]

    def __len__(self) -> int:
        return self.n

    @property
    def columns(self) -> dict[str, np.ndarray]:
        """All columns (read-only arrays), by name."""
        return dict(self._columns)

    def take(self, index: np.ndarray | Sequence[int] | slice) -> ContextBatch:
        """The sub-batch of the given customers (rows)."""
        cols = {name: np.ascontiguousarray(arr[index]) for name, arr in self._columns.items()}
        for arr in cols.values():
            arr.flags.writeable = False
        return ContextBatch(cols, self.n_channels, self.n_offers)

    def row(self, i: int) -> dict[str, Any]:
        """Customer ``i`` as plain Python values: floats/ints/bools, tuples for per-channel
        and per-offer columns. This is the input of the single-customer rule path."""
        return {
            name: arr.item(i) if arr.ndim == 1 else tuple(arr[i].tolist())
            for name, arr in self._columns.items()
        }


def _frozen_column(name: str, values: Any, expected: tuple[int, ...]) -> np.ndarray:
    """Column ``name`` as a read-only contiguous array of its dtype, of shape ``expected``.

    Raises
    ------
    ValueError
        If the shape differs.
    """
    arr = np.ascontiguousarray(values, dtype=CONTEXT_COLUMNS[name].dtype)
    if arr.shape != expected:
        raise ValueError(
            f"ContextBatch: column {name!r} has shape {arr.shape}, expected {expected}"
        )
    arr.flags.writeable = False
    return arr


def _elapsed(now_utc: datetime, then: datetime | None, unit_s: float) -> np.float32:
    """Time from ``then`` to ``now_utc`` in units of ``unit_s`` seconds, at least 0, rounded
    down to float32 (:func:`~nextbest.timestamps.elapsed_float32`); inf if ``then`` is None."""
    if then is None:
        return np.float32(np.inf)
    return elapsed_float32(max(0.0, (now_utc - then).total_seconds() / unit_s))  # type: ignore[no-any-return]


_RANGES: dict[str, tuple[float, float]] = {
    "age": (0, 120),
    "aum_cny": (0, np.inf),
    "risk_tolerance": (0, 5),
    "income_band": (0, len(INCOME_BANDS) - 1),
    "lifecycle_stage": (0, len(LIFECYCLE_STAGES) - 1),
    "local_hour": (0, 23),
    "local_weekday": (0, 6),
    "contacts_7d": (0, np.inf),
    "contacts_30d": (0, np.inf),
    "contacts_7d_total": (0, np.inf),
    "contacts_30d_total": (0, np.inf),
    "hours_since_last_contact": (0, np.inf),
    "days_since_complaint": (0, np.inf),
    "risk_assessment_age_days": (0, np.inf),
    "tenure_months": (0, np.inf),
    "app_logins_30d": (0, np.inf),
    "mortgage_page_views_7d": (0, np.inf),
    "days_to_product_maturity": (0, np.inf),
    "days_since_last_login": (0, np.inf),
    "usual_login_hour": (-1, 23),
    "offer_views_30d": (0, np.inf),
}
"""Valid range of each numeric column, checked on the raw values before any cast."""


def _check_ranges(cols: dict[str, np.ndarray]) -> None:
    """Refuse a non-numeric column or a value outside :data:`_RANGES` among ``cols`` (the
    columns given that have a range)."""
    for name, (lo, hi) in _RANGES.items():
        arr = cols.get(name)
        if arr is None or arr.size == 0:
            continue
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"ContextBatch: column {name!r} must be numeric, got {arr.dtype}")
        wide = arr.astype(np.float64)
        bad = np.isnan(wide) | (wide < lo) | (wide > hi)
        if bad.any():
            where = np.argwhere(bad)[0]
            raise ValueError(
                f"ContextBatch: column {name!r} has value {float(wide[tuple(where)])!r} "
                f"at {where.tolist()}, outside [{lo}, {hi}]"
            )
