"""The logged-decision schema: round trip, and a table of bad logs refused with reasons."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nextbest.decision_log import (
    DecisionLogError,
    decisions_table,
    read_decisions,
    validate_decisions,
    write_decisions,
)

N_ACTIONS = 4


def good_columns(n: int = 6) -> dict[str, list]:
    return {
        "decision_id": [f"d{i}" for i in range(n)],
        "timestamp": [dt.datetime(2026, 11, 1, 9, tzinfo=dt.UTC)] * n,
        "customer_key": [f"cust_{i:024x}" for i in range(n)],
        "context": [[0.5, -1.0, 2.0]] * n,
        "candidate_actions": [[0, 1, 3]] * n,
        "action": [1, 3, 0, 1, 3, 0][:n],
        "pscore": [0.5, 0.25, 0.25, 0.5, 0.25, 0.25][:n],
        "action_dist": [[0.25, 0.5, 0.25]] * n,
        "reward": [1.0, None, 0.0, 2.5, None, 0.0][:n],
        "policy": ["playbook"] * n,
        "model_version": ["playbook-1"] * n,
        "ruleset_version": ["r1"] * n,
        "catalog_version": ["c1"] * n,
        "feature_spec_version": ["f1"] * n,
    }


def test_write_read_decisions_round_trip(tmp_path: Path) -> None:
    table = decisions_table(good_columns())
    write_decisions(table, tmp_path / "log")
    write_decisions(
        decisions_table({**good_columns(), "decision_id": list("abcdef")}), tmp_path / "log"
    )
    back = read_decisions(tmp_path / "log", n_actions=N_ACTIONS, n_features=3)
    assert back.num_rows == 12
    assert sorted(back.column("decision_id").to_pylist())[:2] == ["a", "b"]
    assert back.schema.field("pscore").type == pa.float64()


def test_read_decisions_without_pscore_is_allowed(tmp_path: Path) -> None:
    cols = good_columns()
    cols["pscore"] = [None] * 6
    cols["action_dist"] = [None] * 6
    path = write_decisions(decisions_table(cols), tmp_path / "nops.parquet")
    assert read_decisions(path).column("pscore").null_count == 6


BAD_LOGS = [
    ({"pscore": [0.0, 0.25, 0.25, 0.5, 0.25, 0.25]}, "pscore", r"must be in \(0, 1\]"),
    ({"pscore": [1.5, 0.25, 0.25, 0.5, 0.25, 0.25]}, "pscore", r"must be in \(0, 1\]"),
    ({"action": [7, 3, 0, 1, 3, 0]}, "action", "outside the catalogue"),
    ({"action": [2, 3, 0, 1, 3, 0]}, "action", "not among the row's candidate_actions"),
    ({"decision_id": ["d0", "d0", "d2", "d3", "d4", "d5"]}, "decision_id", "duplicate"),
    ({"context": [[0.5]] + [[0.5, -1.0, 2.0]] * 5}, "context", "expected 3"),
    ({"action_dist": [[0.5, 0.5, 0.5]] * 6}, "action_dist", "sum to 1"),
    ({"action_dist": [[-0.5, 1.0, 0.5]] * 6}, "action_dist", "non-negative"),
    ({"action_dist": [[0.5, 0.5]] * 6}, "action_dist", "candidate_actions has 3"),
    ({"pscore": [0.4, 0.25, 0.25, 0.5, 0.25, 0.25]}, "pscore", "differs from the action_dist"),
    # a tenfold importance weight, below any absolute tolerance
    (
        {
            "pscore": [1e-5, 0.25, 0.25, 0.5, 0.25, 0.25],
            "action_dist": [[0.9999, 1e-4, 0.0]] + [[0.25, 0.5, 0.25]] * 5,
        },
        "pscore",
        "differs from the action_dist",
    ),
    # NaN is a bad propensity, not a missing one (a missing one is an empty cell, null)
    ({"pscore": [float("nan")] * 6, "action_dist": [None] * 6}, "pscore", "got nan"),
    ({"candidate_actions": [[]] + [[0, 1, 3]] * 5}, "candidate_actions", "must not be empty"),
    # one bad value would otherwise reach the trainers silently (a NaN weight poisons a model)
    ({"pscore": [0.5, None, 0.25, 0.5, 0.25, 0.25]}, "pscore", "missing on this row"),
    ({"action_dist": [[0.25, float("nan"), 0.25]] * 6}, "action_dist", "sum to 1"),
    ({"reward": [1.0, None, float("nan"), 2.5, None, 0.0]}, "reward", "must be finite"),
    ({"reward": [1.0, None, float("inf"), 2.5, None, 0.0]}, "reward", "must be finite"),
    (
        {"context": [[0.5, -1.0, 2.0]] * 4 + [[0.5, float("inf"), 2.0]] + [[0.5, -1.0, 2.0]]},
        "context",
        "feature 1 is inf",
    ),
    ({"context": [[float("nan"), -1.0, 2.0]] * 6}, "context", "feature 0 is nan"),
    (
        {"candidate_actions": [[0, 1, 3]] * 3 + [[3, 1, 3]] + [[0, 1, 3]] * 2},
        "candidate_actions",
        "lists action 3 twice",
    ),
]


def test_validate_decisions_pscore_agrees_within_float32_rounding() -> None:
    """A distribution stored as float32 beside a float64 propensity agrees."""
    cols = good_columns()
    dist = np.array([0.1234567, 0.654321, 0.0], np.float64)
    dist[2] = 1.0 - dist[:2].sum()
    cols["action_dist"] = [dist.astype(np.float32).tolist()] * 6
    cols["action"] = [0] * 6
    cols["pscore"] = [float(dist[0])] * 6
    validate_decisions(decisions_table(cols), n_actions=N_ACTIONS, n_features=3)


@pytest.mark.parametrize(("override", "column", "reason"), BAD_LOGS)
def test_validate_decisions_bad_log_refused(override: dict, column: str, reason: str) -> None:
    table = decisions_table({**good_columns(), **override})
    with pytest.raises(DecisionLogError, match=reason) as info:
        validate_decisions(table, n_actions=N_ACTIONS, n_features=3)
    assert info.value.column == column


def test_candidates_in_any_order_without_repeats_are_accepted() -> None:
    table = decisions_table(
        {
            **good_columns(),
            "candidate_actions": [[3, 1, 0]] * 6,
            "action_dist": [[0.25, 0.5, 0.25]] * 6,
        }
    )
    assert validate_decisions(table, n_actions=N_ACTIONS, n_features=3).num_rows == 6


def test_decisions_table_columns_of_different_lengths_refused() -> None:
    cols = good_columns()
    cols["action"] = [1, 3]
    with pytest.raises(DecisionLogError, match="has 2 rows but decision_id has 6"):
        decisions_table(cols)


def test_read_decisions_missing_required_column_refused(tmp_path: Path) -> None:
    table = decisions_table(good_columns()).drop_columns(["action"])
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(DecisionLogError, match="required column is missing") as info:
        read_decisions(tmp_path / "bad.parquet")
    assert info.value.column == "action"
    assert str(tmp_path / "bad.parquet") in str(info.value)


def test_read_decisions_wrong_type_refused(tmp_path: Path) -> None:
    table = decisions_table(good_columns())
    table = table.set_column(table.schema.get_field_index("action"), "action", pa.array(["x"] * 6))
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(DecisionLogError, match="cannot be read as int32") as info:
        read_decisions(tmp_path / "bad.parquet")
    assert info.value.column == "action"


def test_read_decisions_naive_times_refused(tmp_path: Path) -> None:
    """A Parquet time without a time zone would be read as UTC: refused, like CSV's."""
    table = decisions_table(good_columns())
    at = table.schema.get_field_index("timestamp")
    naive = table.column("timestamp").cast(pa.timestamp("us"))
    pq.write_table(table.set_column(at, "timestamp", naive), tmp_path / "naive.parquet")
    with pytest.raises(DecisionLogError, match="UTC offset") as info:
        read_decisions(tmp_path / "naive.parquet")
    assert info.value.column == "timestamp"


def test_read_decisions_not_parquet_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DecisionLogError, match="not a readable Parquet file"):
        read_decisions(tmp_path / "junk.parquet")
    with pytest.raises(DecisionLogError, match="no such file"):
        read_decisions(tmp_path / "missing.parquet")
    (tmp_path / "journal.db").write_text("garbage")  # a damaged journal is not "Parquet"
    with pytest.raises(DecisionLogError, match=r"neither a service journal \(SQLite\) nor"):
        read_decisions(tmp_path / "journal.db")


def test_write_decisions_bad_table_leaves_existing_parts_intact(tmp_path: Path) -> None:
    first = write_decisions(decisions_table(good_columns()), tmp_path / "log")
    before = first.read_bytes()
    bad = decisions_table({**good_columns(), "pscore": [2.0] * 6})
    with pytest.raises(DecisionLogError):
        write_decisions(bad, tmp_path / "log")
    assert first.read_bytes() == before
    assert [p.name for p in (tmp_path / "log").iterdir()] == [first.name]


@pytest.mark.parametrize("column", ["action", "decision_id", "timestamp", "context"])
def test_read_decisions_null_in_required_column_names_file_column_and_row(
    tmp_path: Path, column: str
) -> None:
    """A null where the schema forbids one: the file, the column and the first row, not the
    whole-table cast's "cannot evaluate ... non-nullable"."""
    table = decisions_table(good_columns())
    values = table.column(column).to_pylist()
    values[4] = None
    field = pa.field(column, table.schema.field(column).type, nullable=True)
    table = table.set_column(
        table.schema.get_field_index(column), field, pa.array(values, type=field.type)
    )
    path = tmp_path / "nulls.parquet"
    pq.write_table(table, path)
    with pytest.raises(DecisionLogError, match="must not be null") as info:
        read_decisions(path, n_actions=N_ACTIONS)
    assert (info.value.source, info.value.column, info.value.row) == (str(path), column, 4)


def _renamed(table: pa.Table, old: str, new: str) -> pa.Table:
    return table.rename_columns([new if name == old else name for name in table.column_names])


@pytest.mark.parametrize(
    ("spelt", "meant"),
    [
        ("Pscore", "pscore"),
        ("PSCORE", "pscore"),
        (" pscore", "pscore"),
        ("pscore\t", "pscore"),
        ("action-dist", "action_dist"),
        ("Candidate-Actions", "candidate_actions"),
        ("actiondist", "action_dist"),
    ],
)
def test_read_decisions_misspelt_schema_column_refused(
    tmp_path: Path, spelt: str, meant: str
) -> None:
    """Left out as unknown, a misspelt ``pscore`` would read as a log without propensities."""
    table = _renamed(decisions_table(good_columns()), meant, spelt)
    path = tmp_path / "typo.parquet"
    pq.write_table(table, path)
    with pytest.raises(DecisionLogError) as info:
        read_decisions(path)
    assert info.value.column == spelt
    assert str(info.value) == (
        f"{path}: column {spelt!r}: not in the decision schema: did you mean {meant!r}?"
    )


def test_read_decisions_misspelt_copy_of_a_schema_column_refused(tmp_path: Path) -> None:
    table = decisions_table(good_columns())
    table = table.append_column("Pscore", table.column("pscore"))
    pq.write_table(table, tmp_path / "both.parquet")
    with pytest.raises(DecisionLogError, match="the file also has 'pscore': drop one"):
        read_decisions(tmp_path / "both.parquet")


def test_read_decisions_unknown_columns_read_with_one_warning_for_the_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unknown columns are left out, named once for the whole directory (a log of hundreds
    of parts would otherwise repeat the same warning for each)."""
    table = decisions_table(good_columns())
    write_decisions(table, tmp_path / "log")
    for name, extras in [("a", ["channel_name", "segment"]), ("b", ["segment"])]:
        extra = decisions_table({**good_columns(), "decision_id": [f"{name}{i}" for i in range(6)]})
        for column in extras:
            extra = extra.append_column(column, pa.array(["x"] * 6))
        pq.write_table(extra, tmp_path / "log" / f"part-extra-{name}.parquet")
    with caplog.at_level("WARNING", logger="nextbest.decision_log"):
        back = read_decisions(tmp_path / "log", n_actions=N_ACTIONS, n_features=3)
    assert back.num_rows == 18 and back.column_names == table.column_names
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert record.getMessage() == (
        f"{tmp_path / 'log'}: columns not in the decision schema, "
        "left out: 'channel_name', 'segment'"
    )
