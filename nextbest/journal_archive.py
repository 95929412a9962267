"""Moving a service journal's old decisions into an archive journal, so the live one stays the
size of what is still worth reading.

A service journals every decision it serves (:mod:`nextbest.decision_journal`), and nothing
removes them: months of traffic make every read of the state directory (training, evaluation,
``nextbest trace``) slower. :func:`archive_journal` moves the decisions made before a cutoff,
with their rewards, withdrawals and per-action rule blocks, into another journal file of the
same layout, while the service keeps writing:

* An archive is a journal: ``nextbest train``, ``evaluate`` and ``trace`` read it as they read
  a state directory, so the audit trail (which rule blocked what, for whom, when) goes with the
  decisions.
* Whole chunks move (a chunk is one committed part: its decisions share its arrays), oldest
  first, in steps of about :data:`STEP_DECISIONS` decisions; a step stops at the first chunk
  holding a decision at or after the cutoff, and the newest chunk never moves (SQLite numbers
  new rows after the last one; an empty table would number them from 1 again).
* Each step is recorded in the live journal (``journal_meta``); then it takes the live
  journal's write lock (a second connection), copies and checks the step into the archive
  and commits it there, deletes it from the live journal and commits, which lets go of the
  lock. Nothing reaches the live journal between the copy and the delete: a reward sent
  meanwhile waits, then finds its decision archived. A crash leaves the step recorded: the
  next run finishes it first, and refuses another archive directory until it has (a
  decision is never in two archives). Nothing is lost either way.
* The archive records which journal it is of (a random id in the live journal's
  ``journal_meta``); another journal's archive is refused.
* A decision whose outcome may still be reported stays: the cutoff must be at least the
  attribution window old. For a moved decision the live journal keeps whom it was for
  (``archived``), so an opt-out or complaint reported later still binds (the service answers
  410: the outcome itself is not recorded).
* The live journal's file does not shrink: SQLite reuses the freed pages for new decisions.
* Whom each moved decision was for stays until :func:`forget_archived` (``nextbest
  forget-archived``) deletes it for the decisions made before a later cutoff.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from nextbest.decision_journal import (
    ARCHIVED_DDL,
    JOURNAL_DDL,
    JOURNAL_FILENAME,
    JournalCorruptError,
    check_journal_layout,
    journal_file,
    open_journal,
)
from nextbest.sqlite_writer import open_sqlite
from nextbest.timestamps import epoch_us

STEP_DECISIONS = 50_000
"""Decisions moved per step at most: each step holds the live journal's write lock while it
deletes, short enough that the service's writers wait for it rather than fail."""
BUSY_TIMEOUT_MS = 30_000
"""How long a step waits for the service's writers to let go of a journal."""


class ArchiveError(ValueError):
    """The archive cannot be made: names the file or setting at fault and why."""


@dataclass(frozen=True)
class ArchiveResult:
    """What :func:`archive_journal` moved, and what it left."""

    decisions: int
    chunks: int
    archive: Path
    """The archive's journal file."""
    kept: int
    """Decisions left in the live journal."""


@dataclass(frozen=True)
class _Step:
    """Whole chunks to move: the decisions ``first_seq..last_seq`` (``decisions`` of them,
    consecutive) and the chunks ``chunk_ids`` they fill."""

    first_seq: int
    last_seq: int
    chunk_ids: list[int]
    decisions: int


def archive_journal(
    journal: str | Path,
    before: datetime,
    archive: str | Path,
    attribution_window: timedelta,
    now: datetime | None = None,
    step_decisions: int = STEP_DECISIONS,
) -> ArchiveResult:
    """Move the decisions of ``journal`` (a file or state directory) made before ``before``
    into the journal in directory ``archive`` (created, or an earlier archive of the same
    journal, added to).

    Raises
    ------
    ArchiveError
        ``before`` without a time zone or within ``attribution_window`` of ``now``; no
        journal at ``journal``; ``archive`` the journal's own directory; an archive holding
        other rows under the same ids (another journal's archive).
    JournalSchemaError
        Either journal in another layout.
    JournalCorruptError
        A chunk whose decisions are not as many as its rows.
    """
    _check_cutoff(
        before,
        attribution_window,
        now,
        "outcomes of those decisions may still be reported, and an archived decision's "
        "outcome is no longer recorded",
    )
    source = journal_file(journal)
    if source is None:
        raise ArchiveError(f"{journal}: not a decision journal (no {JOURNAL_FILENAME})")
    target = Path(archive) / JOURNAL_FILENAME
    if target.resolve() == source.resolve():
        raise ArchiveError(f"{archive}: the archive must be another directory than the journal")
    _check_existing(target)
    conn = open_sqlite(source, busy_timeout_ms=BUSY_TIMEOUT_MS)
    moved = chunks = 0
    try:
        check_journal_layout(conn, source)
        conn.execute(ARCHIVED_DDL)  # a journal last opened by an older service lacks it
        identity = _identity(conn)
        pending = _pending(conn)
        if pending is not None and pending[0] != str(target.resolve()):
            raise ArchiveError(
                f"{source}: an archive into {Path(pending[0]).parent} was interrupted: run it "
                "again with that --out first (a decision must not go to two archives)"
            )
        _create(target)
        conn.execute("ATTACH DATABASE ? AS archive", (str(target),))
        check_journal_layout(conn, target, "archive")
        lock = open_sqlite(source, busy_timeout_ms=BUSY_TIMEOUT_MS)
        try:
            cutoff = epoch_us(before)
            step = None if pending is None else pending[1]
            while step is not None or (step := _next_step(conn, cutoff, step_decisions, source)):
                if _move(conn, lock, step, target, identity):
                    moved += step.decisions
                    chunks += len(step.chunk_ids)
                step = None
        finally:
            lock.close()
        (kept,) = conn.execute("SELECT count(*) FROM main.decisions").fetchone()
    finally:
        conn.close()
    return ArchiveResult(moved, chunks, target, kept)


def _check_cutoff(
    before: datetime, attribution_window: timedelta, now: datetime | None, why: str
) -> None:
    """Refuse a cutoff without a time zone, or within ``attribution_window`` of ``now``
    (``why``: what would go wrong)."""
    if before.tzinfo is None:
        raise ArchiveError(f"before {before.isoformat()} needs a time zone")
    now = now or datetime.now(UTC)
    if before > now - attribution_window:
        raise ArchiveError(
            f"before {before.isoformat(timespec='seconds')} is within the attribution window "
            f"({attribution_window / timedelta(days=1):g} days) of now: {why}"
        )


def forget_archived(
    journal: str | Path,
    before: datetime,
    attribution_window: timedelta,
    now: datetime | None = None,
    step_decisions: int = STEP_DECISIONS,
) -> int:
    """Forget whom the archived decisions of ``journal`` made before ``before`` were for: the
    live journal's ``archived`` rows, one per decision moved out, which otherwise stay for
    ever. A reward reported for one of them is then unknown (404) rather than archived
    (410), and an opt-out or complaint in it no longer binds through the service (the
    platform records it in the customer's own opt-outs). Returns the rows deleted, in steps
    of ``step_decisions`` (each a short write transaction: the service keeps writing).

    Raises
    ------
    ArchiveError
        ``before`` without a time zone or within ``attribution_window`` of ``now``; no
        journal at ``journal``.
    JournalSchemaError
        A journal in another layout.
    """
    _check_cutoff(
        before,
        attribution_window,
        now,
        "outcomes of those decisions may still be reported, and their opt-outs must bind",
    )
    source = journal_file(journal)
    if source is None:
        raise ArchiveError(f"{journal}: not a decision journal (no {JOURNAL_FILENAME})")
    conn = open_sqlite(source, busy_timeout_ms=BUSY_TIMEOUT_MS)
    forgotten = 0
    try:
        check_journal_layout(conn, source)
        conn.execute(ARCHIVED_DDL)  # a journal never archived from has none
        while True:
            conn.execute("BEGIN IMMEDIATE")
            # decision ids are time-ordered: the oldest rows come first in key order
            deleted = conn.execute(
                "DELETE FROM archived WHERE decision_id IN (SELECT decision_id FROM archived "
                "WHERE timestamp_us < ? LIMIT ?)",
                (epoch_us(before), step_decisions),
            ).rowcount
            conn.execute("COMMIT")
            forgotten += deleted
            if deleted < step_decisions:
                return forgotten
    finally:
        conn.close()


def _move(
    conn: sqlite3.Connection, lock: sqlite3.Connection, step: _Step, target: Path, identity: str
) -> bool:
    """Move ``step``: record it in the live journal, take the live journal's write lock (on
    ``lock``, a second connection), copy and check the step into the archive and commit it
    there (``conn``: nothing can reach the live journal meanwhile), then delete it from the
    live journal and clear the record in one transaction, and let go of the lock.

    A copy refused by its check (another journal's archive) clears the record again: nothing
    was copied. False when the step's decisions were gone by then (another run moved them).
    """
    record = _record(lock, step, target)
    lock.execute("BEGIN IMMEDIATE")
    try:
        (present,) = lock.execute(
            "SELECT count(*) FROM decisions WHERE seq BETWEEN ? AND ?",
            (step.first_seq, step.last_seq),
        ).fetchone()
        if present == 0:  # moved meanwhile by another run: nothing to copy
            lock.execute(_CLEAR_RECORD, (_PENDING, record))
            lock.execute("COMMIT")
            return False
        try:
            _copy(conn, step, target, identity)
        except ArchiveError:
            lock.execute("ROLLBACK")
            conn.execute(_CLEAR_RECORD, (_PENDING, record))
            raise
        _delete(lock, step, record)
    except BaseException:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        raise
    return True


def _check_existing(target: Path) -> None:
    """Refuse an archive file that is not a journal of this layout, before writing to it."""
    if not target.exists():
        return
    try:
        conn, _ = open_journal(target)
    except FileNotFoundError:
        raise ArchiveError(f"{target}: not a decision journal (an archive must be one)") from None
    conn.close()


_IDENTITY = "journal_id"
_ARCHIVE_OF = "archive_of"
_PENDING = "archiving"
_CLEAR_RECORD = "DELETE FROM main.journal_meta WHERE key = ? AND value = ?"
"""Clear a step's record: this run's own only (``?2``), never another run's."""


def _identity(conn: sqlite3.Connection) -> str:
    """The live journal's id (made on its first archive)."""
    conn.execute(
        "INSERT OR IGNORE INTO main.journal_meta VALUES (?, ?)", (_IDENTITY, uuid.uuid4().hex)
    )
    (found,) = conn.execute(
        "SELECT value FROM main.journal_meta WHERE key = ?", (_IDENTITY,)
    ).fetchone()
    return str(found)


def _claim(conn: sqlite3.Connection, identity: str, target: Path) -> None:
    """Make the archive this journal's, or refuse another journal's (in the copy's
    transaction: a refused copy claims nothing). An archive that holds decisions but no
    journal id is refused too: it may be another journal's."""
    found = conn.execute(
        "SELECT value FROM archive.journal_meta WHERE key = ?", (_ARCHIVE_OF,)
    ).fetchone()
    if found is None:
        (held,) = conn.execute("SELECT count(*) FROM archive.decisions").fetchone()
        if held:
            raise ArchiveError(
                f"{target}: holds {held} decisions but says of no journal whose archive it is: "
                "archive into a new directory"
            )
        conn.execute("INSERT INTO archive.journal_meta VALUES (?, ?)", (_ARCHIVE_OF, identity))
    elif found[0] != identity:
        raise ArchiveError(
            f"{target}: is the archive of another journal: archive into a new directory"
        )


def _pending(conn: sqlite3.Connection) -> tuple[str, _Step] | None:
    """The step an interrupted run recorded (its archive file and the step), if any."""
    found = conn.execute(
        "SELECT value FROM main.journal_meta WHERE key = ?", (_PENDING,)
    ).fetchone()
    if found is None:
        return None
    record = json.loads(found[0])
    step = _Step(record["first"], record["last"], record["chunks"], record["decisions"])
    return record["archive"], step


def _record(lock: sqlite3.Connection, step: _Step, target: Path) -> str:
    """Record ``step`` in the live journal before any of it is copied; the record. Another
    run's record (a run at the same time, into another directory) refuses.

    Raises
    ------
    ArchiveError
        The live journal records another step.
    """
    record = {
        "archive": str(target.resolve()),
        "first": step.first_seq,
        "last": step.last_seq,
        "chunks": step.chunk_ids,
        "decisions": step.decisions,
    }
    text = json.dumps(record)
    lock.execute("BEGIN IMMEDIATE")
    try:
        found = lock.execute("SELECT value FROM journal_meta WHERE key = ?", (_PENDING,)).fetchone()
        if found is not None and found[0] != text:
            raise ArchiveError(
                f"another archive run is moving part of this journal (into "
                f"{Path(json.loads(found[0])['archive']).parent}): let it finish, or if it was "
                "interrupted, run again with its --out"
            )
        lock.execute("INSERT OR REPLACE INTO journal_meta VALUES (?, ?)", (_PENDING, text))
    except BaseException:
        lock.execute("ROLLBACK")
        raise
    lock.execute("COMMIT")
    return text


def _create(target: Path) -> None:
    """A journal at ``target`` in this version's layout (its tables added if missing)."""
    conn = open_sqlite(target, busy_timeout_ms=BUSY_TIMEOUT_MS)
    try:
        for statement in JOURNAL_DDL:
            conn.execute(statement)
    finally:
        conn.close()


def _next_step(conn: sqlite3.Connection, cutoff_us: int, limit: int, file: Path) -> _Step | None:
    """The oldest whole chunks (in ``seq`` order) whose decisions were all made before
    ``cutoff_us``, about ``limit`` decisions (at least one chunk); None when the oldest chunk
    is not entirely before the cutoff, or is the newest chunk."""
    newest = conn.execute(
        "SELECT chunk_id FROM main.decisions ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    newest = None if newest is None else newest[0]
    rows = conn.execute(
        "SELECT seq, chunk_id, timestamp_us FROM main.decisions ORDER BY seq LIMIT ?", (limit,)
    ).fetchall()
    members: dict[int, list[tuple[int, int]]] = {}
    for seq, chunk_id, at in rows:
        members.setdefault(chunk_id, []).append((seq, at))
    sizes = dict(
        conn.execute(
            "SELECT chunk_id, rows FROM main.decision_chunks WHERE chunk_id IN "
            "(SELECT value FROM json_each(?))",
            (json.dumps(list(members)),),
        ).fetchall()
    )
    taken: list[int] = []
    seqs: list[int] = []
    for chunk_id, found in members.items():
        if len(found) < sizes.get(chunk_id, 0) and not taken:  # one chunk past the limit
            found = conn.execute(
                "SELECT seq, timestamp_us FROM main.decisions WHERE seq >= ? ORDER BY seq LIMIT ?",
                (found[0][0], sizes[chunk_id]),
            ).fetchall()
        if len(found) != sizes.get(chunk_id):
            if taken:  # cut short by the limit: the next step takes it
                break
            raise JournalCorruptError(
                f"{file}: chunk {chunk_id} holds {sizes.get(chunk_id)} rows, its decisions "
                f"are {len(found)}"
            )
        if chunk_id == newest or max(at for _, at in found) >= cutoff_us:
            break
        taken.append(chunk_id)
        seqs += [seq for seq, _ in found]
    if not taken:
        return None
    if seqs[-1] - seqs[0] + 1 != len(seqs):
        raise JournalCorruptError(f"{file}: decisions {seqs[0]}..{seqs[-1]} are not consecutive")
    return _Step(seqs[0], seqs[-1], taken, len(seqs))


_IN_CHUNKS = "chunk_id IN (SELECT value FROM json_each(:chunks))"
_IN_SEQS = "seq BETWEEN :first AND :last"
_COPY = (
    "INSERT OR IGNORE INTO archive.versions SELECT * FROM main.versions",
    "INSERT OR IGNORE INTO archive.rule_sets SELECT * FROM main.rule_sets",
    f"INSERT OR IGNORE INTO archive.decision_chunks SELECT * FROM main.decision_chunks "
    f"WHERE {_IN_CHUNKS}",
    f"INSERT OR IGNORE INTO archive.chunk_blocks SELECT * FROM main.chunk_blocks "
    f"WHERE {_IN_CHUNKS}",
    f"INSERT OR IGNORE INTO archive.decisions SELECT * FROM main.decisions WHERE {_IN_SEQS}",
    f"INSERT OR IGNORE INTO archive.rewards SELECT * FROM main.rewards WHERE {_IN_SEQS}",
    "INSERT OR IGNORE INTO archive.withdrawn SELECT w.decision_id FROM main.withdrawn AS w "
    f"JOIN main.decisions AS d USING (decision_id) WHERE d.{_IN_SEQS}",
)
"""Copy a step's rows (``INSERT OR IGNORE``: a step copied before a crash is copied again)."""
_DIFFERENT = (
    (
        "versions",
        "SELECT count(*) FROM main.versions AS m JOIN archive.versions AS a "
        "USING (version_id) WHERE (m.policy, m.model_version, m.ruleset_version, "
        "m.catalog_version, m.feature_spec_version) IS NOT (a.policy, a.model_version, "
        "a.ruleset_version, a.catalog_version, a.feature_spec_version)",
    ),
    (
        "decisions",
        "SELECT count(*) FROM main.decisions AS m LEFT JOIN archive.decisions AS a "
        f"USING (seq) WHERE m.{_IN_SEQS} AND (a.decision_id IS NOT m.decision_id "
        "OR a.chunk_id IS NOT m.chunk_id OR a.timestamp_us IS NOT m.timestamp_us)",
    ),
    (
        "rewards",
        "SELECT count(*) FROM main.rewards AS m LEFT JOIN archive.rewards AS a "
        f"USING (decision_id) WHERE m.{_IN_SEQS} AND (a.seq IS NOT m.seq OR a.reward IS NOT "
        "m.reward OR a.received_at_us IS NOT m.received_at_us)",
    ),
    (
        "decision_chunks",
        "SELECT count(*) FROM main.decision_chunks AS m LEFT JOIN "
        f"archive.decision_chunks AS a USING (chunk_id) WHERE m.{_IN_CHUNKS} AND "
        "(a.rows IS NOT m.rows OR a.context IS NOT m.context)",
    ),
)
"""After a copy, the rows of the step that the archive does not hold as they are: must be 0."""


def _copy(conn: sqlite3.Connection, step: _Step, target: Path, identity: str) -> None:
    """Copy ``step``'s rows into the archive and check them there, in one transaction of the
    archive (committed before anything is deleted).

    Raises
    ------
    ArchiveError
        The archive holds other rows under the same ids (another journal's archive).
    """
    params = {"first": step.first_seq, "last": step.last_seq, "chunks": json.dumps(step.chunk_ids)}
    conn.execute("BEGIN")
    try:
        _claim(conn, identity, target)
        for statement in _COPY:
            conn.execute(statement, params)
        for table, query in _DIFFERENT:
            (different,) = conn.execute(query, params).fetchone()
            if different:
                raise ArchiveError(
                    f"{target}: holds {different} {table} rows other than this journal's "
                    "under the same ids: it is another journal's archive (archive into a new "
                    "directory)"
                )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _delete(lock: sqlite3.Connection, step: _Step, record: str) -> None:
    """In ``lock``'s transaction (it holds the live journal's write lock since before the
    step was copied): keep whom each served decision of ``step`` was for (``archived``),
    delete the step's rows, clear its record (``record``, this run's own: never another
    run's), and commit."""
    params = {"first": step.first_seq, "last": step.last_seq, "chunks": json.dumps(step.chunk_ids)}
    lock.execute(
        "INSERT OR IGNORE INTO archived SELECT d.decision_id, d.customer_key, d.action, "
        "v.catalog_version, d.timestamp_us FROM decisions AS d JOIN versions AS v "
        f"USING (version_id) WHERE d.{_IN_SEQS} AND d.decision_id NOT IN "
        "(SELECT decision_id FROM withdrawn)",
        params,
    )
    lock.execute(
        "DELETE FROM withdrawn WHERE decision_id IN "
        f"(SELECT decision_id FROM decisions WHERE {_IN_SEQS})",
        params,
    )
    lock.execute(f"DELETE FROM rewards WHERE {_IN_SEQS}", params)
    lock.execute(f"DELETE FROM decisions WHERE {_IN_SEQS}", params)
    lock.execute(f"DELETE FROM chunk_blocks WHERE {_IN_CHUNKS}", params)
    lock.execute(f"DELETE FROM decision_chunks WHERE {_IN_CHUNKS}", params)
    lock.execute(_CLEAR_RECORD, (_PENDING, record))
    lock.execute("COMMIT")


__all__ = ["STEP_DECISIONS", "ArchiveError", "ArchiveResult", "archive_journal"]
