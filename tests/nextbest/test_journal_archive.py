"""Archiving a journal's old decisions: nothing lost, nothing doubled, the audit trail kept,
the live journal still written to, and a crash between copy and delete finished by a rerun."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from test_decision_journal import N_ACTIONS, RULE, T0, make_batch
from typer.testing import CliRunner

from nextbest import journal_archive
from nextbest.cli import app
from nextbest.compliance.engine import ALLOWED
from nextbest.decision_batch import new_decision_ids
from nextbest.decision_journal import JournalWriter, decision_trace, read_journal
from nextbest.journal_archive import ArchiveError, archive_journal
from nextbest.rewards import RewardOutcome, UnknownDecisionError

DAY = timedelta(days=1)
WINDOW = timedelta(days=2)
NOW = T0 + 10 * DAY
SIZES = (30, 20, 40, 10, 25)
"""Decisions journalled on days 0..4, one committed part a day."""


def _journal(path: Path) -> tuple[JournalWriter, list[list[str]]]:
    """A journal of one part a day (SIZES), every part with its rules per action, some
    outcomes, and one withdrawn decision on day 1."""
    path.mkdir()
    writer = JournalWriter(path, RULE)  # a state directory, as the service's
    days = []
    for day, n in enumerate(SIZES):
        ids = new_decision_ids(n)
        batch = make_batch(ids, seed=day, at=T0 + day * DAY)
        codes = np.full((n, N_ACTIONS), 1, np.uint8)
        codes[np.arange(n), batch.action] = ALLOWED
        writer.submit(replace(batch, blocked_by=codes, rule_ids=("consent", "quiet"))).result()
        for decision_id in ids[::3]:
            outcome = RewardOutcome(True, False, False, 100.0 + day)
            writer.submit_reward(decision_id, outcome, T0 + day * DAY + timedelta(hours=2))
        days.append(ids)
    writer.withdraw([days[1][4]]).result()
    writer.flush()
    return writer, days


def _ids(table: pa.Table) -> list[str]:
    return table.column("decision_id").to_pylist()


def test_archive_moves_whole_old_days_with_outcomes_and_rules(tmp_path: Path) -> None:
    writer, days = _journal(tmp_path / "live")
    before = read_journal(tmp_path / "live")
    result = archive_journal(
        tmp_path / "live", T0 + 2.5 * DAY, tmp_path / "archive", WINDOW, now=NOW, step_decisions=25
    )
    assert (result.decisions, result.chunks, result.kept) == (90, 3, 35)
    archived, live = read_journal(tmp_path / "archive"), read_journal(tmp_path / "live")
    # every row exactly once, as it was (outcomes included); the withdrawn one in neither
    assert archived.num_rows + live.num_rows == before.num_rows == sum(SIZES) - 1
    assert archived.equals(before.slice(0, archived.num_rows))
    assert live.equals(before.slice(archived.num_rows))
    assert days[1][4] not in _ids(archived) + _ids(live)
    assert set(_ids(archived)) == set(days[0] + days[1] + days[2]) - {days[1][4]}
    # the audit trail goes with the decisions
    found = decision_trace(tmp_path / "archive", days[0][7])
    assert found.blocked() == {"quiet": [a for a in range(N_ACTIONS) if a != found.action]}
    with pytest.raises(UnknownDecisionError):
        decision_trace(tmp_path / "live", days[0][7])
    # the service keeps writing to the live journal; outcomes of archived decisions are
    # unknown there (hence the attribution window)
    late = make_batch(new_decision_ids(5), seed=7, at=NOW)
    writer.submit(late).result()
    assert _ids(read_journal(tmp_path / "live"))[-5:] == late.decision_id
    with pytest.raises(UnknownDecisionError):
        writer.submit_reward(days[0][0], RewardOutcome(False, False, False, 0.0)).result()
    writer.close()
    # again: nothing more is old enough, nothing changes
    again = archive_journal(
        tmp_path / "live", T0 + 2.5 * DAY, tmp_path / "archive", WINDOW, now=NOW
    )
    assert again.decisions == 0 and read_journal(tmp_path / "archive").equals(archived)


def test_a_journal_and_its_archive_are_read_as_one_log(tmp_path: Path) -> None:
    """After archiving, training and evaluation read the live journal and its archive
    together: every decision once, as before the move; the same one twice is refused."""
    from nextbest.decision_log import DecisionLogError
    from training.logged_data import load_logged_bandit, read_logs

    writer, _ = _journal(tmp_path / "live")
    writer.close()
    before = read_journal(tmp_path / "live")
    archive_journal(tmp_path / "live", T0 + 2.5 * DAY, tmp_path / "archive", WINDOW, now=NOW)
    both = read_logs([tmp_path / "archive", tmp_path / "live"], N_ACTIONS)
    assert both.equals(before)
    log = load_logged_bandit(
        [tmp_path / "archive", tmp_path / "live"], N_ACTIONS, drop_pending=True
    )
    assert log.n_rounds == before.filter(pc.is_valid(before["reward"])).num_rows
    with pytest.raises(DecisionLogError, match=r"is in .*live.* and .*live.*: a log given twice"):
        read_logs([tmp_path / "live", tmp_path / "live"], N_ACTIONS)


def test_the_newest_part_stays_and_a_crash_between_copy_and_delete_is_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, days = _journal(tmp_path / "live")
    writer.close()
    before = read_journal(tmp_path / "live")
    calls = []

    def crash(lock, step, record) -> None:  # the copy committed, then the process dies
        calls.append(step)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(journal_archive, "_delete", crash)
        with pytest.raises(KeyboardInterrupt):
            archive_journal(tmp_path / "live", NOW - WINDOW, tmp_path / "archive", WINDOW, now=NOW)
    assert calls and read_journal(tmp_path / "live").equals(before)  # nothing deleted
    assert read_journal(tmp_path / "archive").num_rows == sum(SIZES) - 1 - len(days[4])
    result = archive_journal(tmp_path / "live", NOW - WINDOW, tmp_path / "archive", WINDOW, now=NOW)
    assert result.kept == len(days[4])  # everything is old enough, but the newest part stays
    archived, live = read_journal(tmp_path / "archive"), read_journal(tmp_path / "live")
    assert _ids(live) == days[4]
    assert archived.equals(before.slice(0, archived.num_rows))  # copied once, not twice


def test_archive_refuses_what_it_cannot_do_safely(tmp_path: Path) -> None:
    writer, _ = _journal(tmp_path / "live")
    writer.close()
    live = tmp_path / "live"
    with pytest.raises(ArchiveError, match="attribution window"):
        archive_journal(live, NOW - WINDOW + timedelta(minutes=1), tmp_path / "a", WINDOW, now=NOW)
    with pytest.raises(ArchiveError, match="time zone"):
        archive_journal(live, (T0 + DAY).replace(tzinfo=None), tmp_path / "a", WINDOW, now=NOW)
    with pytest.raises(ArchiveError, match="not a decision journal"):
        archive_journal(tmp_path / "nowhere", T0 + DAY, tmp_path / "a", WINDOW, now=NOW)
    with pytest.raises(ArchiveError, match="another directory"):
        archive_journal(live, T0 + DAY, live, WINDOW, now=NOW)
    # another journal's archive holds other decisions under the same numbers
    other, _ = _journal(tmp_path / "other")
    other.close()
    archive_journal(tmp_path / "other", T0 + 1.5 * DAY, tmp_path / "a", WINDOW, now=NOW)
    with pytest.raises(ArchiveError, match="archive of another journal"):
        archive_journal(live, T0 + 1.5 * DAY, tmp_path / "a", WINDOW, now=NOW)
    assert read_journal(live).num_rows == sum(SIZES) - 1  # nothing moved


def test_archive_command(tmp_path: Path) -> None:
    writer, _ = _journal(tmp_path / "live")
    writer.close()
    args = [
        "archive",
        *("--journal", str(tmp_path / "live"), "--out", str(tmp_path / "archive")),
        *("--attribution-days", "2"),  # the journal's decisions are of early November
    ]
    done = CliRunner().invoke(app, [*args, "--before", (T0 + 1.5 * DAY).isoformat()])
    assert done.exit_code == 0, done.output
    assert "archived 50 decisions (2 committed parts)" in " ".join(done.output.split())
    assert read_journal(tmp_path / "archive").num_rows == 49  # one of them withdrawn
    recent = CliRunner().invoke(app, [*args, "--before", "2999-01-01T00:00:00+00:00"])
    assert recent.exit_code == 2 and "attribution window" in " ".join(recent.output.split())
    naive = CliRunner().invoke(app, [*args, "--before", "2026-11-01T00:00"])
    assert naive.exit_code == 2 and "bad --before" in naive.output


def test_what_the_service_writes_during_a_step_is_moved_or_refused_never_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reward and a withdrawal committed before a step takes the live journal's write
    lock move with it; a reward sent while the lock is held waits for it, and finds its
    decision archived (refused: 410 at the service), never acknowledged and then lost."""
    from nextbest.rewards import ArchivedDecisionError

    writer, days = _journal(tmp_path / "live")
    real_record, real_copy, waiting = journal_archive._record, journal_archive._copy, []

    def record_then_report(lock, step, target) -> str:
        record = real_record(lock, step, target)
        late = RewardOutcome(False, False, True, 0.0)
        writer.submit_reward(days[0][1], late, T0 + 9 * DAY).result()
        writer.withdraw([days[0][2]]).result()
        return record

    def copy_while_reported(conn, step, target, identity) -> None:
        waiting.append(writer.submit_reward(days[0][4], RewardOutcome(True, False, False, 5.0)))
        real_copy(conn, step, target, identity)

    monkeypatch.setattr(journal_archive, "_record", record_then_report)
    monkeypatch.setattr(journal_archive, "_copy", copy_while_reported)
    before = read_journal(tmp_path / "live")
    archive_journal(tmp_path / "live", T0 + 0.5 * DAY, tmp_path / "archive", WINDOW, now=NOW)
    with pytest.raises(ArchivedDecisionError):
        waiting[0].result(timeout=30)
    writer.close()
    archived = read_journal(tmp_path / "archive")
    rows = dict(zip(_ids(archived), archived.column("opted_out").to_pylist(), strict=True))
    assert rows[days[0][1]] is True  # the late opt-out moved with its decision
    assert days[0][2] not in rows  # and so did the withdrawal
    assert rows[days[0][4]] is None  # the reward sent under the lock was refused, not stored
    assert archived.num_rows == len(days[0]) - 1
    assert read_journal(tmp_path / "live").num_rows == before.num_rows - len(days[0])


def test_an_interrupted_archive_is_finished_before_another_and_only_into_its_own_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, _ = _journal(tmp_path / "live")
    writer.close()
    before = read_journal(tmp_path / "live")

    def crash(lock, step, record) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(journal_archive, "_delete", crash)
        with pytest.raises(KeyboardInterrupt):
            archive_journal(tmp_path / "live", T0 + 2.5 * DAY, tmp_path / "a", WINDOW, now=NOW)
    # another directory would hold the step's decisions a second time
    with pytest.raises(ArchiveError, match="was interrupted"):
        archive_journal(tmp_path / "live", T0 + 2.5 * DAY, tmp_path / "b", WINDOW, now=NOW)
    assert not (tmp_path / "b").exists()
    # an earlier cutoff still finishes the recorded step first
    done = archive_journal(tmp_path / "live", T0 + 0.5 * DAY, tmp_path / "a", WINDOW, now=NOW)
    archived, live = read_journal(tmp_path / "a"), read_journal(tmp_path / "live")
    assert done.decisions > 0 and archived.num_rows + live.num_rows == before.num_rows
    assert set(_ids(archived)).isdisjoint(_ids(live))


def test_an_archive_is_checked_before_it_is_written_and_keeps_to_its_journal(
    tmp_path: Path,
) -> None:
    writer, _ = _journal(tmp_path / "live")
    writer.close()
    other, _ = _journal(tmp_path / "other")
    other.close()
    # another journal's archive, even with none of the same row numbers
    archive_journal(tmp_path / "other", T0 + 0.5 * DAY, tmp_path / "a", WINDOW, now=NOW)
    with pytest.raises(ArchiveError, match="archive of another journal"):
        archive_journal(tmp_path / "live", T0 + 3.5 * DAY, tmp_path / "a", WINDOW, now=NOW)
    # the refusal claimed nothing and left no step behind: both journals archive on
    assert archive_journal(tmp_path / "other", T0 + 1.5 * DAY, tmp_path / "a", WINDOW, now=NOW)
    assert archive_journal(tmp_path / "live", T0 + 0.5 * DAY, tmp_path / "b", WINDOW, now=NOW)
    # an archive that holds decisions but names no journal may be anyone's
    with sqlite3.connect(tmp_path / "b" / "journal.db") as conn:
        conn.execute("DELETE FROM journal_meta WHERE key = 'archive_of'")
    with pytest.raises(ArchiveError, match="says of no journal"):
        archive_journal(tmp_path / "live", T0 + 1.5 * DAY, tmp_path / "b", WINDOW, now=NOW)
    # a file that is not a journal is left as it is
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "journal.db").write_bytes(b"not a database at all")
    with pytest.raises(ArchiveError, match="not a decision journal"):
        archive_journal(tmp_path / "live", T0 + 0.5 * DAY, tmp_path / "junk", WINDOW, now=NOW)
    assert (tmp_path / "junk" / "journal.db").read_bytes() == b"not a database at all"
    assert read_journal(tmp_path / "live").num_rows == sum(SIZES) - 1 - SIZES[0]


def test_a_reward_for_an_archived_decision_names_whom_it_was_for(tmp_path: Path) -> None:
    from nextbest.rewards import ArchivedDecisionError

    writer, days = _journal(tmp_path / "live")
    archive_journal(tmp_path / "live", T0 + 0.5 * DAY, tmp_path / "archive", WINDOW, now=NOW)
    moved = read_journal(tmp_path / "archive")
    with pytest.raises(ArchivedDecisionError) as info:
        writer.submit_reward(days[0][0], RewardOutcome(False, False, True, 0.0)).result()
    writer.close()
    row = _ids(moved).index(days[0][0])
    assert info.value.decision.customer_key == moved.column("customer_key")[row].as_py()
    assert info.value.decision.action == moved.column("action")[row].as_py()
    assert isinstance(info.value, UnknownDecisionError)


def test_forgetting_archived_decisions_makes_their_rewards_unknown(tmp_path: Path) -> None:
    """The live journal's record of whom each archived decision was for is deleted for the
    decisions made before the cutoff only, in steps; their rewards are then unknown (404),
    the later ones' still archived (410)."""
    from nextbest.journal_archive import forget_archived
    from nextbest.rewards import ArchivedDecisionError

    writer, days = _journal(tmp_path / "live")
    archive_journal(tmp_path / "live", T0 + 2.5 * DAY, tmp_path / "archive", WINDOW, now=NOW)
    forgotten = forget_archived(
        tmp_path / "live", T0 + 1.5 * DAY, WINDOW, now=NOW, step_decisions=7
    )
    assert forgotten == SIZES[0] + SIZES[1] - 1  # the withdrawn one was never archived
    with pytest.raises(UnknownDecisionError) as old:
        writer.submit_reward(days[0][3], RewardOutcome(False, False, True, 0.0)).result()
    assert not isinstance(old.value, ArchivedDecisionError)
    with pytest.raises(ArchivedDecisionError):
        writer.submit_reward(days[2][3], RewardOutcome(False, False, True, 0.0)).result()
    writer.close()
    assert forget_archived(tmp_path / "live", T0 + 1.5 * DAY, WINDOW, now=NOW) == 0
    with pytest.raises(ArchiveError, match="within the attribution window"):
        forget_archived(tmp_path / "live", NOW - DAY, WINDOW, now=NOW)
    with pytest.raises(ArchiveError, match="not a decision journal"):
        forget_archived(tmp_path / "nowhere", T0, WINDOW, now=NOW)


def test_forget_archived_command(tmp_path: Path) -> None:
    writer, _ = _journal(tmp_path / "live")
    writer.close()
    archive_journal(tmp_path / "live", T0 + 2.5 * DAY, tmp_path / "archive", WINDOW, now=NOW)
    args = ["forget-archived", "--journal", str(tmp_path / "live"), "--attribution-days", "2"]
    done = CliRunner().invoke(app, [*args, "--before", (T0 + 0.5 * DAY).isoformat()])
    assert done.exit_code == 0, done.output
    assert f"forgot whom {SIZES[0]} archived decisions" in " ".join(done.output.split())
    recent = CliRunner().invoke(app, [*args, "--before", "2999-01-01T00:00:00+00:00"])
    assert recent.exit_code == 2 and "attribution window" in " ".join(recent.output.split())
    naive = CliRunner().invoke(app, [*args, "--before", "2026-11-01T00:00"])
    assert naive.exit_code == 2 and "bad --before" in naive.output


def test_a_damaged_journal_is_named_as_damaged_not_as_missing(tmp_path: Path) -> None:
    """Telling a journal from other files goes through SQLite; a damaged one is still the
    journal (its readers say what is wrong), where only a file that is no database is not."""
    from nextbest.decision_journal import journal_file

    writer, _ = _journal(tmp_path / "live")
    writer.close()
    file = tmp_path / "live" / "journal.db"
    damaged = bytearray(file.read_bytes())
    damaged[100:200] = b"\xff" * 100  # the schema page's tree header
    file.write_bytes(bytes(damaged))
    assert journal_file(tmp_path / "live") == file
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        read_journal(tmp_path / "live")
    file.write_bytes(b"not a database")
    assert journal_file(tmp_path / "live") is None


def test_a_run_finds_another_runs_step_and_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs at once into two directories: a run that finds another's step recorded,
    at its start or at any step, refuses rather than move decisions into a second archive."""
    writer, _ = _journal(tmp_path / "live")
    writer.close()
    other = json.dumps(
        {
            "archive": str(tmp_path / "first" / "journal.db"),
            "first": 1,
            "last": 30,
            "chunks": [1],
            "decisions": 30,
        }
    )

    def record_other() -> None:
        with sqlite3.connect(tmp_path / "live" / "journal.db") as conn:
            conn.execute("INSERT OR REPLACE INTO journal_meta VALUES ('archiving', ?)", (other,))

    real_next = journal_archive._next_step

    def other_run_starts(*args):  # the other run records its step after this one started
        step = real_next(*args)
        record_other()
        return step

    with monkeypatch.context() as patch:
        patch.setattr(journal_archive, "_next_step", other_run_starts)
        with pytest.raises(ArchiveError, match="another archive run"):
            archive_journal(tmp_path / "live", T0 + 0.5 * DAY, tmp_path / "second", WINDOW, now=NOW)
    with pytest.raises(ArchiveError, match="was interrupted"):  # found at the start
        archive_journal(tmp_path / "live", T0 + 0.5 * DAY, tmp_path / "second", WINDOW, now=NOW)
    assert read_journal(tmp_path / "live").num_rows == sum(SIZES) - 1
