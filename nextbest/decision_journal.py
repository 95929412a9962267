"""The decision journal: the service's durable, append-only log of decisions and rewards.

One SQLite database file (``<state_dir>/journal.db``) in WAL mode, shared by every worker
process of the service and read directly by training (:func:`read_journal`, and through it
:func:`nextbest.decision_log.read_decisions`), so served decisions become training data
without an export step.

Tables (times are integer microseconds since the epoch, UTC; arrays are LZ4-compressed
little-endian blobs, one per submitted batch):

``decisions``
    One row per decision, never updated: ``seq`` (commit order), ``decision_id`` (unique),
    ``timestamp_us``, ``customer_key`` (pseudonymised by the caller), ``action``, ``pscore``,
    ``campaign_id``, ``version_id`` and ``chunk_id``: the row of ``decision_chunks`` holding
    its arrays.
``decision_chunks``
    The arrays of the decisions of one submitted batch, one row per batch: ``rows``,
    ``n_features``, ``n_actions`` and, each compressed with ``codec`` (LZ4 frames), the
    batch's arrays as single blobs: ``context`` (float32 ``(rows, n_features)``),
    ``candidates`` (a bitmap: ``rows`` rows of ``ceil(n_actions / 8)`` bytes, bit ``a`` of a
    row set if action ``a`` was allowed, as :func:`numpy.packbits` writes it) and
    ``action_dist`` (float32, the probability of every candidate, row by row in increasing
    action order; or null). A chunk's decisions are consecutive in ``seq``. Storing arrays
    per batch instead of per decision keeps a decision's cost in the journal at a few
    microseconds (one short row) however large the catalogue.
``versions``
    What served the decisions: ``policy``, ``model_version``, ``ruleset_version``,
    ``catalog_version``, ``feature_spec_version``, once per combination (a handful of rows;
    storing them once keeps every decision row short, which is most of the append and read
    speed).
``rewards``
    At most one row per decision (its ``decision_id`` and ``seq``): ``converted``,
    ``complaint``, ``opted_out``, ``value_cny``, ``reward``
    (see :func:`~nextbest.rewards.reward_cny`),
    ``reward_at_us`` (when the outcome happened, as the caller gave it, or null),
    ``received_at_us``, ``late`` (outside the attribution window).
``rule_sets``, ``chunk_blocks``
    Traceability: which rule blocked which action, for every decision. ``chunk_blocks``
    holds per chunk ``blocked_by`` (uint8 ``(rows, n_actions)``, compressed: the index of
    the first rule that blocked each action, 255 where the rules allowed it), and
    ``rule_sets`` the rule ids those indices name, per ``ruleset_version`` (a JSON list).
    Read with :func:`decision_trace`. Chunks written without it (before it existed, or by
    a writer not given the rules) have no row.
``decision_log`` (a view)
    The scalar columns joined (versions, rewards), one row per decision, for ad-hoc SQL;
    the arrays are read by :func:`read_journal`.

Writes go through a :class:`~nextbest.sqlite_writer.GroupCommitWriter` (group commit on a
background thread; a write's future resolves after its transaction committed, so a caller
that acknowledges after the future never acknowledges a decision that could be lost). Its
module docstring describes the durability of ``synchronous=NORMAL`` and ``FULL``, and how to
copy a live journal (``sqlite3 journal.db ".backup copy.db"``, not ``cp``).

Decisions arrive as :class:`~nextbest.decision_batch.DecisionBatch` arrays; rewards are
valued by a :class:`~nextbest.rewards.RewardRule`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic_core import to_json

from nextbest.compliance.engine import ALLOWED
from nextbest.decision_batch import VERSION_FIELDS, DecisionBatch
from nextbest.decision_log import DECISION_SCHEMA
from nextbest.packed_rows import PackedRows, int_field, real_field, text_field
from nextbest.rewards import (
    ArchivedDecisionError,
    DecidedFor,
    RewardConflictError,
    RewardOutcome,
    RewardResult,
    RewardRule,
    RewardTimeError,
    UnknownDecisionError,
    reward_cny,
)
from nextbest.sqlite_writer import (
    GroupCommitWriter,
    Synchronous,
    open_sqlite,
    sqlite_tables,
)
from nextbest.timestamps import epoch_us, from_epoch_us

JOURNAL_FILENAME = "journal.db"
"""Name of the journal inside a service state directory."""
JOURNAL_SCHEMA_ID = "nextbest.decision-journal/2"


ARCHIVED_DDL = """CREATE TABLE IF NOT EXISTS archived (
    decision_id TEXT PRIMARY KEY,
    customer_key TEXT NOT NULL,
    action INTEGER NOT NULL,
    catalog_version TEXT NOT NULL,
    timestamp_us INTEGER NOT NULL
) WITHOUT ROWID"""
"""Decisions ``nextbest archive`` moved out (:mod:`nextbest.journal_archive`): whom each was
for, so an opt-out reported for it later still binds."""
JOURNAL_DDL = (
    "CREATE TABLE IF NOT EXISTS journal_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"INSERT OR IGNORE INTO journal_meta VALUES ('schema', '{JOURNAL_SCHEMA_ID}')",
    """CREATE TABLE IF NOT EXISTS versions (
        version_id INTEGER PRIMARY KEY,
        policy TEXT NOT NULL,
        model_version TEXT NOT NULL,
        ruleset_version TEXT NOT NULL,
        catalog_version TEXT NOT NULL,
        feature_spec_version TEXT NOT NULL,
        UNIQUE (policy, model_version, ruleset_version, catalog_version, feature_spec_version)
    )""",
    """CREATE TABLE IF NOT EXISTS decision_chunks (
        chunk_id INTEGER PRIMARY KEY,
        rows INTEGER NOT NULL,
        n_features INTEGER NOT NULL,
        n_actions INTEGER NOT NULL,
        codec TEXT NOT NULL,
        context BLOB NOT NULL,
        candidates BLOB NOT NULL,
        action_dist BLOB
    )""",
    """CREATE TABLE IF NOT EXISTS decisions (
        seq INTEGER PRIMARY KEY,
        decision_id TEXT NOT NULL UNIQUE,
        timestamp_us INTEGER NOT NULL,
        customer_key TEXT NOT NULL,
        action INTEGER NOT NULL,
        pscore REAL,
        campaign_id TEXT,
        version_id INTEGER NOT NULL REFERENCES versions (version_id),
        chunk_id INTEGER NOT NULL REFERENCES decision_chunks (chunk_id)
    )""",
    """CREATE TABLE IF NOT EXISTS rewards (
        decision_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        converted INTEGER NOT NULL,
        complaint INTEGER NOT NULL,
        opted_out INTEGER NOT NULL,
        value_cny REAL NOT NULL,
        reward REAL NOT NULL,
        reward_at_us INTEGER,
        received_at_us INTEGER NOT NULL,
        late INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS withdrawn (
        decision_id TEXT PRIMARY KEY
    ) WITHOUT ROWID""",
    ARCHIVED_DDL,
    """CREATE TABLE IF NOT EXISTS rule_sets (
        ruleset_version TEXT PRIMARY KEY,
        rule_ids TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS chunk_blocks (
        chunk_id INTEGER PRIMARY KEY REFERENCES decision_chunks (chunk_id),
        blocked_by BLOB NOT NULL
    )""",
    "DROP VIEW IF EXISTS decision_log",  # a file from before withdrawals: the view without
    """CREATE VIEW decision_log AS
        SELECT d.seq, d.decision_id, d.timestamp_us, d.customer_key, d.action, d.pscore,
            d.campaign_id, d.chunk_id, v.policy, v.model_version, v.ruleset_version,
            v.catalog_version, v.feature_spec_version, r.converted, r.complaint, r.opted_out,
            r.value_cny, r.reward, r.reward_at_us, r.received_at_us, r.late
        FROM decisions d JOIN versions v USING (version_id)
        LEFT JOIN rewards r USING (seq)
        WHERE d.decision_id NOT IN (SELECT decision_id FROM withdrawn)""",
)
"""The journal's tables (idempotent DDL). ``withdrawn`` lists decisions that were journalled
but not served (:meth:`JournalWriter.withdraw`); readers and the ``decision_log`` view leave
them out. It was added to layout 2 without a new layout id: a file without it gets it when
a writer opens it, and a reader treats its absence as no withdrawal."""


_INSERT_CHUNK = (
    "INSERT INTO decision_chunks (rows, n_features, n_actions, codec, context, candidates, "
    "action_dist) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_DECISIONS = (
    "INSERT INTO decisions (decision_id, timestamp_us, customer_key, action, pscore, "
    "campaign_id, version_id, chunk_id) SELECT {decision_id}, {timestamp_us}, {customer_key}, "
    "{action}, {pscore}, {campaign_id}, ?2, ?3 FROM packed"
)
"""All the decisions of a batch (:func:`_decision_rows`) in one statement: SQLite reads them
without the GIL, where ``executemany`` takes the GIL back for every row (on a 10,000-row
batch, thousands of hand-offs with the event loop's thread, each up to the 5 ms switch
interval)."""
_DECISIONS_FREE_PARAM = 4
"""The first parameter number :data:`_INSERT_DECISIONS` leaves free (``?1`` the packed rows,
``?2`` the version id, ``?3`` the chunk id): :func:`_decision_rows` numbers its shared values
from here."""
CHUNK_CODEC = "lz4"
"""Compression of the chunk blobs (LZ4 frames, through pyarrow): an exploration policy's
probabilities shrink thirty-fold in about a millisecond per 10,000 decisions."""


def _pack(raw: np.ndarray) -> bytes:
    return pa.compress(raw, codec=CHUNK_CODEC, asbytes=True)  # type: ignore[no-any-return]


def _candidate_mask(blob: bytes, codec: str, rows: int, n_actions: int) -> np.ndarray:
    """A chunk's ``candidates`` bitmap as a bool mask ``(rows, n_actions)``."""
    width = -(-n_actions // 8)
    packed = _unpack(blob, codec, rows * width, "u1").reshape(rows, width)
    return np.unpackbits(packed, axis=1)[:, :n_actions].astype(bool)


def _unpack(blob: bytes, codec: str, nbytes: int, dtype: str) -> np.ndarray:
    return np.frombuffer(pa.decompress(blob, nbytes, codec=codec, asbytes=True), dtype)


def _candidate_order(batch: DecisionBatch) -> np.ndarray | None:
    """Permutation that sorts every row's candidates by action id (None if already sorted).

    Raises
    ------
    ValueError
        If a row lists an action twice, or an action id is negative.
    """
    actions = np.asarray(batch.candidate_actions, np.int64)
    offsets = np.asarray(batch.candidate_offsets, np.int64)
    if len(actions) and actions.min() < 0:
        raise ValueError(f"candidate_actions has a negative action id {int(actions.min())}")
    step = np.diff(actions)
    step[offsets[1:-1] - 1] = 1  # row boundaries may go down
    if (step > 0).all():
        return None
    rows = np.repeat(np.arange(len(batch)), np.diff(offsets))
    order = np.lexsort((actions, rows))
    ordered = actions[order]
    repeated = (np.diff(ordered) == 0) & (np.diff(rows) == 0)
    if repeated.any():
        i = int(np.argmax(repeated))
        raise ValueError(f"row {int(rows[i])} lists candidate action {int(ordered[i])} twice")
    return order


def _chunk_row(batch: DecisionBatch) -> tuple[Any, ...]:
    """The ``decision_chunks`` values of a batch (its arrays as compressed blobs)."""
    n = len(batch)
    context = np.ascontiguousarray(batch.context, "<f4")
    dist = None if batch.action_dist is None else np.asarray(batch.action_dist, "<f4")
    if batch.candidate_mask is not None:  # candidates in row-major mask order already
        n_actions = batch.candidate_mask.shape[1]
        packed = np.packbits(batch.candidate_mask, axis=1)
    else:
        actions = np.asarray(batch.candidate_actions, np.int64)
        offsets = np.asarray(batch.candidate_offsets, np.int64)
        order = _candidate_order(batch)
        if order is not None:
            actions = actions[order]
            dist = None if dist is None else dist[order]
        n_actions = int(actions.max()) + 1 if len(actions) else 0
        if batch.blocked_by is not None:  # the rules' array spans the whole catalogue
            n_actions = max(n_actions, batch.blocked_by.shape[1])
        width = -(-n_actions // 8)
        bits = np.zeros(n * width * 8, bool)
        bits[np.repeat(np.arange(n, dtype=np.int64) * width * 8, np.diff(offsets)) + actions] = True
        packed = np.packbits(bits)
    return (
        n,
        context.shape[1],
        n_actions,
        CHUNK_CODEC,
        _pack(context),
        _pack(packed),
        None if dist is None else _pack(np.ascontiguousarray(dist, "<f4")),
    )


def _decision_rows(batch: DecisionBatch) -> tuple[PackedRows, dict[str, str], tuple[Any, ...]]:
    """The ``decisions`` values of a batch but ``version_id`` and ``chunk_id``, for
    :data:`_INSERT_DECISIONS`: the rows packed, and the time and campaign when the same
    for every row, as parameters numbered from :data:`_DECISIONS_FREE_PARAM` (placeholders
    and values; a NaN pscore, unknown, is stored as null)."""
    n = len(batch)
    fields = {
        "decision_id": text_field(batch.decision_id),
        "customer_key": text_field(batch.customer_key),
        "action": int_field(batch.action),
        "pscore": real_field(np.full(n, np.nan) if batch.pscore is None else batch.pscore),
    }
    given: dict[str, str] = {}
    values: list[Any] = []
    if np.ndim(batch.timestamp_us) == 0:
        given["timestamp_us"] = f"?{_DECISIONS_FREE_PARAM + len(values)}"
        values.append(int(batch.timestamp_us))
    else:
        fields["timestamp_us"] = int_field(batch.timestamp_us)
    campaign = batch.campaign_id
    if campaign is None or isinstance(campaign, str):
        given["campaign_id"] = f"?{_DECISIONS_FREE_PARAM + len(values)}"
        values.append(campaign)
    else:
        fields["campaign_id"] = text_field(campaign)
    return PackedRows.of(**fields), given, tuple(values)


class JournalWriter:
    """Appends decisions and records rewards in a journal file, off the request path.

    Several processes may open writers on the same file (each with its own thread and
    connection); SQLite serialises their transactions. Every write returns a
    :class:`concurrent.futures.Future` resolved after its transaction committed; from
    asyncio, ``await asyncio.wrap_future(future)``.

    Parameters
    ----------
    path : path
        The journal file, or a state directory (the file is ``journal.db`` inside it).
    reward_rule : RewardRule
        Turns outcomes into rewards and flags late ones.
    synchronous : {"NORMAL", "FULL"}
        ``NORMAL``: acknowledged writes survive a killed process; ``FULL``: also power loss
        (one fsync per committed group). See :mod:`nextbest.sqlite_writer`.
    busy_timeout_ms : int
    max_group_rows : int
        Decisions per transaction at most (a bigger submitted batch is one transaction).

    Raises
    ------
    JournalSchemaError
        If ``path`` is a journal written in another layout.

    Examples
    --------
    In an asyncio handler, acknowledge only once the decisions are durable::

        writer = JournalWriter(state_dir, RewardRule.from_catalog(catalog, 300.0))
        await asyncio.wrap_future(writer.submit(batch))
    """

    def __init__(
        self,
        path: str | Path,
        reward_rule: RewardRule,
        synchronous: Synchronous = "NORMAL",
        busy_timeout_ms: int = 10_000,
        max_group_rows: int = 50_000,
    ) -> None:
        path = Path(path)
        self.path = path / JOURNAL_FILENAME if path.is_dir() else path
        self.reward_rule = reward_rule
        if journal_file(self.path) is not None:
            existing = open_sqlite(self.path, read_only=True, busy_timeout_ms=busy_timeout_ms)
            try:
                check_journal_layout(existing, self.path)
            finally:
                existing.close()
        self._writer = GroupCommitWriter(
            self.path,
            JOURNAL_DDL,
            synchronous=synchronous,
            busy_timeout_ms=busy_timeout_ms,
            max_group_rows=max_group_rows,
            name="decision-journal",
        )
        self._version_ids: dict[tuple[str, ...], int] = {}
        """Ids of the versions rows committed so far, by served-by tuple."""
        self._rule_sets: set[str] = set()
        """Rule-set versions whose ``rule_sets`` row this writer has seen committed."""

    def submit(
        self, decisions: DecisionBatch, inline: bool = False, more: bool = False
    ) -> Future[int]:
        """Queue a batch of decisions; the future gives the number of rows once committed.

        With ``inline``, commit on the calling thread when the writer is idle (see
        :meth:`GroupCommitWriter.submit_inline`): for a request's few decisions, faster.
        With ``more``, the caller submits more decisions right after these (the next part
        of a batch), to commit in the same transaction.
        The scalar columns are serialised here, on the caller's thread; the arrays are
        compressed on the writer's. An empty batch resolves to 0 at once (no chunk row).

        The future fails with :class:`sqlite3.IntegrityError` if a decision id is already
        in the journal (then none of the batch is written).

        Raises
        ------
        RuntimeError
            If the journal is closed.
        """
        if len(decisions) == 0:  # nothing to store (and no empty chunk)
            if self._writer.closed:
                raise RuntimeError(f"{self.path}: the writer is closed")
            done: Future[int] = Future()
            done.set_result(0)
            return done
        served_by = tuple(getattr(decisions, name) for name in VERSION_FIELDS)
        known = self._version_ids.get(served_by)
        used: list[int] = []
        rows, given, constants = _decision_rows(decisions)  # here: the writer runs GIL-free
        traced = decisions.blocked_by is not None
        new_rules = traced and decisions.ruleset_version not in self._rule_sets

        def append(conn: sqlite3.Connection) -> int:
            version_id = known if known is not None else self._version_id(conn, served_by)
            chunk_id = conn.execute(_INSERT_CHUNK, _chunk_row(decisions)).lastrowid
            if new_rules:  # once per rule-set version and writer (a version's ids never change)
                conn.execute(
                    "INSERT OR IGNORE INTO rule_sets VALUES (?, ?)",
                    (decisions.ruleset_version, json.dumps(list(decisions.rule_ids or ()))),
                )
            if traced:
                blocked = np.ascontiguousarray(decisions.blocked_by, np.uint8)
                conn.execute("INSERT INTO chunk_blocks VALUES (?, ?)", (chunk_id, _pack(blocked)))
            statement = rows.sql(_INSERT_DECISIONS, **given)
            conn.execute(statement, (rows.param, version_id, chunk_id, *constants))
            used.append(version_id)
            return len(decisions)

        def remember(future: Future[int]) -> None:
            # only a committed row is known for good (a rolled-back one is not)
            committed = not future.cancelled() and future.exception() is None
            if known is None and used and committed:
                self._version_ids[served_by] = used[0]
            if new_rules and committed:
                self._rule_sets.add(decisions.ruleset_version)

        submit = self._writer.submit_inline if inline else self._writer.submit
        future = submit(append, rows=len(decisions), more=more)
        future.add_done_callback(remember)
        return future

    @staticmethod
    def _version_id(conn: sqlite3.Connection, served_by: tuple[str, ...]) -> int:
        """Id of the versions row of ``served_by``, inserted if new (on the writer thread).

        :meth:`submit` remembers the ids of committed rows (they never change, in any
        process), so this runs once per model and rule-set version and writer.
        """
        conn.execute(
            f"INSERT OR IGNORE INTO versions ({', '.join(VERSION_FIELDS)}) VALUES (?, ?, ?, ?, ?)",
            served_by,
        )
        where = " AND ".join(f"{name} = ?" for name in VERSION_FIELDS)
        (version_id,) = conn.execute(
            f"SELECT version_id FROM versions WHERE {where}", served_by
        ).fetchone()
        return int(version_id)

    def submit_reward(
        self, decision_id: str, outcome: RewardOutcome, received_at: datetime | None = None
    ) -> Future[RewardResult]:
        """Queue the outcome of a decision; the future gives the stored :class:`RewardResult`.

        Idempotent per decision id: the same outcome again resolves to the stored result
        with ``duplicate=True``. The future fails with :class:`UnknownDecisionError` (no such
        decision), :class:`RewardConflictError` (a different outcome is already recorded) or
        :class:`RewardTimeError` (the outcome predates the decision). An outcome later than
        the attribution window after the decision is stored with ``late=True``.
        """
        received_us = epoch_us(received_at or datetime.now(UTC))
        given_at_us = None if outcome.reward_at is None else epoch_us(outcome.reward_at)
        rule = self.reward_rule

        def record(conn: sqlite3.Connection) -> RewardResult:
            found = conn.execute(
                "SELECT d.seq, d.timestamp_us, d.action, d.customer_key, v.catalog_version "
                "FROM decisions AS d JOIN versions AS v USING (version_id) "
                "WHERE d.decision_id = ? "
                "AND d.decision_id NOT IN (SELECT decision_id FROM withdrawn)",
                (decision_id,),
            ).fetchone()
            if found is None:  # or withdrawn: journalled, never served
                moved = conn.execute(
                    "SELECT customer_key, action, catalog_version, timestamp_us FROM archived "
                    "WHERE decision_id = ?",
                    (decision_id,),
                ).fetchone()
                if moved is not None:  # nextbest archive moved it: whom it was for stays
                    raise ArchivedDecisionError(
                        decision_id,
                        DecidedFor(moved[0], int(moved[1]), moved[2], from_epoch_us(moved[3])),
                    )
                raise UnknownDecisionError(decision_id)
            seq, decided_us, action, customer_key, catalog_version = found
            decision = DecidedFor(
                customer_key, int(action), catalog_version, from_epoch_us(decided_us)
            )
            stored = conn.execute(
                "SELECT converted, complaint, opted_out, value_cny, reward, reward_at_us, "
                "received_at_us, late FROM rewards WHERE decision_id = ?",
                (decision_id,),
            ).fetchone()
            if stored is not None:
                try:
                    repeated = _repeat(decision_id, outcome, given_at_us, stored)
                except RewardConflictError as exc:
                    exc.decision = decision
                    raise
                return replace(repeated, decision=decision)
            happened_us = received_us if given_at_us is None else given_at_us
            if happened_us < decided_us:
                early = RewardTimeError(
                    f"the outcome of decision {decision_id!r} is dated "
                    f"{from_epoch_us(happened_us).isoformat()}, before the decision "
                    f"({from_epoch_us(decided_us).isoformat()})"
                )
                early.decision = decision
                raise early
            late = happened_us - decided_us > rule.attribution_window // timedelta(microseconds=1)
            cost = rule.contact_cost_cny[action] if 0 <= action < len(rule.contact_cost_cny) else 0
            value = float(
                reward_cny(outcome.value_cny, cost, outcome.complaint, rule.complaint_penalty_cny)
            )
            conn.execute(
                "INSERT INTO rewards VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    decision_id,
                    seq,
                    outcome.converted,
                    outcome.complaint,
                    outcome.opted_out,
                    float(outcome.value_cny),
                    value,
                    given_at_us,
                    received_us,
                    late,
                ),
            )
            return RewardResult(
                decision_id,
                outcome,
                value,
                from_epoch_us(received_us),
                bool(late),
                duplicate=False,
                decision=decision,
            )

        return self._writer.submit(record)

    def record_reward(
        self,
        decision_id: str,
        outcome: RewardOutcome,
        received_at: datetime | None = None,
        timeout: float | None = None,
    ) -> RewardResult:
        """Blocking form of :meth:`submit_reward` (raises its errors)."""
        return self.submit_reward(decision_id, outcome, received_at).result(timeout)

    def withdraw(self, decision_ids: Sequence[str]) -> Future[int]:
        """Mark journalled decisions as not served, so that no reader counts them (the
        service journals a decision while its contact is being stored; when the contact
        store refuses the contact, the customer is decided again under a new id). The
        decisions stay in the file, the journal only grows; the future gives the decisions
        newly withdrawn.

        Raises
        ------
        RuntimeError
            If the journal is closed.
        """
        text = to_json(list(decision_ids)).decode()

        def append(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "INSERT OR IGNORE INTO withdrawn (decision_id) SELECT value FROM json_each(?)",
                (text,),
            ).rowcount

        return self._writer.submit(append, rows=len(decision_ids))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything submitted so far is committed."""
        self._writer.flush(timeout)

    def close(self) -> None:
        """Commit everything queued and close (idempotent)."""
        self._writer.close()

    @property
    def commits(self) -> int:
        """Transactions committed by this writer."""
        return self._writer.commits

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _repeat(
    decision_id: str, outcome: RewardOutcome, given_at_us: int | None, stored: tuple[Any, ...]
) -> RewardResult:
    converted, complaint, opted_out, value_cny, reward, at_us, received_us, late = stored
    kept = RewardOutcome(
        bool(converted),
        bool(complaint),
        bool(opted_out),
        value_cny,
        None if at_us is None else from_epoch_us(at_us),
    )
    differs = [
        name
        for name, old, new in (
            ("converted", kept.converted, outcome.converted),
            ("complaint", kept.complaint, outcome.complaint),
            ("opted_out", kept.opted_out, outcome.opted_out),
            ("value_cny", kept.value_cny, float(outcome.value_cny)),
            ("reward_at", at_us, given_at_us),
        )
        if old != new
    ]
    if differs:
        raise RewardConflictError(decision_id, differs, kept, from_epoch_us(received_us))
    return RewardResult(decision_id, kept, reward, from_epoch_us(received_us), bool(late), True)


# --------------------------------------------------------------------------- reading


def journal_file(path: str | Path) -> Path | None:
    """The journal database at ``path`` (a journal file, or a directory holding
    ``journal.db``), or None if ``path`` is not a journal."""
    path = Path(path)
    if path.is_dir():
        path = path / JOURNAL_FILENAME
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        return path if sqlite_tables(path) is not None else None
    except OSError:  # a database that cannot be read (damaged, permissions): its reader says why
        return path


_READ_CHUNK = 100_000


def read_journal(
    path: str | Path, include_late: bool = True, rewarded_only: bool = False
) -> pa.Table:
    """The journal's decisions, each with its reward, as a table in ``DECISION_SCHEMA``.

    Rows are in commit order; withdrawn decisions (journalled, never served:
    :meth:`JournalWriter.withdraw`) are left out. Outcome columns are null for decisions
    without a reward;
    ``reward_at`` is when the outcome happened, or when it was received if the caller did
    not say. Reads one consistent snapshot while writers keep appending. Decisions,
    versions, chunks and rewards are read by one scan each (no per-row join); the chunks
    are decoded into Arrow list arrays in blocks of about 100,000 decisions (the table's
    list offsets cannot overflow, however long the journal, and contexts of different
    widths keep their own lengths). ``read_decisions`` and training read the columns chunk
    by chunk; code that combines them into one list array meets Arrow's 2**31-value limit.

    Parameters
    ----------
    path : path
        Journal file or state directory.
    include_late : bool
        Keep outcomes that arrived after the attribution window (False: their outcome
        columns are null, as if they had not arrived).
    rewarded_only : bool
        Only decisions whose outcome is known (after ``include_late``).

    Returns
    -------
    pyarrow.Table
        ``DECISION_SCHEMA``, one row per decision; not validated (``read_decisions``
        validates).

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a journal.
    JournalSchemaError
        If the journal was written in another layout.
    JournalCorruptError
        If its decisions and their arrays do not line up.
    """
    conn, file = open_journal(path)
    try:
        conn.execute("BEGIN")  # one snapshot for the scans
        versions = conn.execute(
            f"SELECT version_id, {', '.join(VERSION_FIELDS)} FROM versions ORDER BY version_id"
        ).fetchall()
        cursor = conn.execute(
            "SELECT seq, decision_id, timestamp_us, customer_key, action, pscore, "
            "campaign_id, version_id, chunk_id FROM decisions ORDER BY seq"
        )
        scans = []
        while rows := cursor.fetchmany(_READ_CHUNK):
            scans.append(_decision_scan(rows))
        chunks = conn.execute(
            "SELECT chunk_id, rows, n_features, n_actions, codec, context, candidates, "
            "action_dist FROM decision_chunks ORDER BY chunk_id"
        ).fetchall()
        rewards = conn.execute(
            "SELECT seq, reward, converted, complaint, opted_out, value_cny, "
            "coalesce(reward_at_us, received_at_us), late FROM rewards ORDER BY seq"
        ).fetchall()
        withdrawn: list[str] = []
        if conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'withdrawn'"
        ).fetchone():
            withdrawn = [r[0] for r in conn.execute("SELECT decision_id FROM withdrawn")]
        conn.execute("COMMIT")
    finally:
        conn.close()
    if not scans:
        return DECISION_SCHEMA.empty_table()
    seq = np.concatenate([c[0] for c in scans])
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        name: pa.chunked_array([c[1][name] for c in scans]) for name in scans[0][1]
    }
    columns.update(_chunk_arrays(chunks, columns.pop("chunk_id").to_numpy(), file))
    version_ids = np.array([v[0] for v in versions], np.int64)
    row_version = np.searchsorted(version_ids, columns.pop("version_id").to_numpy())
    for i, name in enumerate(VERSION_FIELDS, start=1):
        columns[name] = pa.array([v[i] for v in versions], pa.string()).take(row_version)
    columns.update(_reward_columns(rewards, seq, include_late))
    table = pa.Table.from_arrays([columns[f.name] for f in DECISION_SCHEMA], schema=DECISION_SCHEMA)
    if withdrawn:  # journalled, never served
        served = pc.invert(pc.is_in(table.column("decision_id"), pa.array(withdrawn, pa.string())))
        table = table.filter(served)
    if rewarded_only:
        table = table.filter(table.column("reward").is_valid())
    return table


def open_journal(path: str | Path) -> tuple[sqlite3.Connection, Path]:
    """A read-only connection to the journal at ``path`` (file or state directory), its
    layout checked, and the file.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a journal.
    JournalSchemaError
        If the journal was written in another layout.
    """
    file = journal_file(path)
    if file is None:
        raise FileNotFoundError(f"{path}: not a decision journal (no {JOURNAL_FILENAME})")
    conn = open_sqlite(file, read_only=True)
    try:
        check_journal_layout(conn, file)
    except BaseException:
        conn.close()
        raise
    return conn, file


def _decision_scan(rows: list[tuple[Any, ...]]) -> tuple[np.ndarray, dict[str, pa.Array]]:
    """Rows of the decisions scan -> (seq ``(m,)``, Arrow columns by name)."""
    (seq, ids, stamps, keys, actions, pscores, campaigns, versions, chunk_ids) = zip(
        *rows, strict=True
    )
    return np.array(seq, np.int64), {
        "decision_id": pa.array(ids, pa.string()),
        "timestamp": pa.array(np.array(stamps, np.int64), pa.timestamp("us", tz="UTC")),
        "customer_key": pa.array(keys, pa.string()),
        "action": pa.array(np.array(actions, np.int32)),
        "pscore": pa.array(pscores, pa.float64()),
        "campaign_id": pa.array(campaigns, pa.string()),
        "version_id": pa.array(np.array(versions, np.int64)),
        "chunk_id": pa.array(np.array(chunk_ids, np.int64)),
    }


@dataclass(frozen=True)
class DecisionTrace:
    """What the journal says about one decision, for an audit after the fact: for whom
    (the pseudonymised key), when, what was chosen, and per action whether it was a
    candidate and which rule blocked it.

    Attributes
    ----------
    decision_id, customer_key, ruleset_version, catalog_version : str
        ``catalog_version``: the catalogue the action indices belong to.
    timestamp : datetime (UTC)
    action : int
        The chosen action.
    candidate : bool ``(A,)``
        The actions the decision could choose (allowed by the rules and by the request).
    blocked_by : uint8 ``(A,)`` or None
        Index in ``rule_ids`` of the first rule that blocked each action, 255 where the
        rules allowed it; None for a decision journalled without it.
    rule_ids : tuple of str or None
    """

    decision_id: str
    timestamp: datetime
    customer_key: str
    action: int
    ruleset_version: str
    catalog_version: str
    candidate: np.ndarray
    blocked_by: np.ndarray | None
    rule_ids: tuple[str, ...] | None

    def blocked(self) -> dict[str, list[int]]:
        """The actions each rule blocked (rule id -> action ids, in rule-set order); empty
        when the rules were not journalled."""
        if self.blocked_by is None or self.rule_ids is None:
            return {}
        out: dict[str, list[int]] = {}
        for code in np.unique(self.blocked_by[self.blocked_by != ALLOWED]).tolist():
            out[self.rule_ids[code]] = np.flatnonzero(self.blocked_by == code).tolist()
        return out

    def left_out(self) -> list[int]:
        """The actions the rules allowed but the request left out (its candidates, channels
        or campaign); empty when the rules were not journalled."""
        if self.blocked_by is None:
            return []
        return np.flatnonzero((self.blocked_by == ALLOWED) & ~self.candidate).tolist()


def decision_trace(path: str | Path, decision_id: str) -> DecisionTrace:
    """The journal's record of one decision (:class:`DecisionTrace`), withdrawn ones
    included (journalled, never served).

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a journal.
    UnknownDecisionError
        If the journal has no such decision.
    """
    conn, _ = open_journal(path)
    try:
        conn.execute("BEGIN")  # one snapshot
        found = conn.execute(
            "SELECT d.seq, d.timestamp_us, d.customer_key, d.action, d.chunk_id, "
            "v.ruleset_version, v.catalog_version FROM decisions AS d "
            "JOIN versions AS v USING (version_id) WHERE d.decision_id = ?",
            (decision_id,),
        ).fetchone()
        if found is None:
            raise UnknownDecisionError(decision_id)
        seq, stamp, key, action, chunk_id, ruleset, catalog_version = found
        rows, n_actions, codec, candidates = conn.execute(
            "SELECT rows, n_actions, codec, candidates FROM decision_chunks WHERE chunk_id = ?",
            (chunk_id,),
        ).fetchone()
        row = seq - _first_seq(conn, chunk_id, seq, rows)
        candidate = _candidate_mask(candidates, codec, rows, n_actions)[row]
        blocked_by = rule_ids = None
        stored = conn.execute(
            "SELECT c.blocked_by, r.rule_ids FROM chunk_blocks AS c, rule_sets AS r "
            "WHERE c.chunk_id = ? AND r.ruleset_version = ?",
            (chunk_id, ruleset),
        ).fetchone()
        if stored is not None:
            codes = _unpack(stored[0], codec, rows * n_actions, "u1").reshape(rows, n_actions)
            blocked_by, rule_ids = codes[row].copy(), tuple(json.loads(stored[1]))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return DecisionTrace(
        decision_id,
        from_epoch_us(stamp),
        key,
        int(action),
        ruleset,
        catalog_version,
        candidate,
        blocked_by,
        rule_ids,
    )


def _first_seq(conn: sqlite3.Connection, chunk_id: int, seq: int, rows: int) -> int:
    """The first ``seq`` of chunk ``chunk_id``, which holds decision ``seq``: a chunk's
    ``rows`` decisions are consecutive and chunks are in ``seq`` order, so a binary search
    over the ``rows`` before it (by primary key) finds it."""
    lo, hi = seq - rows + 1, seq  # the first is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        found = conn.execute("SELECT chunk_id FROM decisions WHERE seq = ?", (mid,)).fetchone()
        if found is not None and found[0] == chunk_id:
            hi = mid
        else:
            lo = mid + 1
    return lo


class JournalCorruptError(ValueError):
    """The decisions and their chunks of arrays do not line up."""


class JournalSchemaError(ValueError):
    """A journal written in another layout than this version's (:data:`JOURNAL_SCHEMA_ID`)."""


def check_journal_layout(conn: sqlite3.Connection, file: Path, schema: str = "main") -> None:
    """Refuse a journal (database ``schema`` of ``conn``: ``main``, or an attached one) of
    another layout; a file without the table is a new journal.

    Raises
    ------
    JournalSchemaError
    """
    has_meta = conn.execute(
        f"SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = 'journal_meta'"
    ).fetchone()
    if not has_meta:
        return
    found = conn.execute(f"SELECT value FROM {schema}.journal_meta WHERE key = 'schema'").fetchone()
    if found is not None and found[0] != JOURNAL_SCHEMA_ID:
        raise JournalSchemaError(
            f"{file}: decision journal in layout {found[0]!r}; this version reads and writes "
            f"{JOURNAL_SCHEMA_ID!r}. Start the service on a new state directory (export the "
            "old journal's decisions with the version that wrote it)."
        )


def _chunk_arrays(
    chunks: list[tuple[Any, ...]], row_chunk: np.ndarray, file: Path
) -> dict[str, pa.Array]:
    """The list columns of the decisions (in ``seq`` order) from their chunks.

    Parameters
    ----------
    chunks : list of ``decision_chunks`` rows, by ``chunk_id``
    row_chunk : int64 ``(n,)``
        ``chunk_id`` of every decision, in ``seq`` order.

    Raises
    ------
    JournalCorruptError
        If the decisions of a chunk are not consecutive or not as many as its ``rows``.
    """
    ids = np.array([c[0] for c in chunks], np.int64)
    sizes = np.array([c[1] for c in chunks], np.int64)
    expected = np.repeat(ids, sizes)
    if len(expected) != len(row_chunk) or not np.array_equal(expected, row_chunk):
        raise JournalCorruptError(
            f"{file}: the decisions do not line up with their chunks of arrays "
            f"({len(row_chunk)} decisions, {int(sizes.sum())} rows in {len(chunks)} chunks)"
        )
    blocks: list[dict[str, pa.Array]] = []
    parts: list[tuple[np.ndarray, ...]] = []
    rows_in_block = 0
    for _, rows, n_features, n_actions, codec, context, bitmap, dist in chunks:
        allowed = _candidate_mask(bitmap, codec, rows, n_actions)
        counts = np.count_nonzero(allowed, axis=1)
        flat = np.flatnonzero(allowed)
        candidates = (flat - np.repeat(np.arange(rows, dtype=np.int64) * n_actions, counts)).astype(
            np.int32
        )
        parts.append(
            (
                _unpack(context, codec, rows * n_features * 4, "<f4"),
                np.full(rows, n_features, np.int64),
                candidates,
                counts,
                _unpack(dist, codec, len(flat) * 4, "<f4")
                if dist is not None
                else np.zeros(len(flat), "<f4"),
                np.full(rows, dist is not None),
            )
        )
        rows_in_block += rows
        if rows_in_block >= _READ_CHUNK:
            blocks.append(_list_block(parts))
            parts, rows_in_block = [], 0
    if parts or not blocks:
        blocks.append(_list_block(parts))
    return {
        name: pa.chunked_array([block[name] for block in blocks], LIST_TYPES[name])
        for name in LIST_TYPES
    }


LIST_TYPES = {
    "context": pa.list_(pa.float32()),
    "candidate_actions": pa.list_(pa.int32()),
    "action_dist": pa.list_(pa.float32()),
}


def _list_block(parts: list[tuple[np.ndarray, ...]]) -> dict[str, pa.Array]:
    """One Arrow list array per column for the decoded chunks of one block (at most about
    ``_READ_CHUNK`` decisions: int32 offsets stay far from overflowing however long the
    journal; contexts of different widths keep their own lengths)."""
    if not parts:
        return {name: pa.array([], list_type) for name, list_type in LIST_TYPES.items()}
    context, widths, candidates, counts, dists, has_dist = (
        np.concatenate(column) for column in zip(*parts, strict=True)
    )
    context_offsets = np.zeros(len(widths) + 1, np.int32)
    np.cumsum(widths, out=context_offsets[1:])
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return {
        "context": pa.ListArray.from_arrays(pa.array(context_offsets), pa.array(context)),
        "candidate_actions": pa.ListArray.from_arrays(offsets, pa.array(candidates)),
        "action_dist": pa.ListArray.from_arrays(
            offsets,
            pa.array(dists),
            mask=None if has_dist.all() else pa.array(~has_dist),
        ),
    }


def _reward_columns(
    rewards: list[tuple[Any, ...]], seq: np.ndarray, include_late: bool
) -> dict[str, pa.Array]:
    """Outcome columns aligned with the decisions ``seq`` ``(n,)`` (null where none)."""
    n = len(seq)
    m = len(rewards)
    cols = list(zip(*rewards, strict=True)) if m else [()] * 8
    r_seq = np.array(cols[0], np.int64)
    keep = np.ones(m, bool) if include_late else ~np.array(cols[7], bool)
    row = np.searchsorted(seq, r_seq)
    found = (row < n) & (seq[np.minimum(row, n - 1)] == r_seq) & keep
    row = row[found]
    valid = np.zeros(n, bool)
    valid[row] = True
    out: dict[str, pa.Array] = {}
    types = {
        "reward": np.float64,
        "converted": np.bool_,
        "complaint": np.bool_,
        "opted_out": np.bool_,
        "value_cny": np.float64,
        "reward_at": np.int64,
    }
    for i, (name, dtype) in enumerate(types.items(), start=1):
        values = np.zeros(n, dtype)
        values[row] = np.array(cols[i], dtype)[found]
        out[name] = pa.array(values, mask=~valid)
    out["reward_at"] = out["reward_at"].cast(pa.timestamp("us", tz="UTC"))
    return out


__all__ = [
    "JOURNAL_DDL",
    "JOURNAL_FILENAME",
    "JournalCorruptError",
    "JournalSchemaError",
    "JournalWriter",
    "journal_file",
    "read_journal",
]
