"""The decision journal: round trip to the decision schema, rewards, group commit, several
writer processes on one file, and no acknowledged decision lost to SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from nextbest import decision_journal
from nextbest.catalog import ActionCatalog
from nextbest.compliance import RuleEngine
from nextbest.decision_batch import DecisionBatch, new_decision_ids
from nextbest.decision_journal import (
    JOURNAL_FILENAME,
    JournalCorruptError,
    JournalSchemaError,
    JournalWriter,
    journal_file,
    read_journal,
)
from nextbest.decision_log import (
    DECISION_SCHEMA,
    DecisionLogError,
    read_decisions,
    validate_decisions,
)
from nextbest.rewards import (
    RewardConflictError,
    RewardOutcome,
    RewardRule,
    RewardTimeError,
    UnknownDecisionError,
    reward_cny,
)
from nextbest.sqlite_writer import GroupCommitWriter, open_sqlite
from nextbest.timestamps import epoch_us, from_epoch_us
from simulators.scenario import Scenario

N_ACTIONS = 5
N_FEATURES = 3
T0 = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
COST = np.array([0.0, 0.05, 0.05, 40.0, 40.0])
RULE = RewardRule(300.0, COST, attribution_window=timedelta(days=7))
AT5 = T0 + timedelta(hours=5)
SERVED_BY = {
    "policy": "p",
    "model_version": "m",
    "ruleset_version": "r",
    "catalog_version": "c",
    "feature_spec_version": "f",
}


def make_batch(
    ids: list[str],
    seed: int = 0,
    at: datetime = T0,
    with_dist: bool = True,
    campaign: str | list[str | None] | None = "spring",
    model_version: str = "m1",
) -> DecisionBatch:
    """``len(ids)`` decisions with 1..N_ACTIONS candidates each, uniform over candidates."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    widths = rng.integers(1, N_ACTIONS + 1, n)
    offsets = np.concatenate([[0], np.cumsum(widths)])
    cands = np.concatenate([np.sort(rng.permutation(N_ACTIONS)[:w]) for w in widths])
    pick = rng.integers(0, widths)
    return DecisionBatch(
        decision_id=ids,
        timestamp_us=epoch_us(at),
        customer_key=[f"cust_{k:024x}" for k in rng.integers(0, 2**40, n)],
        context=rng.standard_normal((n, N_FEATURES)).astype(np.float32),
        candidate_offsets=offsets,
        candidate_actions=cands.astype(np.int32),
        action=cands[offsets[:-1] + pick].astype(np.int32),
        pscore=1.0 / widths if with_dist else None,
        action_dist=(1.0 / np.repeat(widths, widths)).astype(np.float32) if with_dist else None,
        campaign_id=campaign,
        policy="neural_bandit",
        model_version=model_version,
        ruleset_version="r1",
        catalog_version="c1",
        feature_spec_version="f1",
    )


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[JournalWriter]:
    writer = JournalWriter(tmp_path, RULE)
    yield writer
    writer.close()


def test_read_journal_round_trip_to_decision_schema(journal: JournalWriter) -> None:
    first = make_batch([f"a{i}" for i in range(40)], seed=1)
    second = make_batch(
        [f"b{i}" for i in range(7)], seed=2, with_dist=False, campaign=["x", None] * 3 + ["y"]
    )
    journal.submit(first).result()
    journal.submit(second).result()

    table = read_journal(journal.path)

    assert table.schema == DECISION_SCHEMA
    validate_decisions(table.slice(0, 40), n_actions=N_ACTIONS, n_features=N_FEATURES)
    # propensities on some rows only: read, but refused for training and evaluation
    with pytest.raises(DecisionLogError, match="row 40: is missing on this row"):
        validate_decisions(table, n_actions=N_ACTIONS, n_features=N_FEATURES)
    assert table.column("decision_id").to_pylist() == [*first.decision_id, *second.decision_id]
    ctx = np.stack(table.column("context").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(ctx[:40], first.context)
    got = table.slice(0, 40).column("candidate_actions").combine_chunks()
    np.testing.assert_array_equal(got.offsets.to_numpy(), first.candidate_offsets)
    np.testing.assert_array_equal(got.flatten().to_numpy(), first.candidate_actions)
    np.testing.assert_array_equal(table.column("action").to_numpy()[:40], first.action)
    np.testing.assert_allclose(table.column("pscore").to_numpy()[:40], first.pscore)
    assert table.column("action_dist").null_count == 7
    assert table.column("pscore").null_count == 7
    campaigns = ["spring", "spring", "x", None, "x", None, "x", None, "y"]
    assert table.column("campaign_id").to_pylist()[38:] == campaigns
    assert table.column("timestamp")[0].as_py() == T0
    assert table.column("reward").null_count == 47


@pytest.mark.parametrize("n", [7, 100], ids=["json", "records"])
def test_times_and_campaigns_per_row_or_per_batch_round_trip(
    journal: JournalWriter, n: int
) -> None:
    """A time or campaign the same for the whole batch travels as one statement
    parameter, per-row ones inside the packed rows: both read back row for row."""
    at = np.array([epoch_us(T0) + 1_000_000 * i for i in range(n)], np.int64)
    campaigns = [None if i % 3 else f"c{i % 5}" for i in range(n)]
    per_row = replace(
        make_batch([f"r{i}" for i in range(n)], seed=4), timestamp_us=at, campaign_id=campaigns
    )
    per_batch = make_batch([f"s{i}" for i in range(n)], seed=5, campaign=None)
    journal.submit(per_row).result()
    journal.submit(per_batch).result()

    table = read_journal(journal.path)
    stamps = table.column("timestamp").cast(pa.int64()).to_numpy()
    assert stamps[:n].tolist() == at.tolist()
    assert stamps[n:].tolist() == [epoch_us(T0)] * n
    assert table.column("campaign_id").to_pylist() == campaigns + [None] * n
    np.testing.assert_array_equal(table.column("pscore").to_numpy()[:n], per_row.pscore)


def test_journal_keeps_unsorted_candidates_with_their_probabilities(
    journal: JournalWriter,
) -> None:
    """Candidates are stored as a bitmap: a row given out of order comes back sorted, each
    probability still beside its action; a large catalogue (over 8 bits) round-trips."""
    batch = make_batch(["a", "b"], seed=3)
    shuffled = DecisionBatch(
        **{
            **batch.__dict__,
            "candidate_offsets": np.array([0, 3, 5]),
            "candidate_actions": np.array([4, 0, 2, 700, 9], np.int32),
            "action": np.array([0, 700], np.int32),
            "pscore": np.array([0.6, 0.75]),
            "action_dist": np.array([0.1, 0.6, 0.3, 0.75, 0.25], np.float32),
        }
    )
    journal.submit(shuffled).result()
    table = read_journal(journal.path)
    assert table.column("candidate_actions").to_pylist() == [[0, 2, 4], [9, 700]]
    np.testing.assert_allclose(
        np.concatenate(table.column("action_dist").to_pylist()), [0.6, 0.3, 0.1, 0.25, 0.75]
    )


def test_journal_refuses_a_row_listing_an_action_twice(journal: JournalWriter) -> None:
    batch = make_batch(["a", "b"], seed=3)
    twice = DecisionBatch(
        **{
            **batch.__dict__,
            "candidate_offsets": np.array([0, 1, 3]),
            "candidate_actions": np.array([1, 2, 2], np.int32),
            "action": np.array([1, 2], np.int32),
            "pscore": None,
            "action_dist": None,
        }
    )
    with pytest.raises(ValueError, match="row 1 lists candidate action 2 twice"):
        journal.submit(twice).result()
    journal.submit(make_batch(["c"])).result()  # the writer goes on
    assert read_journal(journal.path).column("decision_id").to_pylist() == ["c"]


def test_withdrawn_decisions_stay_in_the_file_and_out_of_every_reader(
    journal: JournalWriter,
) -> None:
    journal.submit(make_batch([f"w{i}" for i in range(5)], seed=3)).result()

    assert journal.withdraw(["w1", "w3"]).result() == 2
    assert journal.withdraw(["w3"]).result() == 0  # already withdrawn

    assert read_journal(journal.path).column("decision_id").to_pylist() == ["w0", "w2", "w4"]
    conn = sqlite3.connect(journal.path)
    try:
        (stored,) = conn.execute("SELECT count(*) FROM decisions").fetchone()
        view = [r[0] for r in conn.execute("SELECT decision_id FROM decision_log ORDER BY seq")]
    finally:
        conn.close()
    assert stored == 5  # the journal only grows
    assert view == ["w0", "w2", "w4"]


def test_a_reward_for_a_withdrawn_decision_is_refused(journal: JournalWriter) -> None:
    """A withdrawn decision was never served: its outcome has nothing to attach to."""
    journal.submit(make_batch(["kept", "gone"], seed=4)).result()
    journal.withdraw(["gone"]).result()
    with pytest.raises(UnknownDecisionError):
        journal.record_reward("gone", RewardOutcome(True, False, False, 100.0))
    assert journal.record_reward("kept", RewardOutcome(True, False, False, 100.0)).reward > 0


def test_a_journal_from_before_withdrawals_is_read_and_upgraded(tmp_path: Path) -> None:
    with JournalWriter(tmp_path, RULE) as writer:
        writer.submit(make_batch(["o0", "o1"], seed=4)).result()
    conn = sqlite3.connect(tmp_path / JOURNAL_FILENAME)
    conn.execute("DROP VIEW decision_log")
    conn.execute("DROP TABLE withdrawn")
    conn.execute("CREATE VIEW decision_log AS SELECT decision_id FROM decisions")
    conn.commit()
    conn.close()

    assert read_journal(tmp_path).column("decision_id").to_pylist() == ["o0", "o1"]
    with JournalWriter(tmp_path, RULE) as writer:  # the writer adds the table, mends the view
        writer.withdraw(["o0"]).result()
    assert read_journal(tmp_path).column("decision_id").to_pylist() == ["o1"]
    conn = sqlite3.connect(tmp_path / JOURNAL_FILENAME)
    assert [r[0] for r in conn.execute("SELECT decision_id FROM decision_log")] == ["o1"]
    conn.close()


def test_journal_of_another_layout_is_refused_by_name(tmp_path: Path) -> None:
    old = tmp_path / JOURNAL_FILENAME
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE journal_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO journal_meta VALUES ('schema', 'nextbest.decision-journal/1')")
    conn.commit()
    conn.close()
    before = old.read_bytes()
    with pytest.raises(JournalSchemaError, match=r"decision-journal/1.*new state directory"):
        JournalWriter(tmp_path, RULE)
    with pytest.raises(JournalSchemaError, match="decision-journal/1"):
        read_journal(tmp_path)
    assert old.read_bytes() == before  # nothing written to it


def test_journal_with_decisions_missing_from_their_chunk_is_reported(
    journal: JournalWriter,
) -> None:
    journal.submit(make_batch(["a", "b", "c"])).result()
    conn = sqlite3.connect(journal.path)
    conn.execute("DELETE FROM decisions WHERE decision_id = 'b'")
    conn.commit()
    conn.close()
    with pytest.raises(JournalCorruptError, match="2 decisions, 3 rows in 1 chunks"):
        read_journal(journal.path)


def test_journal_stores_a_decision_in_a_fraction_of_its_array_bytes(
    journal: JournalWriter,
) -> None:
    """A 10,000-decision batch of an exploring policy over a 361-action catalogue: the
    arrays are one compressed chunk, far smaller than the raw per-decision arrays."""
    rng = np.random.default_rng(5)
    n, a = 10_000, 361
    allowed = rng.random((n, a)) < 0.33
    allowed[:, 0] = True
    greedy = np.argmax(allowed * rng.random((n, a)), axis=1)
    dist = np.where(allowed, 0.1 / allowed.sum(axis=1, keepdims=True), 0.0)
    dist[np.arange(n), greedy] += 0.9
    batch = DecisionBatch.from_mask(
        allowed,
        dist,
        greedy,
        decision_id=new_decision_ids(n),
        timestamp_us=epoch_us(T0),
        customer_key=[f"cust_{i:024x}" for i in range(n)],
        context=rng.standard_normal((n, 4)).astype(np.float32),
        **SERVED_BY,
    )
    journal.submit(batch).result()
    conn = sqlite3.connect(journal.path)
    (stored,) = conn.execute(
        "SELECT length(context) + length(candidates) + length(action_dist) FROM decision_chunks"
    ).fetchone()
    conn.close()
    raw = batch.context.nbytes + 8 * allowed.sum()  # int32 action + float32 probability
    assert stored < raw / 4
    table = read_journal(journal.path)
    np.testing.assert_array_equal(
        table.column("candidate_actions").combine_chunks().flatten().to_numpy(),
        np.flatnonzero(allowed) % a,
    )
    np.testing.assert_array_equal(
        table.column("action_dist").combine_chunks().flatten().to_numpy(),
        dist[allowed].astype(np.float32),
    )
    np.testing.assert_array_equal(table.column("pscore").to_numpy(), dist[np.arange(n), greedy])


def test_read_journal_two_model_versions_keep_their_rows(journal: JournalWriter) -> None:
    journal.submit(make_batch(["a", "b"], model_version="m1")).result()
    journal.submit(make_batch(["c"], model_version="m2")).result()
    journal.submit(make_batch(["d"], model_version="m1")).result()

    assert read_journal(journal.path).column("model_version").to_pylist() == [
        "m1",
        "m1",
        "m2",
        "m1",
    ]


def test_submit_failed_batch_of_a_new_version_leaves_no_stale_version(
    journal: JournalWriter,
) -> None:
    journal.submit(make_batch(["a"], model_version="m1")).result()
    # the first batch of m2 rolls back (duplicate id): its versions row goes with it
    with pytest.raises(sqlite3.IntegrityError):
        journal.submit(make_batch(["a"], model_version="m2")).result()
    journal.submit(make_batch(["b"], model_version="m2")).result()
    journal.submit(make_batch(["c"], model_version="m2"), inline=True).result()
    journal.submit(make_batch(["d"], model_version="m1"), inline=True).result()

    table = read_journal(journal.path)
    assert table.column("decision_id").to_pylist() == ["a", "b", "c", "d"]
    assert table.column("model_version").to_pylist() == ["m1", "m2", "m2", "m1"]


def test_read_journal_empty_journal_has_the_schema(journal: JournalWriter) -> None:
    journal.flush()
    table = read_journal(journal.path)
    assert table.num_rows == 0
    assert table.schema == DECISION_SCHEMA


def test_decision_batch_from_table_round_trip(journal: JournalWriter) -> None:
    batch = make_batch([f"a{i}" for i in range(12)], seed=3)
    journal.submit(batch).result()
    table = read_journal(journal.path)
    again = DecisionBatch.from_table(table)
    np.testing.assert_array_equal(again.context, batch.context)
    np.testing.assert_array_equal(again.candidate_offsets, batch.candidate_offsets)
    np.testing.assert_array_equal(again.action_dist, batch.action_dist)
    assert again.model_version == "m1"


def test_read_decisions_and_load_logged_bandit_read_a_journal(journal: JournalWriter) -> None:
    from training.logged_data import load_logged_bandit

    batch = make_batch([f"a{i}" for i in range(30)], seed=4)
    journal.submit(batch).result()
    for i, decision_id in enumerate(batch.decision_id):
        journal.record_reward(
            decision_id, RewardOutcome(i % 3 == 0, False, False, 120.0 * (i % 3 == 0))
        )

    for where in (journal.path, journal.path.parent):
        table = read_decisions(where, n_actions=N_ACTIONS, n_features=N_FEATURES)
        assert table.num_rows == 30
    logged = load_logged_bandit(journal.path.parent, N_ACTIONS)
    assert logged.context.shape == (30, N_FEATURES)
    np.testing.assert_array_equal(logged.action, batch.action)
    expected = reward_cny(120.0 * (np.arange(30) % 3 == 0), COST[batch.action], False, 300.0)
    np.testing.assert_allclose(logged.reward, expected)
    assert logged.logging_dist is not None


def test_journal_read_in_many_blocks_trains_the_same(
    journal: JournalWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation and training read the journal's list columns chunk by chunk (one Arrow list
    array holds at most 2**31 values): many small blocks give the same arrays as one."""
    from training.logged_data import load_logged_bandit

    for part in range(4):
        batch = make_batch([f"{part}-{i}" for i in range(11)], seed=10 + part)
        journal.submit(batch).result()
        for i, decision_id in enumerate(batch.decision_id):
            journal.record_reward(decision_id, RewardOutcome(i % 2 == 0, False, False, 50.0))
    whole = load_logged_bandit(journal.path, N_ACTIONS)

    monkeypatch.setattr(decision_journal, "_READ_CHUNK", 5)
    table = read_decisions(journal.path, n_actions=N_ACTIONS, n_features=N_FEATURES)
    assert table.column("context").num_chunks > 1
    blocked = load_logged_bandit(journal.path, N_ACTIONS)

    np.testing.assert_array_equal(blocked.context, whole.context)
    np.testing.assert_array_equal(blocked.candidates, whole.candidates)
    np.testing.assert_array_equal(blocked.logging_dist, whole.logging_dist)
    np.testing.assert_array_equal(blocked.reward, whole.reward)


def test_simulated_log_through_the_journal_gives_the_same_training_arrays(
    tmp_path: Path, catalog: ActionCatalog, engine: RuleEngine, scenario: Scenario
) -> None:
    """The loop closes: decisions and outcomes replayed through the journal (rewards
    recomputed by it from value and complaint) load exactly as the simulator's own log."""
    from simulators.policies import PlaybookPolicy
    from simulators.rollout import run_policy
    from simulators.world import BatchSimulator
    from training.logged_data import load_logged_bandit

    sim = BatchSimulator(scenario, catalog, engine, 1500, seed=3)
    run_policy(sim, PlaybookPolicy(catalog, 0.2), 3, np.random.default_rng(4), log_dir=tmp_path)
    simulated = read_decisions(tmp_path, n_actions=catalog.n_actions)
    rule = RewardRule.from_catalog(
        catalog, scenario.reward.complaint_penalty_cny, attribution_window=timedelta(days=30)
    )
    with JournalWriter(tmp_path / "state", rule) as writer:
        writer.submit(DecisionBatch.from_table(simulated)).result()
        outcomes = simulated.select(
            ["decision_id", "converted", "complaint", "opted_out", "value_cny", "reward_at"]
        ).to_pylist()
        for row in outcomes:
            writer.submit_reward(
                row.pop("decision_id"), RewardOutcome(**row), received_at=row["reward_at"]
            )

    expected = load_logged_bandit(tmp_path, catalog.n_actions)
    journaled = load_logged_bandit(tmp_path / "state", catalog.n_actions)

    np.testing.assert_array_equal(journaled.context, expected.context)
    np.testing.assert_array_equal(journaled.action, expected.action)
    np.testing.assert_array_equal(journaled.pscore, expected.pscore)
    np.testing.assert_array_equal(journaled.candidates, expected.candidates)
    np.testing.assert_array_equal(journaled.logging_dist, expected.logging_dist)
    np.testing.assert_allclose(journaled.reward, expected.reward, atol=1e-4)  # sim: float32


def test_journal_file_recognises_only_sqlite_journals(tmp_path: Path) -> None:
    (tmp_path / "log.parquet").write_bytes(b"PAR1....")
    assert journal_file(tmp_path / "log.parquet") is None
    assert journal_file(tmp_path) is None
    with JournalWriter(tmp_path, RULE):
        pass
    assert journal_file(tmp_path) == tmp_path / JOURNAL_FILENAME
    with pytest.raises(FileNotFoundError, match="not a decision journal"):
        read_journal(tmp_path / "log.parquet")


def test_read_decisions_other_sqlite_file_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "mlflow.db")
    conn.execute("CREATE TABLE runs (x INTEGER)")
    conn.close()
    with pytest.raises(DecisionLogError, match="not a readable journal"):
        read_decisions(tmp_path / "mlflow.db")


# --------------------------------------------------------------------------- rewards


def test_record_reward_computes_reward_from_catalogue_economics(journal: JournalWriter) -> None:
    batch = make_batch(["d0", "d1"], seed=5)
    journal.submit(batch).result()

    result = journal.record_reward(
        "d0", RewardOutcome(True, True, False, 500.0), T0 + timedelta(days=1)
    )

    assert result.reward == pytest.approx(500.0 - COST[batch.action[0]] - 300.0)
    assert not result.late
    assert not result.duplicate
    row = read_journal(journal.path).slice(0, 1).to_pylist()[0]
    assert row["reward"] == pytest.approx(result.reward)
    assert row["converted"] and row["complaint"] and not row["opted_out"]
    assert row["value_cny"] == 500.0
    assert row["reward_at"] == T0 + timedelta(days=1)  # received time when none given


def test_record_reward_same_outcome_twice_is_a_duplicate(journal: JournalWriter) -> None:
    journal.submit(make_batch(["d0"])).result()
    outcome = RewardOutcome(True, False, False, 80.0, reward_at=AT5)
    first = journal.record_reward("d0", outcome, T0 + timedelta(hours=6))

    again = journal.record_reward("d0", outcome, T0 + timedelta(hours=9))

    assert again.duplicate
    assert again.reward == first.reward
    assert again.received_at == first.received_at == T0 + timedelta(hours=6)
    assert read_journal(journal.path).column("reward").null_count == 0


@pytest.mark.parametrize(
    ("second", "fields"),
    [
        (RewardOutcome(False, False, False, 80.0), "converted, reward_at"),
        (RewardOutcome(True, False, False, 81.0, reward_at=AT5), "value_cny"),
        (
            RewardOutcome(True, True, True, 80.0, reward_at=AT5),
            "complaint, opted_out",
        ),
    ],
)
def test_record_reward_conflicting_outcome_refused(
    journal: JournalWriter, second: RewardOutcome, fields: str
) -> None:
    journal.submit(make_batch(["d0"])).result()
    kept = RewardOutcome(True, False, False, 80.0, reward_at=AT5)
    journal.record_reward("d0", kept, T0 + timedelta(hours=6))

    with pytest.raises(RewardConflictError, match=f"{fields} differ") as info:
        journal.record_reward("d0", second, T0 + timedelta(hours=7))
    assert info.value.stored == kept


def test_record_reward_unknown_decision_refused(journal: JournalWriter) -> None:
    journal.submit(make_batch(["d0"])).result()
    with pytest.raises(UnknownDecisionError, match="'nope'"):
        journal.record_reward("nope", RewardOutcome(False, False, False, 0.0), T0)


def test_record_reward_before_the_decision_refused(journal: JournalWriter) -> None:
    journal.submit(make_batch(["d0"])).result()
    early = RewardOutcome(True, False, False, 10.0, reward_at=T0 - timedelta(minutes=1))
    with pytest.raises(RewardTimeError, match="before the decision"):
        journal.record_reward("d0", early, T0)


def test_record_reward_after_the_window_is_stored_but_late(journal: JournalWriter) -> None:
    journal.submit(make_batch(["d0", "d1", "d2"])).result()
    on_time = journal.record_reward(
        "d0", RewardOutcome(True, False, False, 10.0), T0 + timedelta(days=7)
    )
    late = journal.record_reward(
        "d1", RewardOutcome(True, False, False, 10.0), T0 + timedelta(days=7, seconds=1)
    )
    # the outcome time decides, not when the report arrives
    reported_late = journal.record_reward(
        "d2",
        RewardOutcome(True, False, False, 10.0, reward_at=T0 + timedelta(days=2)),
        T0 + timedelta(days=20),
    )

    assert (on_time.late, late.late, reported_late.late) == (False, True, False)
    assert read_journal(journal.path).column("reward").null_count == 0
    without_late = read_journal(journal.path, include_late=False)
    assert without_late.column("reward").is_null().to_pylist() == [False, True, False]
    rewarded = read_journal(journal.path, include_late=False, rewarded_only=True)
    assert rewarded.column("decision_id").to_pylist() == ["d0", "d2"]


def test_submit_reward_future_fails_with_the_error(journal: JournalWriter) -> None:
    future = journal.submit_reward("nope", RewardOutcome(False, False, False, 0.0), T0)
    assert isinstance(future.exception(timeout=10), UnknownDecisionError)


BAD_RULES = [
    ({"complaint_penalty_cny": -1.0}, "complaint_penalty_cny"),
    ({"contact_cost_cny": np.array([0.0, -1.0])}, "contact_cost_cny"),
    ({"contact_cost_cny": np.zeros((2, 2))}, "contact_cost_cny"),
    ({"attribution_window": timedelta(0)}, "attribution_window"),
]


@pytest.mark.parametrize(("override", "match"), BAD_RULES)
def test_reward_rule_bad_settings_refused(override: dict, match: str) -> None:
    settings = {"complaint_penalty_cny": 1.0, "contact_cost_cny": COST, **override}
    with pytest.raises(ValueError, match=match):
        RewardRule(**settings)


def test_reward_rule_from_catalog_charges_channel_cost(catalog: ActionCatalog) -> None:
    rule = RewardRule.from_catalog(catalog, 300.0)
    assert rule.contact_cost_cny.shape == (catalog.n_actions,)
    assert rule.contact_cost_cny[0] == 0.0  # no contact costs nothing
    sms = next(a for a in catalog.actions if a.channel == "sms")
    assert rule.contact_cost_cny[sms.id] == catalog.channel("sms").cost_cny


# --------------------------------------------------------------------------- batches


BAD_BATCHES = [
    ({"context": np.zeros((2, 3), np.float32)}, "context must have shape"),
    ({"candidate_offsets": np.array([0, 1, 1, 2])}, "candidate_offsets"),
    ({"candidate_offsets": np.array([1, 2, 3, 4])}, "candidate_offsets"),
    ({"action": np.zeros(2, np.int32)}, "action has 2 rows"),
    ({"customer_key": ["k"]}, "customer_key has 1 rows"),
    ({"campaign_id": ["a", "b"]}, "campaign_id has 2 rows"),
    ({"action_dist": np.ones(1, np.float32)}, "action_dist has 1 entries"),
    ({"pscore": np.array([0.5, -0.1, 0.5])}, r"pscore must be in \(0, 1\], got -0.1 at row 1"),
    ({"campaign_id": ["a", "b\x00c", None]}, "campaign_id contains a NUL"),
    ({"decision_id": ["a", "b\x00", "c"]}, "decision_id contains a NUL"),
    ({"model_version": "m\x00"}, "model_version contains a NUL"),
    ({"pscore": np.array([0.5, 0.5, 0.0])}, "at row 2"),
    ({"pscore": np.array([1.5, 0.5, 0.5])}, "got 1.5 at row 0"),
]


@pytest.mark.parametrize(("override", "match"), BAD_BATCHES)
def test_decision_batch_bad_arrays_refused(override: dict, match: str) -> None:
    good = make_batch(["a", "b", "c"])
    fields = {name: getattr(good, name) for name in good.__dataclass_fields__}
    with pytest.raises(ValueError, match=match):
        DecisionBatch(**{**fields, **override})


def test_decision_batch_from_mask_epsilon_greedy_needs_no_dense_distribution() -> None:
    allowed = np.array([[True, False, True, True], [False, True, False, True]])
    fields = {
        "decision_id": ["a", "b"],
        "timestamp_us": 0,
        "customer_key": ["k1", "k2"],
        "context": np.zeros((2, N_FEATURES), np.float32),
        "pscore": np.array([0.1, 0.85]),
        **SERVED_BY,
    }
    batch = DecisionBatch.from_mask(
        allowed, None, np.array([0, 1]), epsilon_greedy=(np.array([2, 1]), 0.3), **fields
    )
    assert batch.action_dist.tolist() == pytest.approx([0.1, 0.8, 0.1, 0.85, 0.15])
    del fields["pscore"]  # computed when not given
    batch = DecisionBatch.from_mask(
        allowed, None, np.array([0, 1]), epsilon_greedy=(np.array([2, 1]), 0.3), **fields
    )
    assert batch.pscore is not None
    assert batch.pscore.tolist() == pytest.approx([0.1, 0.85])
    with pytest.raises(ValueError, match="greedy action must be allowed"):
        DecisionBatch.from_mask(
            allowed, None, np.array([0, 1]), epsilon_greedy=(np.array([1, 1]), 0.3), **fields
        )
    with pytest.raises(ValueError, match="not both"):
        DecisionBatch.from_mask(
            allowed, allowed * 0.5, np.array([0, 1]), epsilon_greedy=(np.array([2, 1]), 0.3)
        )


def test_decision_batch_from_mask_refuses_a_distribution_of_another_shape() -> None:
    allowed = np.ones((2, N_ACTIONS), bool)
    with pytest.raises(ValueError, match=r"action_dist has shape \(2, 4\), allowed \(2, 5\)"):
        DecisionBatch.from_mask(
            allowed,
            np.full((2, N_ACTIONS - 1), 0.25),
            np.array([0, 1]),
            decision_id=["a", "b"],
            timestamp_us=epoch_us(T0),
            customer_key=["k1", "k2"],
            context=np.zeros((2, N_FEATURES), np.float32),
            **SERVED_BY,
        )


def _empty_batch() -> DecisionBatch:
    return DecisionBatch.from_mask(
        np.zeros((0, N_ACTIONS), bool),
        None,
        np.zeros(0, np.int32),
        decision_id=[],
        timestamp_us=epoch_us(T0),
        customer_key=[],
        context=np.zeros((0, N_FEATURES), np.float32),
        **SERVED_BY,
    )


def test_unknown_pscore_rows_are_stored_as_null_and_read_back(journal: JournalWriter) -> None:
    """NaN marks a row whose propensity is unknown: null in the journal, and a table mixing
    known and unknown propensities reads back into a batch."""
    batch = make_batch(["a", "b", "c"], seed=5)
    mixed = replace(batch, pscore=np.array([0.5, np.nan, 0.25]), action_dist=None)
    journal.submit(mixed).result()

    table = read_journal(journal.path)

    assert table.column("pscore").to_pylist() == [0.5, None, 0.25]
    again = DecisionBatch.from_table(table)
    assert np.isnan(again.pscore[1]) and again.pscore[2] == 0.25


def test_submit_empty_batch_to_a_closed_journal_refused(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, RULE)
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(_empty_batch())


def test_submit_empty_batch_writes_nothing(journal: JournalWriter) -> None:
    assert journal.submit(_empty_batch()).result() == 0
    journal.submit(make_batch(["a", "b"])).result()

    with sqlite3.connect(journal.path) as db:
        assert db.execute("SELECT count(*) FROM decision_chunks").fetchone() == (1,)
    assert read_journal(journal.path).num_rows == 2


def test_read_journal_in_blocks_equals_one_block(
    journal: JournalWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    for part in range(5):
        journal.submit(make_batch([f"{part}-{i}" for i in range(9)], seed=part)).result()
    whole = read_journal(journal.path)

    monkeypatch.setattr(decision_journal, "_READ_CHUNK", 10)
    blocked = read_journal(journal.path)

    assert blocked.column("candidate_actions").num_chunks > 1
    assert blocked.equals(whole)


def test_read_journal_keeps_contexts_of_different_widths(journal: JournalWriter) -> None:
    narrow = make_batch(["a", "b"], seed=1)
    wide = replace(make_batch(["c"], seed=2), context=np.ones((1, N_FEATURES + 2), np.float32))
    journal.submit(narrow).result()
    journal.submit(wide).result()

    contexts = read_journal(journal.path).column("context").to_pylist()

    assert [len(c) for c in contexts] == [N_FEATURES, N_FEATURES, N_FEATURES + 2]
    assert contexts[2] == [1.0] * (N_FEATURES + 2)


def test_decision_batch_from_mask_keeps_allowed_actions(journal: JournalWriter) -> None:
    allowed = np.array([[True, False, True, False, False], [False, True, True, True, False]])
    dist = np.array([[0.25, 0, 0.75, 0, 0], [0, 0.5, 0.25, 0.25, 0]])
    batch = DecisionBatch.from_mask(
        allowed,
        dist,
        np.array([2, 1]),
        decision_id=["a", "b"],
        timestamp_us=epoch_us(T0),
        customer_key=["k1", "k2"],
        context=np.zeros((2, N_FEATURES), np.float32),
        **SERVED_BY,
    )
    journal.submit(batch).result()

    table = validate_decisions(read_journal(journal.path), n_actions=N_ACTIONS)

    assert table.column("candidate_actions").to_pylist() == [[0, 2], [1, 2, 3]]
    assert table.column("action_dist").to_pylist() == [[0.25, 0.75], [0.5, 0.25, 0.25]]
    assert table.column("pscore").to_pylist() == [0.75, 0.5]
    # the mask's bitmap, stored as it is, reads back as the lists would have been stored
    assert batch.candidate_actions is None
    assert batch.candidates().tolist() == [0, 2, 1, 2, 3]
    lists = replace(
        batch, decision_id=["c", "d"], candidate_actions=batch.candidates(), candidate_mask=None
    )
    with pytest.raises(ValueError, match="exactly one of candidate_actions"):
        replace(batch, candidate_mask=None)
    with pytest.raises(ValueError, match="exactly one of candidate_actions"):
        replace(batch, candidate_actions=batch.candidates())
    with pytest.raises(ValueError, match="count each row"):
        replace(batch, candidate_mask=allowed[::-1])
    journal.submit(lists).result()
    rows = read_journal(journal.path).to_pylist()
    for name in ("candidate_actions", "action_dist", "pscore", "context"):
        assert [r[name] for r in rows[2:]] == [r[name] for r in rows[:2]], name


def test_submit_duplicate_decision_id_fails_only_its_batch(journal: JournalWriter) -> None:
    journal.submit(make_batch(["a"])).result()
    # queued together so they share one transaction: the bad one must not sink the others
    futures = [
        journal.submit(make_batch(["b", "c"])),
        journal.submit(make_batch(["d", "a"])),
        journal.submit(make_batch(["e"])),
    ]
    assert futures[0].result(10) == 2
    with pytest.raises(sqlite3.IntegrityError):
        futures[1].result(10)
    assert futures[2].result(10) == 1
    assert read_journal(journal.path).column("decision_id").to_pylist() == ["a", "b", "c", "e"]


def test_new_decision_ids_unique_and_time_ordered() -> None:
    first = new_decision_ids(1000)
    later = new_decision_ids(10)
    assert len(set(first + later)) == 1010
    assert all(len(i) == 32 for i in first)
    assert max(first)[:12] <= min(later)[:12]


def test_epoch_us_round_trip_is_exact() -> None:
    moment = datetime(2026, 11, 2, 9, 30, 0, 123457, tzinfo=UTC)
    assert from_epoch_us(epoch_us(moment)) == moment
    with pytest.raises(ValueError, match="time zone"):
        epoch_us(datetime(2026, 1, 1))


# --------------------------------------------------------------------------- the writer thread


def test_group_commit_writer_groups_queued_jobs(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(10)

    schema = ["CREATE TABLE IF NOT EXISTS t (x INTEGER)"]
    with GroupCommitWriter(tmp_path / "g.db", schema) as writer:
        first = writer.submit(block)
        started.wait(10)
        futures = [
            writer.submit(lambda c, i=i: c.execute("INSERT INTO t VALUES (?)", (i,)).rowcount)
            for i in range(50)
        ]
        release.set()
        assert all(f.result(10) == 1 for f in futures)
        first.result(10)
        assert writer.commits == 2  # the blocker, then all 50 in one transaction


def test_group_commit_writer_failed_job_rolls_back_only_itself(tmp_path: Path) -> None:
    schema = ["CREATE TABLE IF NOT EXISTS t (x INTEGER)"]

    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (-1)")
        raise RuntimeError("boom")

    with GroupCommitWriter(tmp_path / "g.db", schema) as writer:
        ok = writer.submit(lambda c: c.execute("INSERT INTO t VALUES (1)").rowcount)
        bad = writer.submit(half_then_fail)
        assert ok.result(10) == 1
        with pytest.raises(RuntimeError, match="boom"):
            bad.result(10)
        rows = writer.submit(lambda c: c.execute("SELECT x FROM t").fetchall()).result(10)
    assert rows == [(1,)]


def test_group_commit_writer_close_flushes_and_refuses_more(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, RULE)
    futures = [writer.submit(make_batch([f"x{i}"], seed=i)) for i in range(200)]
    writer.close()
    assert all(f.done() for f in futures)
    assert read_journal(tmp_path).num_rows == 200
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(make_batch(["late"]))
    writer.close()  # idempotent


def test_group_commit_writer_waits_for_another_writer_then_gives_up(tmp_path: Path) -> None:
    schema = ["CREATE TABLE IF NOT EXISTS t (x INTEGER)"]
    with GroupCommitWriter(tmp_path / "g.db", schema, busy_timeout_ms=300) as writer:
        other = open_sqlite(tmp_path / "g.db", check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another process's write transaction
        waiting = writer.submit(lambda c: c.execute("INSERT INTO t VALUES (1)").rowcount)
        threading.Timer(0.1, lambda: other.execute("COMMIT")).start()
        assert waiting.result(10) == 1

        other.execute("BEGIN IMMEDIATE")
        refused = writer.submit(lambda c: c.execute("INSERT INTO t VALUES (2)").rowcount)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            refused.result(10)
        other.execute("ROLLBACK")
        other.close()
        assert writer.submit(lambda c: c.execute("SELECT x FROM t").fetchall()).result() == [(1,)]


def _insert_on(threads: list[int], x: int) -> Callable[[sqlite3.Connection], int]:
    def insert(conn: sqlite3.Connection) -> int:
        threads.append(threading.get_ident())
        return conn.execute("INSERT INTO t VALUES (?)", (x,)).rowcount

    return insert


def test_group_commit_writer_inline_commits_on_the_caller_when_idle(tmp_path: Path) -> None:
    schema = ["CREATE TABLE IF NOT EXISTS t (x INTEGER)"]
    threads: list[int] = []
    with GroupCommitWriter(tmp_path / "g.db", schema) as writer:
        done = writer.submit_inline(_insert_on(threads, 1))
        assert done.done() and done.result() == 1  # committed before returning
        assert threads == [threading.get_ident()]

        def fail(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO t VALUES (-1)")
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            writer.submit_inline(fail).result()
        # another process's transaction: the job is queued, and commits once it ends
        other = open_sqlite(tmp_path / "g.db", check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        queued = writer.submit_inline(_insert_on(threads, 2))
        assert not queued.done()
        other.execute("COMMIT")
        other.close()
        assert queued.result(10) == 1
        assert threads[-1] != threading.get_ident()
        rows = writer.submit(lambda c: c.execute("SELECT x FROM t").fetchall()).result(10)
    assert rows == [(1,), (2,)]  # the failed job left nothing
    # read by a fresh connection: the inline commits are in the file
    check = sqlite3.connect(tmp_path / "g.db")
    assert check.execute("SELECT count(*) FROM t").fetchone() == (2,)
    check.close()


def test_group_commit_writer_inline_is_queued_under_synchronous_full(tmp_path: Path) -> None:
    schema = ["CREATE TABLE IF NOT EXISTS t (x INTEGER)"]
    threads: list[int] = []
    with GroupCommitWriter(tmp_path / "g.db", schema, synchronous="FULL") as writer:
        assert writer.submit_inline(_insert_on(threads, 1)).result(10) == 1
    assert threads and threads[0] != threading.get_ident()  # fsyncs never block the caller


def test_group_commit_writer_keeps_the_transaction_open_for_an_announced_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job submitted with ``more`` holds its transaction for the next one: the parts of a
    batch submitted 50 ms apart commit once, together, and neither is visible before."""
    from nextbest import sqlite_writer

    monkeypatch.setattr(sqlite_writer, "MAX_HOLD_S", 60)
    schema = ["CREATE TABLE IF NOT EXISTS t (x INTEGER)"]
    with GroupCommitWriter(tmp_path / "g.db", schema) as writer:
        before = writer.commits
        first = writer.submit(_insert_on([], 1), more=True)
        time.sleep(0.05)
        reader = open_sqlite(tmp_path / "g.db", read_only=True, check_same_thread=False)
        assert not first.done()
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (0,)
        second = writer.submit_inline(_insert_on([], 2), more=True)  # queued, not inline
        time.sleep(0.05)
        last = writer.submit_inline(_insert_on([], 3))  # the writer is busy: queued
        assert (first.result(10), second.result(10), last.result(10)) == (1, 1, 1)
        assert writer.commits == before + 1
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (3,)
        reader.close()


def test_group_commit_writer_commits_when_the_announced_job_does_not_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller failed between two parts: the transaction waits ``MAX_HOLD_S`` for the
    next, then commits what it has; closing the writer meanwhile commits at once."""
    from nextbest import sqlite_writer

    monkeypatch.setattr(sqlite_writer, "MAX_HOLD_S", 0.2)
    schema = ["CREATE TABLE IF NOT EXISTS t (x INTEGER)"]
    with GroupCommitWriter(tmp_path / "g.db", schema) as writer:
        started = time.monotonic()
        alone = writer.submit(_insert_on([], 1), more=True)
        assert alone.result(10) == 1
        assert 0.15 < time.monotonic() - started < 5
        assert writer.submit(lambda c: c.execute("SELECT x FROM t").fetchall()).result(10) == [(1,)]
    monkeypatch.setattr(sqlite_writer, "MAX_HOLD_S", 60)
    writer = GroupCommitWriter(tmp_path / "g.db", schema)
    held = writer.submit(_insert_on([], 2), more=True)
    time.sleep(0.05)
    started = time.monotonic()
    writer.close()
    assert time.monotonic() - started < 5 and held.result(0) == 1
    check = sqlite3.connect(tmp_path / "g.db")
    assert check.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,)]
    check.close()


def test_group_commit_writer_holds_a_transaction_for_max_hold_s_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other processes wait for the write lock while a transaction is held: it commits after
    ``MAX_HOLD_S`` even though more was announced, and the next job goes in another."""
    from nextbest import sqlite_writer

    monkeypatch.setattr(sqlite_writer, "MAX_HOLD_S", 0.1)
    schema = ["CREATE TABLE IF NOT EXISTS t (x INTEGER)"]
    with GroupCommitWriter(tmp_path / "g.db", schema) as writer:
        before = writer.commits
        first = writer.submit(_insert_on([], 1), more=True)
        assert first.result(10) == 1 and writer.commits == before + 1
        assert writer.submit(_insert_on([], 2)).result(10) == 1
        assert writer.commits == before + 2


def test_group_commit_writer_closing_does_not_wait_for_an_announced_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job announcing more, taken with the writer's stop: committed at once."""
    from nextbest import sqlite_writer

    monkeypatch.setattr(sqlite_writer, "MAX_HOLD_S", 60)
    schema = ["CREATE TABLE IF NOT EXISTS t (x INTEGER)"]
    writer = GroupCommitWriter(tmp_path / "g.db", schema)
    started, release = threading.Event(), threading.Event()
    writer.submit(lambda conn: (started.set(), release.wait(10)))
    started.wait(10)
    announced = writer.submit(_insert_on([], 1), more=True)
    threading.Timer(0.1, release.set).start()
    begun = time.monotonic()
    writer.close()  # queued behind the announcing job, taken in its group
    assert time.monotonic() - begun < 5 and announced.result(0) == 1


def test_group_commit_writer_inline_never_overtakes_an_announced_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the writer taking a job that announces more and its transaction starting,
    the writer looks idle: an inline commit then would overtake the transaction waiting for
    it. The job after an announcing one is always queued."""
    from nextbest import sqlite_writer

    monkeypatch.setattr(sqlite_writer, "MAX_HOLD_S", 60)  # however slow the machine
    schema = ["CREATE TABLE IF NOT EXISTS t (x INTEGER)"]
    with GroupCommitWriter(tmp_path / "g.db", schema) as writer:
        take = writer._take_group

        def slow_take(*args: Any, **kwargs: Any) -> Any:
            taken = take(*args, **kwargs)
            time.sleep(0.05)  # the gap, widened
            return taken

        monkeypatch.setattr(writer, "_take_group", slow_take)
        writer.flush()  # the writer's next wait for a job is the slow one
        before, threads = writer.commits, []
        first = writer.submit(_insert_on(threads, 1), more=True)
        time.sleep(0.02)  # taken, the transaction not begun
        last = writer.submit_inline(_insert_on(threads, 2))
        assert (first.result(10), last.result(10)) == (1, 1)
        assert threading.get_ident() not in threads
        assert writer.commits == before + 1


def test_group_commit_writer_bad_schema_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        GroupCommitWriter(tmp_path / "g.db", ["CREATE TABLE"])


def test_open_sqlite_concurrent_openers_of_a_new_file_all_succeed(tmp_path: Path) -> None:
    """Workers starting together on a fresh state directory: while one converts the file to
    WAL, SQLite answers the others "database is locked" without waiting (before the retry,
    about 6% of such opens failed, and a worker failing at start stops uvicorn's server)."""
    errors: list[str] = []

    def open_and_write(path: Path, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            conn = open_sqlite(path, busy_timeout_ms=5000, check_same_thread=False)
            conn.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
            for _ in range(10):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT INTO t VALUES (1)")
                conn.execute("COMMIT")
            conn.close()
        except sqlite3.Error as exc:
            errors.append(repr(exc))

    for trial in range(40):
        path, barrier = tmp_path / f"new{trial}.db", threading.Barrier(3)
        threads = [threading.Thread(target=open_and_write, args=(path, barrier)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert errors == []


def test_open_sqlite_bad_synchronous_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NORMAL"):
        open_sqlite(tmp_path / "x.db", synchronous="OFF")  # type: ignore[arg-type]


def test_journal_full_synchronous_writes(tmp_path: Path) -> None:
    with JournalWriter(tmp_path, RULE, synchronous="FULL") as writer:
        writer.submit(make_batch(["a", "b"])).result()
        (mode,) = writer._writer.submit(
            lambda c: c.execute("PRAGMA synchronous").fetchone()
        ).result()
    assert mode == 2  # FULL
    assert read_journal(tmp_path).num_rows == 2


def test_journal_asyncio_wrap_future_awaits_the_commit(journal: JournalWriter) -> None:
    import asyncio

    async def decide() -> int:
        return await asyncio.wrap_future(journal.submit(make_batch(["a", "b", "c"])))

    assert asyncio.run(decide()) == 3
    assert read_journal(journal.path).num_rows == 3


# --------------------------------------------------------------------------- processes

WRITER_SCRIPT = textwrap.dedent(
    """
    import sys
    from collections import deque
    import numpy as np
    from test_decision_journal import RULE, make_batch
    from nextbest.decision_journal import JournalWriter
    from nextbest.rewards import RewardOutcome

    path, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    writer = JournalWriter(path, RULE)
    pending = deque()
    i = 0
    while count < 0 or i < count:
        size = 1 + i % 7
        ids = [f"{prefix}-{i}-{j}" for j in range(size)]
        pending.append((ids, writer.submit(make_batch(ids, seed=i))))
        i += 1
        while len(pending) > 16 or (pending and pending[0][1].done()):
            acked, future = pending.popleft()
            future.result()
            sys.stdout.write("\\n".join(acked) + "\\n")
            sys.stdout.flush()
        if i % 10 == 0:
            writer.record_reward(ids[0], RewardOutcome(True, False, False, 5.0))
    while pending:
        acked, future = pending.popleft()
        future.result()
        sys.stdout.write("\\n".join(acked) + "\\n")
    writer.close()
    """
)


def _writer_process(path: Path, prefix: str, count: int, stderr: int) -> subprocess.Popen[str]:
    """A process appending decisions and printing each id once its commit is acknowledged
    (``count`` < 0: until killed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(path), prefix, str(count)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )


def test_two_processes_append_to_one_journal(tmp_path: Path) -> None:
    procs = [_writer_process(tmp_path, name, 300, subprocess.PIPE) for name in ("w1", "w2")]
    acked: list[str] = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        acked += out.split()

    table = read_journal(tmp_path)

    validate_decisions(table, n_actions=N_ACTIONS)
    assert sorted(table.column("decision_id").to_pylist()) == sorted(acked)
    assert len(acked) == 2 * sum(1 + i % 7 for i in range(300))
    assert table.column("reward").null_count == len(acked) - 2 * 30


def test_sigkill_loses_no_acknowledged_decision(tmp_path: Path) -> None:
    proc = _writer_process(tmp_path, "k", -1, subprocess.DEVNULL)
    acked: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        acked.append(line.strip())
        if len(acked) >= 3000:
            break
    os.kill(proc.pid, signal.SIGKILL)
    # complete lines printed before the kill were acknowledged; a cut last line is dropped
    acked += [line for line in proc.stdout.read().split("\n")[:-1] if line]
    assert proc.wait(timeout=30) == -signal.SIGKILL

    stored = set(read_journal(tmp_path).column("decision_id").to_pylist())

    missing = [i for i in acked if i not in stored]
    assert not missing, f"{len(missing)} acknowledged decisions lost, e.g. {missing[:3]}"
    assert len(stored) >= len(acked)
    # the journal stays writable after the crash
    with JournalWriter(tmp_path, RULE) as writer:
        writer.submit(make_batch(["after-restart"])).result()
    assert "after-restart" in read_journal(tmp_path).column("decision_id").to_pylist()


def test_read_journal_while_writing_sees_a_consistent_prefix(tmp_path: Path) -> None:
    with JournalWriter(tmp_path, RULE) as writer:
        futures: list[Future[int]] = []
        for i in range(50):
            futures.append(writer.submit(make_batch([f"r{i}-{j}" for j in range(20)], seed=i)))
            if i == 25:
                snapshot = read_journal(tmp_path)
                assert snapshot.num_rows % 20 == 0
                validate_decisions(snapshot, n_actions=N_ACTIONS)
        for f in futures:
            f.result(10)
    assert read_journal(tmp_path).num_rows == 1000


def test_read_journal_arrow_types(journal: JournalWriter) -> None:
    journal.submit(make_batch(["a"])).result()
    table = read_journal(journal.path)
    assert table.schema.field("context").type == pa.list_(pa.float32())
    assert table.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")


def test_decision_trace_names_the_rule_of_every_blocked_action(journal: JournalWriter) -> None:
    """Traceability: per decision, for whom, when, and which rule blocked which action (or
    that the request left it out), read back from any row of any chunk."""
    from nextbest.compliance.engine import ALLOWED
    from nextbest.decision_journal import decision_trace

    rules = ("consent", "quiet_hours", "suitability")
    batches = []
    for chunk, n in enumerate((7, 40, 3)):
        plain = make_batch(new_decision_ids(n), seed=chunk)
        rng = np.random.default_rng(10 + chunk)
        allowed = np.zeros((n, N_ACTIONS), bool)
        allowed[np.arange(n).repeat(np.diff(plain.candidate_offsets)), plain.candidates()] = True
        codes = np.where(allowed, ALLOWED, rng.integers(0, len(rules), (n, N_ACTIONS)))
        left_out = ~allowed & (rng.random((n, N_ACTIONS)) < 0.3)  # rules allowed, request not
        codes = np.where(left_out, ALLOWED, codes).astype(np.uint8)
        batch = replace(plain, blocked_by=codes, rule_ids=rules)
        journal.submit(batch).result()
        batches.append(batch)
    untraced = make_batch(new_decision_ids(2), seed=9)  # a writer not given the rules
    journal.submit(untraced).result()
    for batch in batches:
        for row in (0, len(batch) // 2, len(batch) - 1):
            found = decision_trace(journal.path, batch.decision_id[row])
            assert found.customer_key == batch.customer_key[row]
            assert found.action == batch.action[row] and found.timestamp == T0
            assert found.ruleset_version == "r1"
            np.testing.assert_array_equal(found.blocked_by, batch.blocked_by[row])
            codes = batch.blocked_by[row]
            for rule, actions in found.blocked().items():
                assert (codes[actions] == rules.index(rule)).all()
            blocked = sorted(a for actions in found.blocked().values() for a in actions)
            assert blocked == np.flatnonzero(codes != ALLOWED).tolist()
            assert (
                found.left_out() == np.flatnonzero((codes == ALLOWED) & ~found.candidate).tolist()
            )
            assert found.candidate[found.action]
    plain = decision_trace(journal.path, untraced.decision_id[1])
    assert plain.blocked_by is None and plain.blocked() == {} and plain.left_out() == []
    with pytest.raises(UnknownDecisionError):
        decision_trace(journal.path, "0" * 32)
    with pytest.raises(ValueError, match="rule_ids"):
        replace(batches[0], rule_ids=None)


def test_a_trace_spans_the_catalogue_even_when_no_candidate_reaches_its_end(
    journal: JournalWriter,
) -> None:
    """Candidates given as a list size the chunk by the largest one: the rules' array,
    which spans every action, must still be read back (its chunk was read too short)."""
    from typer.testing import CliRunner

    from nextbest.cli import app
    from nextbest.compliance.engine import ALLOWED
    from nextbest.decision_journal import decision_trace

    plain = make_batch(new_decision_ids(4), seed=3)
    width = N_ACTIONS + 3  # actions past every candidate
    codes = np.full((4, width), 1, np.uint8)
    codes[np.arange(4).repeat(np.diff(plain.candidate_offsets)), plain.candidates()] = ALLOWED
    batch = replace(plain, blocked_by=codes, rule_ids=("a", "b"))
    journal.submit(batch).result()
    found = decision_trace(journal.path, batch.decision_id[2])
    np.testing.assert_array_equal(found.blocked_by, codes[2])
    assert len(found.candidate) == width and found.catalog_version == "c1"
    with pytest.raises(ValueError, match="blocked_by has 2 actions"):
        replace(plain, blocked_by=codes[:, :2], rule_ids=("a", "b"))
    # the command refuses to name actions from another catalogue than the decision's
    result = CliRunner().invoke(
        app, ["trace", batch.decision_id[2], "--journal", str(journal.path)]
    )
    assert result.exit_code == 2
    assert "made with catalogue c1" in " ".join(result.output.split())
