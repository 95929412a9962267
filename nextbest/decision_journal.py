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
    ``complaint``, ``opted_out``, ``value_cny``, ``reward`` (see :func:`reward_cny`),
    ``reward_at_us`` (when the outcome happened, as the caller gave it, or null),
    ``received_at_us``, ``late`` (outside the attribution window).
``decision_log`` (a view)
    The scalar columns joined (versions, rewards), one row per decision, for ad-hoc SQL;
    the arrays are read by :func:`read_journal`.

Writes go through a :class:`GroupCommitWriter`: a background thread owns the connection,
takes whatever has queued up while the previous transaction committed, and commits it as
one transaction. A write's future resolves only after its transaction committed, so a
caller that acknowledges after the future never acknowledges a decision that could be lost.

Durability: in WAL mode a committed transaction is in the operating system's page cache
when ``COMMIT`` returns. ``synchronous=NORMAL`` (the default) does not fsync the WAL on
each commit: an acknowledged decision survives the death of the process (SIGKILL, crash,
OOM kill), but the last transactions before a power loss or kernel crash may be lost
(the database itself stays consistent). ``synchronous=FULL`` fsyncs the WAL on every commit
and survives power loss too, at the cost of one fsync per group (milliseconds on most
disks; group commit amortises it over everything queued meanwhile).

Committed data lives partly in ``journal.db-wal`` until the next checkpoint: copy a live
journal with ``sqlite3 journal.db ".backup copy.db"``, not ``cp journal.db``. Open writers
after the worker processes are forked, never before (a connection must not cross a fork).
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic_core import to_json

from nextbest.catalog import ActionCatalog
from nextbest.decision_log import DECISION_SCHEMA
from nextbest.exploration import (
    epsilon_greedy_candidate_probabilities,
    epsilon_greedy_pscore,
)
from nextbest.packed_rows import PackedRows, int_field, real_field, text_field

log = logging.getLogger(__name__)

JOURNAL_FILENAME = "journal.db"
"""Name of the journal inside a service state directory."""
JOURNAL_SCHEMA_ID = "nextbest.decision-journal/2"
SQLITE_MAGIC = b"SQLite format 3\x00"
SQLITE_MIN_WRITER_VERSION = (3, 38, 0)
"""Writers need the JSON ``->>`` operator (SQLite 3.38, 2022)."""
Synchronous = Literal["NORMAL", "FULL"]

T = TypeVar("T")


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_us(moment: datetime) -> int:
    """Microseconds since the epoch (UTC) of a timezone-aware ``moment``, exactly.

    Raises
    ------
    ValueError
        If ``moment`` has no time zone.
    """
    if moment.tzinfo is None:
        raise ValueError(f"{moment} must include a time zone")
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_epoch_us(us: int) -> datetime:
    """The UTC datetime of ``us`` microseconds since the epoch (inverse of :func:`epoch_us`)."""
    return EPOCH + timedelta(microseconds=us)


# --------------------------------------------------------------------------- SQLite plumbing


def open_sqlite(
    path: str | Path,
    synchronous: Synchronous = "NORMAL",
    busy_timeout_ms: int = 10_000,
    read_only: bool = False,
    check_same_thread: bool = True,
) -> sqlite3.Connection:
    """Open a SQLite database in WAL mode for one thread, in autocommit mode.

    Transactions are explicit (``BEGIN IMMEDIATE`` ... ``COMMIT``); ``busy_timeout_ms`` is
    how long a writer waits for another process's write transaction before failing.

    Parameters
    ----------
    path : path
        Database file (created, with its directory, unless ``read_only``).
    synchronous : {"NORMAL", "FULL"}
        ``NORMAL``: durable against process death; ``FULL``: also against power loss.
    busy_timeout_ms : int
    read_only : bool
        Refuse writes on this connection (a reader must not create a missing file).
    check_same_thread : bool
        Refuse use from another thread (False lets an owner close a thread's connection).
    """
    if synchronous not in ("NORMAL", "FULL"):
        raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
    if not read_only and sqlite3.sqlite_version_info < SQLITE_MIN_WRITER_VERSION:
        raise RuntimeError(
            f"SQLite {sqlite3.sqlite_version} is too old to write the journal and contact "
            f"store (their batch inserts use the ->> operator of SQLite "
            f"{'.'.join(map(str, SQLITE_MIN_WRITER_VERSION))}); "
            "use a Python built with a newer SQLite"
        )
    path = Path(path)
    if read_only:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such database file")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if read_only:
        conn.execute("PRAGMA query_only = ON")
    else:
        # the mode is stored in the file: a no-op after the first opener set it
        mode = _switch_to_wal(conn, busy_timeout_ms)
        if mode.lower() != "wal":
            conn.close()
            raise sqlite3.OperationalError(f"{path}: cannot switch to WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: bulk appends touch the id index
    return conn


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is SQLITE_BUSY (any of its extended codes): another connection holds
    the lock."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY


def _switch_to_wal(conn: sqlite3.Connection, busy_timeout_ms: int) -> str:
    """``PRAGMA journal_mode = WAL``, retried while another connection holds the file.

    While another process converts a new file to WAL, or recovers its WAL index, SQLite
    answers "database is locked" at once, without its busy handler: two workers starting
    on a fresh state directory under load hit this (measured: 17 of 300 concurrent opens),
    and a worker failing at start-up stops uvicorn's whole server.
    """
    try:
        return str(
            _retry_while_busy(
                lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0],
                busy_timeout_ms,
                first_pause_s=1e-3,
                max_pause_s=0.05,
            )
        )
    except sqlite3.Error:
        conn.close()
        raise


def _retry_while_busy(
    statement: Callable[[], T], timeout_ms: float, first_pause_s: float, max_pause_s: float
) -> T:
    """``statement()``, retried while it fails with SQLITE_BUSY, pausing ``first_pause_s``
    then twice as long each time up to ``max_pause_s``, for ``timeout_ms`` at most (then
    the last error is raised)."""
    deadline = time.monotonic() + timeout_ms / 1000
    pause = first_pause_s
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, max_pause_s)


@dataclass(slots=True)
class _Job(Generic[T]):
    apply: Callable[[sqlite3.Connection], T]
    rows: int
    future: Future[T]


class GroupCommitWriter:
    """A background thread that owns one SQLite connection and commits jobs in groups.

    :meth:`submit` queues a job (a function of the connection) and returns a future at
    once. The thread takes the first waiting job plus everything queued behind it (up to
    ``max_group_rows``), runs them in one ``BEGIN IMMEDIATE`` transaction, each inside its own
    savepoint, commits, and only then resolves the futures: with the job's return value, or
    with the exception it raised (its savepoint rolled back, the rest of the group
    unaffected). If the commit fails, every future of the group gets the error. A lone job
    is committed as soon as the thread is free: there is no waiting to fill a group, so
    latency at low load is one transaction, and throughput under load grows with the group.

    Checkpoints (copying the WAL back into the database file, with an fsync) run on a
    second thread with its own connection, at most every ``checkpoint_interval_s``, so the
    writer thread never pays for them between two commits.

    Parameters
    ----------
    path : path
        Database file.
    schema : sequence of str
        Idempotent DDL statements (``CREATE TABLE IF NOT EXISTS`` ...) run once at start.
    synchronous : {"NORMAL", "FULL"}
        See the module docstring for the durability trade-off.
    busy_timeout_ms : int
        Wait for other processes' write transactions before failing.
    max_group_rows : int
        Stop adding jobs to a group once it holds this many rows (keeps transactions short,
        so other processes writing the same file are not locked out for long).
    checkpoint_interval_s : float
        Delay between a commit and the checkpoint that follows it (commits meanwhile share it).
    name : str
        Thread name (shows in logs and debuggers).

    Raises
    ------
    sqlite3.Error
        From the constructor, if the database cannot be opened or the schema not created.
    """

    def __init__(
        self,
        path: str | Path,
        schema: Sequence[str] = (),
        synchronous: Synchronous = "NORMAL",
        busy_timeout_ms: int = 10_000,
        max_group_rows: int = 50_000,
        checkpoint_interval_s: float = 0.2,
        name: str = "sqlite-group-commit",
    ) -> None:
        if max_group_rows < 1:
            raise ValueError(f"max_group_rows must be positive, got {max_group_rows}")
        self.path = Path(path)
        self.synchronous: Synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self.max_group_rows = max_group_rows
        self._schema = tuple(schema)
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = threading.Lock()
        """Held while a transaction of this writer runs (writer thread or inline)."""
        self._inline_conn: sqlite3.Connection | None = None
        self._closed = False
        self._started = Future[None]()
        self.commits = 0
        """Transactions committed so far (for metrics and tests)."""
        self.transactions = 0
        """Transactions begun so far: a job reading it learns which transaction it runs in
        (jobs of one transaction see the same number; transactions never overlap)."""
        self.checkpoint_interval_s = checkpoint_interval_s
        self._committed = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._started.result()  # re-raises an open or schema error here
        self._checkpointer = threading.Thread(
            target=self._checkpoints, name=f"{name}-checkpoint", daemon=True
        )
        self._checkpointer.start()

    # -- producer side

    def submit(self, apply: Callable[[sqlite3.Connection], T], rows: int = 1) -> Future[T]:
        """Queue ``apply(connection)`` to run in the next group; its future resolves after
        the commit.

        Parameters
        ----------
        apply : callable
            Runs on the writer thread inside a transaction; must not commit or roll back.
        rows : int
            Rows the job writes (counts towards ``max_group_rows``).

        Raises
        ------
        RuntimeError
            If the writer is closed.
        """
        job = _Job(apply, max(1, rows), Future[T]())
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.path}: the writer is closed")
            self._queue.put(job)
        return job.future

    def submit_inline(self, apply: Callable[[sqlite3.Connection], T], rows: int = 1) -> Future[T]:
        """Like :meth:`submit`, but commit ``apply`` on the calling thread at once when that
        cannot wait: the writer is idle (nothing queued, no transaction running) and no other
        process holds the write lock. The returned future is then already resolved, after
        the commit, and the caller saved two thread hand-offs (for one small write, several
        times the cost of the write itself). Otherwise the job is queued as by :meth:`submit`.

        Only with ``synchronous="NORMAL"``: under ``FULL`` a commit waits for an fsync,
        which must not block the caller (an event loop), so every job is queued.

        Raises
        ------
        RuntimeError
            If the writer is closed.
        """
        if (
            self.synchronous != "NORMAL"
            or not self._queue.empty()
            or not self._busy.acquire(blocking=False)
        ):
            return self.submit(apply, rows)
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError(f"{self.path}: the writer is closed")
            conn = self._inline_conn
            if conn is None:
                conn = self._inline_conn = open_sqlite(
                    self.path, self.synchronous, 0, check_same_thread=False
                )
                # a commit past the WAL threshold would run a checkpoint on the caller (after a
                # big batch: tens of milliseconds); the checkpointer thread does them instead
                conn.execute("PRAGMA wal_autocheckpoint = 0")
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                return self.submit(apply, rows)  # another process is writing: queue it
            self.transactions += 1
            future = Future[T]()
            future.set_running_or_notify_cancel()
            try:
                result = apply(conn)
                conn.execute("COMMIT")
            except Exception as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                future.set_exception(exc)
                return future
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self.commits += 1
            self._committed.set()
            future.set_result(result)
            return future
        finally:
            self._busy.release()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything submitted before this call is committed."""
        self.submit(lambda _conn: None).result(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Commit everything queued, stop the thread and close the connection (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)
        with self._busy:
            if self._inline_conn is not None:
                self._inline_conn.close()
                self._inline_conn = None
        self._stopping.set()
        self._committed.set()
        self._checkpointer.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> GroupCommitWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writer thread

    def _run(self) -> None:
        try:
            conn = open_sqlite(self.path, self.synchronous, self.busy_timeout_ms)
            try:
                conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpoint thread's job
                if self._schema:
                    conn.execute("BEGIN IMMEDIATE")
                    for statement in self._schema:
                        conn.execute(statement)
                    conn.execute("COMMIT")
                # from here on _begin waits for other processes itself
                conn.execute("PRAGMA busy_timeout = 0")
            except BaseException:
                conn.close()
                raise
        except BaseException as exc:
            self._closed = True
            self._started.set_exception(exc)
            return
        self._started.set_result(None)
        try:
            stop = False
            while not stop:
                group, stop = self._take_group()
                if group:
                    with self._busy:
                        self._commit(conn, group)
        finally:
            conn.close()
            self._fail_pending()

    def _fail_pending(self) -> None:
        """After the thread stopped: refuse new jobs and fail any still queued."""
        with self._lock:
            self._closed = True
        stopped = RuntimeError(f"{self.path}: the writer thread has stopped")
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(stopped)

    def _checkpoints(self) -> None:
        conn = open_sqlite(self.path, self.synchronous, self.busy_timeout_ms)
        try:
            while not self._stopping.is_set():
                self._committed.wait()
                self._stopping.wait(self.checkpoint_interval_s)  # let commits accumulate
                self._committed.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # the next one retries; the WAL only grows
                    log.warning("%s: checkpoint failed: %s", self.path, exc)
        finally:
            conn.close()

    def _take_group(self) -> tuple[list[_Job[Any]], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        group, rows = [first], first.rows
        while rows < self.max_group_rows:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return group, True
            group.append(job)
            rows += job.rows
        return group, False

    def _begin(self, conn: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE``, retried while another process holds the write lock.

        SQLite's own busy handler sleeps 1, 2, 5, 10 ... ms between tries; the other
        process's transactions last well under a millisecond, so polling from 50 us (doubling
        to 2 ms) cuts the wait, and the tail latency, several times.
        """
        _retry_while_busy(
            lambda: conn.execute("BEGIN IMMEDIATE"),
            self.busy_timeout_ms,
            first_pause_s=50e-6,
            max_pause_s=2e-3,
        )
        self.transactions += 1

    def _commit(self, conn: sqlite3.Connection, group: list[_Job[Any]]) -> None:
        done: list[tuple[_Job[Any], Any]] = []
        failed: list[tuple[_Job[Any], BaseException]] = []
        try:
            self._begin(conn)
            for job in group:
                if not job.future.set_running_or_notify_cancel():
                    continue  # cancelled before it ran
                conn.execute("SAVEPOINT job")
                try:
                    result = job.apply(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    failed.append((job, exc))
                else:
                    conn.execute("RELEASE job")
                    done.append((job, result))
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("%s: transaction of %d jobs failed: %s", self.path, len(group), exc)
            for job in group:
                if job.future.running():
                    job.future.set_exception(exc)
                elif not job.future.done() and job.future.set_running_or_notify_cancel():
                    job.future.set_exception(exc)  # never reached (BEGIN failed)
            if not isinstance(exc, Exception):
                raise
            return
        self.commits += 1
        self._committed.set()
        for job, result in done:
            job.future.set_result(result)
        for job, error in failed:
            job.future.set_exception(error)


# --------------------------------------------------------------------------- reward


def reward_cny(
    value_cny: np.ndarray | float,
    contact_cost_cny: np.ndarray | float,
    complaint: np.ndarray | bool,
    complaint_penalty_cny: float,
) -> np.ndarray:
    """The logged reward of a decision, in CNY: the bank's economics of one contact.

    ``reward = value_cny - contact_cost_cny - complaint_penalty_cny * complaint``

    the value of the conversion (0 without one), minus the cost of the contact on its
    channel (0 for no contact), minus the price of a complaint. This is the reward the
    simulator logs (``simulators/world.py``), so served and simulated logs mean the same.

    Parameters
    ----------
    value_cny : float array ``(n,)`` or scalar
    contact_cost_cny : float array ``(n,)`` or scalar
    complaint : bool array ``(n,)`` or scalar
    complaint_penalty_cny : float

    Returns
    -------
    numpy.ndarray
        float64, the broadcast shape of the inputs.
    """
    return (
        np.asarray(value_cny, np.float64)
        - np.asarray(contact_cost_cny, np.float64)
        - float(complaint_penalty_cny) * np.asarray(complaint, np.float64)
    )


@dataclass(frozen=True)
class RewardRule:
    """How the journal turns a reported outcome into a reward, and when it is late.

    Parameters
    ----------
    complaint_penalty_cny : float
        CNY charged per complaint (``RewardSpec.complaint_penalty_cny`` in training).
    contact_cost_cny : float array ``(n_actions,)``
        Cost of each action's contact (0 for no contact); :meth:`from_catalog` builds it.
    attribution_window : timedelta
        An outcome later than this after the decision is stored but flagged ``late``.
    """

    complaint_penalty_cny: float
    contact_cost_cny: np.ndarray
    attribution_window: timedelta = timedelta(days=30)

    def __post_init__(self) -> None:
        if not np.isfinite(self.complaint_penalty_cny) or self.complaint_penalty_cny < 0:
            raise ValueError(
                f"complaint_penalty_cny must be finite and >= 0, got {self.complaint_penalty_cny}"
            )
        cost = np.asarray(self.contact_cost_cny, np.float64)
        if cost.ndim != 1 or not np.isfinite(cost).all() or (cost < 0).any():
            raise ValueError("contact_cost_cny must be a 1-d array of finite costs >= 0")
        if self.attribution_window <= timedelta(0):
            raise ValueError(f"attribution_window must be positive, got {self.attribution_window}")
        object.__setattr__(self, "contact_cost_cny", cost)

    @classmethod
    def from_catalog(
        cls,
        catalog: ActionCatalog,
        complaint_penalty_cny: float,
        attribution_window: timedelta = timedelta(days=30),
    ) -> RewardRule:
        """The rule with each action's contact cost taken from its channel in ``catalog``."""
        cost = np.array([c or 0.0 for c in catalog.attribute("cost_cny")], np.float64)
        return cls(complaint_penalty_cny, cost, attribution_window)


@dataclass(frozen=True)
class RewardOutcome:
    """The outcome of a decision as reported by the marketing platform.

    ``reward_at`` is when the outcome happened (timezone-aware); None means "now", the
    time the journal receives it.
    """

    converted: bool
    complaint: bool
    opted_out: bool
    value_cny: float
    reward_at: datetime | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.value_cny):
            raise ValueError(f"value_cny must be finite, got {self.value_cny}")
        if self.reward_at is not None and self.reward_at.tzinfo is None:
            raise ValueError("reward_at must include a time zone")


@dataclass(frozen=True)
class RewardResult:
    """What the journal holds for a decision's reward after :meth:`JournalWriter.submit_reward`.

    ``duplicate`` is True when the same outcome had been recorded before (the stored one is
    returned and nothing is written).
    """

    decision_id: str
    outcome: RewardOutcome
    reward: float
    received_at: datetime
    late: bool
    duplicate: bool


class UnknownDecisionError(LookupError):
    """A reward names a decision id the journal does not hold (HTTP 404)."""

    def __init__(self, decision_id: str) -> None:
        self.decision_id = decision_id
        super().__init__(f"no decision with id {decision_id!r} in the journal")


class RewardConflictError(ValueError):
    """A second, different outcome for a decision whose reward is already recorded (HTTP 409).

    ``fields`` names what differs; ``stored`` is the outcome kept.
    """

    def __init__(self, decision_id: str, fields: list[str], stored: RewardOutcome) -> None:
        self.decision_id, self.fields, self.stored = decision_id, fields, stored
        super().__init__(
            f"decision {decision_id!r} already has a different outcome recorded "
            f"({', '.join(fields)} differ); rewards are recorded once and never changed"
        )


class RewardTimeError(ValueError):
    """An outcome dated before its decision (HTTP 400/422)."""


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class DecisionBatch:
    """``n`` decisions as arrays, the input of :meth:`JournalWriter.submit`.

    Variable-length lists (candidates, action distribution) are flat arrays cut by
    ``candidate_offsets``, as in Arrow: the candidates of row ``i`` are
    ``candidate_actions[candidate_offsets[i]:candidate_offsets[i + 1]]``. The versions and the
    policy are one value per batch (a batch is served by one model). A row's candidates
    may come in any order (they are stored as a bitmap and read back sorted, each with its
    probability); an action listed twice in a row is refused. The scalar columns are
    serialised when the batch is submitted; the arrays are read when the writer thread gets
    to the batch: do not modify them until the future resolves.

    Parameters
    ----------
    decision_id : sequence of str ``(n,)``
    timestamp_us : int64 ``(n,)`` or int
        Decision time, microseconds since the epoch (UTC); one int for the whole batch.
    customer_key : sequence of str ``(n,)``
        Pseudonymised keys (:func:`nextbest.privacy.pseudonymise`), never raw identifiers.
    context : float32 ``(n, F)``
        Encoded features the policy saw.
    candidate_offsets : int ``(n + 1,)``
        Starts of each row's candidates in ``candidate_actions``; ``[0, ..., total]``.
    candidate_actions : int32 ``(total,)`` or None
        Allowed action ids of every row; None when ``candidate_mask`` holds them
        (:meth:`candidates` gives them either way).
    action : int32 ``(n,)``
    pscore : float64 ``(n,)`` or None
        Propensity of the chosen action, in (0, 1].
    action_dist : float32 ``(total,)`` or None
        Probability of each candidate, aligned with ``candidate_actions``.
    campaign_id : str, sequence of str ``(n,)`` or None
    policy, model_version, ruleset_version, catalog_version, feature_spec_version : str
    candidate_mask : bool ``(n, A)`` or None
        The allowed actions as a mask, instead of ``candidate_actions`` (exactly one of the
        two; :meth:`from_mask` keeps its mask): the journal packs it into its bitmap as it is.
    """

    decision_id: Sequence[str]
    timestamp_us: np.ndarray | int
    customer_key: Sequence[str]
    context: np.ndarray
    candidate_offsets: np.ndarray
    candidate_actions: np.ndarray | None
    action: np.ndarray
    pscore: np.ndarray | None
    action_dist: np.ndarray | None
    policy: str
    model_version: str
    ruleset_version: str
    catalog_version: str
    feature_spec_version: str
    campaign_id: str | Sequence[str | None] | None = None
    candidate_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.decision_id)
        if self.candidate_mask is not None and (
            self.candidate_mask.ndim != 2 or len(self.candidate_mask) != n
        ):
            raise ValueError(
                f"candidate_mask must have shape (n={n}, A), got {self.candidate_mask.shape}"
            )
        context = np.asarray(self.context)
        if context.ndim != 2 or len(context) != n:
            raise ValueError(f"context must have shape (n={n}, F), got {context.shape}")
        offsets = np.asarray(self.candidate_offsets)
        if (self.candidate_actions is None) == (self.candidate_mask is None):
            raise ValueError("give exactly one of candidate_actions and candidate_mask")
        total = (
            len(self.candidate_actions) if self.candidate_actions is not None else int(offsets[-1])
        )
        if (
            offsets.shape != (n + 1,)
            or offsets[0] != 0
            or offsets[-1] != total
            or (np.diff(offsets) <= 0).any()
        ):
            raise ValueError(
                f"candidate_offsets must be increasing, shape ({n + 1},), from 0 to "
                f"len(candidate_actions)={total}, with no empty row"
            )
        if (
            self.candidate_mask is not None
            and (np.count_nonzero(self.candidate_mask, axis=1) != np.diff(offsets)).any()
        ):
            raise ValueError("candidate_offsets must count each row's allowed actions in the mask")
        lengths = {
            "customer_key": len(self.customer_key),
            "action": len(self.action),
        }
        if self.pscore is not None:
            lengths["pscore"] = len(self.pscore)
        if np.ndim(self.timestamp_us):
            lengths["timestamp_us"] = len(np.asarray(self.timestamp_us))
        if self.campaign_id is not None and not isinstance(self.campaign_id, str):
            lengths["campaign_id"] = len(self.campaign_id)
        for name, length in lengths.items():
            if length != n:
                raise ValueError(f"{name} has {length} rows but decision_id has {n}")
        if self.pscore is not None:  # NaN: unknown for that row (stored as null)
            pscore = np.asarray(self.pscore, np.float64)
            bad = np.flatnonzero(~np.isnan(pscore) & ~((pscore > 0) & (pscore <= 1)))
            if len(bad):
                raise ValueError(
                    f"pscore must be in (0, 1], got {float(pscore[bad[0]])} at row {int(bad[0])}"
                )
        campaigns = self.campaign_id
        texts = {
            "decision_id": "".join(self.decision_id),
            "customer_key": "".join(self.customer_key),
            "campaign_id": campaigns
            if campaigns is None or isinstance(campaigns, str)
            else "".join(c for c in campaigns if c is not None),
            **{name: getattr(self, name) for name in VERSION_FIELDS},
        }
        for name, text in texts.items():
            if text is not None and "\x00" in text:  # SQLite's JSON text would end there
                raise ValueError(f"{name} contains a NUL character")
        if self.action_dist is not None and len(self.action_dist) != total:
            raise ValueError(
                f"action_dist has {len(self.action_dist)} entries but candidate_actions {total}"
            )

    def __len__(self) -> int:
        return len(self.decision_id)

    def candidates(self) -> np.ndarray:
        """Allowed action ids of every row, int32 ``(total,)`` (read from the mask when the
        batch has no list)."""
        if self.candidate_actions is not None:
            return np.asarray(self.candidate_actions)
        mask = np.asarray(self.candidate_mask)
        return (np.flatnonzero(mask) % mask.shape[1]).astype(np.int32)

    @classmethod
    def from_mask(
        cls,
        allowed: np.ndarray,
        action_dist: np.ndarray | None,
        action: np.ndarray,
        epsilon_greedy: tuple[np.ndarray, float] | None = None,
        **fields: Any,
    ) -> DecisionBatch:
        """Decisions from dense per-action arrays, as a scorer produces them.

        Parameters
        ----------
        allowed : bool ``(n, A)``
            Actions the rules allowed (the candidates); every row needs one.
        action_dist : float ``(n, A)`` or None
            Probability of each action (0 where not allowed); only allowed entries are kept.
        action : int ``(n,)``
            Chosen actions.
        epsilon_greedy : (greedy int ``(n,)``, epsilon), optional
            Instead of ``action_dist``: the epsilon-greedy distribution around each row's
            greedy action (which must be allowed), computed on the allowed entries only.
        **fields
            The other fields of :class:`DecisionBatch` (``pscore`` defaults to the chosen
            action's probability under the distribution given).
        """
        allowed = np.asarray(allowed, bool)
        n, n_actions = allowed.shape
        # flat positions of the allowed entries: one pass over the mask (np.nonzero's row
        # and column arrays cost ten times as much on a 10,000 x 361 mask); the batch keeps
        # the mask instead of a list of action ids (see candidates())
        flat = np.flatnonzero(allowed)
        # each row's start among them (a bool row count would cast the whole mask to int)
        offsets = np.searchsorted(flat, np.arange(n + 1) * n_actions).astype(np.int64)
        counts = np.diff(offsets)
        dist = None
        if epsilon_greedy is not None:
            if action_dist is not None:
                raise ValueError("give action_dist or epsilon_greedy, not both")
            greedy, epsilon = epsilon_greedy
            greedy = np.asarray(greedy, np.int64)
            if not allowed[np.arange(n), greedy].all():
                raise ValueError("every row's greedy action must be allowed")
            # the greedy action's place among the sorted flat positions of the allowed ones
            greedy_index = np.searchsorted(flat, np.arange(n) * n_actions + greedy)
            dist = epsilon_greedy_candidate_probabilities(counts, greedy_index, epsilon)
            if "pscore" not in fields:
                fields["pscore"] = epsilon_greedy_pscore(allowed, greedy, action, epsilon)
        elif action_dist is not None:
            dense = np.asarray(action_dist)
            if dense.shape != allowed.shape:
                raise ValueError(
                    f"action_dist has shape {dense.shape}, allowed {allowed.shape}: they must match"
                )
            dist = dense.reshape(-1).take(flat).astype(np.float32)
            fields.setdefault("pscore", dense[np.arange(n), action].astype(np.float64))
        return cls(
            candidate_offsets=offsets,
            candidate_actions=None,
            action=np.asarray(action, np.int32),
            action_dist=dist,
            candidate_mask=allowed,
            **{"pscore": None, **fields},
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> DecisionBatch:
        """The decisions of a table in :data:`~nextbest.decision_log.DECISION_SCHEMA`
        (outcome columns ignored; one value of each version column expected)."""
        versions = {}
        for name in VERSION_FIELDS:
            values = table.column(name).unique().to_pylist()
            if len(values) > 1:
                raise ValueError(f"{name} must have one value per batch, got {values[:3]}")
            versions[name] = values[0] if values else ""
        cand = table.column("candidate_actions").combine_chunks()
        context = table.column("context").combine_chunks()
        dist = table.column("action_dist").combine_chunks()
        n = table.num_rows
        ts = table.column("timestamp").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        pscore = table.column("pscore")
        return cls(
            decision_id=table.column("decision_id").to_pylist(),
            timestamp_us=ts.to_numpy(),
            customer_key=table.column("customer_key").to_pylist(),
            context=context.flatten().to_numpy().reshape(n, -1) if n else np.zeros((0, 0)),
            candidate_offsets=_list_offsets(cand),
            candidate_actions=cand.flatten().to_numpy(),
            action=table.column("action").to_numpy(),
            pscore=None if pscore.null_count == n else pscore.to_numpy(),
            action_dist=dist.flatten().to_numpy() if n and dist.null_count == 0 else None,
            campaign_id=table.column("campaign_id").to_pylist(),
            **versions,
        )


def _list_offsets(array: pa.Array) -> np.ndarray:
    offsets = array.offsets.to_numpy()
    return offsets - offsets[0]


def new_decision_ids(n: int) -> list[str]:
    """``n`` unique, time-ordered decision ids: 32 hex characters, UUIDv7-like (48 bits of
    milliseconds, then 76 random bits).

    Time-ordered ids keep appends to the journal's id index local (random ids scatter them
    over the whole index); they reveal nothing about the customer.
    """
    ms = time.time_ns() // 1_000_000
    head = f"{ms & 0xFFFF_FFFF_FFFF:012x}7"
    tails = os.urandom(10 * n).hex()
    return [head + tails[20 * i : 20 * i + 19] for i in range(n)]


VERSION_FIELDS = (
    "policy",
    "model_version",
    "ruleset_version",
    "catalog_version",
    "feature_spec_version",
)
"""What served a decision; stored once per combination in ``versions``."""

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
CHUNK_CODEC = "lz4"
"""Compression of the chunk blobs (LZ4 frames, through pyarrow): an exploration policy's
probabilities shrink thirty-fold in about a millisecond per 10,000 decisions."""


def _pack(raw: np.ndarray) -> bytes:
    return pa.compress(raw, codec=CHUNK_CODEC, asbytes=True)  # type: ignore[no-any-return]


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
    for every row, as parameters ``?4`` and ``?5`` (placeholders and values; a NaN pscore,
    unknown, is stored as null)."""
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
        given["timestamp_us"] = "?4"
        values.append(int(batch.timestamp_us))
    else:
        fields["timestamp_us"] = int_field(batch.timestamp_us)
    campaign = batch.campaign_id
    if campaign is None or isinstance(campaign, str):
        given["campaign_id"] = f"?{4 + len(values)}"
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
        (one fsync per committed group). See the module docstring.
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
                _check_schema(existing, self.path)
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

    def submit(self, decisions: DecisionBatch, inline: bool = False) -> Future[int]:
        """Queue a batch of decisions; the future gives the number of rows once committed.

        With ``inline``, commit on the calling thread when the writer is idle (see
        :meth:`GroupCommitWriter.submit_inline`): for a request's few decisions, faster.
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

        def append(conn: sqlite3.Connection) -> int:
            version_id = known if known is not None else self._version_id(conn, served_by)
            chunk_id = conn.execute(_INSERT_CHUNK, _chunk_row(decisions)).lastrowid
            statement = rows.sql(_INSERT_DECISIONS, **given)
            conn.execute(statement, (rows.param, version_id, chunk_id, *constants))
            used.append(version_id)
            return len(decisions)

        def remember(future: Future[int]) -> None:
            # only a committed versions row is known for good (a rolled-back one is not)
            if known is None and used and not future.cancelled() and future.exception() is None:
                self._version_ids[served_by] = used[0]

        submit = self._writer.submit_inline if inline else self._writer.submit
        future = submit(append, rows=len(decisions))
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
                "SELECT seq, timestamp_us, action FROM decisions WHERE decision_id = ?",
                (decision_id,),
            ).fetchone()
            if found is None:
                raise UnknownDecisionError(decision_id)
            seq, decided_us, action = found
            stored = conn.execute(
                "SELECT converted, complaint, opted_out, value_cny, reward, reward_at_us, "
                "received_at_us, late FROM rewards WHERE decision_id = ?",
                (decision_id,),
            ).fetchone()
            if stored is not None:
                return _repeat(decision_id, outcome, given_at_us, stored)
            happened_us = received_us if given_at_us is None else given_at_us
            if happened_us < decided_us:
                raise RewardTimeError(
                    f"the outcome of decision {decision_id!r} is dated "
                    f"{from_epoch_us(happened_us).isoformat()}, before the decision "
                    f"({from_epoch_us(decided_us).isoformat()})"
                )
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
                decision_id, outcome, value, from_epoch_us(received_us), bool(late), duplicate=False
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
        raise RewardConflictError(decision_id, differs, kept)
    return RewardResult(decision_id, kept, reward, from_epoch_us(received_us), bool(late), True)


# --------------------------------------------------------------------------- reading


def journal_file(path: str | Path) -> Path | None:
    """The journal database at ``path`` (a journal file, or a directory holding
    ``journal.db``), or None if ``path`` is not a journal."""
    path = Path(path)
    if path.is_dir():
        path = path / JOURNAL_FILENAME
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        return path if handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC else None


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
    file = journal_file(path)
    if file is None:
        raise FileNotFoundError(f"{path}: not a decision journal (no {JOURNAL_FILENAME})")
    conn = open_sqlite(file, read_only=True)
    try:
        _check_schema(conn, file)
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


class JournalCorruptError(ValueError):
    """The decisions and their chunks of arrays do not line up."""


class JournalSchemaError(ValueError):
    """A journal written in another layout than this version's (:data:`JOURNAL_SCHEMA_ID`)."""


def _check_schema(conn: sqlite3.Connection, file: Path) -> None:
    """Refuse a journal of another layout (a file without the table is a new journal)."""
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'journal_meta'"
    ).fetchone()
    if not has_meta:
        return
    found = conn.execute("SELECT value FROM journal_meta WHERE key = 'schema'").fetchone()
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
        width = -(-n_actions // 8)
        packed = _unpack(bitmap, codec, rows * width, "u1").reshape(rows, width)
        allowed = np.unpackbits(packed, axis=1)[:, :n_actions].astype(bool)
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
    "DecisionBatch",
    "GroupCommitWriter",
    "JournalCorruptError",
    "JournalSchemaError",
    "JournalWriter",
    "RewardConflictError",
    "RewardOutcome",
    "RewardResult",
    "RewardRule",
    "RewardTimeError",
    "UnknownDecisionError",
    "epoch_us",
    "from_epoch_us",
    "journal_file",
    "new_decision_ids",
    "open_sqlite",
    "read_journal",
    "reward_cny",
]
