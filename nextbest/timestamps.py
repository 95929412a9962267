"""Times as integer microseconds since the epoch (UTC), as the journal and the contact
store keep them, and elapsed times as the context's float32 columns keep them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US_PER_HOUR = 3_600_000_000
US_PER_DAY = 24 * US_PER_HOUR


def epoch_us(moment: datetime) -> int:
    """Microseconds since the epoch (UTC) of a timezone-aware ``moment``, exactly.

    Raises
    ------
    ValueError
        If ``moment`` has no time zone.
    """
    if moment.tzinfo is None:
        raise ValueError(f"{moment} must include a time zone")
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_epoch_us(us: int) -> datetime:
    """The UTC datetime of ``us`` microseconds since the epoch (inverse of :func:`epoch_us`)."""
    return EPOCH + timedelta(microseconds=us)


def elapsed_float32(elapsed: float | ArrayLike) -> Any:
    """Elapsed times (float64, any unit) as float32, rounded down rather than to nearest: a
    ``numpy.float32`` for a Python float, else a float32 array of the same shape.

    The rules compare times since an event with a minimum (a contact gap of 24 hours, a
    complaint's 30 days): rounded to nearest, 24 hours less 3 ms would become exactly 24.0
    and pass. Rounded down, a float32 elapsed time never reaches a limit the exact time has
    not reached (infinities and zeros stay as they are).
    """
    if isinstance(elapsed, float):  # one customer's (a single decision): no array
        value = np.float32(elapsed)
        return np.nextafter(value, np.float32(-np.inf)) if float(value) > elapsed else value
    exact = np.asarray(elapsed, np.float64)
    out = exact.astype(np.float32)
    over = out > exact
    if over.any():
        out[over] = np.nextafter(out[over], np.float32(-np.inf))
    return out
