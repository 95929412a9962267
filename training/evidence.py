"""How much logged evidence stands behind a policy's choices, offer by offer.

A policy learned from a log can only know an offer's appeal from the decisions where the
logging policy tried it. A playbook that explores 10% of the time over ~100 allowed actions
tries most offers in well under 1% of its decisions, so a learned policy can send an offer to
a large share of customers on the strength of a handful of conversions (measured on the
digital-bank benchmark: an offer logged 2,111 times with 4 conversions, chosen for 76% of the
held-out decisions). The off-policy ESS says the same for the policy as a whole; this table
says it per offer, in the terms a reviewer can act on (which offers to explore more).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nextbest.catalog import ActionCatalog
from training.logged_data import LoggedBandit

THIN_EVIDENCE_CONVERSIONS = 50
"""Fewer logged conversions than this behind an offer is thin evidence for choosing it."""
NOTABLE_SHARE = 0.01
"""Offers the policy chooses for at least this share of decisions are judged for evidence."""


EvidenceRow = dict[str, float | int | str | bool | None]


@dataclass(frozen=True)
class ChoiceEvidence:
    """The evidence table of a policy and the share of its decisions that rest on thin
    evidence (NaN when the log records no outcome events)."""

    rows: list[EvidenceRow]
    thin_share: float


def choice_evidence(
    train: LoggedBandit, action_dist: np.ndarray, catalog: ActionCatalog
) -> ChoiceEvidence:
    """Per offer the policy chooses: how often, and what the training log holds about it.

    Parameters
    ----------
    train : LoggedBandit
        The decisions the policy was trained on.
    action_dist : float ``(m, A)``
        The policy's distribution over the catalogue's actions on each of ``m`` evaluation
        decisions (one-hot for a greedy policy).
    catalog : ActionCatalog

    Returns
    -------
    ChoiceEvidence
        ``rows``: one dict per offer the policy gives probability (most chosen first):
        ``offer``; ``policy_share`` (its expected share of the ``m`` decisions); ``logged``
        (training decisions whose logged action has the offer, on any channel and timing);
        ``conversions`` (their logged conversions; None when the log records no outcome
        events); ``thin`` (a share of at least :data:`NOTABLE_SHARE` on fewer than
        :data:`THIN_EVIDENCE_CONVERSIONS` conversions; None when conversions are unknown).
        ``thin_share``: the summed share of the thin offers.

    Raises
    ------
    ValueError
        If ``action_dist`` is not ``(m, A)`` for the catalogue's ``A`` actions, or a logged
        action id is outside the catalogue.
    """
    dist = np.asarray(action_dist, np.float64)
    if dist.ndim != 2 or dist.shape[1] != catalog.n_actions:
        raise ValueError(f"action_dist must have shape (m, {catalog.n_actions}), got {dist.shape}")
    logged_actions = np.asarray(train.action)
    if len(logged_actions) and (
        logged_actions.min() < 0 or logged_actions.max() >= catalog.n_actions
    ):
        raise ValueError(
            f"logged action ids must be in [0, {catalog.n_actions}), got "
            f"{int(logged_actions.min())}..{int(logged_actions.max())}"
        )
    n_offers = len(catalog.offer_names)
    offer_of = catalog.offer_index.astype(np.int64)
    contact = offer_of >= 0
    # expected decisions per offer: the distribution's mass summed over each offer's actions
    picked = np.bincount(offer_of[contact], weights=dist.sum(axis=0)[contact], minlength=n_offers)
    logged_offer = offer_of[logged_actions]
    logged_contact = logged_offer >= 0
    logged = np.bincount(logged_offer[logged_contact], minlength=n_offers)
    conversions = None
    if train.converted is not None:
        converted_rows = logged_contact & np.asarray(train.converted, bool)
        conversions = np.bincount(logged_offer[converted_rows], minlength=n_offers)
    m = len(dist)
    rows: list[EvidenceRow] = []
    for offer in np.argsort(-picked, kind="stable"):
        if picked[offer] <= 0:
            break
        share = float(picked[offer] / m)
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
    thin = (
        float("nan")
        if conversions is None
        else float(sum(float(r["policy_share"]) for r in rows if r["thin"]))  # type: ignore[arg-type]
    )
    return ChoiceEvidence(rows, thin)
