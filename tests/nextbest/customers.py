"""A permissive base customer and one-customer batches built from overrides of it.

The base customer passes every rule of ``configs/compliance/default.yaml`` for every action:
all channels consented, no opt-outs, C5 assessed 10 days ago, age 40, AUM 10,000,000 CNY,
local hour 12 (Asia/Shanghai), no contacts, no complaint, not blocked. A test overrides the
one or two fields that make a rule fire (or almost fire).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from nextbest.catalog import ActionCatalog
from nextbest.context import ContextBatch, CustomerContext, parse_customer

SHANGHAI = ZoneInfo("Asia/Shanghai")
NOW = datetime(2026, 1, 5, 4, 0, tzinfo=UTC)
"""Monday 2026-01-05 12:00 in Asia/Shanghai: the base customer's decision time."""


def at_local_hour(hour: int) -> datetime:
    """The decision instant on 2026-01-05 at ``hour`` o'clock in Asia/Shanghai (aware)."""
    return datetime(2026, 1, 5, hour, 0, tzinfo=SHANGHAI)


def ago(*, days: float = 0.0, hours: float = 0.0, now: datetime = NOW) -> datetime:
    """The aware instant ``days`` and ``hours`` before ``now``."""
    return now - timedelta(days=days, hours=hours)


def base_customer(catalog: ActionCatalog) -> dict[str, Any]:
    """Raw mapping of the permissive base customer (input of :func:`parse_customer`)."""
    return {
        "customer_id": "c-0001",
        "age": 40,
        "aum_cny": 10_000_000.0,
        "income_band": "high",
        "risk_tolerance": "C5",
        "risk_assessed_on": (NOW.astimezone(SHANGHAI).date() - timedelta(days=10)).isoformat(),
        "lifecycle_stage": "mature",
        "tenure_months": 60,
        "app_logins_30d": 12,
        "holdings": [],
        "consented_channels": list(catalog.channel_names),
        "opt_outs": [],
        "opted_out_all": False,
        "litigation": False,
        "dishonest_debtor": False,
        "last_complaint_at": None,
        "contact_history": {"contacts_7d": {}, "contacts_30d": {}, "last_contact_at": None},
        "timezone": "Asia/Shanghai",
        "events": {},
    }


def make_customer(catalog: ActionCatalog, **overrides: Any) -> CustomerContext:
    """The base customer with ``overrides`` (CustomerContext fields), validated."""
    data = base_customer(catalog)
    data.update(overrides)
    return parse_customer(data, catalog)


def make_row_batch(catalog: ActionCatalog, now: datetime = NOW, **overrides: Any) -> ContextBatch:
    """A one-customer :class:`ContextBatch` of the base customer with ``overrides`` at ``now``."""
    return ContextBatch.from_contexts([make_customer(catalog, **overrides)], catalog, now)


def assessed(days_ago: int, now: datetime = NOW) -> date:
    """The local (Asia/Shanghai) date ``days_ago`` days before ``now``."""
    return now.astimezone(SHANGHAI).date() - timedelta(days=days_ago)
