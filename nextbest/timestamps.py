"""Times as integer microseconds since the epoch (UTC), as the journal and the contact
store keep them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
