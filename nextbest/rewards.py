"""Rewards of decisions: the bank's economics of one contact (:func:`reward_cny`, shared by
the simulator and the service), how the journal turns a reported outcome into a reward
(:class:`RewardRule`), and the errors of reporting one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from nextbest.catalog import ActionCatalog


def reward_cny(
    value_cny: np.ndarray | float,
    contact_cost_cny: np.ndarray | float,
    complaint: np.ndarray | bool,
    complaint_penalty_cny: float,
) -> np.ndarray:
    """The logged reward of a decision, in CNY: the bank's economics of one contact.

    ``reward = value_cny - contact_cost_cny - complaint_penalty_cny * complaint``

    the value of the conversion (0 without one), minus the cost of the contact on its
    channel (0 for no contact), minus the price of a complaint. This is the reward the
    simulator logs (``simulators/world.py``), so served and simulated logs mean the same.

    Parameters
    ----------
    value_cny : float array ``(n,)`` or scalar
    contact_cost_cny : float array ``(n,)`` or scalar
    complaint : bool array ``(n,)`` or scalar
    complaint_penalty_cny : float

    Returns
    -------
    numpy.ndarray
        float64, the broadcast shape of the inputs.
    """
    return (
        np.asarray(value_cny, np.float64)
        - np.asarray(contact_cost_cny, np.float64)
        - float(complaint_penalty_cny) * np.asarray(complaint, np.float64)
    )


ATTRIBUTION_WINDOW = timedelta(days=30)
"""How long after a decision its outcome is attributed to it by default (the service's
``NEXTBEST_ATTRIBUTION_WINDOW``): later outcomes are stored but flagged ``late``."""


@dataclass(frozen=True)
class RewardRule:
    """How the journal turns a reported outcome into a reward, and when it is late.

    Parameters
    ----------
    complaint_penalty_cny : float
        CNY charged per complaint (``RewardSpec.complaint_penalty_cny`` in training).
    contact_cost_cny : float array ``(n_actions,)``
        Cost of each action's contact (0 for no contact); :meth:`from_catalog` builds it.
    attribution_window : timedelta
        An outcome later than this after the decision is stored but flagged ``late``.
    """

    complaint_penalty_cny: float
    contact_cost_cny: np.ndarray
    attribution_window: timedelta = ATTRIBUTION_WINDOW

    def __post_init__(self) -> None:
        if not np.isfinite(self.complaint_penalty_cny) or self.complaint_penalty_cny < 0:
            raise ValueError(
                f"complaint_penalty_cny must be finite and >= 0, got {self.complaint_penalty_cny}"
            )
        cost = np.asarray(self.contact_cost_cny, np.float64)
        if cost.ndim != 1 or not np.isfinite(cost).all() or (cost < 0).any():
            raise ValueError("contact_cost_cny must be a 1-d array of finite costs >= 0")
        if self.attribution_window <= timedelta(0):
            raise ValueError(f"attribution_window must be positive, got {self.attribution_window}")
        object.__setattr__(self, "contact_cost_cny", cost)

    @classmethod
    def from_catalog(
        cls,
        catalog: ActionCatalog,
        complaint_penalty_cny: float,
        attribution_window: timedelta = ATTRIBUTION_WINDOW,
    ) -> RewardRule:
        """The rule with each action's contact cost taken from its channel in ``catalog``."""
        cost = np.array([c or 0.0 for c in catalog.attribute("cost_cny")], np.float64)
        return cls(complaint_penalty_cny, cost, attribution_window)


@dataclass(frozen=True)
class RewardOutcome:
    """The outcome of a decision as reported by the marketing platform.

    ``reward_at`` is when the outcome happened (timezone-aware); None means "now", the
    time the journal receives it.
    """

    converted: bool
    complaint: bool
    opted_out: bool
    value_cny: float
    reward_at: datetime | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.value_cny):
            raise ValueError(f"value_cny must be finite, got {self.value_cny}")
        if self.reward_at is not None and self.reward_at.tzinfo is None:
            raise ValueError("reward_at must include a time zone")


@dataclass(frozen=True)
class DecidedFor:
    """Whom a journalled decision was for, what it chose and when: the pseudonymised customer
    key, the action index, the catalogue version that index belongs to, and the decision's
    time (an outcome dated before it is dated at receipt)."""

    customer_key: str
    action: int
    catalog_version: str
    decided_at: datetime


@dataclass(frozen=True)
class RewardResult:
    """What the journal holds for a decision's reward after
    :meth:`~nextbest.decision_journal.JournalWriter.submit_reward`.

    ``duplicate`` is True when the same outcome had been recorded before (the stored one is
    returned and nothing is written). ``decision``: whom and what the decision was for, for
    what the outcome asks of later decisions.
    """

    decision_id: str
    outcome: RewardOutcome
    reward: float
    received_at: datetime
    late: bool
    duplicate: bool
    decision: DecidedFor | None = None


class UnknownDecisionError(LookupError):
    """A reward names a decision id the journal does not hold (HTTP 404)."""

    def __init__(self, decision_id: str) -> None:
        self.decision_id = decision_id
        super().__init__(f"no decision with id {decision_id!r} in the journal")


class ArchivedDecisionError(UnknownDecisionError):
    """A reward names a decision moved out of the live journal by ``nextbest archive`` (HTTP
    410): its outcome is not recorded, but ``decision`` says whom it was for, so an opt-out
    or complaint in the report still binds."""

    def __init__(self, decision_id: str, decision: DecidedFor) -> None:
        super().__init__(decision_id)
        self.args = (
            f"decision {decision_id!r} was archived (nextbest archive): its outcome is no "
            "longer recorded",
        )
        self.decision = decision


class RewardConflictError(ValueError):
    """A second, different outcome for a decision whose reward is already recorded (HTTP 409).

    ``fields`` names what differs; ``stored`` is the outcome kept and ``received_at`` when it
    was first received; ``decision`` whom it was for (set by the journal: an opt-out in the
    refused report, or in the stored one, still binds).
    """

    decision: DecidedFor | None = None

    def __init__(
        self, decision_id: str, fields: list[str], stored: RewardOutcome, received_at: datetime
    ) -> None:
        self.decision_id, self.fields, self.stored = decision_id, fields, stored
        self.received_at = received_at
        super().__init__(
            f"decision {decision_id!r} already has a different outcome recorded "
            f"({', '.join(fields)} {'differs' if len(fields) == 1 else 'differ'}); rewards are "
            "recorded once and never changed"
        )


class RewardTimeError(ValueError):
    """An outcome dated before its decision (HTTP 400/422); ``decision`` whom it was for,
    when the journal found it."""

    decision: DecidedFor | None = None
