"""Rows handed to SQLite in one statement parameter, read back in SQL as a CTE ``packed``.

A batch of rows goes into SQLite in one statement, so that SQLite works through it without
the GIL (``executemany`` takes the GIL back for every row). Two encodings, one interface:

* **Few rows** (up to :data:`JSON_ROWS`): a JSON array of arrays, read with ``json_each``.
  Built in microseconds, but SQLite 3.40 re-parses a row's JSON text for every field it
  extracts (``value ->> i``): ~18 ms for 10,000 rows of six fields.
* **Many rows**: one BLOB of fixed-width records of ASCII digits and UTF-8 bytes, numbered
  by a recursive CTE and cut with ``substr`` (byte offsets on a BLOB, so each field is found
  in constant time): ~7 ms for the same rows, built with numpy rather than one Python
  object per value. Building costs ~90 us whatever the size, so it does not pay for a
  single decision's row (~3 us as JSON).

Usage::

    rows = PackedRows.of(contact_id=text_field(ids), customer=int_field(keys))
    conn.execute(rows.sql("INSERT INTO t (a, b) SELECT {contact_id}, {customer} FROM packed"),
                 (rows.param,))

The rows are always parameter ``?1``; each ``{column}`` is an SQL expression over the CTE
``packed`` (its columns qualified, so a joined table's own ``value`` or ``o`` cannot shadow
them). Rows come out in the order given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic_core import to_json

JSON_ROWS = 64
"""Batches of this many rows or fewer travel as JSON (cheaper to build than to parse)."""
_ZERO = ord("0")
_FOUR_DIGITS = np.array([list(b"%04d" % i) for i in range(10_000)], np.uint8).view(np.uint32)[:, 0]
"""The ASCII bytes of "0000" ... "9999", four to an element."""


def _decimal(magnitude: np.ndarray, width: int) -> np.ndarray:
    """The last ``width`` decimal digits of ``magnitude`` (uint64 ``(n,)``) as ASCII,
    uint8 ``(n, width)``: four digits per table lookup (a division by a constant is
    vectorised; one by an array of place values is not)."""
    chunks = -(-width // 4)
    parts = []
    for _ in range(chunks):
        quotient = magnitude // 10_000
        parts.append(np.take(_FOUR_DIGITS, (magnitude - quotient * 10_000).astype(np.intp)))
        magnitude = quotient
    block = np.stack(parts[::-1], axis=1).view(np.uint8)
    return block[:, chunks * 4 - width :]


@dataclass(frozen=True)
class PackedField:
    """One column of a batch: its values and how each encoding carries them.

    Attributes
    ----------
    kind : {"int", "text", "real"}
    values : int64 or float64 ``(n,)``, or a list of str or None
    null : bool ``(n,)`` or None
        NULL rows of an integer column (texts and reals mark theirs as None and NaN).
    """

    kind: Literal["int", "text", "real"]
    values: Any
    null: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.values)

    def json_values(self) -> list[Any]:
        """The values for a JSON row (None for NULL; NaN is written as null)."""
        if self.kind == "text":
            return list(self.values)
        values: list[Any] = self.values.tolist()
        if self.null is not None and self.null.any():
            for i in np.flatnonzero(self.null).tolist():
                values[i] = None
        return values

    def records(self) -> tuple[np.ndarray, str]:
        """The column as fixed-width bytes, uint8 ``(n, width)``, and an SQL expression of
        it at record offset ``packed.o`` and field offset ``{at}``."""
        if self.kind == "int":
            return _int_records(self.values, self.null)
        if self.kind == "text":
            return _text_records(self.values)
        return _real_records(self.values)


def int_field(values: np.ndarray | Sequence[int], null: np.ndarray | None = None) -> PackedField:
    """An integer column; ``null`` (bool ``(n,)``) marks NULLs.

    Parameters
    ----------
    values : int64 ``(n,)``
    null : bool ``(n,)``, optional
    """
    given = np.asarray(values)
    if given.dtype.kind == "u" and given.size and given.max() > np.iinfo(np.int64).max:
        raise ValueError(f"integer column: {given.max()} does not fit in 64 signed bits")
    x = given.astype(np.int64).reshape(-1)
    return PackedField("int", x, None if null is None else np.asarray(null, bool).reshape(-1))


def text_field(values: Sequence[str | None]) -> PackedField:
    """A text column (UTF-8, NULL for None).

    Parameters
    ----------
    values : sequence of str or None ``(n,)``

    Raises
    ------
    ValueError
        If a text holds a NUL character: SQLite's JSON reader ends the text there, numpy's
        byte strings drop it at the end, so neither encoding could carry it.
    """
    texts = values if isinstance(values, list) else list(values)
    present = texts if None not in texts else [t for t in texts if t is not None]
    if "\x00" in "".join(present):  # type: ignore[arg-type]
        row = next(i for i, t in enumerate(texts) if t is not None and "\x00" in t)
        raise ValueError(f"text column: row {row} holds a NUL character")
    return PackedField("text", texts)


def real_field(values: np.ndarray | Sequence[float]) -> PackedField:
    """A float column, NULL for NaN and infinities; read back bit for bit in either
    encoding (the shortest round-trip decimal that JSON writes, parsed by SQLite's JSON
    number parser).

    Parameters
    ----------
    values : float64 ``(n,)``
    """
    return PackedField("real", np.asarray(values, np.float64).reshape(-1))


def _int_records(x: np.ndarray, null: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Zero-padded decimal digits, with a sign place when any value is negative; NULL as
    spaces."""
    negative = x < 0
    # magnitude as uint64: -x overflows for int64's least value, -(x + 1) + 1 does not
    magnitude = np.where(negative, (-(x + 1)).astype(np.uint64) + 1, x.astype(np.uint64))
    largest = int(magnitude.max()) if len(x) else 0
    data = _decimal(magnitude, len(str(largest)))
    if negative.any():
        sign = np.where(negative, ord("-"), _ZERO).astype(np.uint8)
        data = np.hstack([sign[:, None], data])
    width = data.shape[1]
    if null is not None and null.any():
        data[null] = ord(" ")
        blank = "x'" + "20" * width + "'"
        return data, f"CAST(nullif(substr(?1, packed.o + {{at}}, {width}), {blank}) AS INTEGER)"
    return data, f"CAST(substr(?1, packed.o + {{at}}, {width}) AS INTEGER)"


def _text_records(texts: list[str | None]) -> tuple[np.ndarray, str]:
    """Texts of one length as they are; otherwise each text's byte length (an integer
    field) before the text, padded to the longest."""
    null = None
    if None in texts:
        null = np.fromiter((v is None for v in texts), bool, len(texts))
        if null.all():
            return _bytes_records(np.zeros(len(texts), "S1"), null)
        texts = ["" if v is None else v for v in texts]
    if null is None and texts and set(map(len, texts)) == {len(texts[0])} and texts[0]:
        # ids and keys: one length; ASCII when the bytes are as many as the characters
        joined = "".join(texts).encode()
        if len(joined) == len(texts[0]) * len(texts):
            return _bytes_records(np.frombuffer(joined, f"S{len(texts[0])}"), None)
    try:
        data = np.array(texts, dtype="S")  # ASCII, the common case: no Python loop
    except UnicodeEncodeError:
        data = np.array([v.encode() for v in texts], dtype="S")  # type: ignore[union-attr]
    return _bytes_records(data, null)


def _real_records(x: np.ndarray) -> tuple[np.ndarray, str]:
    """Each value's shortest round-trip decimal as JSON writes it (``null`` for NaN and
    infinities, as in the JSON encoding), read back by SQLite's JSON number parser: its
    ``CAST(text AS REAL)`` is not correctly rounded (3.40 turns 0.839396101051679 into
    0.8393961010516791), its JSON parser is. Each distinct value (bit pattern) is written
    once: an epsilon-greedy batch's propensities take a few hundred values."""
    if not len(x):
        return _bytes_records(np.zeros(0, "S1"), None)
    bits, row_of = np.unique(x.view(np.int64), return_inverse=True)
    decimals = to_json(bits.view(np.float64).tolist(), inf_nan_mode="null")[1:-1].split(b",")
    data, text_sql = _bytes_records(np.array(decimals, dtype="S")[row_of], None)
    return data, f"({text_sql} ->> '$')"


def _bytes_records(data: np.ndarray, null: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Byte strings ``data`` (``S`` dtype, ``(n,)``) read back as text; ``null`` (bool
    ``(n,)``) marks NULLs."""
    width = data.dtype.itemsize
    block = data.view(np.uint8).reshape(len(data), width)
    lengths = np.strings.str_len(data)
    if null is None and (lengths == width).all():
        return block, f"CAST(substr(?1, packed.o + {{at}}, {width}) AS TEXT)"
    length, length_sql = _int_records(lengths, null)  # NULL for None: substr(.., NULL) is NULL
    skip = length.shape[1]
    sql = f"CAST(substr(?1, packed.o + {{at}} + {skip}, {length_sql}) AS TEXT)"
    return np.hstack([length, block]), sql


@dataclass(frozen=True)
class PackedRows:
    """A batch of rows as one statement parameter (:attr:`param`, bound as ``?1``) and an
    SQL expression per column (:attr:`columns`) over the CTE ``packed``.

    Attributes
    ----------
    param : str or bytes
        JSON text (at most :data:`JSON_ROWS` rows) or fixed-width records.
    columns : dict of str to str
    n : int
        Rows.
    """

    param: str | bytes
    columns: dict[str, str]
    n: int
    _cte: str

    @classmethod
    def of(cls, **fields: PackedField) -> PackedRows:
        """Pack columns of equal length (keyword order is column order)."""
        if not fields:
            raise ValueError("nothing to pack: no columns")
        lengths = {name: len(f) for name, f in fields.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"packed columns of different lengths: {lengths}")
        n = next(iter(lengths.values()))
        if n <= JSON_ROWS:
            rows = list(zip(*(f.json_values() for f in fields.values()), strict=True))
            text = to_json(rows, inf_nan_mode="null").decode()  # TEXT: 3.45 reads BLOBs as JSONB
            columns = {name: f"packed.value ->> {i}" for i, name in enumerate(fields)}
            return cls(text, columns, n, "WITH packed(value) AS (SELECT value FROM json_each(?1)) ")
        blocks, columns, at = [], {}, 0
        for name, f in fields.items():
            block, sql = f.records()
            blocks.append(block)
            columns[name] = sql.replace("{at}", str(at))
            at += block.shape[1]
        data = np.ascontiguousarray(np.hstack(blocks), np.uint8).tobytes()
        cte = (
            f"WITH RECURSIVE packed(o) AS (SELECT 1 WHERE length(?1) >= {at} "
            f"UNION ALL SELECT o + {at} FROM packed WHERE o + {2 * at - 1} <= length(?1)) "
        )
        return cls(data, columns, n, cte)

    def __len__(self) -> int:
        return self.n

    def sql(self, statement: str, **given: str) -> str:
        """``statement`` with each ``{column}`` replaced by its expression, after the CTE
        ``packed`` (one row per packed row, in order); ``given``: expressions of further
        placeholders (a parameter for a value the same in every row, say)."""
        return self._cte + statement.format(**self.columns, **given)
