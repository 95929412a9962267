"""Contact history shared across requests and workers, so caps and minimum gaps hold.

The service records every contact it recommends (kind ``recommended``, keyed by the
decision id) and every contact reported delivered (kind ``delivered``: keyed by the decision
id it fulfils, which upgrades the recommendation in place, or by the platform's own message
id for contacts made outside the service). One contact is one row, whatever its kind, so a
recommendation that is later reported delivered is counted once.

Before the rule engine runs, the API asks the store for the contacts of the request's
customers over the longest window (one query per batch) and merges them into the history
the request brought (:func:`merge_into_batch` for a whole :class:`ContextBatch`,
:func:`merge_contact_history` for one :class:`ContactHistory`). The merge rule, written once
in :func:`merge_contact_counts`:

* The request's history is the caller's view, complete up to its ``last_contact_at`` (the
  *horizon*). A stored contact after the horizon cannot be in it, so it is **added**. A
  stored contact at or before the horizon may already be counted by the caller, so per
  channel and window the larger of the two counts is kept (**maximum**). Adding those too
  would count twice every contact the caller learned of from the same delivery report.
* A request without ``last_contact_at`` has no horizon: every stored contact is added. Such
  a request counts no contacts of its own (counts without a last-contact time are refused
  by validation: the minimum gap could not be checked).
* The last contact is the later of the two; recommendations count as contacts (the
  service cannot know the platform did not send them) unless ``count_recommended=False``.

The merged counts can still undercount only if the caller omits contacts older than its own
last contact that the service never saw; no store can know about those.

A lookup also counts the contacts its own store object was given and has not committed yet,
so a process never decides twice for a customer on the same history. Between processes, a
lookup returns the store's position (:attr:`ContactEvents.position`) and the service stores
the contacts it decided with :meth:`ContactStore.record_if_unchanged`, which refuses, in the
write's own transaction, a customer with a contact stored after that position: of two
workers that decided for one customer on the same history, the second to commit decides
again on the history with the first's contact.

The store also keeps what customers asked for through the service (opt-outs and complaints
reported with outcomes, consents that lift opt-outs: :mod:`serving.customer_restrictions`),
merged into later decisions the same way.

The SQLite implementation is :class:`serving.sqlite_contact_store.SqliteContactStore`; a
Redis or PostgreSQL store implements :class:`ContactStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from nextbest.catalog import ActionCatalog
from nextbest.context import ContactHistory, ContextBatch
from nextbest.timestamps import US_PER_HOUR, elapsed_float32, epoch_us, from_epoch_us
from serving.customer_restrictions import Consent, CustomerRestrictions, Restriction

ContactKind = Literal["recommended", "delivered"]
CONTACT_KINDS: tuple[ContactKind, ...] = ("recommended", "delivered")
"""Stored as their index: a later kind replaces an earlier one for the same contact id."""
WINDOWS: dict[str, timedelta] = {
    "contacts_7d": timedelta(days=7),
    "contacts_30d": timedelta(days=30),
}
"""The rolling windows of :class:`~nextbest.context.ContactHistory`."""
LONGEST_WINDOW = max(WINDOWS.values())
HORIZON_SLACK_US = 1_000_000
"""A stored contact up to 1 s after the caller's last contact is taken as that same contact
(the batch form carries the last contact as float32 hours since ``now``)."""


@dataclass(frozen=True)
class ContactBatch:
    """``n`` contacts to record, as arrays.

    Parameters
    ----------
    contact_id : sequence of str ``(n,)``
        The decision id for a recommendation, and for a delivery of a recommended contact;
        the platform's message id for a contact made outside the service.
    customer_key : sequence of str ``(n,)``
        Pseudonymised customer keys (never raw identifiers).
    channel : sequence of str ``(n,)``
    offer : sequence of str or None ``(n,)``
    at_us : int64 ``(n,)`` or int
        When the contact happens, microseconds since the epoch (UTC).
    kind : {"recommended", "delivered"}
    """

    contact_id: Sequence[str]
    customer_key: Sequence[str]
    channel: Sequence[str]
    offer: Sequence[str | None]
    at_us: np.ndarray | int
    kind: ContactKind
    latest_us: np.ndarray | None = None
    """int64 ``(n,)``: the latest each contact may be sent, when later than ``at_us`` (a
    recommendation for a later window); None: ``at_us``."""

    def __post_init__(self) -> None:
        if self.kind not in CONTACT_KINDS:
            raise ValueError(f"kind must be one of {CONTACT_KINDS}, got {self.kind!r}")
        n = len(self.contact_id)
        lengths = {
            "customer_key": len(self.customer_key),
            "channel": len(self.channel),
            "offer": len(self.offer),
        }
        if np.ndim(self.at_us):
            lengths["at_us"] = len(np.asarray(self.at_us))
        if self.latest_us is not None:
            lengths["latest_us"] = len(np.asarray(self.latest_us))
        for name, length in lengths.items():
            if length != n:
                raise ValueError(f"{name} has {length} rows but contact_id has {n}")

    def __len__(self) -> int:
        return len(self.contact_id)

    @classmethod
    def recommended(
        cls,
        decision_id: Sequence[str],
        customer_key: Sequence[str],
        action: np.ndarray,
        catalog: ActionCatalog,
        at: datetime,
        latest_us: np.ndarray | None = None,
    ) -> ContactBatch:
        """The contacts of chosen actions (no-contact decisions are not contacts).

        Parameters
        ----------
        decision_id, customer_key : sequence of str ``(n,)``
        action : int ``(n,)``
            Chosen action ids.
        catalog : ActionCatalog
        at : datetime
            Decision time (timezone-aware).
        latest_us : int64 ``(n,)``, optional
            The latest each contact may be sent
            (:meth:`nextbest.send_schedule.SendSchedule.latest_send_us`).
        """
        actions = np.asarray(action, np.intp)
        channel_index = catalog.channel_index[actions]
        rows = np.flatnonzero(channel_index >= 0)
        picked = rows.tolist()
        # every contact action is an offer on a channel (the catalogue builds them so)
        channels = np.array(catalog.channel_names, object)
        offers = np.array(catalog.offer_names, object)
        return cls(
            contact_id=[decision_id[i] for i in picked],
            customer_key=[customer_key[i] for i in picked],
            channel=channels[channel_index[rows]].tolist(),
            offer=offers[catalog.offer_index[actions[rows]]].tolist(),
            at_us=epoch_us(at),
            kind="recommended",
            latest_us=None if latest_us is None else np.asarray(latest_us, np.int64)[rows],
        )


@dataclass(frozen=True)
class ContactEvents:
    """The stored contacts of ``n`` queried customers, as ``m`` events.

    Attributes
    ----------
    n : int
        Customers queried.
    row : int64 ``(m,)``
        Index of the event's customer among the queried keys.
    channel : int64 ``(m,)``
        Index of the channel in the store's ``channels``.
    at_us : int64 ``(m,)``
        Contact time, microseconds since the epoch (UTC).
    delivered : bool ``(m,)``
        Reported delivered (False: recommended by the service).
    latest_us : int64 ``(m,)``
        The latest the contact may be sent: ``at_us`` unless a recommendation was scheduled
        for a later window (then that window's end, until its delivery is reported). Gaps
        count from it, and a contact counts towards a window's cap while it may still be
        sent within it. Default: ``at_us``.
    position : int or None
        The store's position when it was read (opaque; for SQLite the last row id): give it
        to :meth:`ContactStore.record_if_unchanged` with the contacts decided on these
        events. None: not read from a store.
    """

    n: int
    row: np.ndarray
    channel: np.ndarray
    at_us: np.ndarray
    delivered: np.ndarray
    latest_us: np.ndarray | None = None
    position: int | None = None

    def __post_init__(self) -> None:
        if self.latest_us is None:
            object.__setattr__(self, "latest_us", self.at_us)

    @classmethod
    def empty(cls, n: int, position: int | None = None) -> ContactEvents:
        """No stored contact for any of ``n`` customers."""
        none = np.zeros(0, np.int64)
        return cls(n, none, none, none, np.zeros(0, bool), position=position)


@runtime_checkable
class ContactStore(Protocol):
    """Where contact history lives; every worker of the service shares one.

    ``record`` and ``prune`` return futures resolved once the write is durable (await them
    with ``asyncio.wrap_future`` before answering, so the next request, on any worker, sees
    the contact). ``contacts`` is one round trip for a whole batch of customers.
    """

    channels: tuple[str, ...]
    """Channel names; :attr:`ContactEvents.channel` indexes this."""

    def record(self, contacts: ContactBatch, inline: bool = False) -> Future[int]:
        """Store contacts (idempotent per contact id); the future gives the rows inserted or
        replaced.

        ``inline``: a hint that the caller would rather have a small write done on its own
        thread when that cannot block (the future is then resolved on return)."""
        ...

    def record_if_unchanged(
        self,
        contacts: ContactBatch,
        position: int | None,
        inline: bool = False,
        more: bool = False,
    ) -> Future[list[str]]:
        """Store recommended contacts, each only if its customer got no contact in the store
        after ``position`` (:attr:`ContactEvents.position` of the lookup they were decided
        on); the future gives the contact ids refused (nothing stored for them: decide those
        customers again). The check and the write are one transaction, so two workers that
        decided for one customer on the same history cannot both store a contact.
        ``position`` None: no check (as :meth:`record`). ``more``: a hint that the caller
        records more contacts right after these (the next part of a batch), which a store
        may then commit together with them."""
        ...

    def contacts(self, customer_keys: Sequence[str], since_us: int) -> ContactEvents:
        """Stored contacts of ``customer_keys`` ``(n,)`` that may be sent later than
        ``since_us`` (by their latest time), with the contacts this store was given to
        record and has not committed yet (a decision must see every contact decided before
        it), and the store's position."""
        ...

    def restrict(self, restrictions: Sequence[Restriction]) -> Future[int]:
        """Store restrictions (an opt-out, a complaint, a consent: idempotent, one per
        customer, kind and channel keeping its latest time); the future resolves once every
        worker's next lookup sees them."""
        ...

    def consent(self, consent: Consent) -> Future[int]:
        """Store a customer's renewed consent: its restrictions (as :meth:`restrict`) and a
        row a channel in an append-only consent log, in one write; the future resolves once
        every worker's next lookup sees it."""
        ...

    def restrictions(self, customer_keys: Sequence[str]) -> CustomerRestrictions:
        """The stored restrictions of ``customer_keys`` ``(n,)``, in one query."""
        ...

    def lookup(
        self, customer_keys: Sequence[str], since_us: int
    ) -> tuple[ContactEvents, CustomerRestrictions]:
        """:meth:`contacts` and :meth:`restrictions` together (what a decision reads)."""
        ...

    def prune(self, before_us: int) -> Future[int]:
        """Delete contacts older than ``before_us`` (by the latest they may be sent); the
        future gives the rows deleted. Restrictions are kept."""
        ...

    def close(self) -> None:
        """Flush pending writes and release resources."""
        ...


def merge_contact_counts(
    contacts_7d: np.ndarray,
    contacts_30d: np.ndarray,
    horizon_us: np.ndarray,
    events: ContactEvents,
    now_us: int,
    count_recommended: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge stored contacts into request-supplied counts (the rule of the module docstring).

    ``merged[w] = max(request[w], stored_known[w]) + stored_after[w]`` per customer, channel
    and window ``w``, where ``stored_known`` are stored contacts at or before the customer's
    horizon (plus :data:`HORIZON_SLACK_US`) and ``stored_after`` those later.

    Parameters
    ----------
    contacts_7d, contacts_30d : float ``(n, C)``
        The request's counts.
    horizon_us : float64 ``(n,)``
        The request's last contact, microseconds since the epoch; ``-inf`` if none.
    events : ContactEvents
        Stored contacts of the same ``n`` customers.
    now_us : int
        Decision time, microseconds since the epoch.
    count_recommended : bool
        Count recommendations not (yet) reported delivered.

    Returns
    -------
    contacts_7d, contacts_30d : float32 ``(n, C)``
    stored_last_us : float64 ``(n,)``
        The latest time a counted stored contact may be sent (its ``latest_us``), ``-inf``
        if none; may lie after ``now_us`` (a contact scheduled for later today).
    """
    n, c = np.shape(contacts_30d)
    if events.n != n:
        raise ValueError(f"events are for {events.n} customers, the counts for {n}")
    keep = np.ones(len(events.row), bool) if count_recommended else events.delivered.copy()
    row, channel, at = events.row[keep], events.channel[keep], events.at_us[keep]
    latest = np.asarray(events.latest_us)[keep]
    after = at > np.asarray(horizon_us, np.float64)[row] + HORIZON_SLACK_US
    cell = row * c + channel
    merged = []
    for request, window in (
        (contacts_7d, WINDOWS["contacts_7d"]),
        (contacts_30d, WINDOWS["contacts_30d"]),
    ):
        # a scheduled contact counts while it may still be sent within the window
        inside = latest > now_us - window // timedelta(microseconds=1)
        known = np.bincount(cell[inside & ~after], minlength=n * c).reshape(n, c)
        extra = np.bincount(cell[inside & after], minlength=n * c).reshape(n, c)
        merged.append((np.maximum(request, known) + extra).astype(np.float32))
    stored_last = np.full(n, -np.inf)
    np.maximum.at(stored_last, row, latest.astype(np.float64))
    return merged[0], merged[1], stored_last


def merge_into_batch(
    batch: ContextBatch,
    events: ContactEvents,
    now: datetime,
    *,
    count_recommended: bool = True,
) -> ContextBatch:
    """The batch with stored contacts merged into its contact columns.

    Updates ``contacts_7d``, ``contacts_30d`` (``(n, C)``), their totals and
    ``hours_since_last_contact`` ``(n,)``; the request's last contact is
    ``now - hours_since_last_contact``.

    Parameters
    ----------
    batch : ContextBatch
        ``n`` customers as the request described them, at ``now``.
    events : ContactEvents
        From :meth:`ContactStore.contacts` for the same customers, in the same order, with
        channels in catalogue order.
    now : datetime
    count_recommended : bool
    """
    now_us = epoch_us(now)
    hours = batch["hours_since_last_contact"].astype(np.float64)
    known = np.isfinite(hours)
    horizon = np.where(known, now_us - np.where(known, hours, 0.0) * US_PER_HOUR, -np.inf)
    c7, c30, stored_last = merge_contact_counts(
        batch["contacts_7d"], batch["contacts_30d"], horizon, events, now_us, count_recommended
    )
    stored_hours = np.where(
        np.isfinite(stored_last),
        np.maximum(0.0, (now_us - stored_last) / US_PER_HOUR),
        np.inf,
    )
    return batch.replace(
        contacts_7d=c7,
        contacts_30d=c30,
        contacts_7d_total=c7.sum(axis=1),
        contacts_30d_total=c30.sum(axis=1),
        hours_since_last_contact=elapsed_float32(np.minimum(hours, stored_hours)),
    )


def merge_contact_history(
    history: ContactHistory,
    events: ContactEvents,
    row: int,
    channels: Sequence[str],
    now: datetime,
    count_recommended: bool = True,
) -> ContactHistory:
    """One customer's request-supplied history merged with its stored contacts.

    Parameters
    ----------
    history : ContactHistory
        From the request.
    events : ContactEvents
        From :meth:`ContactStore.contacts`; the customer is ``row`` among the queried keys.
    row : int
    channels : sequence of str
        The store's channels (``events.channel`` indexes them).
    now : datetime
    count_recommended : bool
    """
    index = {name: i for i, name in enumerate(channels)}
    request = np.zeros((2, 1, len(channels)), np.float32)
    for w, counts in enumerate((history.contacts_7d, history.contacts_30d)):
        for name, count in counts.items():
            request[w, 0, index[name]] = count
    mine = events.row == row
    one = ContactEvents(
        1,
        np.zeros(int(mine.sum()), np.int64),
        events.channel[mine],
        events.at_us[mine],
        events.delivered[mine],
        np.asarray(events.latest_us)[mine],
    )
    last = history.last_contact_at
    horizon = np.array([-np.inf if last is None else float(epoch_us(last))])
    c7, c30, stored_last = merge_contact_counts(
        request[0], request[1], horizon, one, epoch_us(now), count_recommended
    )
    if np.isfinite(stored_last[0]):
        stored_at = from_epoch_us(int(stored_last[0]))
        last = stored_at if last is None else max(last, stored_at)
    return ContactHistory(
        contacts_7d={name: int(c7[0, i]) for name, i in index.items() if c7[0, i]},
        contacts_30d={name: int(c30[0, i]) for name, i in index.items() if c30[0, i]},
        last_contact_at=last,
    )


class ContactConflictError(ValueError):
    """A delivery names a contact (a decision) stored for another customer: recording it
    would move that contact off the customer it was made for, out of their caps."""

    def __init__(self, contact_id: str) -> None:
        super().__init__(f"contact {contact_id!r} was recorded for another customer")
        self.contact_id = contact_id


__all__ = [
    "CONTACT_KINDS",
    "LONGEST_WINDOW",
    "WINDOWS",
    "ContactBatch",
    "ContactConflictError",
    "ContactEvents",
    "ContactStore",
    "merge_contact_counts",
    "merge_contact_history",
    "merge_into_batch",
]
