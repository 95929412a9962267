"""Rows handed to SQLite as one BLOB of fixed-width records, read back in SQL.

A batch of rows goes into SQLite in one statement, so that SQLite works through it without
the GIL (``executemany`` takes the GIL back for every row). The rows used to travel as a
JSON array of arrays read with ``json_each``; SQLite 3.40 re-parses a row's JSON text for
every field it extracts (``value ->> i``), which cost ~18 ms for 10,000 rows of six fields.
Here every row is a fixed-width record of ASCII digits and UTF-8 bytes, numbered by a
recursive CTE and cut with ``substr`` (byte offsets on a BLOB, so each field is found in
constant time): ~7 ms for the same rows, built with numpy rather than one Python object
per value.

Usage::

    rows = PackedRows.of(contact_id=text_field(ids), customer=int_field(keys))
    conn.execute(rows.sql("INSERT INTO t (a, b) SELECT {contact_id}, {customer} FROM packed"),
                 (rows.blob,))

The BLOB is always parameter ``?1``; the CTE is called ``packed`` and each of its rows
carries the 1-based offset ``o`` of its record. Rows come out in the order given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic_core import to_json

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
    """One column of a packed batch: its bytes and how SQL reads it back.

    Attributes
    ----------
    data : uint8 ``(n, width)``
        The field's bytes in every record.
    sql : str
        An SQL expression of the field at record offset ``o`` and field offset ``{at}``
        (filled in by :class:`PackedRows`).
    """

    data: np.ndarray
    sql: str


def int_field(values: np.ndarray | Sequence[int], null: np.ndarray | None = None) -> PackedField:
    """An integer column: zero-padded decimal digits, with a sign place when any value is
    negative; ``null`` (bool ``(n,)``) marks NULLs (stored as spaces).

    Parameters
    ----------
    values : int64 ``(n,)``
    null : bool ``(n,)``, optional
    """
    x = np.asarray(values, np.int64)
    negative = x < 0
    # magnitude as uint64: -x overflows for int64's least value, -(x + 1) + 1 does not
    magnitude = np.where(negative, (-(x + 1)).astype(np.uint64) + 1, x.astype(np.uint64))
    largest = int(magnitude.max()) if len(x) else 0
    data = _decimal(magnitude, len(str(largest)))
    if negative.any():
        sign = np.where(negative, ord("-"), _ZERO).astype(np.uint8)
        data = np.hstack([sign[:, None], data])
    width = data.shape[1]
    if null is not None and np.any(null):
        data[np.asarray(null, bool)] = ord(" ")
        blank = "x'" + "20" * width + "'"
        sql = f"CAST(nullif(substr(?1, o + {{at}}, {width}), {blank}) AS INTEGER)"
        return PackedField(data, sql)
    return PackedField(data, f"CAST(substr(?1, o + {{at}}, {width}) AS INTEGER)")


def text_field(values: Sequence[str | None]) -> PackedField:
    """A text column (UTF-8, NULL for None; a text must not end in a NUL character, which
    numpy's byte strings drop). Texts of one length are stored as they are; otherwise each
    record holds the text's byte length (an :func:`int_field`) before the text, padded to
    the longest.

    Parameters
    ----------
    values : sequence of str or None ``(n,)``
    """
    texts = list(values)
    null = None
    if None in texts:
        null = np.fromiter((v is None for v in texts), bool, len(texts))
        if null.all():
            return _bytes_field(np.zeros(len(texts), "S1"), null, "TEXT")
        texts = ["" if v is None else v for v in texts]
    try:
        data = np.array(texts, dtype="S")  # ASCII, the common case: no Python loop
    except UnicodeEncodeError:
        data = np.array([v.encode() for v in texts], dtype="S")
    return _bytes_field(data, null, "TEXT")


def real_field(values: np.ndarray | Sequence[float]) -> PackedField:
    """A float column: each value's shortest round-trip decimal (as JSON writes it), read
    back by SQLite's text-to-real conversion, as JSON numbers are; NaN is stored as NULL.

    Parameters
    ----------
    values : float64 ``(n,)``
    """
    x = np.asarray(values, np.float64)
    if not len(x):
        return _bytes_field(np.zeros(0, "S1"), None, "REAL")
    decimals = to_json(x.tolist(), inf_nan_mode="null")[1:-1].split(b",")
    nan = np.isnan(x)
    return _bytes_field(np.array(decimals, dtype="S"), nan if nan.any() else None, "REAL")


def _bytes_field(data: np.ndarray, null: np.ndarray | None, affinity: str) -> PackedField:
    """A column of byte strings ``data`` (``S`` dtype, ``(n,)``), read back as ``affinity``
    (``TEXT`` or ``REAL``); ``null`` (bool ``(n,)``) marks NULLs."""
    width = data.dtype.itemsize
    block = data.view(np.uint8).reshape(len(data), width)
    lengths = np.strings.str_len(data)
    if null is None and (lengths == width).all():
        return PackedField(block, f"CAST(substr(?1, o + {{at}}, {width}) AS {affinity})")
    length = int_field(lengths, null)  # NULL for None: substr(..., NULL) is NULL
    skip = length.data.shape[1]
    sql = f"CAST(substr(?1, o + {{at}} + {skip}, {length.sql}) AS {affinity})"
    return PackedField(np.hstack([length.data, block]), sql)


@dataclass(frozen=True)
class PackedRows:
    """A batch of rows as one BLOB of fixed-width records (:attr:`blob`, bound as ``?1``)
    and an SQL expression per column (:attr:`columns`).

    Attributes
    ----------
    blob : bytes
        ``n`` records of :attr:`width` bytes.
    width : int
    columns : dict of str to str
        Each column's SQL expression over the CTE ``packed``.
    """

    blob: bytes
    width: int
    columns: dict[str, str]

    @classmethod
    def of(cls, **fields: PackedField) -> PackedRows:
        """Pack columns of equal length (keyword order is record order)."""
        if not fields:
            raise ValueError("nothing to pack: no columns")
        lengths = {name: len(f.data) for name, f in fields.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"packed columns of different lengths: {lengths}")
        columns: dict[str, str] = {}
        at = 0
        for name, f in fields.items():
            columns[name] = f.sql.replace("{at}", str(at))
            at += f.data.shape[1]
        data = np.hstack([f.data for f in fields.values()])
        return cls(np.ascontiguousarray(data, np.uint8).tobytes(), at, columns)

    def __len__(self) -> int:
        return len(self.blob) // self.width

    def sql(self, statement: str) -> str:
        """``statement`` with each ``{column}`` replaced by its expression, after the CTE
        ``packed(o)`` that numbers the records (one row per record, in order)."""
        w = self.width
        cte = (
            f"WITH RECURSIVE packed(o) AS (SELECT 1 WHERE length(?1) >= {w} "
            f"UNION ALL SELECT o + {w} FROM packed WHERE o + {2 * w - 1} <= length(?1)) "
        )
        return cte + statement.format(**self.columns)
