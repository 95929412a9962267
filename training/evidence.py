"""How much logged evidence stands behind a policy's choices, offer by offer.

A policy learned from a log can only know an offer's appeal from the decisions where the
logging policy tried it. A playbook that explores 10% of the time over ~100 allowed actions
tries most offers in well under 1% of its decisions, so a learned policy can send an offer to
a large share of customers on the strength of a handful of conversions (measured on the
digital-bank benchmark: an offer logged 2,111 times with 4 conversions, chosen for 76% of the
held-out customers). The off-policy ESS says the same for the policy as a whole; this table
says it per offer, in the terms a reviewer can act on (which offers to explore more).
"""

from __future__ import annotations

import numpy as np

from nextbest.catalog import ActionCatalog
from training.logged_data import LoggedBandit

THIN_EVIDENCE_CONVERSIONS = 50
"""Fewer logged conversions than this behind an offer is thin evidence for choosing it."""
NOTABLE_SHARE = 0.01
"""Offers the policy chooses for at least this share of decisions are judged for evidence."""


def choice_evidence(
    train: LoggedBandit, chosen: np.ndarray, catalog: ActionCatalog
) -> list[dict[str, float | int | str | bool | None]]:
    """Per offer the policy chooses: how often, and what the training log holds about it.

    Parameters
    ----------
    train : LoggedBandit
        The decisions the policy was trained on.
    chosen : int ``(m,)``
        The policy's chosen action on each of ``m`` evaluation decisions.
    catalog : ActionCatalog

    Returns
    -------
    list of dict, one per offer the policy chooses (most chosen first)
        ``offer``; ``policy_share`` (share of the ``m`` decisions); ``logged`` (training
        decisions whose logged action has the offer); ``conversions`` (their logged
        conversions; None when the log records no outcome events); ``thin`` (chosen for at
        least :data:`NOTABLE_SHARE` of decisions on fewer than
        :data:`THIN_EVIDENCE_CONVERSIONS` conversions; None when conversions are unknown).

    Raises
    ------
    ValueError
        If an action id is outside the catalogue.
    """
    chosen = np.asarray(chosen, np.int64)
    for name, actions in (("chosen", chosen), ("logged action", train.action)):
        if len(actions) and (actions.min() < 0 or actions.max() >= catalog.n_actions):
            raise ValueError(
                f"{name} ids must be in [0, {catalog.n_actions}), got {int(actions.min())}.."
                f"{int(actions.max())}"
            )
    n_offers = len(catalog.offer_names)
    offer_of = catalog.offer_index.astype(np.int64)

    def per_offer(actions: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        offers = offer_of[actions]
        contact = offers >= 0
        w = None if weights is None else weights[contact]
        return np.bincount(offers[contact], weights=w, minlength=n_offers)

    picked = per_offer(chosen)
    logged = per_offer(train.action)
    conversions = (
        None
        if train.converted is None
        else per_offer(train.action, train.converted.astype(np.float64))
    )
    rows: list[dict[str, float | int | str | bool | None]] = []
    for offer in np.argsort(-picked, kind="stable"):
        if picked[offer] == 0:
            break
        share = float(picked[offer] / len(chosen))
        converted = None if conversions is None else int(conversions[offer])
        rows.append(
            {
                "offer": catalog.offer_names[offer],
                "policy_share": share,
                "logged": int(logged[offer]),
                "conversions": converted,
                "thin": None
                if converted is None
                else bool(share >= NOTABLE_SHARE and converted < THIN_EVIDENCE_CONVERSIONS),
            }
        )
    return rows


def thin_share(evidence: list[dict[str, float | int | str | bool | None]]) -> float:
    """Share of the policy's decisions that go to offers on thin evidence (NaN if unknown)."""
    if any(row["thin"] is None for row in evidence):
        return float("nan")
    return float(sum(float(row["policy_share"]) for row in evidence if row["thin"]))  # type: ignore[arg-type]
