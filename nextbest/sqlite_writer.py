"""SQLite files shared by the service's worker processes: opening them in WAL mode, and the
group-commit writer thread that the decision journal and the contact store write through.

A :class:`GroupCommitWriter`'s background thread owns the connection, takes whatever has
queued up while the previous transaction committed, and commits it as one transaction. A
write's future resolves only after its transaction committed, so a caller that acknowledges
after the future never acknowledges a write that could be lost.

Durability: in WAL mode a committed transaction is in the operating system's page cache
when ``COMMIT`` returns. ``synchronous=NORMAL`` (the default) does not fsync the WAL on
each commit: a committed write survives the death of the process (SIGKILL, crash, OOM
kill), but the last transactions before a power loss or kernel crash may be lost (the
database itself stays consistent). ``synchronous=FULL`` fsyncs the WAL on every commit and
survives power loss too, at the cost of one fsync per group (milliseconds on most disks;
group commit amortises it over everything queued meanwhile).

Committed data lives partly in the ``-wal`` file until the next checkpoint: copy a live
database with ``sqlite3 FILE ".backup copy.db"``, not ``cp``. Open writers after the worker
processes are forked, never before (a connection must not cross a fork).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

log = logging.getLogger(__name__)


def sqlite_tables(path: Path) -> set[str] | None:
    """The table names of the database file ``path`` (empty for an empty file), or None when
    it is not a SQLite database.

    Read through SQLite itself, read-only: opening and closing a database with plain
    ``open()`` releases every POSIX lock this process holds on it, those of its own SQLite
    connections included (a writer then loses its lock and another process's checkpoint can
    remove a WAL still in use).

    Raises
    ------
    OSError
        If it cannot be read (permissions, a directory, a damaged database).
    """
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return {
                row[0]
                for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            return None
        raise OSError(str(exc)) from exc


SQLITE_MIN_WRITER_VERSION = (3, 38, 0)
"""Writers need the JSON ``->>`` operator (SQLite 3.38, 2022)."""
Synchronous = Literal["NORMAL", "FULL"]

T = TypeVar("T")


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
        # a batch statement in a transaction keeps the pages it changes in a statement
        # journal (to undo itself alone): in memory, not a temporary file (10,000 contacts
        # into a store of 200,000: the insert's CPU 31 against 43 ms)
        conn.execute("PRAGMA temp_store = MEMORY")
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


MAX_HOLD_S = 0.05
"""A transaction kept open for the jobs ``more=True`` jobs announce (see
:meth:`GroupCommitWriter.submit`) commits once it has been open this long, whether they came
or not (those still to come go in the next): other processes wait for the write lock
meanwhile (another worker's decisions, outcomes and consents)."""


@dataclass(slots=True)
class _Job(Generic[T]):
    apply: Callable[[sqlite3.Connection], T]
    rows: int
    future: Future[T]
    more: bool = False


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
        self._announced = False
        """The last job submitted announced another (``more``): an inline commit would
        overtake a transaction waiting for it."""
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

    def submit(
        self, apply: Callable[[sqlite3.Connection], T], rows: int = 1, more: bool = False
    ) -> Future[T]:
        """Queue ``apply(connection)`` to run in the next group; its future resolves after
        the commit.

        Parameters
        ----------
        apply : callable
            Runs on the writer thread inside a transaction; must not commit or roll back.
        rows : int
            Rows the job writes (counts towards ``max_group_rows``).
        more : bool
            The caller submits another job right after this one (the next part of a batch):
            the transaction stays open for it, :data:`MAX_HOLD_S` at most, so that the
            parts commit together. A commit writes every page the transaction changed,
            whole, and random customer keys change an index page per row: parts committed
            one by one rewrite the same pages once each.

        Raises
        ------
        RuntimeError
            If the writer is closed.
        """
        job = _Job(apply, max(1, rows), Future[T](), more)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.path}: the writer is closed")
            self._announced = more
            self._queue.put(job)
        return job.future

    def submit_nothing(self, result: T, more: bool = False) -> Future[T]:
        """For a caller with nothing to write where it announced a job (``more`` on the job
        before): a job that writes nothing and keeps (``more``) or ends the transaction held
        for it. Resolved at once with ``result``, and nothing queued, when the last job
        submitted announced none.

        Raises
        ------
        RuntimeError
            If the writer is closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.path}: the writer is closed")
            announced = self._announced
        if announced:
            return self.submit(lambda _conn: result, more=more)
        done = Future[T]()
        done.set_result(result)
        return done

    def submit_inline(
        self, apply: Callable[[sqlite3.Connection], T], rows: int = 1, more: bool = False
    ) -> Future[T]:
        """Like :meth:`submit`, but commit ``apply`` on the calling thread at once when that
        cannot wait (and no job follows: ``more`` queues it as :meth:`submit` does): the
        writer is idle (nothing queued, no transaction running) and no other
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
            more
            or self._announced  # the job announced before it: its transaction may wait for it
            or self.synchronous != "NORMAL"
            or not self._queue.empty()
            or not self._busy.acquire(blocking=False)
        ):
            return self.submit(apply, rows, more)
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
                        stop = self._commit(conn, group, stop)
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

    def _take_group(
        self, rows: int = 0, wait_s: float | None = None
    ) -> tuple[list[_Job[Any]], bool]:
        """The next group: the first job waiting (for at most ``wait_s``; None: for ever)
        and those queued behind it, until the group (with ``rows`` already taken) holds
        ``max_group_rows``; and whether the writer is closing."""
        try:
            first = self._queue.get(timeout=wait_s)
        except queue.Empty:
            return [], False
        if first is None:
            return [], True
        group, rows = [first], rows + first.rows
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

    def _commit(self, conn: sqlite3.Connection, group: list[_Job[Any]], stop: bool) -> bool:
        """Run ``group`` in one transaction, with the jobs it announces (``more``) as they
        come (unless the writer is closing, ``stop``), for :data:`MAX_HOLD_S` at most, and
        commit; whether the writer is closing."""
        done: list[tuple[_Job[Any], Any]] = []
        failed: list[tuple[_Job[Any], BaseException]] = []
        try:
            self._begin(conn)
            held_until = time.monotonic() + MAX_HOLD_S
            taken, rows = group, 0
            while taken:
                for job in taken:
                    rows += job.rows
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
                # the last job taken announces the next (an unrelated job queued behind a
                # part ends the wait early: one more commit, nothing else)
                wait_s = held_until - time.monotonic()
                if not taken[-1].more or stop or rows >= self.max_group_rows or wait_s <= 0:
                    break
                taken, stop = self._take_group(rows, wait_s)
                group = group + taken
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
            return stop
        self.commits += 1
        self._committed.set()
        for job, result in done:
            job.future.set_result(result)
        for job, error in failed:
            job.future.set_exception(error)
        return stop
