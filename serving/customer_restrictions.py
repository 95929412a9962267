"""What a customer asked for through an outcome reported to the service: an opt-out of the
channel that contacted them, or a complaint.

The marketing platform reports them with a decision's outcome (``POST /v1/rewards``,
``opted_out`` / ``complaint``). Its own customer record may take a while to say so, so the
service keeps them beside the contact history (:class:`~serving.contact_history.ContactStore`)
and merges them into the context of every later decision for that customer
(:func:`apply_restrictions`), on every worker: the rules ``channel_opt_out`` and
``complaint_suppression`` then hold at once, whatever the request says. A restriction only
ever adds to what the request brought (an opt-out the request does not list, a complaint
later than the request's), never removes.

Opt-outs are kept for good; a complaint keeps its latest time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np

from nextbest.context import ContextBatch
from nextbest.timestamps import US_PER_DAY, elapsed_float32, epoch_us

RestrictionKind = Literal["opt_out", "complaint"]
RESTRICTION_KINDS: tuple[RestrictionKind, ...] = ("opt_out", "complaint")
"""Stored as their index."""
EVERY_CHANNEL = -1
"""The channel of a restriction on every channel (a complaint; an opt-out reported for a
decision that contacted no one)."""


@dataclass(frozen=True)
class Restriction:
    """One restriction to store: the pseudonymised customer, its kind, the channel name
    (None: every channel) and when it happened, microseconds since the epoch (UTC)."""

    customer_key: str
    kind: RestrictionKind
    channel: str | None
    at_us: int


@dataclass(frozen=True)
class CustomerRestrictions:
    """The stored restrictions of ``n`` queried customers, as ``m`` rows.

    Attributes
    ----------
    n : int
    row : int64 ``(m,)``
        Index of the restriction's customer among the queried keys.
    kind : int64 ``(m,)``
        Index into :data:`RESTRICTION_KINDS`.
    channel : int64 ``(m,)``
        Index of the channel in the store's ``channels``; :data:`EVERY_CHANNEL` for all.
    at_us : int64 ``(m,)``
        When it happened (a complaint's latest), microseconds since the epoch.
    """

    n: int
    row: np.ndarray
    kind: np.ndarray
    channel: np.ndarray
    at_us: np.ndarray

    @classmethod
    def none(cls, n: int) -> CustomerRestrictions:
        """No restriction for any of ``n`` customers."""
        empty = np.zeros(0, np.int64)
        return cls(n, empty, empty, empty, empty)

    def __len__(self) -> int:
        return len(self.row)


def apply_restrictions(
    batch: ContextBatch, restrictions: CustomerRestrictions, now: datetime
) -> ContextBatch:
    """``batch`` with ``restrictions`` (of the same customers, in the same order) merged
    into ``opt_out`` ``(n, C)``, ``opted_out_all`` ``(n,)`` and ``days_since_complaint``
    ``(n,)``: the union of opt-outs, the later complaint (days rounded down, so a complaint
    29.9999 days ago never counts as 30)."""
    if restrictions.n != len(batch):
        raise ValueError(
            f"restrictions are for {restrictions.n} customers, the batch for {len(batch)}"
        )
    if not len(restrictions):
        return batch
    opt_out = np.array(batch["opt_out"], copy=True)
    opted_out_all = np.array(batch["opted_out_all"], copy=True)
    out = restrictions.kind == RESTRICTION_KINDS.index("opt_out")
    every = out & (restrictions.channel == EVERY_CHANNEL)
    one = out & ~every
    opt_out[restrictions.row[one], restrictions.channel[one]] = True
    opted_out_all[restrictions.row[every]] = True
    complaint = restrictions.kind == RESTRICTION_KINDS.index("complaint")
    latest = np.full(len(batch), -np.inf)
    np.maximum.at(latest, restrictions.row[complaint], restrictions.at_us[complaint].astype(float))
    days = np.where(
        np.isfinite(latest), np.maximum(0.0, (epoch_us(now) - latest) / US_PER_DAY), np.inf
    )
    since = np.minimum(np.asarray(batch["days_since_complaint"], np.float64), days)
    return batch.replace(
        opt_out=opt_out,
        opted_out_all=opted_out_all,
        days_since_complaint=elapsed_float32(since),
    )


__all__ = [
    "EVERY_CHANNEL",
    "RESTRICTION_KINDS",
    "CustomerRestrictions",
    "Restriction",
    "RestrictionKind",
    "apply_restrictions",
]
