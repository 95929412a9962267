"""The transforms a context feature is made of, each in two forms with one meaning.

A transform reads one column (or two) of a :class:`~nextbest.context.ContextBatch` and writes
one feature block. ``vector(batch)`` computes it for N customers with numpy: float ``(N,)``
or ``(N, width)``; ``scalar(row, out)`` appends the same values for one customer given as
:meth:`ContextBatch.row` (Python scalars and tuples) to a list, without numpy, because numpy's
per-call cost dominates for a single row. The encoder declares its features as transforms, so
the batch path (training, simulation, batch scoring) and the one-customer path (a scoring
request) cannot drift apart; a test checks that they agree on random contexts.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from nextbest.context import ContextBatch

Row = Mapping[str, Any]
"""One customer as :meth:`ContextBatch.row` gives it."""

_IDENTITY = {width: np.eye(width, dtype=np.float32) for width in range(1, 17)}
"""Identity matrices by width: a one-hot block is one row gather from them."""


@dataclass(frozen=True, slots=True)
class Scaled:
    """``(f(min(x, cap)) - shift) / scale`` with ``f`` the identity or ``log1p``, elementwise
    (a per-channel or per-offer column gives one feature per channel or offer); booleans
    count as 0/1."""

    column: str
    shift: float = 0.0
    scale: float = 1.0
    log: bool = False
    cap: float | None = None

    def vector(self, batch: ContextBatch) -> np.ndarray:
        x = batch[self.column]
        if self.cap is not None:
            x = np.minimum(x, self.cap)
        if self.log:
            x = np.log1p(x)
        if self.shift:
            x = x - self.shift
        return x / self.scale if self.scale != 1.0 else x

    def scalar(self, row: Row, out: list[float]) -> None:
        value = row[self.column]
        if not isinstance(value, tuple):
            out.append(self._one(value))
            return
        # a per-channel or per-offer column, one step at a time over the whole tuple (calling
        # _one per element costs 3 us more per decision, a quarter of encode_row)
        values: Sequence[float] = value
        if self.cap is not None:
            cap = self.cap
            values = [min(v, cap) for v in values]
        if self.log:
            values = list(map(math.log1p, values))
        if self.shift or self.scale != 1.0:
            shift, scale = self.shift, self.scale
            values = [(v - shift) / scale for v in values]
        out.extend(values)

    def _one(self, x: float) -> float:
        if self.cap is not None:
            x = min(x, self.cap)
        if self.log:
            x = math.log1p(x)
        return (x - self.shift) / self.scale


@dataclass(frozen=True, slots=True)
class Threshold:
    """1 where ``x >= value`` (``at_least``) or ``x <= value`` (``at_most``), else 0."""

    column: str
    op: Literal["at_least", "at_most"]
    value: float

    def vector(self, batch: ContextBatch) -> np.ndarray:
        x = batch[self.column]
        return x >= self.value if self.op == "at_least" else x <= self.value

    def scalar(self, row: Row, out: list[float]) -> None:
        x = row[self.column]
        out.append(float(x >= self.value if self.op == "at_least" else x <= self.value))


@dataclass(frozen=True, slots=True)
class Decay:
    """``exp(-x / scale)``: 1 for just now, 0 for never (``inf``)."""

    column: str
    scale: float

    def vector(self, batch: ContextBatch) -> np.ndarray:
        return np.exp(-np.asarray(batch[self.column], np.float32) / np.float32(self.scale))

    def scalar(self, row: Row, out: list[float]) -> None:
        out.append(math.exp(-row[self.column] / self.scale))


@dataclass(frozen=True, slots=True)
class Periodic:
    """``sin`` or ``cos`` of ``x`` on a circle of ``period`` (hour of day: 24)."""

    column: str
    period: float
    fn: Literal["sin", "cos"]

    def vector(self, batch: ContextBatch) -> np.ndarray:
        angle = batch[self.column] * (2 * np.pi / self.period)
        return np.sin(angle) if self.fn == "sin" else np.cos(angle)

    def scalar(self, row: Row, out: list[float]) -> None:
        angle = row[self.column] * (2 * math.pi / self.period)
        out.append(math.sin(angle) if self.fn == "sin" else math.cos(angle))


@dataclass(frozen=True, slots=True)
class OneHot:
    """A 1 at the category's position among ``width``: the column itself when it holds an
    index, or the bucket of ``x`` among ascending ``bounds`` (``searchsorted`` right: a value
    equal to a bound falls in the bucket above, as :mod:`nextbest.segments` defines them)."""

    column: str
    width: int
    bounds: Sequence[float] | None = None

    def vector(self, batch: ContextBatch) -> np.ndarray:
        x = batch[self.column]
        index = x if self.bounds is None else np.searchsorted(self.bounds, x, side="right")
        identity = _IDENTITY.get(self.width)
        if identity is None:
            identity = np.eye(self.width, dtype=np.float32)
        return identity[index]

    def scalar(self, row: Row, out: list[float]) -> None:
        x = row[self.column]
        index = int(x) if self.bounds is None else bisect_right(self.bounds, x)
        block = [0.0] * self.width
        block[index] = 1.0
        out.extend(block)


@dataclass(frozen=True, slots=True)
class HourInWindows:
    """Whether an hour of the day falls in each of T windows, one feature per window.

    A window is ``[start, end)`` in local hours; a window with ``start`` -1 means "now": the
    hour fits when it is within one hour of the ``now_column`` hour. A negative hour (unknown)
    fits nothing.
    """

    column: str
    now_column: str
    start: tuple[int, ...]
    end: tuple[int, ...]

    def vector(self, batch: ContextBatch) -> np.ndarray:
        hour = batch[self.column].astype(np.int16)[:, None]
        now = batch[self.now_column].astype(np.int16)[:, None]
        start, end = _as_row(self.start), _as_row(self.end)
        fits = np.where(start < 0, np.abs(now - hour) <= 1, (hour >= start) & (hour < end))
        return fits & (hour >= 0)

    def scalar(self, row: Row, out: list[float]) -> None:
        hour, now = row[self.column], row[self.now_column]
        if hour < 0:
            out.extend([0.0] * len(self.start))
            return
        out.extend(
            float(abs(now - hour) <= 1 if s < 0 else s <= hour < e)
            for s, e in zip(self.start, self.end, strict=True)
        )


_ROWS: dict[tuple[int, ...], np.ndarray] = {}


def _as_row(values: tuple[int, ...]) -> np.ndarray:
    """int16 ``(1, len(values))``, built once per distinct tuple."""
    arr = _ROWS.get(values)
    if arr is None:
        arr = _ROWS[values] = np.array(values, np.int16)[None, :]
    return arr


Transform = Scaled | Threshold | Decay | Periodic | OneHot | HourInWindows
