"""What a customer asked for through the service: an opt-out of the channel that contacted
them or a complaint, reported with a decision's outcome, and a later consent that lifts an
opt-out.

The marketing platform reports opt-outs and complaints with a decision's outcome
(``POST /v1/rewards``, ``opted_out`` / ``complaint``). Its own customer record may take a while
to say so, so the service keeps them beside the contact history
(:class:`~serving.contact_history.ContactStore`) and merges them into the context of every
later decision for that customer (:func:`apply_restrictions`), on every worker: the rules
``channel_opt_out`` and ``complaint_suppression`` then hold at once, whatever the request
says. A restriction only ever adds to what the request brought (an opt-out the request does
not list, a complaint later than the request's), never removes.

A customer who consents again to a channel is reported with ``POST /v1/consents``: an
opt-out the service stored binds a channel while it is at least as late as the latest
consent to that channel (or to every channel); the consent lifts an earlier opt-out and
nothing else (never the request's own ``opt_outs``, never a complaint, never a later
opt-out). Reports arrive late and clocks differ, so each side is dated the way that keeps
the block: an opt-out at the later of when it happened and when the service heard of it,
a consent at the earlier of when it was given and when the service heard of it
(:attr:`Consent.counted_from_us`). An opt-out either dated or reported after a consent
therefore binds, and only a consent both given and reported after an opt-out lifts it.
The restrictions table keeps each kind's latest time (the state); every consent is also
appended, with who reported it, to the store's consent log (the audit trail).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np

from nextbest.context import ContextBatch
from nextbest.timestamps import US_PER_DAY, elapsed_float32, epoch_us

RestrictionKind = Literal["opt_out", "complaint", "consent"]
RESTRICTION_KINDS: tuple[RestrictionKind, ...] = ("opt_out", "complaint", "consent")
"""Stored as their index (a consent is stored beside what it lifts)."""
EVERY_CHANNEL = -1
"""The channel of a restriction on every channel (a complaint; an opt-out reported for a
decision that contacted no one; a consent to every channel)."""
_OPT_OUT, _COMPLAINT, _CONSENT = range(len(RESTRICTION_KINDS))


@dataclass(frozen=True)
class Restriction:
    """One restriction to store: the pseudonymised customer, its kind, the channel name
    (None: every channel) and when it happened, microseconds since the epoch (UTC)."""

    customer_key: str
    kind: RestrictionKind
    channel: str | None
    at_us: int


@dataclass(frozen=True)
class Consent:
    """A customer's renewed consent, as the service stores it: the pseudonymised customer,
    the channel names (None: every channel), when it was given and when the service received
    it (microseconds since the epoch, UTC), and who reported it (an API key id)."""

    customer_key: str
    channels: tuple[str, ...] | None
    given_us: int
    received_us: int
    reported_by: str

    @property
    def counted_from_us(self) -> int:
        """When the consent counts from: the earlier of given and received (a consent dated
        ahead of the service's clock never overtakes an opt-out it has not heard of yet)."""
        return min(self.given_us, self.received_us)

    def restrictions(self) -> list[Restriction]:
        """The consent as restrictions of kind ``consent``, one per channel, at
        :attr:`counted_from_us`."""
        return [
            Restriction(self.customer_key, "consent", channel, self.counted_from_us)
            for channel in (self.channels or (None,))
        ]


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


@dataclass(frozen=True)
class OptOutsInForce:
    """The stored opt-outs that bind, of the ``r`` queried customers that have one.

    Attributes
    ----------
    rows : int64 ``(r,)``
        Index of each such customer among the queried ones (ascending).
    channels : bool ``(r, C)``
        The channels the customer's stored opt-outs block.
    every : bool ``(r,)``
        An opt-out of every channel, with no consent to any channel since: the customer is
        opted out of all marketing (``channels`` is then all true).
    """

    rows: np.ndarray
    channels: np.ndarray
    every: np.ndarray


def opt_outs_in_force(restrictions: CustomerRestrictions, n_channels: int) -> OptOutsInForce:
    """Which stored opt-outs bind: on a channel, the latest opt-out of it (or of every
    channel) binds while it is at least as late as the latest consent to it (or to every
    channel); a tie keeps the opt-out. ``n_channels``: ``C``, the channels the restrictions'
    channel indices refer to."""
    rows, inverse = np.unique(restrictions.row, return_inverse=True)
    kind, channel = restrictions.kind, restrictions.channel
    at = restrictions.at_us.astype(np.float64)  # microseconds since 1970 are exact below 2**53
    every_channel = channel == EVERY_CHANNEL

    def latest(of_kind: int) -> np.ndarray:
        """``(len(rows), C)`` the latest time of ``of_kind`` per customer and channel."""
        times = np.full((len(rows), n_channels), -np.inf)
        one = (kind == of_kind) & ~every_channel
        np.maximum.at(times, (inverse[one], channel[one]), at[one])
        every = (kind == of_kind) & every_channel
        np.maximum.at(times, inverse[every], at[every][:, None])
        return times

    opted_out, consented = latest(_OPT_OUT), latest(_CONSENT)
    blocked = np.isfinite(opted_out) & (opted_out >= consented)
    out_of_all = np.full(len(rows), -np.inf)
    whole = (kind == _OPT_OUT) & every_channel
    np.maximum.at(out_of_all, inverse[whole], at[whole])
    every = np.isfinite(out_of_all) & (out_of_all >= consented.max(axis=1, initial=-np.inf))
    binding = blocked.any(axis=1)
    return OptOutsInForce(rows[binding], blocked[binding], every[binding])


def apply_restrictions(
    batch: ContextBatch, restrictions: CustomerRestrictions, now: datetime
) -> ContextBatch:
    """``batch`` with ``restrictions`` (of the same customers, in the same order) merged
    into ``opt_out`` ``(n, C)``, ``opted_out_all`` ``(n,)`` and ``days_since_complaint``
    ``(n,)``: the union of the request's opt-outs with the stored ones in force
    (:func:`opt_outs_in_force`), the later complaint (days rounded down, so a complaint
    29.9999 days ago never counts as 30)."""
    if restrictions.n != len(batch):
        raise ValueError(
            f"restrictions are for {restrictions.n} customers, the batch for {len(batch)}"
        )
    if not len(restrictions):
        return batch
    opt_out = np.array(batch["opt_out"], copy=True)
    opted_out_all = np.array(batch["opted_out_all"], copy=True)
    in_force = opt_outs_in_force(restrictions, opt_out.shape[1])
    opt_out[in_force.rows] |= in_force.channels
    opted_out_all[in_force.rows[in_force.every]] = True
    complaint = restrictions.kind == _COMPLAINT
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
    "Consent",
    "CustomerRestrictions",
    "OptOutsInForce",
    "Restriction",
    "RestrictionKind",
    "apply_restrictions",
    "opt_outs_in_force",
]
