"""Elapsed times reach the rules rounded down, never up to a limit the exact time has not
reached: a contact 24 hours less a millisecond ago still blocks the 24-hour gap, however the
customer arrives (an object, a columns body, stored contacts merged in)."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
from customers import NOW, make_customer, make_row_batch
from hypothesis import given
from hypothesis import strategies as st

from nextbest.catalog import ActionCatalog
from nextbest.compliance import RuleEngine
from nextbest.context import ContextBatch
from nextbest.customer_columns import CustomerColumns, context_batch
from nextbest.timestamps import elapsed_float32, epoch_us
from serving.contact_history import ContactEvents, merge_into_batch

JUST_SHORT = timedelta(milliseconds=1)
"""How far short of a rule's limit the edge cases are: below float32's spacing at 24 hours
(~7 ms) and at 30 days (~0.2 s), so rounding to nearest would land on the limit."""


@given(st.floats(min_value=0.0, max_value=1e30, allow_nan=False))
def test_elapsed_float32_is_the_largest_float32_not_above(exact: float) -> None:
    for value in (elapsed_float32(exact), elapsed_float32(np.array([exact]))[0]):
        assert value.dtype == np.float32
        assert float(value) <= exact
        assert float(np.nextafter(value, np.float32(np.inf))) > exact


def test_elapsed_float32_keeps_infinities_and_zeros() -> None:
    np.testing.assert_array_equal(
        elapsed_float32(np.array([np.inf, 0.0, 24.0])), np.array([np.inf, 0.0, 24.0], np.float32)
    )


def _blocking(engine: RuleEngine, batch: ContextBatch, rule: str) -> bool:
    """Whether ``rule`` blocks some action of the batch's one customer."""
    codes = engine.blocked_by(batch)[0]
    return bool((codes == engine.rule_ids.index(rule)).any())


def _both_forms(catalog: ActionCatalog, **overrides: object) -> list[ContextBatch]:
    """The customer with ``overrides`` as the objects path and the columns path build it."""
    columns = CustomerColumns.from_contexts([make_customer(catalog, **overrides)])
    return [make_row_batch(catalog, **overrides), context_batch(columns, catalog, NOW)]


def test_a_contact_or_complaint_just_short_of_the_limit_blocks_in_either_form(
    catalog: ActionCatalog, engine: RuleEngine
) -> None:
    last = NOW - timedelta(hours=24) + JUST_SHORT
    complained = NOW - timedelta(days=30) + JUST_SHORT
    for batch in _both_forms(catalog, contact_history={"last_contact_at": last}):
        assert batch["hours_since_last_contact"][0] < 24.0
        assert _blocking(engine, batch, "min_contact_gap")
    for batch in _both_forms(catalog, last_complaint_at=complained):
        assert batch["days_since_complaint"][0] < 30.0
        assert _blocking(engine, batch, "complaint_suppression")
    # a millisecond past the limits, neither rule fires
    late = {"last_contact_at": last - 2 * JUST_SHORT}
    for batch in _both_forms(catalog, contact_history=late):
        assert not _blocking(engine, batch, "min_contact_gap")
    for batch in _both_forms(catalog, last_complaint_at=complained - 2 * JUST_SHORT):
        assert not _blocking(engine, batch, "complaint_suppression")


def test_a_stored_contact_just_short_of_the_gap_blocks_once_merged(
    catalog: ActionCatalog, engine: RuleEngine
) -> None:
    batch = make_row_batch(catalog)
    stored = epoch_us(NOW - timedelta(hours=24) + JUST_SHORT)
    events = ContactEvents(
        1,
        np.array([0]),
        np.array([catalog.channel_names.index("sms")]),
        np.array([stored]),
        np.array([True]),
    )
    merged = merge_into_batch(batch, events, NOW)
    assert merged["hours_since_last_contact"][0] < 24.0
    assert _blocking(engine, merged, "min_contact_gap")
