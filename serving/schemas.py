"""Request and response bodies of the scoring API (the OpenAPI schema is built from these).

Request bodies are validated once, from the raw JSON, with the catalogue in the validation
context (so channel and offer names are checked in the same pass): see
:func:`serving.routes.decisions.parse_body`.
"""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, timedelta
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from nextbest.context import MAX_NAMES, CustomerContext, require_aware
from nextbest.customer_columns import CustomerColumns, CustomerId
from nextbest.timestamps import EPOCH
from serving.campaigns import CAMPAIGN_ID_PATTERN

FUTURE_SKEW = timedelta(minutes=5)
"""How far in the service's future a reported outcome or delivery may be dated (the two
clocks may differ a little; more is a wrong date, and a delivery dated years ahead would
block its customer's channel until then)."""

DECISION_ID_PATTERN = r"^[0-9a-f]{32}$"

_EXAMPLE_DAY = datetime.now(UTC).date()
"""The schema's example customers are dated from the day the service started: an example
assessed over a year ago would have every product blocked by the suitability rules."""
EXAMPLE_CUSTOMER: dict[str, Any] = {
    "customer_id": "c-0001",
    "age": 34,
    "aum_cny": 250000.0,
    "income_band": "middle",
    "risk_tolerance": "C3",
    "risk_assessed_on": (_EXAMPLE_DAY - timedelta(days=60)).isoformat(),
    "lifecycle_stage": "growth",
    "tenure_months": 20,
    "app_logins_30d": 9,
    "holdings": ["fund_sip"],
    "consented_channels": ["app_push", "sms", "wechat"],
    "opt_outs": [],
    "contact_history": {
        "contacts_7d": {"app_push": 1},
        "contacts_30d": {"app_push": 2, "sms": 1},
        "last_contact_at": f"{_EXAMPLE_DAY - timedelta(days=3)}T19:30:00+08:00",
    },
    "timezone": "Asia/Shanghai",
    "events": {"mortgage_page_views_7d": 0, "offer_views_30d": {"wealth_r2": 3}},
}


class _Options(BaseModel):
    """What a caller may ask of a decision, beside the customer."""

    candidates: list[str] | None = Field(default=None, min_length=1, max_length=10_000)
    """Action ids to choose among (``channel:offer:timing`` or ``no_contact``); default all.
    No-contact is always a candidate. Unknown ids: HTTP 400."""
    channels: list[str] | None = Field(default=None, min_length=1, max_length=64)
    """Channels the platform can use for this call; default all. Unknown names: HTTP 400."""
    campaign_id: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=CAMPAIGN_ID_PATTERN
    )
    """A known campaign (its offers limit the candidates); unknown campaigns: HTTP 400."""
    k: int = Field(default=3, ge=1, le=50)
    """Number of ranked allowed actions wanted."""


def _check_assessment_dates(dates: list[date | None], where: str) -> None:
    """Refuse a risk assessment dated after tomorrow (UTC; today somewhere on earth): a typo
    in the year would make an expired assessment look valid to the suitability rules.

    Checked here, against the service's clock (its decision time), not in
    :class:`~nextbest.context.CustomerContext`: simulations and replays build contexts at
    other times than now."""
    _refuse_after(dates, datetime.now(UTC).date() + timedelta(days=1), "risk_assessed_on", where)


def _check_complaint_times(times: list[datetime | None], where: str) -> None:
    """Refuse a complaint dated after now plus :data:`FUTURE_SKEW`: the complaint rule
    counts its days from it, so a typo in the year would suppress the customer for years.
    (A last contact may lie ahead: a send the platform has scheduled.)"""
    latest = (datetime.now(UTC) + FUTURE_SKEW).replace(microsecond=0)
    _refuse_after(times, latest, "last_complaint_at", where)


def _refuse_after(values: list[Any], latest: Any, field: str, where: str) -> None:
    """Refuse the first of ``values`` (dates or times, None skipped) after ``latest``, naming
    ``field`` and, in a batch (``where`` not ``customer``), its row."""
    if max(filter(None, values), default=latest) > latest:
        row = next(i for i, v in enumerate(values) if v is not None and v > latest)
        at = "" if where == "customer" else f" (row {row})"
        raise ValueError(
            f"{where}{at}: {field} {values[row]} is in the future (after {latest.isoformat()})"
        )


class DecisionRequest(_Options):
    """One customer to decide for."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "customer": EXAMPLE_CUSTOMER,
                    "campaign_id": "friday_wealth_day",
                    "k": 3,
                    "explain": True,
                }
            ]
        },
    )

    customer: CustomerContext
    explain: bool = False
    """Also return every blocked action with the rule that blocked it."""

    @field_validator("customer")
    @classmethod
    def _dated_in_the_past(cls, customer: CustomerContext) -> CustomerContext:
        _check_assessment_dates([customer.risk_assessed_on], "customer")
        _check_complaint_times([customer.last_complaint_at], "customer")
        return customer


class BatchDecisionRequest(_Options):
    """Many customers (a whole campaign) under the same options, as a list of customer
    objects (``customers``) or as one array per field (``columns``, the fast form: a
    10,000-customer body validates in ~15-25 ms; the service turns objects into columns,
    ~95-115 ms from bytes to contexts: :func:`serving.deps.parse_batch`). Exactly one of the
    two."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "customers": [EXAMPLE_CUSTOMER, {**EXAMPLE_CUSTOMER, "customer_id": "c-0002"}],
                    "campaign_id": "always_on",
                    "k": 2,
                },
                {
                    "columns": {
                        "customer_id": ["c-0001", "c-0002"],
                        "age": [34, 51],
                        "aum_cny": [250000.0, 1200000.0],
                        "income_band": ["middle", "high"],
                        "risk_tolerance": ["C3", None],
                        "risk_assessed_on": [
                            (_EXAMPLE_DAY - timedelta(days=200)).isoformat(),
                            None,
                        ],
                        "lifecycle_stage": ["growth", "mature"],
                        "tenure_months": [40, 150],
                        "app_logins_30d": [12, 0],
                        "consented_channels": [["app_push", "sms"], ["sms"]],
                        "contacts_30d": {"sms": [1, 0]},
                        "last_contact_at": [
                            f"{_EXAMPLE_DAY - timedelta(days=12)}T10:00:00+08:00",
                            None,
                        ],
                        "timezone": "Asia/Shanghai",
                    },
                    "campaign_id": "always_on",
                    "k": 2,
                },
            ]
        },
    )

    max_rows: ClassVar[int | None] = None
    """Customers a request may hold at most (set by :func:`batch_request_model`)."""

    customers: list[CustomerContext] | None = Field(default=None, min_length=1)
    """The customers; more than the service's ``max_batch`` (10,000 by default): HTTP 413,
    whatever else is wrong with them (:func:`batch_request_model`)."""
    columns: CustomerColumns | None = None
    """The customers as columns (see :class:`~nextbest.customer_columns.CustomerColumns`);
    instead of ``customers``."""
    answer: Literal["decisions", "columns"] = "decisions"
    """The answer's form: ``decisions``, one object per customer
    (:class:`BatchDecisionResponse`), or ``columns``, one array per field
    (:class:`BatchDecisionColumnsResponse`: the same values, encoded in about half the time
    for a big batch)."""

    @field_validator("customers")
    @classmethod
    def _customers_dated_in_the_past(
        cls, customers: list[CustomerContext] | None
    ) -> list[CustomerContext] | None:
        _check_assessment_dates([c.risk_assessed_on for c in customers or []], "customers")
        _check_complaint_times([c.last_complaint_at for c in customers or []], "customers")
        return customers

    @field_validator("columns")
    @classmethod
    def _columns_dated_in_the_past(cls, columns: CustomerColumns | None) -> CustomerColumns | None:
        _check_assessment_dates(columns.risk_assessed_on or [] if columns else [], "columns")
        _check_complaint_times(columns.last_complaint_at or [] if columns else [], "columns")
        return columns

    @model_validator(mode="after")
    def _one_form(self) -> BatchDecisionRequest:
        if (self.customers is None) == (self.columns is None):
            got = "neither" if self.customers is None else "both"
            raise ValueError(f"exactly one of `customers` and `columns` is required, got {got}")
        ids = self.customer_ids()
        if len(set(ids)) < len(ids):  # every copy would see the same contact history
            seen: dict[str, int] = {}
            for row, customer_id in enumerate(ids):
                first = seen.setdefault(customer_id, row)
                if first != row:
                    raise ValueError(
                        f"customer_id of row {row} repeats row {first}: a batch decides each "
                        "customer once (a later call sees this one's contacts, so caps and "
                        "gaps hold)"
                    )
        return self

    def __len__(self) -> int:
        return len(self.customers) if self.customers is not None else len(self.columns or ())

    def customer_ids(self) -> list[str]:
        """The customers' identifiers, in request order."""
        if self.columns is not None:
            return self.columns.customer_id
        return [c.customer_id for c in self.customers or ()]


BATCH_ROW_LOCATIONS = (("customers",), ("columns", "customer_id"))
"""Where a batch's customers are counted: :func:`batch_request_model` caps these lists."""


def _capped(annotation: Any, max_rows: int) -> Any:
    """``annotation`` of a :class:`CustomerColumns` field with every column list capped at
    ``max_rows`` entries and every per-customer list or per-name mapping at
    :data:`MAX_NAMES`: pydantic-core stops a list at its cap, where without one a column of
    400,000 invalid entries made as many errors (a 1.2 MB body, a 47 MB answer, 560 MB)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        return Union[tuple(_capped(arm, max_rows) for arm in args)]  # noqa: UP007
    if origin is list:
        (item,) = args
        inner = Annotated[item, Field(max_length=MAX_NAMES)] if get_origin(item) is list else item
        return Annotated[list[inner], Field(max_length=max_rows)]  # type: ignore[valid-type]
    if origin is dict:
        key, value = args
        return Annotated[dict[key, _capped(value, max_rows)], Field(max_length=MAX_NAMES)]  # type: ignore[valid-type]
    return annotation


@functools.cache
def batch_request_model(max_rows: int) -> type[BatchDecisionRequest]:
    """:class:`BatchDecisionRequest` refusing more than ``max_rows`` customers (the service's
    ``max_batch``) with pydantic's ``too_long`` error at a :data:`BATCH_ROW_LOCATIONS`.

    An oversized batch is then 413 whatever else is wrong with it (without the cap an
    invalid field answered 422). pydantic-core checks the length as it reads a list: in the
    ``customers`` form it validates at most ``max_rows + 1`` customers (a 700,000-customer
    body was validated in full, ~1.5 s of the event loop, before the service refused it).
    In the ``columns`` form only ``customer_id`` stops early: the other columns are still
    validated, which the body limit (``max_body_bytes``) bounds. The service's own parser
    (:func:`serving.deps.parse_batch`) counts a body's customer objects once it is parsed,
    before validating any (~40 ms per 10,000 customers), with the same 413.
    """
    capped_columns: dict[str, Any] = {
        name: (_capped(field.annotation, max_rows), field)
        for name, field in CustomerColumns.model_fields.items()
        if name != "customer_id"
    }
    columns = create_model(
        "CustomerColumns",
        __base__=CustomerColumns,
        customer_id=(list[CustomerId], Field(min_length=1, max_length=max_rows)),
        **capped_columns,
    )
    capped = create_model(
        "BatchDecisionRequest",
        __base__=BatchDecisionRequest,
        customers=(
            list[CustomerContext] | None,
            Field(default=None, min_length=1, max_length=max_rows),
        ),
        columns=(columns | None, None),
    )
    capped.max_rows = max_rows
    return capped


class RankedAction(BaseModel):
    """An allowed action with its model score."""

    action: str
    """Action id: ``channel:offer:timing`` or ``no_contact``."""
    action_index: int
    """Position of the action in the catalogue (the model's output index)."""
    channel: str | None
    offer: str | None
    timing: str | None
    score: float
    """Model score (higher is better)."""


class ChosenAction(RankedAction):
    """The action to take, drawn by the exploration policy."""

    propensity: float = Field(ge=0.0, le=1.0)
    """Probability that the exploration policy chose this action (logged for learning)."""


class BlockedAction(BaseModel):
    """An action the compliance rules block for this customer."""

    action: str
    rule: str
    """Id of the first rule (in rule-set order) that blocks it."""


class DecisionResponse(BaseModel):
    """The decision for one customer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "decision_id": "019440f3a2c07b1e4a9c2d5e8f0a1b2c",
                    "chosen": {
                        "action": "app_push:wealth_r2:evening",
                        "action_index": 57,
                        "channel": "app_push",
                        "offer": "wealth_r2",
                        "timing": "evening",
                        "score": 1.82,
                        "propensity": 0.9625,
                    },
                    "ranked": [
                        {
                            "action": "app_push:wealth_r2:evening",
                            "action_index": 57,
                            "channel": "app_push",
                            "offer": "wealth_r2",
                            "timing": "evening",
                            "score": 1.82,
                        }
                    ],
                    "exploration": "epsilon_greedy",
                    "model_version": "nextbest/3",
                    "ruleset_version": "5f2a9c1d0e3b",
                    "catalog_version": "a1b2c3d4e5f6",
                    "blocked": [{"action": "sms:wealth_r5:now", "rule": "suitability"}],
                }
            ]
        }
    )

    decision_id: str = Field(pattern=DECISION_ID_PATTERN)
    """Quote it when reporting the outcome (``POST /v1/rewards``) or the delivery."""
    chosen: ChosenAction
    ranked: list[RankedAction]
    """The best allowed actions by score, at most ``k``."""
    exploration: Literal["epsilon_greedy", "softmax"]
    model_version: str
    ruleset_version: str
    catalog_version: str
    blocked: list[BlockedAction] | None = None
    """Every blocked action and its rule, when the request asked to ``explain``."""


class BatchDecision(BaseModel):
    """The decision for one customer of a batch (same order as the request)."""

    decision_id: str
    action: str
    """The chosen action (drawn by the exploration policy)."""
    propensity: float
    ranked: list[str]
    """The best allowed actions by score, at most ``k``."""
    scores: list[float]
    """Model scores of ``ranked``."""


class BatchDecisionResponse(BaseModel):
    """Decisions for every customer of a batch."""

    decisions: list[BatchDecision]
    exploration: Literal["epsilon_greedy", "softmax"]
    model_version: str
    ruleset_version: str
    catalog_version: str


class BatchDecisionColumns(BaseModel):
    """The decisions of a batch as one array per field, in request order: entry ``i`` of
    every array is customer ``i``'s (the fields of :class:`BatchDecision`)."""

    decision_id: list[str]
    """Quote one when reporting its outcome or delivery."""
    action: list[str]
    """The chosen actions (drawn by the exploration policy)."""
    propensity: list[float]
    """Probability each chosen action had (logged for learning)."""
    ranked: list[list[str]]
    """The best allowed actions by score, at most ``k`` per customer."""
    scores: list[list[float]]
    """Model scores of ``ranked``."""


class BatchDecisionColumnsResponse(BaseModel):
    """Decisions for every customer of a batch, as columns (``"answer": "columns"``)."""

    columns: BatchDecisionColumns
    exploration: Literal["epsilon_greedy", "softmax"]
    model_version: str
    ruleset_version: str
    catalog_version: str


class RewardRequest(BaseModel):
    """The outcome of a decision, reported by the marketing platform."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "decision_id": "019440f3a2c07b1e4a9c2d5e8f0a1b2c",
                    "converted": True,
                    "value_cny": 300.0,
                    "occurred_at": "2026-01-06T20:15:00+08:00",
                }
            ]
        },
    )

    decision_id: str = Field(pattern=DECISION_ID_PATTERN)
    converted: bool = False
    complaint: bool = False
    opted_out: bool = False
    value_cny: float = Field(default=0.0, ge=-1e12, le=1e12, allow_inf_nan=False)
    """Value of the conversion to the bank, CNY (0 without one)."""
    occurred_at: datetime | None = None
    """When the outcome happened (with a time zone); default: when it is received."""

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return None if value is None else _reported_time(value)


def _reported_time(value: datetime) -> datetime:
    """A time a platform reports (an outcome, a delivery): with a time zone, from 1970 up to
    :data:`FUTURE_SKEW` past now."""
    require_aware(value)
    if not EPOCH <= value <= datetime.now(UTC) + FUTURE_SKEW:
        raise ValueError(
            f"must lie between 1970 and now (plus {FUTURE_SKEW}), got {value.isoformat()}"
        )
    return value


class RewardResponse(BaseModel):
    """The reward stored for a decision."""

    decision_id: str
    reward: float
    """``value_cny - contact cost - complaint penalty``, CNY."""
    late: bool
    """The outcome came after the attribution window; stored, but flagged."""
    duplicate: bool
    """The same outcome had been recorded before; nothing was written."""
    received_at: datetime


class DeliveryRequest(BaseModel):
    """A contact the platform made, so caps and minimum gaps count it on every worker."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "customer_id": "c-0001",
                    "decision_id": "019440f3a2c07b1e4a9c2d5e8f0a1b2c",
                    "channel": "app_push",
                    "offer": "wealth_r2",
                    "delivered_at": "2026-01-06T19:05:00+08:00",
                }
            ]
        },
    )

    customer_id: str = Field(min_length=1, max_length=128)
    """The bank's customer identifier (pseudonymised before it is stored)."""
    decision_id: str | None = Field(default=None, pattern=DECISION_ID_PATTERN)
    """The decision the contact fulfils; None for a contact made outside the service."""
    message_id: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[^\x00]+$"
    )
    """The platform's id of a contact made outside the service (instead of ``decision_id``:
    exactly one of the two); no NUL characters (SQLite's JSON text ends at one)."""
    channel: str = Field(min_length=1, max_length=64)
    offer: str | None = Field(default=None, min_length=1, max_length=64)
    delivered_at: datetime

    @field_validator("delivered_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return _reported_time(value)

    @model_validator(mode="after")
    def _one_id(self) -> DeliveryRequest:
        if (self.decision_id is None) == (self.message_id is None):
            got = "neither" if self.decision_id is None else "both"
            raise ValueError(
                "exactly one of `decision_id` (a contact the service decided) and `message_id` "
                f"(a contact made outside it) is required, got {got}"
            )
        return self

    @property
    def contact_id(self) -> str:
        """The id the contact is stored under: the decision's, or the platform's message id."""
        contact_id = self.decision_id or self.message_id
        assert contact_id is not None  # one of the two (validated)
        return contact_id


class DeliveryResponse(BaseModel):
    """The contact recorded."""

    contact_id: str
    recorded: bool


class ConsentRequest(BaseModel):
    """A customer consented again to be contacted, after an opt-out the service was told of
    with a decision's outcome (``POST /v1/rewards``, ``opted_out``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "customer_id": "c-0001",
                    "channels": ["sms"],
                    "given_at": "2026-01-08T10:30:00+08:00",
                }
            ]
        },
    )

    customer_id: str = Field(min_length=1, max_length=128)
    """The bank's customer identifier (pseudonymised before it is stored)."""
    channels: list[str] | None = Field(default=None, min_length=1, max_length=64)
    """The channels consented to; default: every channel."""
    given_at: datetime
    """When the customer gave the consent (with a time zone; at most a few minutes ahead of
    the service's clock), as the bank records it. The consent counts from the earlier of this
    and its receipt: an opt-out dated or reported at or after that keeps binding."""

    @field_validator("given_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return _reported_time(value)


class ConsentResponse(BaseModel):
    """The consent recorded, and the customer's stored opt-outs after it."""

    given_at: datetime
    """When the consent was given (as reported)."""
    counted_from: datetime
    """When it counts from: the earlier of ``given_at`` and its receipt."""
    lifted: list[str]
    """Channels a stored opt-out blocked before this consent and no longer does."""
    still_opted_out: list[str]
    """Channels the service's stored opt-outs still block (an opt-out later than the
    consent, or on a channel not consented to). The request's own ``opt_outs`` and
    ``consented_channels`` are the platform's and are not shown here."""


class Health(BaseModel):
    """Liveness: the process answers."""

    status: Literal["ok"]


class Readiness(BaseModel):
    """Readiness: a model is loaded and the stores are open."""

    ready: bool
    model_uri: str
    model_version: str | None
    """Version serving now (``<name>/<version>`` or ``file:<sha256 prefix>``)."""
    loaded_at: datetime | None
    last_error: str | None
    """The last failed load or reload (the previous model keeps serving)."""
    ruleset_version: str
    catalog_version: str


class ReloadResponse(BaseModel):
    """Outcome of a model reload."""

    model_version: str | None
    changed: bool
    last_error: str | None


class ErrorResponse(BaseModel):
    """An error with a human-readable reason."""

    detail: str


class ValidationIssue(BaseModel):
    """One schema violation."""

    loc: list[str | int]
    """Where: ``["body", "customer", "age"]``."""
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    """HTTP 422: every schema violation, each with the field named."""

    detail: list[ValidationIssue]
