"""Rows packed into one statement parameter come back from SQLite exactly as given, in
either encoding (JSON for few rows, fixed-width records for many)."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from nextbest import packed_rows
from nextbest.packed_rows import PackedRows, int_field, real_field, text_field


@pytest.fixture(autouse=True, params=["json", "records"])
def encoding(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs in both encodings, whatever its number of rows."""
    monkeypatch.setattr(packed_rows, "JSON_ROWS", 10**9 if request.param == "json" else -1)
    return str(request.param)


def read_back(rows: PackedRows, *names: str) -> list[tuple]:
    conn = sqlite3.connect(":memory:")
    select = ", ".join("{" + name + "}" for name in names)
    return conn.execute(rows.sql(f"SELECT {select} FROM packed"), (rows.param,)).fetchall()


def test_integers_round_trip_across_int64_in_order() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            [0, 1, -1, 9_999, 10_000, -10_001, 2**63 - 1, -(2**63)],
            rng.integers(-(2**63), 2**63 - 1, 2_000, dtype=np.int64),
            rng.integers(0, 100, 500),
        ]
    ).astype(np.int64)
    rows = PackedRows.of(value=int_field(values))

    assert [v for (v,) in read_back(rows, "value")] == values.tolist()
    assert len(rows) == len(values)


def test_the_encoding_follows_the_number_of_rows(encoding: str) -> None:
    rows = PackedRows.of(n=int_field(np.arange(3)))
    assert isinstance(rows.param, str if encoding == "json" else bytes)


def test_non_negative_integers_take_no_sign_place() -> None:
    assert int_field(np.array([0, 7, 42])).records()[0].shape == (3, 2)
    assert int_field(np.array([0, -7, 42])).records()[0].shape == (3, 3)


def test_integer_nulls() -> None:
    values = np.array([5, 0, -3, 12])
    rows = PackedRows.of(value=int_field(values, null=np.array([False, True, False, True])))

    assert read_back(rows, "value") == [(5,), (None,), (-3,), (None,)]


def test_texts_round_trip_with_nulls_unicode_and_empty() -> None:
    texts = ["a", None, "中文 x", "", "trailing space ", "z" * 300, None]
    rows = PackedRows.of(text=text_field(texts))

    assert [t for (t,) in read_back(rows, "text")] == texts


@pytest.mark.parametrize(
    "texts",
    [["ab", "cd", "ef"], [None, None], ["", ""], ["é", "e"], ["éa", "ab", "bc"], ["ab", "c", "de"]],
    ids=["same-length", "all-null", "all-empty", "unicode-bytes", "unicode-first", "lengths"],
)
def test_text_shapes(texts: list[str | None]) -> None:
    rows = PackedRows.of(text=text_field(texts), n=int_field(np.arange(len(texts))))

    assert read_back(rows, "text", "n") == [(t, i) for i, t in enumerate(texts)]


def test_reals_round_trip_bit_for_bit_and_nan_and_infinities_are_null() -> None:
    """SQLite 3.40's CAST(text AS REAL) is not correctly rounded (0.839396101051679 came
    back as 0.8393961010516791): every finite double must survive, whatever its bits."""
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**63, 50_000, dtype=np.int64).view(np.float64)
    values = np.concatenate(
        [
            [1.0, 0.1, 1 / 3, 5e-324, -0.0, 1e16, 2.5e-10, 0.1 / 361, 0.839396101051679],
            rng.random(20_000),
            bits[np.isfinite(bits)],
            -bits[np.isfinite(bits)][:1_000],
        ]
    )
    rows = PackedRows.of(value=real_field(values))
    back = np.array([v for (v,) in read_back(rows, "value")])
    assert back.tobytes() == values.tobytes()

    # few distinct values, repeated in any order (an epsilon-greedy batch's propensities)
    repeated = np.concatenate([values[:9], -values[:9], rng.random(40)])[rng.integers(0, 58, 5_000)]
    back = np.array([v for (v,) in read_back(PackedRows.of(value=real_field(repeated)), "value")])
    assert back.tobytes() == repeated.tobytes()

    odd = PackedRows.of(value=real_field(np.array([0.5, np.nan, np.inf, -np.inf, 0.25])))
    assert read_back(odd, "value") == [(0.5,), (None,), (None,), (None,), (0.25,)]


def test_columns_of_a_row_stay_together() -> None:
    n = 1_000
    rng = np.random.default_rng(2)
    ids = [f"id{i:05d}" for i in range(n)]
    labels = [None if i % 7 == 0 else "x" * (i % 13) for i in range(n)]
    numbers = rng.integers(-(10**12), 10**12, n)
    reals = rng.random(n)
    rows = PackedRows.of(
        id=text_field(ids),
        number=int_field(numbers),
        label=text_field(labels),
        real=real_field(reals),
    )

    assert read_back(rows, "id", "number", "label", "real") == list(
        zip(ids, numbers.tolist(), labels, reals.tolist(), strict=True)
    )


def test_an_empty_batch_has_no_rows() -> None:
    rows = PackedRows.of(n=int_field(np.zeros(0, np.int64)), t=text_field([]), r=real_field([]))

    assert len(rows) == 0
    assert read_back(rows, "n", "t", "r") == []


def test_columns_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        PackedRows.of(a=int_field([1, 2]), b=text_field(["x"]))
    with pytest.raises(ValueError, match="no columns"):
        PackedRows.of()


def test_a_nul_character_or_an_integer_past_int64_is_refused() -> None:
    with pytest.raises(ValueError, match="row 1 holds a NUL"):
        text_field(["ok", "bad\x00text", None])
    with pytest.raises(ValueError, match="does not fit"):
        int_field(np.array([1, 2**63], np.uint64))


def test_columns_read_the_packed_rows_beside_a_table_with_the_same_column_names() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (value TEXT, o INTEGER, id INTEGER)")
    conn.execute("INSERT INTO t VALUES ('theirs', 99, 1)")
    rows = PackedRows.of(id=int_field([1]), label=text_field(["mine"]))
    got = conn.execute(
        rows.sql("SELECT {label}, t.value FROM packed JOIN t ON t.id = {id}"), (rows.param,)
    ).fetchall()
    assert got == [("mine", "theirs")]
