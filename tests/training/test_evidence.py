"""The evidence behind a policy's choices, offer by offer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nextbest.catalog import ActionCatalog
from training.evidence import THIN_EVIDENCE_CONVERSIONS, choice_evidence, thin_share
from training.logged_data import LoggedBandit


def _action(catalog: ActionCatalog, offer: str) -> int:
    """The first catalogue action with ``offer``."""
    return int(np.flatnonzero(catalog.offer_index == catalog.offer_names.index(offer))[0])


def _log(catalog: ActionCatalog, actions: list[int], converted: list[bool] | None) -> LoggedBandit:
    n = len(actions)
    return LoggedBandit(
        context=np.zeros((n, 1), np.float32),
        action=np.array(actions, np.int64),
        reward=np.zeros(n),
        pscore=np.full(n, 0.5),
        candidates=np.ones((n, catalog.n_actions), bool),
        logging_dist=None,
        feature_spec_version="f",
        ruleset_version="r",
        catalog_version=catalog.version,
        converted=None if converted is None else np.array(converted),
    )


def test_choice_evidence_counts_logged_decisions_and_conversions(catalog: ActionCatalog) -> None:
    loan, card = _action(catalog, "consumer_loan"), _action(catalog, "credit_card_upgrade")
    # 300 card decisions with 60 conversions, 20 loan decisions with 2
    actions = [card] * 300 + [loan] * 20 + [0] * 10
    converted = [i < 60 for i in range(300)] + [i < 2 for i in range(20)] + [False] * 10
    chosen = np.array([loan] * 70 + [card] * 20 + [0] * 10)
    rows = choice_evidence(_log(catalog, actions, converted), chosen, catalog)
    assert rows == [
        {
            "offer": "consumer_loan",
            "policy_share": 0.7,
            "logged": 20,
            "conversions": 2,
            "thin": True,
        },
        {
            "offer": "credit_card_upgrade",
            "policy_share": 0.2,
            "logged": 300,
            "conversions": 60,
            "thin": False,
        },
    ]
    assert thin_share(rows) == pytest.approx(0.7)


def test_choice_evidence_rarely_chosen_offer_is_not_flagged(catalog: ActionCatalog) -> None:
    loan = _action(catalog, "consumer_loan")
    chosen = np.array([loan] + [0] * 199)  # 0.5% of decisions: below the notable share
    rows = choice_evidence(_log(catalog, [loan], [False]), chosen, catalog)
    assert rows[0]["conversions"] == 0 < THIN_EVIDENCE_CONVERSIONS
    assert rows[0]["thin"] is False
    assert thin_share(rows) == 0.0


def test_choice_evidence_without_outcome_events_is_unknown(catalog: ActionCatalog) -> None:
    loan = _action(catalog, "consumer_loan")
    rows = choice_evidence(_log(catalog, [loan, loan], None), np.array([loan]), catalog)
    assert rows == [
        {
            "offer": "consumer_loan",
            "policy_share": 1.0,
            "logged": 2,
            "conversions": None,
            "thin": None,
        }
    ]
    assert math.isnan(thin_share(rows))


def test_choice_evidence_no_contact_policy_has_no_rows(catalog: ActionCatalog) -> None:
    rows = choice_evidence(_log(catalog, [0], [False]), np.zeros(5, np.int64), catalog)
    assert rows == []
    assert thin_share(rows) == 0.0


@pytest.mark.parametrize("chosen", [[-1], [10_000]])
def test_choice_evidence_action_outside_catalogue_names_it(
    catalog: ActionCatalog, chosen: list[int]
) -> None:
    with pytest.raises(ValueError, match="chosen ids must be in"):
        choice_evidence(_log(catalog, [0], [False]), np.array(chosen), catalog)
