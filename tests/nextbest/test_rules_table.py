"""One table row per rule of configs/compliance/default.yaml: a customer+action the rule blocks
and a neighbouring customer+action it allows.

Each case starts from the permissive base customer of ``customers.py`` (every action allowed)
and overrides only what makes the rule fire; the neighbour sits just across the rule's edge
(one day, one hour, one contact, one year of age, another channel or offer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pytest
import yaml
from customers import NOW, ago, assessed, at_local_hour, make_row_batch

from nextbest.catalog import NO_CONTACT_ID, ActionCatalog
from nextbest.compliance import ALLOWED, DEFAULT_RULES_PATH, RuleEngine, code_counts


@dataclass(frozen=True)
class Case:
    """A customer (overrides of the base customer), a decision time and an action name."""

    action: str
    overrides: dict[str, Any] = field(default_factory=dict)
    now: datetime = NOW


ALL_CHANNELS_BUT_SMS = ["app_push", "wechat", "outbound_call", "relationship_manager"]


def _history(c7: dict[str, int], c30: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "contact_history": {
            "contacts_7d": c7,
            "contacts_30d": c30 if c30 is not None else c7,
            "last_contact_at": ago(days=3),  # outside the minimum gap
        }
    }


# rule id -> (blocked case, allowed neighbour)
RULE_TABLE: dict[str, tuple[Case, Case]] = {
    "opted_out_all": (
        Case("app_push:investor_education:now", {"opted_out_all": True}),
        Case("app_push:investor_education:now", {"opted_out_all": False}),
    ),
    "complaint_suppression": (
        Case("sms:fund_sip:now", {"last_complaint_at": ago(days=29, hours=23)}),
        Case("sms:fund_sip:now", {"last_complaint_at": ago(days=30)}),
    ),
    "consent": (
        Case("sms:fund_sip:now", {"consented_channels": ALL_CHANNELS_BUT_SMS}),
        Case("app_push:fund_sip:now", {"consented_channels": ALL_CHANNELS_BUT_SMS}),
    ),
    "channel_opt_out": (
        Case("sms:fund_sip:now", {"opt_outs": ["sms"]}),
        Case("wechat:fund_sip:now", {"opt_outs": ["sms"]}),
    ),
    "blocked_credit": (
        Case("sms:consumer_loan:now", {"litigation": True}),
        Case("sms:fund_sip:now", {"litigation": True}),
    ),
    "blocked_credit_dishonest_debtor": (
        Case("app_push:credit_card_upgrade:evening", {"dishonest_debtor": True}),
        Case("app_push:health_insurance:evening", {"dishonest_debtor": True}),
    ),
    "suitability_no_assessment": (
        Case("app_push:wealth_r2:now", {"risk_tolerance": "C5", "risk_assessed_on": assessed(366)}),
        Case("app_push:wealth_r2:now", {"risk_tolerance": "C5", "risk_assessed_on": assessed(365)}),
    ),
    "suitability_risk": (
        Case("app_push:wealth_r3:now", {"risk_tolerance": "C2", "risk_assessed_on": assessed(10)}),
        Case("app_push:wealth_r2:now", {"risk_tolerance": "C2", "risk_assessed_on": assessed(10)}),
    ),
    "hnw_only": (
        Case("wechat:private_banking:now", {"aum_cny": 5_999_999.0}),
        Case("wechat:private_banking:now", {"aum_cny": 6_000_000.0}),
    ),
    "min_aum": (
        Case("sms:fund_sip:now", {"aum_cny": 99.0}),
        Case("sms:fund_sip:now", {"aum_cny": 100.0}),
    ),
    "age_below_band": (
        Case("sms:consumer_loan:now", {"age": 21}),
        Case("sms:consumer_loan:now", {"age": 22}),
    ),
    "age_above_band": (
        Case("sms:consumer_loan:now", {"age": 61}),
        Case("sms:consumer_loan:now", {"age": 60}),
    ),
    "senior_remote_high_risk": (
        Case("app_push:wealth_r4:now", {"age": 65}),
        Case("relationship_manager:wealth_r4:now", {"age": 65}),
    ),
    "quiet_hours": (
        Case("sms:fund_sip:now", now=at_local_hour(21)),
        Case("app_push:fund_sip:now", now=at_local_hour(21)),
    ),
    "min_contact_gap": (
        Case("sms:fund_sip:now", {"contact_history": {"last_contact_at": ago(hours=23)}}),
        Case("sms:fund_sip:now", {"contact_history": {"last_contact_at": ago(hours=24)}}),
    ),
    "contact_cap_channel_7d": (
        Case("sms:fund_sip:now", _history({"sms": 2})),
        Case("sms:fund_sip:now", _history({"sms": 1})),
    ),
    "contact_cap_channel_30d": (
        Case("sms:fund_sip:now", _history({}, {"sms": 4})),
        Case("sms:fund_sip:now", _history({}, {"sms": 3})),
    ),
    "contact_cap_total_7d": (
        Case("sms:fund_sip:now", _history({"app_push": 2, "wechat": 1, "relationship_manager": 1})),
        Case("sms:fund_sip:now", _history({"app_push": 2, "wechat": 1})),
    ),
    "contact_cap_total_30d": (
        Case("sms:fund_sip:now", _history({}, {"app_push": 5, "wechat": 3, "sms": 2})),
        Case("sms:fund_sip:now", _history({}, {"app_push": 5, "wechat": 2, "sms": 2})),
    ),
}

# Rules that block the "blocked" case too, after the rule under test (both hnw-only offers
# also have a 6,000,000 CNY minimum amount).
ALSO_BLOCKING: dict[str, list[str]] = {"hnw_only": ["min_aum"]}

# Further edges worth pinning down, beyond the one pair per rule above.
EXTRA_BLOCKED: list[tuple[str, Case]] = [
    (
        "suitability_no_assessment",
        Case("app_push:wealth_r2:now", {"risk_tolerance": None, "risk_assessed_on": None}),
    ),
    ("senior_remote_high_risk", Case("app_push:wealth_r5:morning", {"age": 80})),
    ("quiet_hours", Case("outbound_call:fund_sip:now", now=at_local_hour(7))),
    ("quiet_hours", Case("relationship_manager:fund_sip:now", now=at_local_hour(0))),
    ("hnw_only", Case("relationship_manager:family_trust:now", {"aum_cny": 0.0})),
    ("contact_cap_channel_7d", Case("outbound_call:fund_sip:now", _history({"outbound_call": 1}))),
    (
        "contact_cap_channel_30d",
        Case("branch_invite:wealth_r3:weekend", _history({}, {"branch_invite": 1})),
    ),
]
EXTRA_ALLOWED: list[tuple[str, Case]] = [
    (
        "suitability_no_assessment",
        Case("app_push:wealth_r1:now", {"risk_tolerance": None, "risk_assessed_on": None}),
    ),
    ("senior_remote_high_risk", Case("app_push:wealth_r4:now", {"age": 64})),
    ("senior_remote_high_risk", Case("app_push:wealth_r3:now", {"age": 80})),
    ("quiet_hours", Case("sms:fund_sip:now", now=at_local_hour(8))),
    ("quiet_hours", Case("sms:fund_sip:now", now=at_local_hour(20))),
    ("quiet_hours", Case("sms:fund_sip:morning", now=at_local_hour(22))),
    ("quiet_hours", Case("sms:fund_sip:evening", now=at_local_hour(23))),
    ("blocked_credit", Case("sms:consumer_loan:now", {"litigation": False})),
    ("contact_cap_channel_7d", Case("app_push:fund_sip:now", _history({"app_push": 2}))),
]


def _evaluate(catalog: ActionCatalog, engine: RuleEngine, case: Case):
    batch = make_row_batch(catalog, case.now, **case.overrides)
    return batch, engine.evaluate(batch), catalog.action_id(case.action)


def _default_rule_ids() -> list[str]:
    data = yaml.safe_load(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
    return [rule["id"] for rule in data["rules"]]


def test_evaluate_base_customer_allows_every_action(
    catalog: ActionCatalog, engine: RuleEngine
) -> None:
    batch = make_row_batch(catalog)
    verdict = engine.evaluate(batch)
    assert verdict.allowed.shape == (1, catalog.n_actions)
    assert verdict.allowed.all()
    assert (engine.evaluate_row(batch.row(0)) == ALLOWED).all()


def test_cover_rule_table_every_rule_in_yaml(engine: RuleEngine) -> None:
    ids = _default_rule_ids()
    assert sorted(RULE_TABLE) == sorted(ids)
    assert engine.rule_ids == tuple(ids)


@pytest.mark.parametrize(
    ("rule_id", "case"), [(r, b) for r, (b, _) in RULE_TABLE.items()], ids=list(RULE_TABLE)
)
def test_evaluate_rule_blocks_customer_action(
    catalog: ActionCatalog, engine: RuleEngine, rule_id: str, case: Case
) -> None:
    batch, verdict, action = _evaluate(catalog, engine, case)
    assert verdict.blocking_rule(0, action) == rule_id
    assert not verdict.allowed[0, action]
    assert engine.explain_row(batch.row(0), action) == [rule_id, *ALSO_BLOCKING.get(rule_id, [])]
    single = engine.evaluate_row(batch.row(0))
    assert engine.rule_ids[single[action]] == rule_id
    assert verdict.allowed[0, NO_CONTACT_ID]


@pytest.mark.parametrize(
    ("rule_id", "case"), [(r, a) for r, (_, a) in RULE_TABLE.items()], ids=list(RULE_TABLE)
)
def test_evaluate_rule_allows_neighbour(
    catalog: ActionCatalog, engine: RuleEngine, rule_id: str, case: Case
) -> None:
    batch, verdict, action = _evaluate(catalog, engine, case)
    assert verdict.blocking_rule(0, action) is None, rule_id
    assert verdict.allowed[0, action]
    assert engine.explain_row(batch.row(0), action) == []
    assert engine.evaluate_row(batch.row(0))[action] == ALLOWED


@pytest.mark.parametrize(
    ("rule_id", "case"), EXTRA_BLOCKED, ids=[f"{r}-{c.action}" for r, c in EXTRA_BLOCKED]
)
def test_evaluate_rule_blocks_edge_case(
    catalog: ActionCatalog, engine: RuleEngine, rule_id: str, case: Case
) -> None:
    batch, verdict, action = _evaluate(catalog, engine, case)
    assert verdict.blocking_rule(0, action) == rule_id
    assert rule_id in engine.explain_row(batch.row(0), action)


@pytest.mark.parametrize(
    ("rule_id", "case"), EXTRA_ALLOWED, ids=[f"{r}-{c.action}" for r, c in EXTRA_ALLOWED]
)
def test_evaluate_rule_allows_edge_case(
    catalog: ActionCatalog, engine: RuleEngine, rule_id: str, case: Case
) -> None:
    _, verdict, action = _evaluate(catalog, engine, case)
    assert verdict.blocking_rule(0, action) is None, rule_id


def test_explain_row_lists_every_blocking_rule_in_order(
    catalog: ActionCatalog, engine: RuleEngine
) -> None:
    batch = make_row_batch(
        catalog,
        opted_out_all=True,
        litigation=True,
        dishonest_debtor=True,
        age=21,
        opt_outs=["sms"],
    )
    action = catalog.action_id("sms:consumer_loan:now")
    assert engine.explain_row(batch.row(0), action) == [
        "opted_out_all",
        "channel_opt_out",
        "blocked_credit",
        "blocked_credit_dishonest_debtor",
        "age_below_band",
    ]
    assert engine.evaluate(batch).blocking_rule(0, action) == "opted_out_all"


def test_evaluate_no_contact_allowed_worst_customer(
    catalog: ActionCatalog, engine: RuleEngine
) -> None:
    worst = {
        "opted_out_all": True,
        "last_complaint_at": ago(hours=1),
        "consented_channels": [],
        "opt_outs": list(catalog.channel_names),
        "litigation": True,
        "dishonest_debtor": True,
        "risk_tolerance": None,
        "risk_assessed_on": None,
        "aum_cny": 0.0,
        "age": 0,
        "contact_history": {
            "contacts_7d": dict.fromkeys(catalog.channel_names, 9),
            "contacts_30d": dict.fromkeys(catalog.channel_names, 30),
            "last_contact_at": ago(hours=1),
        },
    }
    batch = make_row_batch(catalog, at_local_hour(23), **worst)
    verdict = engine.evaluate(batch)
    assert verdict.allowed[0, NO_CONTACT_ID]
    assert verdict.blocking_rule(0, NO_CONTACT_ID) is None
    assert not verdict.allowed[0, 1:].any()
    assert engine.evaluate_row(batch.row(0))[NO_CONTACT_ID] == ALLOWED
    assert engine.explain_row(batch.row(0), NO_CONTACT_ID) == []


def test_evaluate_no_contact_allowed_every_case(catalog: ActionCatalog, engine: RuleEngine) -> None:
    cases = [c for pair in RULE_TABLE.values() for c in pair]
    for case in cases:
        _, verdict, _ = _evaluate(catalog, engine, case)
        assert verdict.allowed[0, NO_CONTACT_ID]


def test_count_blocks_per_rule_opted_out(catalog: ActionCatalog, engine: RuleEngine) -> None:
    batch = make_row_batch(catalog, opted_out_all=True)
    counts = engine.evaluate(batch).block_counts()
    assert counts["opted_out_all"] == catalog.n_actions - 1
    assert sum(counts.values()) == catalog.n_actions - 1
    assert np.sum(engine.evaluate(batch).allowed) == 1


@pytest.mark.parametrize("shape", [(2_500, 361), (363, 361), (3, 7), (1, 1), (0, 361)])
def test_code_counts_equal_a_plain_count_for_odd_and_even_sizes(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    codes = rng.choice([0, 1, 5, 18, 254, int(ALLOWED)], size=shape).astype(np.uint8)
    expected = np.bincount(codes.ravel(), minlength=256)

    assert code_counts(codes).tolist() == expected.tolist()
    assert (
        code_counts(codes[:, ::2]).tolist()
        == np.bincount(codes[:, ::2].ravel(), minlength=256).tolist()
    )
