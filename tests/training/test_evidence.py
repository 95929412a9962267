"""The evidence behind a policy's choices, offer by offer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nextbest.catalog import ActionCatalog
from training.evidence import NOTABLE_SHARE, THIN_EVIDENCE_CONVERSIONS, choice_evidence
from training.logged_data import LoggedBandit


def _actions(catalog: ActionCatalog, offer: str) -> np.ndarray:
    """Every catalogue action with ``offer`` (its channels and timings)."""
    return np.flatnonzero(catalog.offer_index == catalog.offer_names.index(offer))


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


def _one_hot(catalog: ActionCatalog, chosen: list[int]) -> np.ndarray:
    dist = np.zeros((len(chosen), catalog.n_actions))
    dist[np.arange(len(chosen)), chosen] = 1.0
    return dist


def test_choice_evidence_counts_every_action_of_an_offer(catalog: ActionCatalog) -> None:
    loans, cards = _actions(catalog, "consumer_loan"), _actions(catalog, "credit_card_upgrade")
    assert len(loans) > 2 and len(cards) > 2  # offers on several channels and timings
    # logged: 300 card decisions over three of its actions (60 conversions), 20 loan
    # decisions over two of its actions (2 conversions), 10 without contact
    actions = [int(cards[i % 3]) for i in range(300)] + [int(loans[i % 2]) for i in range(20)]
    actions += [0] * 10
    converted = [i < 60 for i in range(300)] + [i < 2 for i in range(20)] + [False] * 10
    # chosen: a loan action the log never used, and a card action it did
    chosen = [int(loans[-1])] * 70 + [int(cards[0])] * 20 + [0] * 10
    evidence = choice_evidence(
        _log(catalog, actions, converted), _one_hot(catalog, chosen), catalog
    )
    assert evidence.rows == [
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
    assert evidence.thin_share == pytest.approx(0.7)


def test_choice_evidence_share_is_the_policys_probability_mass(catalog: ActionCatalog) -> None:
    loans, cards = _actions(catalog, "consumer_loan"), _actions(catalog, "credit_card_upgrade")
    dist = np.zeros((2, catalog.n_actions))
    dist[0, [loans[0], loans[1], cards[0], 0]] = [0.3, 0.3, 0.3, 0.1]  # a softmax-like row
    dist[1, cards[1]] = 1.0
    evidence = choice_evidence(_log(catalog, [0], [False]), dist, catalog)
    shares = {row["offer"]: row["policy_share"] for row in evidence.rows}
    assert shares == pytest.approx({"credit_card_upgrade": 0.65, "consumer_loan": 0.3})


@pytest.mark.parametrize(
    ("conversions", "decisions", "thin"),
    [
        (THIN_EVIDENCE_CONVERSIONS - 1, 100, True),
        (THIN_EVIDENCE_CONVERSIONS, 100, False),
        (0, round(1 / NOTABLE_SHARE), True),  # chosen for exactly the notable share
        (0, round(1 / NOTABLE_SHARE) + 1, False),  # just below it
    ],
)
def test_choice_evidence_thin_at_its_boundaries(
    catalog: ActionCatalog, conversions: int, decisions: int, thin: bool
) -> None:
    loan = int(_actions(catalog, "consumer_loan")[0])
    logged = [loan] * THIN_EVIDENCE_CONVERSIONS
    converted = [i < conversions for i in range(len(logged))]
    chosen = [loan] + [0] * (decisions - 1)
    evidence = choice_evidence(_log(catalog, logged, converted), _one_hot(catalog, chosen), catalog)
    assert evidence.rows[0]["conversions"] == conversions
    assert evidence.rows[0]["thin"] is thin


def test_choice_evidence_without_outcome_events_is_unknown(catalog: ActionCatalog) -> None:
    loan = int(_actions(catalog, "consumer_loan")[0])
    evidence = choice_evidence(
        _log(catalog, [loan, loan], None), _one_hot(catalog, [loan]), catalog
    )
    assert evidence.rows == [
        {
            "offer": "consumer_loan",
            "policy_share": 1.0,
            "logged": 2,
            "conversions": None,
            "thin": None,
        }
    ]
    assert math.isnan(evidence.thin_share)
    # unknown even when the policy contacts nobody
    silent = choice_evidence(_log(catalog, [loan], None), _one_hot(catalog, [0]), catalog)
    assert silent.rows == []
    assert math.isnan(silent.thin_share)


def test_choice_evidence_no_contact_policy_has_no_rows(catalog: ActionCatalog) -> None:
    evidence = choice_evidence(_log(catalog, [0], [False]), _one_hot(catalog, [0] * 5), catalog)
    assert evidence.rows == []
    assert evidence.thin_share == 0.0


def test_choice_evidence_wrong_distribution_shape_names_it(catalog: ActionCatalog) -> None:
    with pytest.raises(ValueError, match=r"action_dist must have shape \(m, "):
        choice_evidence(_log(catalog, [0], [False]), np.ones((2, 3)), catalog)


@pytest.mark.parametrize("logged", [-1, 10_000])
def test_choice_evidence_logged_action_outside_catalogue_names_it(
    catalog: ActionCatalog, logged: int
) -> None:
    with pytest.raises(ValueError, match="logged action ids must be in"):
        choice_evidence(_log(catalog, [logged], [False]), _one_hot(catalog, [0]), catalog)
