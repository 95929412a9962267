"""When a recommended contact goes out at the latest: the end of its action's next sending
window in the customer's local time (:class:`SendSchedule`).

Minimum gaps count from that time until a delivery is reported, and caps count the contact
while it may still be sent within their windows: the service (:mod:`serving.contact_history`)
and the simulator (:mod:`simulators.world`) read the same schedule, so a log never holds a
contact sequence the service would block.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from nextbest.catalog import ActionCatalog
from nextbest.timestamps import US_PER_HOUR, epoch_us

DST_MARGIN_HOURS = 1
"""Added to a scheduled contact's latest send: the schedule counts local hours, and a
daylight-saving change before the window's end (a fall-back night, in any zone, at whatever
hour it falls) moves that end up to an hour later in UTC (30 minutes on Lord Howe Island).
Without it the gap to the next contact would count from up to an hour too early."""

LONGEST_WAIT = timedelta(days=8)
"""Longer than any wait from a decision to the latest send: a weekend slot decided on a
Saturday after its window goes out the next Saturday (under 7 days and 13 hours, with the
daylight-saving hour). Stores may bound their searches with it."""


@dataclass(frozen=True)
class SendSchedule:
    """When a recommended contact is sent at the latest, by action (build once per catalogue
    with :meth:`of`)."""

    hours_later: np.ndarray
    """int16 ``(A, 24, 7)``: whole hours from a decision at local hour ``h`` on weekday ``d``
    (0 = Monday) to the end of the action's next sending window, plus :data:`DST_MARGIN_HOURS`;
    0 for an immediate action (and no contact)."""

    @classmethod
    def of(cls, catalog: ActionCatalog) -> SendSchedule:
        """The schedule of every action of ``catalog``: today's window if it has not ended,
        else tomorrow's, or the next Saturday's for a weekend slot."""
        timing = catalog.timing
        end = np.array([-1 if t.immediate else int(t.end_hour or 0) for t in timing], np.int64)
        weekend = np.array([t.weekend for t in timing], bool)
        hour = np.arange(24)[:, None]
        weekday = np.arange(7)[None, :]
        slots = []
        for end_hour, saturday_only in zip(end.tolist(), weekend.tolist(), strict=True):
            days = (hour >= end_hour).astype(np.int64)  # today's window has ended
            if saturday_only:
                to_saturday = (5 - weekday) % 7
                days = np.where((to_saturday == 0) & (days == 1), 7, to_saturday)
            later = np.broadcast_to(days * 24 + end_hour - hour + DST_MARGIN_HOURS, (24, 7))
            slots.append(np.zeros((24, 7), np.int64) if end_hour < 0 else later)
        by_slot = np.stack(slots).astype(np.int16)
        contact = catalog.timing_index >= 0
        table = by_slot[np.maximum(catalog.timing_index, 0)]
        table[~contact] = 0
        if table.max(initial=0) >= LONGEST_WAIT // timedelta(hours=1):
            raise ValueError(f"a timing slot waits longer than {LONGEST_WAIT} to be sent")
        return cls(table)

    def latest_send_us(
        self, action: np.ndarray, now: datetime, local_hour: np.ndarray, local_weekday: np.ndarray
    ) -> np.ndarray:
        """When each recommended contact is sent at the latest, microseconds since the
        epoch, int64 ``(n,)``: now for an immediate action, else the end of its next
        sending window in the customer's local time.

        Whole hours are added to ``now``, whose minutes are kept, and an hour more for a
        daylight-saving change before the window ends (:data:`DST_MARGIN_HOURS`): up to two
        hours past the window's end, never before it.

        Parameters
        ----------
        action : int ``(n,)``
        now : datetime
            Decision time (timezone-aware).
        local_hour, local_weekday : int ``(n,)``
            The customers' local hour (0..23) and weekday (0 = Monday) at ``now``.
        """
        hours = self.hours_until_sent(action, local_hour, local_weekday)
        return epoch_us(now) + hours * US_PER_HOUR

    def hours_until_sent(
        self, action: np.ndarray, local_hour: np.ndarray, local_weekday: np.ndarray | int
    ) -> np.ndarray:
        """Whole hours from a decision to the latest its contact is sent, int64 ``(n,)``
        (:attr:`hours_later` of each action at the customers' local hour and weekday)."""
        return self.hours_later[action, local_hour, local_weekday].astype(np.int64)
