"""The atoms of a compliance rule, and how each is evaluated three ways.

A rule blocks a (customer, action) pair when all of its conditions hold. Each condition
knows, for its part of the pair:

* ``holds(row, action_id)``: the plain definition, one customer and one action at a time
  (the reference semantics; slow, obviously right);
* ``keys(batch)`` / ``key_of(row)``: a small integer per customer, such that whether the
  condition holds for (customer, action) depends only on (key, action);
* ``table()``: the ``(n_keys, n_actions)`` boolean table of that dependence.

Keys and tables let the engine evaluate N customers x A actions with a handful of gathers,
and one customer with a single table lookup. The tests check both against ``holds``.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nextbest.context import ContextBatch

ORDERING_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
MEMBERSHIP_OPS = ("in", "not_in")
WINDOW_OPS = ("in_window", "not_in_window")
ALL_OPS = (*ORDERING_OPS, *MEMBERSHIP_OPS, *WINDOW_OPS)


def compare(op: str, left: Any, right: Any) -> Any:
    """``left op right`` for scalars or numpy arrays (``in``/``not_in``: ``right`` a list)."""
    if op in ORDERING_OPS:
        return ORDERING_OPS[op](left, right)
    if op in MEMBERSHIP_OPS:
        if isinstance(left, np.ndarray):
            inside = np.isin(left, np.asarray(list(right)))
            return inside if op == "in" else ~inside
        return (left in right) == (op == "in")
    raise ValueError(f"operator {op!r} does not apply here")


def _wide(column: np.ndarray) -> np.ndarray:
    """Float columns compared in float64, as the scalar paths do (numpy 2 would otherwise
    compare a float32 column with a Python float threshold in float32)."""
    return column.astype(np.float64) if column.dtype.kind == "f" else column


def in_hour_window(hour: int, window: tuple[int, int]) -> bool:
    """True when ``hour`` lies in ``[start, end)``, wrapping past midnight (``(21, 8)``)."""
    start, end = window
    if start <= end:
        return start <= hour < end
    return hour >= start or hour < end


class Condition:
    """Base class: one atom of a rule. Subclasses fill in the three evaluations."""

    n_keys: int
    text: str

    def keys(self, batch: ContextBatch) -> np.ndarray:
        """Per-customer key, shape ``(N,)``, int64 in ``[0, n_keys)``."""
        return np.zeros(batch.n, np.int64)

    def key_of(self, row: dict[str, Any]) -> int:
        """Key of one customer given as :meth:`ContextBatch.row`."""
        return 0

    def table(self) -> np.ndarray:
        """Whether the condition holds, shape ``(n_keys, n_actions)`` bool."""
        raise NotImplementedError

    def scaled_key_fn(self, stride: int) -> Callable[[dict[str, Any]], int]:
        """``row -> stride * key_of(row)`` as one fast closure (the single-customer path)."""
        key_of = self.key_of
        return lambda row: stride * key_of(row)

    def holds(self, row: dict[str, Any], action_id: int) -> bool:
        """Reference semantics for one customer and one action."""
        raise NotImplementedError


@dataclass(eq=False)
class ActionCondition(Condition):
    """``action.<attribute> <op> <value>``: depends on the action only."""

    text: str
    values: Sequence[Any]
    """Per-action attribute values, ``None`` for the no-contact action."""
    op: str
    value: Any
    n_keys: int = 1

    def __post_init__(self) -> None:
        self._row = np.array(
            [v is not None and bool(compare(self.op, v, self.value)) for v in self.values], bool
        )

    def table(self) -> np.ndarray:
        return self._row[None, :].copy()

    def holds(self, row: dict[str, Any], action_id: int) -> bool:
        v = self.values[action_id]
        return v is not None and bool(compare(self.op, v, self.value))


@dataclass(eq=False)
class CustomerCondition(Condition):
    """``customer.<scalar column> <op> <value>``: depends on the customer only."""

    text: str
    column: str
    op: str
    value: Any
    n_actions: int
    n_keys: int = 2

    def keys(self, batch: ContextBatch) -> np.ndarray:
        return np.asarray(compare(self.op, _wide(batch[self.column]), self.value), np.int64)

    def key_of(self, row: dict[str, Any]) -> int:
        return int(bool(compare(self.op, row[self.column], self.value)))

    def table(self) -> np.ndarray:
        return np.array([[False] * self.n_actions, [True] * self.n_actions], bool)

    def holds(self, row: dict[str, Any], action_id: int) -> bool:
        return bool(compare(self.op, row[self.column], self.value))

    def scaled_key_fn(self, stride: int) -> Callable[[dict[str, Any]], int]:
        column, value = self.column, self.value
        if self.op in ORDERING_OPS:
            fn = ORDERING_OPS[self.op]
            return lambda row: stride if fn(row[column], value) else 0
        return super().scaled_key_fn(stride)


@dataclass(eq=False)
class ChannelCondition(Condition):
    """``customer.<per-channel column> <op> <value>``, read at the action's channel.

    ``value`` is one number for every channel or one per channel. Key: a bitmask of the
    channels on which the comparison holds (``2 ** n_channels`` keys).
    """

    text: str
    column: str
    op: str
    per_channel: tuple[Any, ...]
    """The right-hand value for each channel, in catalogue order."""
    channel_index: np.ndarray
    """Channel of each action, shape ``(A,)``, -1 for no contact."""
    n_keys: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_channels = len(self.per_channel)
        self.n_keys = 1 << self.n_channels
        self._weights = (1 << np.arange(self.n_channels)).astype(np.int64)
        self._rhs = np.asarray(self.per_channel)

    def keys(self, batch: ContextBatch) -> np.ndarray:
        bits = compare(self.op, _wide(batch[self.column]), self._rhs[None, :])
        return bits.astype(np.int64) @ self._weights

    def key_of(self, row: dict[str, Any]) -> int:
        fn = ORDERING_OPS[self.op]
        key = 0
        for c, (left, right) in enumerate(zip(row[self.column], self.per_channel, strict=True)):
            if fn(left, right):
                key |= 1 << c
        return key

    def scaled_key_fn(self, stride: int) -> Callable[[dict[str, Any]], int]:
        # Per-channel tuples repeat across customers (consent patterns, small counts): cache.
        fn, column = ORDERING_OPS[self.op], self.column
        scaled = tuple((right, stride << c) for c, right in enumerate(self.per_channel))
        cache: dict[tuple[Any, ...], int] = {}

        def key(row: dict[str, Any]) -> int:
            values = row[column]
            found = cache.get(values)
            if found is None:
                found = sum(
                    bit
                    for left, (right, bit) in zip(values, scaled, strict=True)
                    if fn(left, right)
                )
                if len(cache) < 4096:
                    cache[values] = found
            return found

        return key

    def table(self) -> np.ndarray:
        keys = np.arange(self.n_keys)[:, None]
        ch = self.channel_index[None, :].astype(np.int64)
        bit = (keys >> np.maximum(ch, 0)) & 1
        return (bit == 1) & (ch >= 0)

    def holds(self, row: dict[str, Any], action_id: int) -> bool:
        c = int(self.channel_index[action_id])
        if c < 0:
            return False
        return bool(compare(self.op, row[self.column][c], self.per_channel[c]))


@dataclass(eq=False)
class CrossCondition(Condition):
    """``action.<numeric attribute> <op> customer.<scalar column>`` (either side first).

    The outcome over all actions depends only on where the customer's value falls among the
    sorted distinct attribute values ``u``: key ``2p + eq`` where ``p`` is the insertion point
    and ``eq`` whether the value equals ``u[p]`` (``2 len(u) + 1`` keys).
    """

    text: str
    values: Sequence[Any]
    column: str
    op: str
    action_first: bool
    n_keys: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        distinct = sorted({float(v) for v in self.values if v is not None})
        self._u = distinct
        self._u_arr = np.asarray(distinct, np.float64)
        self.n_keys = 2 * len(distinct) + 1
        pos = {v: i for i, v in enumerate(distinct)}
        self._j = np.array([-1 if v is None else pos[float(v)] for v in self.values], np.int64)

    def keys(self, batch: ContextBatch) -> np.ndarray:
        x = batch[self.column].astype(np.float64)
        p = np.searchsorted(self._u_arr, x, side="left")
        eq = np.zeros(x.shape, bool)
        inside = p < len(self._u)
        eq[inside] = self._u_arr[p[inside]] == x[inside]
        return 2 * p + eq

    def key_of(self, row: dict[str, Any]) -> int:
        x = float(row[self.column])
        p = bisect.bisect_left(self._u, x)
        eq = p < len(self._u) and self._u[p] == x
        return 2 * p + int(eq)

    def table(self) -> np.ndarray:
        keys = np.arange(self.n_keys)
        position = keys // 2 - np.where(keys % 2 == 1, 0.0, 0.5)
        j = self._j.astype(np.float64)
        fn = ORDERING_OPS[self.op]
        if self.action_first:
            out = fn(j[None, :], position[:, None])
        else:
            out = fn(position[:, None], j[None, :])
        return np.asarray(out, bool) & (self._j >= 0)[None, :]

    def holds(self, row: dict[str, Any], action_id: int) -> bool:
        v = self.values[action_id]
        if v is None:
            return False
        x = row[self.column]
        fn = ORDERING_OPS[self.op]
        return bool(fn(v, x) if self.action_first else fn(x, v))


@dataclass(eq=False)
class ContactHourCondition(Condition):
    """``contact.hour in_window [start, end]``: the local hour a contact would land in.

    An immediate action lands at the customer's current local hour; a scheduled slot at any
    hour of its window (the condition holds if it holds for any of them). Key: local hour.
    """

    text: str
    op: str
    window: tuple[int, int]
    slot_hours: Sequence[tuple[int, ...] | None]
    """Per action: the slot's hours, ``()`` for immediate, ``None`` for no contact."""
    n_keys: int = 24

    def keys(self, batch: ContextBatch) -> np.ndarray:
        return batch["local_hour"].astype(np.int64)

    def key_of(self, row: dict[str, Any]) -> int:
        return int(row["local_hour"])

    def scaled_key_fn(self, stride: int) -> Callable[[dict[str, Any]], int]:
        return lambda row: stride * row["local_hour"]

    def _holds_at(self, local_hour: int, hours: tuple[int, ...] | None) -> bool:
        if hours is None:
            return False
        candidates = hours or (local_hour,)
        want_inside = self.op == "in_window"
        return any(in_hour_window(h, self.window) == want_inside for h in candidates)

    def table(self) -> np.ndarray:
        return np.array(
            [[self._holds_at(h, hours) for hours in self.slot_hours] for h in range(24)], bool
        )

    def holds(self, row: dict[str, Any], action_id: int) -> bool:
        return self._holds_at(int(row["local_hour"]), self.slot_hours[action_id])
