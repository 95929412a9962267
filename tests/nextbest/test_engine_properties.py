"""Property tests of the rule engine against the reference semantics of its conditions.

Reference: a rule blocks (customer, action) when ``all(cond.holds(row, a) for cond in
rule.conditions)``; ``blocked_by`` is the index of the first such rule in rule-set order; the
no-contact action (id 0) is never blocked. The engine's batch path (``evaluate``) and its
single-customer path (``evaluate_row``) must both agree with it.

Customers come from two sources: ``random_context_batch`` (seed and size drawn by hypothesis)
and hypothesis-built customers whose values sit on the rules' edges (AUM exactly 6,000,000,
exactly 24 hours since the last contact, contact counts exactly at the caps ...).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nextbest.catalog import NO_CONTACT_ID, ActionCatalog, load_catalog
from nextbest.compliance import RuleEngine, RuleSet, rules_from_yaml
from nextbest.compliance.reference import reference_blocked_by
from nextbest.context import (
    CONTEXT_COLUMNS,
    INCOME_BANDS,
    LIFECYCLE_STAGES,
    ContextBatch,
)
from nextbest.synthetic import random_context_batch

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)
INF = float("inf")

AGE_EDGES = [0, 17, 18, 21, 22, 24, 25, 29, 30, 55, 56, 60, 61, 64, 65, 70, 71, 120]
AUM_EDGES = [
    0.0,
    99.0,
    100.0,
    9_999.0,
    10_000.0,
    49_999.0,
    50_000.0,
    99_999.0,
    100_000.0,
    299_999.0,
    300_000.0,
    5_999_999.0,
    6_000_000.0,
    6_000_001.0,
]
ASSESSMENT_AGE_EDGES = [0.0, 364.0, 365.0, 366.0, INF]
COMPLAINT_EDGES = [0.0, 29.5, 30.0, 30.5, INF]
GAP_EDGES = [0.0, 23.5, 24.0, 24.5, INF]


def _edge_or_range(edges: list[Any], lo: float, hi: float, integer: bool = False):
    ranged = st.integers(int(lo), int(hi)) if integer else st.floats(lo, hi)
    return st.one_of(st.sampled_from(edges), ranged)


@st.composite
def edge_customer(draw: st.DrawFn, n_channels: int, n_offers: int) -> dict[str, Any]:
    """One customer's columns (scalars and per-channel / per-offer lists), often on an edge."""
    # Contact counts around the caps (1..4 a channel, 4 and 10 in total): the 7-day count,
    # then 0..4 more in the 30-day window.
    c7 = draw(st.lists(st.integers(0, 4), min_size=n_channels, max_size=n_channels))
    extra = draw(st.lists(st.integers(0, 4), min_size=n_channels, max_size=n_channels))
    c30 = [a + b for a, b in zip(c7, extra, strict=True)]
    bools = st.lists(st.booleans(), min_size=n_channels, max_size=n_channels)
    return {
        "age": draw(_edge_or_range(AGE_EDGES, 0, 120, integer=True)),
        "aum_cny": draw(_edge_or_range(AUM_EDGES, 0, 2e7)),
        "income_band": draw(st.integers(0, len(INCOME_BANDS) - 1)),
        "risk_tolerance": draw(st.integers(0, 5)),
        "risk_assessment_age_days": draw(_edge_or_range(ASSESSMENT_AGE_EDGES, 0, 800)),
        "lifecycle_stage": draw(st.integers(0, len(LIFECYCLE_STAGES) - 1)),
        "tenure_months": draw(st.integers(0, 300)),
        "app_logins_30d": draw(st.integers(0, 50)),
        "litigation": draw(st.booleans()),
        "dishonest_debtor": draw(st.booleans()),
        "opted_out_all": draw(st.sampled_from([False, False, False, True])),
        "days_since_complaint": draw(_edge_or_range(COMPLAINT_EDGES, 0, 90)),
        "hours_since_last_contact": draw(_edge_or_range(GAP_EDGES, 0, 1000)),
        "local_hour": draw(st.integers(0, 23)),
        "local_weekday": draw(st.integers(0, 6)),
        "mortgage_page_views_7d": draw(st.integers(0, 5)),
        "days_to_product_maturity": draw(st.sampled_from([0.0, 7.0, INF])),
        "days_since_last_login": draw(st.sampled_from([0.0, 30.0, INF])),
        "contacts_7d_total": float(sum(c7)),
        "contacts_30d_total": float(sum(c30)),
        "consent": draw(bools),
        "opt_out": draw(bools),
        "contacts_7d": c7,
        "contacts_30d": c30,
        "holds": draw(st.lists(st.booleans(), min_size=n_offers, max_size=n_offers)),
        "offer_views_30d": draw(st.lists(st.integers(0, 9), min_size=n_offers, max_size=n_offers)),
        "usual_login_hour": draw(st.integers(-1, 23)),
    }


def _stack(catalog: ActionCatalog, customers: list[dict[str, Any]]) -> ContextBatch:
    columns = {name: np.array([c[name] for c in customers]) for name in CONTEXT_COLUMNS}
    return ContextBatch.from_columns(catalog, **columns)


@st.composite
def edge_batch(draw: st.DrawFn, catalog: ActionCatalog) -> ContextBatch:
    """A batch of 1..8 edge customers."""
    customers = draw(
        st.lists(edge_customer(catalog.n_channels, catalog.n_offers), min_size=1, max_size=8)
    )
    return _stack(catalog, customers)


@st.composite
def random_batch(draw: st.DrawFn, catalog: ActionCatalog) -> ContextBatch:
    """``random_context_batch`` with a hypothesis-drawn seed and size."""
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(1, 12))
    return random_context_batch(catalog, n, np.random.default_rng(seed))


def _batches(catalog: ActionCatalog):
    return st.one_of(random_batch(catalog), edge_batch(catalog))


def rule_blocks(ruleset: RuleSet, row: dict[str, Any]) -> np.ndarray:
    """Reference: bool ``(n_rules, A)``, rule r blocks action a for ``row`` (a >= 1)."""
    n_actions = ruleset.catalog.n_actions
    out = np.zeros((len(ruleset.rules), n_actions), bool)
    for rule in ruleset.rules:
        for a in range(1, n_actions):
            out[rule.index, a] = all(cond.holds(row, a) for cond in rule.conditions)
    return out


# The strategies need the catalogue at collection time, before fixtures exist.
CATALOG = load_catalog()


@PROPERTY_SETTINGS
@given(batch=_batches(CATALOG))
def test_mask_actions_excludes_every_blocked(
    engine: RuleEngine, ruleset: RuleSet, batch: ContextBatch
) -> None:
    verdict = engine.evaluate(batch)
    assert verdict.allowed.shape == (batch.n, CATALOG.n_actions)
    assert verdict.allowed[:, NO_CONTACT_ID].all()
    np.testing.assert_array_equal(engine.allowed_mask(batch), verdict.allowed)
    for i in range(batch.n):
        blocks = rule_blocks(ruleset, batch.row(i))
        for rule in ruleset.rules:
            leaked = np.flatnonzero(blocks[rule.index] & verdict.allowed[i])
            assert leaked.size == 0, (
                f"rule {rule.id!r} blocks actions {leaked[:5].tolist()} for customer {i}, "
                f"but they are allowed"
            )
        # ... and nothing is blocked that no rule blocks.
        assert np.array_equal(blocks.any(axis=0), ~verdict.allowed[i])


@PROPERTY_SETTINGS
@given(batch=_batches(CATALOG))
def test_evaluate_batch_equals_evaluate_row(engine: RuleEngine, batch: ContextBatch) -> None:
    blocked_by = engine.evaluate(batch).blocked_by
    assert blocked_by.dtype == np.uint8
    for i in range(batch.n):
        np.testing.assert_array_equal(engine.evaluate_row(batch.row(i)), blocked_by[i])


@PROPERTY_SETTINGS
@given(batch=_batches(CATALOG))
def test_evaluate_blocked_by_equals_reference(
    engine: RuleEngine, ruleset: RuleSet, batch: ContextBatch
) -> None:
    blocked_by = engine.evaluate(batch).blocked_by
    for i in range(batch.n):
        np.testing.assert_array_equal(blocked_by[i], reference_blocked_by(ruleset, batch.row(i)))


@PROPERTY_SETTINGS
@given(batch=_batches(CATALOG))
def test_explain_row_starts_with_blocking_rule(engine: RuleEngine, batch: ContextBatch) -> None:
    verdict = engine.evaluate(batch)
    row = batch.row(0)
    for action in range(CATALOG.n_actions):
        explained = engine.explain_row(row, action)
        first = verdict.blocking_rule(0, action)
        assert (explained[0] if explained else None) == first
        assert [engine.rule_ids.index(r) for r in explained] == sorted(
            engine.rule_ids.index(r) for r in explained
        )


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 40))
def test_evaluate_take_equals_sub_batch(engine: RuleEngine, seed: int, n: int) -> None:
    batch = random_context_batch(CATALOG, n, np.random.default_rng(seed))
    index = np.random.default_rng(seed).permutation(n)[: n // 2]
    np.testing.assert_array_equal(
        engine.evaluate(batch.take(index)).blocked_by, engine.evaluate(batch).blocked_by[index]
    )


def test_evaluate_empty_batch_has_no_rows(engine: RuleEngine) -> None:
    batch = random_context_batch(CATALOG, 0, np.random.default_rng(0))
    verdict = engine.evaluate(batch)
    assert verdict.allowed.shape == (0, CATALOG.n_actions)


# A rule set whose threshold (0.7) is not exactly representable in float32, the dtype of the
# hours_since_last_contact column: the paths disagree for a customer at float32(0.7).
FLOAT_THRESHOLD_RULES = """
name: float_threshold
rules:
  - id: short_gap
    description: At least 0.7 hours between contacts.
    block_when:
      - customer.hours_since_last_contact < 0.7
"""


# At 13a7f79 the batch path said 'allowed' here, the single path and holds() 'blocked'.
def test_evaluate_batch_equals_evaluate_row_float_threshold() -> None:
    ruleset = rules_from_yaml(FLOAT_THRESHOLD_RULES, CATALOG)
    engine = RuleEngine(ruleset)
    columns = random_context_batch(CATALOG, 1, np.random.default_rng(0)).columns
    columns["hours_since_last_contact"] = np.array([0.7], np.float32)
    batch = ContextBatch.from_columns(CATALOG, **columns)
    row = batch.row(0)
    action = CATALOG.action_id("sms:fund_sip:now")
    assert ruleset.rules[0].conditions[0].holds(row, action)  # 0.699999988 < 0.7
    assert engine.evaluate_row(row)[action] == 0
    assert engine.evaluate(batch).blocking_rule(0, action) == "short_gap"


@st.composite
def threshold_case(draw: st.DrawFn) -> tuple[str, float, list[float]]:
    """A float32 column, a float64 threshold, and customer values on and around it."""
    column = draw(st.sampled_from(["hours_since_last_contact", "days_since_complaint", "age"]))
    threshold = draw(st.floats(0.0, 100.0))
    near = np.float32(threshold)
    values = [
        float(near),
        float(np.nextafter(near, np.float32(np.inf))),
        float(np.nextafter(near, np.float32(0))),
        threshold,
        draw(st.floats(0.0, 100.0)),
    ]
    return column, threshold, values


@settings(max_examples=40, deadline=None)
@given(case=threshold_case(), op=st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
def test_evaluate_float_threshold_paths_agree(
    case: tuple[str, float, list[float]], op: str
) -> None:
    column, threshold, values = case
    text = (
        "name: threshold\nrules:\n  - id: edge\n    description: A float threshold.\n"
        f"    block_when:\n      - customer.{column} {op} {threshold!r}\n"
    )
    ruleset = rules_from_yaml(text, CATALOG)
    engine = RuleEngine(ruleset)
    columns = {
        name: np.repeat(arr, len(values), axis=0)
        for name, arr in random_context_batch(CATALOG, 1, np.random.default_rng(0)).columns.items()
    }
    columns[column] = np.asarray(values)
    batch = ContextBatch.from_columns(CATALOG, **columns)
    blocked_by = engine.evaluate(batch).blocked_by
    for i in range(batch.n):
        row = batch.row(i)
        expected = reference_blocked_by(ruleset, row)
        np.testing.assert_array_equal(engine.evaluate_row(row), expected)
        np.testing.assert_array_equal(blocked_by[i], expected)


BUSINESS_HOURS_RULES = """
name: business_hours
rules:
  - id: business_hours_only
    description: Contacts land only between 10:00 and 20:00 local time.
    block_when:
      - contact.hour not_in_window [10, 20]
"""


# ContactHourCondition documents that a scheduled slot "lands at any hour of its window (the
# condition holds if it holds for any of them)". For not_in_window the code computes
# "no hour of the slot is inside the window" instead, so a slot that may land outside the
# allowed hours (morning: 09:00-11:00, evening: 19:00-21:00) is allowed.
@pytest.mark.parametrize(
    ("action", "blocked"),
    [
        ("sms:fund_sip:morning", True),  # may land at 09:00
        ("sms:fund_sip:evening", True),  # may land at 20:00
        ("sms:fund_sip:weekend", False),  # 10:00-12:00, inside
        ("sms:fund_sip:now", False),  # lands at the current local hour, 12
    ],
)
def test_evaluate_not_in_window_any_slot_hour(action: str, blocked: bool) -> None:
    engine = RuleEngine(rules_from_yaml(BUSINESS_HOURS_RULES, CATALOG))
    columns = random_context_batch(CATALOG, 1, np.random.default_rng(0)).columns
    columns["local_hour"] = np.array([12])
    batch = ContextBatch.from_columns(CATALOG, **columns)
    a = CATALOG.action_id(action)
    expected = "business_hours_only" if blocked else None
    assert engine.evaluate(batch).blocking_rule(0, a) == expected
