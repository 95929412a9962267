"""The contact store in a SQLite file: :class:`SqliteContactStore`, the default
:class:`~serving.contact_history.ContactStore`.

One file (``<state_dir>/contacts.db``) in WAL mode, shared by every worker; writes go
through the same group-commit writer thread as the decision journal
(:class:`nextbest.sqlite_writer.GroupCommitWriter`). Rows older than the retention (the
longest window) are pruned. The merge rule and the cross-worker protocol are in
:mod:`serving.contact_history`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, TypeVar, get_args

import numpy as np
from pydantic_core import to_json

from nextbest.packed_rows import PackedRows, int_field, text_field
from nextbest.privacy import PSEUDONYM_HEX_CHARS, PSEUDONYM_PATTERN, PSEUDONYM_PREFIX
from nextbest.send_schedule import LONGEST_WAIT
from nextbest.sqlite_writer import GroupCommitWriter, Synchronous, open_sqlite
from nextbest.timestamps import epoch_us
from serving.contact_history import (
    CONTACT_KINDS,
    LONGEST_WINDOW,
    ContactBatch,
    ContactConflictError,
    ContactEvents,
)
from serving.customer_restrictions import (
    EVERY_CHANNEL,
    RESTRICTION_KINDS,
    Consent,
    CustomerRestrictions,
    Restriction,
)

log = logging.getLogger(__name__)

CONTACTS_FILENAME = "contacts.db"
"""Name of the contact store inside a service state directory."""
T = TypeVar("T")


CONTACTS_DDL = (
    "CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS channel_codes (
        code INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE
    )""",
    """CREATE TABLE IF NOT EXISTS restrictions (
        customer INTEGER NOT NULL,
        kind INTEGER NOT NULL,
        channel INTEGER NOT NULL,
        at_us INTEGER NOT NULL,
        PRIMARY KEY (customer, kind, channel)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS consent_log (
        customer INTEGER NOT NULL,
        channel INTEGER NOT NULL,
        given_us INTEGER NOT NULL,
        received_us INTEGER NOT NULL,
        reported_by TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS contact_events (
        contact_id TEXT PRIMARY KEY,
        customer INTEGER NOT NULL,
        channel INTEGER NOT NULL REFERENCES channel_codes (code),
        offer TEXT,
        at_us INTEGER NOT NULL,
        kind INTEGER NOT NULL,
        latest_us INTEGER
    )""",
)
"""The store's tables (idempotent DDL): ``restrictions`` one row per customer, kind
(:data:`~serving.customer_restrictions.RESTRICTION_KINDS` index) and channel code (-1: every
channel) with its latest time, never pruned; ``consent_log`` every consent reported, append
only (channel -1: every channel; ``reported_by`` the API key id); ``contact_events`` one row
per contact,
``customer`` the :func:`store_key` of the pseudonymised customer key (by the file's
:data:`KeyScheme`, in ``store_meta`` under ``customer_keys``), ``channel`` a code of
``channel_codes`` (codes never change, so a file outlives catalogue versions), ``kind`` 0
recommended, 1 delivered, ``at_us`` microseconds since the epoch (UTC), ``latest_us`` the
latest a recommendation for a later window may be sent (null: ``at_us``; a delivery sets
it null). The covering index :data:`BY_CUSTOMER_INDEX` is made by
:meth:`SqliteContactStore._prepare`, after a file of an earlier layout got its
``latest_us`` column.

Integer keys and channel codes keep the index entries small: random customer keys put every
new row on its own page of the index, and a commit writes each page it dirtied whole, so the
write cost follows the index's size (integers instead of text: ~30% less CPU per recorded
contact once the store holds a few hundred thousand). No index on time alone: it would cost
a third of the write rate, and pruning walks the table by rowid instead."""
BY_CUSTOMER_INDEX = (
    "CREATE INDEX IF NOT EXISTS contact_events_by_customer_latest "
    "ON contact_events (customer, at_us, channel, kind, latest_us)"
)
"""Covering: a batch lookup reads this index only, never the table rows. It replaces
``contact_events_by_customer`` (the same without ``latest_us``)."""
LEGACY_TABLE = "contacts"
"""The text-keyed table of the store's first layout; its rows move to ``contact_events``
when a store opens the file (:meth:`SqliteContactStore.__init__`)."""

_LATER_KIND_REPLACES = (
    "ON CONFLICT (contact_id) DO UPDATE SET "
    "customer = excluded.customer, channel = excluded.channel, "
    "offer = excluded.offer, at_us = max(excluded.at_us, contact_events.at_us), "
    "kind = excluded.kind, latest_us = excluded.latest_us, "
    # correlated, so evaluated per row: each replaced row moves past every other
    "rowid = (SELECT max(m.rowid) FROM contact_events AS m "
    "WHERE m.rowid >= contact_events.rowid) + 1 "
    "WHERE excluded.kind > contact_events.kind"
)
"""The upsert clause of every insert: a delivery replaces the recommendation of its contact
id, never the reverse, and never moves the contact earlier (out of a window it counts in).
The replaced row takes a new last row id, as a new row would: it may have changed channel
or time, and :meth:`SqliteContactStore.record_if_unchanged` finds changes by row id."""
_OTHER_CUSTOMER = (
    "SELECT e.contact_id FROM packed JOIN contact_events AS e ON e.contact_id = {contact_id} "
    "WHERE e.customer != {customer} LIMIT 1"
)
"""A contact id of a batch (:meth:`_StoredRows.packed`, in customer order) already stored
for another customer."""


_UPSERT = (
    "INSERT INTO contact_events (contact_id, customer, channel, offer, at_us, kind, latest_us) "
    "SELECT {contact_id}, {customer}, {channel}, {offer}, {at_us}, ?2, {latest_us} "
    # WHERE: the ON CONFLICT that follows is the upsert's, not a join's
    "FROM packed WHERE true " + _LATER_KIND_REPLACES
)
"""Store a batch of contacts (:meth:`_StoredRows.packed`, kind ``?2``) in one statement:
SQLite reads it without the GIL (one ``executemany`` step per row would hand the GIL back
and forth with the event loop)."""
_CONTACTED_SINCE = (
    "SELECT {contact_id} FROM packed WHERE EXISTS (SELECT 1 FROM contact_events "
    "AS e WHERE e.customer = {customer} AND e.rowid > ?2)"
)
"""The contact ids of a batch whose customer has a contact stored after row id ``?2`` (one
seek of the customer index each; rowids only grow, see :meth:`SqliteContactStore.prune`)."""
_STORE_KEY_HASH = hashlib.blake2b(digest_size=8, person=b"nextbest-contact")
KeyScheme = Literal["digest", "hashed"]
"""How a store turns customer keys into its integers, fixed per file (``store_meta``):

* ``digest``: a pseudonym (:func:`nextbest.privacy.pseudonymise`) is already a keyed hash,
  so its first 63 bits are the integer, read with numpy for a whole batch (0.8-1.4 ms for
  10,000 keys, where hashing them again took 4.6-7.4 ms); any other key is hashed;
* ``hashed``: every key hashed (files written before ``digest``; their integers cannot be
  recomputed, so they keep this scheme)."""
_PSEUDONYM = re.compile(PSEUDONYM_PATTERN)
_PSEUDONYM_CHARS = len(PSEUDONYM_PREFIX) + PSEUDONYM_HEX_CHARS
_PREFIX_BYTES = np.frombuffer(PSEUDONYM_PREFIX.encode(), np.uint8)
_READ_HEX = 16
"""Hex digits of a pseudonym read into its integer (64 bits, the last dropped)."""
_HEX_VALUE = np.full(256, 16, np.uint8)
_HEX_VALUE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
"""Each byte's value as a lowercase hex digit (16: not one)."""
_VECTOR_KEYS = 36
"""Batches of more keys than this are read with numpy, smaller ones in Python (~0.85 us a
key; numpy's ~30 us hardly grows: 17 keys 28 against 15 us, 48 keys 33 against 41 us)."""


def _hashed_key(customer_key: str) -> int:
    """63 bits of a keyed hash of ``customer_key``."""
    digest = _STORE_KEY_HASH.copy()
    digest.update(customer_key.encode())
    return int.from_bytes(digest.digest()) >> 1


def store_key(customer_key: str, scheme: KeyScheme) -> int:
    """The store's 63-bit integer for a customer key (see :data:`KeyScheme`).

    Two customers whose keys share a store key would have their contacts counted together:
    more contacts than either had, so more blocking, never less. With 63 bits the chance
    that any two of 100 million customers share one is about 0.05%.
    """
    if scheme == "digest" and _PSEUDONYM.fullmatch(customer_key):
        start = len(PSEUDONYM_PREFIX)
        return int(customer_key[start : start + _READ_HEX], 16) >> 1
    return _hashed_key(customer_key)


def store_keys(customer_keys: Sequence[str], scheme: KeyScheme) -> np.ndarray:
    """:func:`store_key` of every key, int64 ``(n,)``."""
    keys = customer_keys if isinstance(customer_keys, list) else list(customer_keys)
    n = len(keys)
    if scheme != "digest" or n <= _VECTOR_KEYS:
        return np.array([store_key(k, scheme) for k in keys], np.int64).reshape(n)
    lengths = np.fromiter(map(len, keys), np.int64, n)
    fits = np.flatnonzero(lengths == _PSEUDONYM_CHARS)
    chosen = keys if len(fits) == n else [keys[i] for i in fits.tolist()]
    raw = "".join(chosen).encode("utf-8", "surrogatepass")
    out = np.empty(n, np.int64)
    read = np.zeros(n, bool)
    if len(fits) and len(raw) == _PSEUDONYM_CHARS * len(fits):  # else a non-ASCII key
        chars = np.frombuffer(raw, np.uint8).reshape(len(fits), _PSEUDONYM_CHARS)
        digits = _HEX_VALUE.take(chars[:, len(PSEUDONYM_PREFIX) :])
        prefixed = chars[:, : len(PSEUDONYM_PREFIX)] == _PREFIX_BYTES
        if digits.max() < 16 and prefixed.all():  # the service's keys: all pseudonyms
            rows, high = fits, digits[:, :_READ_HEX]
        else:
            valid = prefixed.all(axis=1) & (digits < 16).all(axis=1)
            rows, high = fits[valid], digits[valid, :_READ_HEX]
        octets = np.ascontiguousarray((high[:, 0::2] << 4) | high[:, 1::2])
        out[rows] = (octets.view(">u8")[:, 0] >> np.uint64(1)).astype(np.int64)
        read[rows] = True
    for i in np.flatnonzero(~read).tolist():
        out[i] = store_key(keys[i], scheme)
    return out


_PRUNE_CHUNK_ROWS = 20_000
"""Rowids per pruning transaction (short, so other writers wait milliseconds at most)."""


def _lookup_sql(n_codes: int) -> str:
    """One query for a batch of customers: ``?1`` a JSON array of store keys, ``?2`` the
    earliest time. The result is the store's last row id (its position, read in the same
    statement, so from the same snapshot) and one text of ``code,at_us,latest_us`` triples
    with ``code = (row * n_codes + channel code) * 2 + kind``: building it in SQLite and
    parsing it with numpy costs a fraction of fetching a Python tuple per contact."""
    return (
        "SELECT (SELECT coalesce(max(rowid), 0) FROM contact_events), "
        f"group_concat(((k.key * {n_codes} + c.channel) * 2 + c.kind) || ',' || c.at_us "
        "|| ',' || coalesce(c.latest_us, c.at_us)) "
        "FROM json_each(?1) AS k JOIN contact_events AS c "
        # a code added since this store opened (another catalogue's channel): left out
        # a scheduled contact counts while it may still be sent (coalesce: its latest time);
        # its decision is at most LONGEST_WAIT earlier, which keeps the index seek on at_us
        f"ON c.customer = k.value AND c.at_us > ?2 - {LONGEST_WAIT // timedelta(microseconds=1)} "
        f"AND coalesce(c.latest_us, c.at_us) > ?2 AND c.channel < {n_codes}"
    )


_UPSERT_RESTRICTION = (
    "INSERT INTO restrictions VALUES (?, ?, ?, ?) "
    "ON CONFLICT (customer, kind, channel) DO UPDATE SET at_us = excluded.at_us "
    "WHERE excluded.at_us > restrictions.at_us"
)
"""One restriction (customer, kind, channel code, time): inserted, or its time moved later."""
_RESTRICTIONS_OF = (
    "SELECT k.key, r.kind, r.channel, r.at_us FROM json_each(?1) AS k "
    "JOIN restrictions AS r ON r.customer = k.value"
)
"""``?1`` a JSON array of store keys; rows (index among the keys, kind, channel code, time)."""


def _json_keys(integers: np.ndarray) -> str:
    """Store keys as the JSON array the lookups read (TEXT: SQLite 3.45 reads BLOBs as
    JSONB)."""
    return to_json(integers.tolist()).decode()


def _last_row_id(conn: sqlite3.Connection) -> int:
    """The store's last row id (0 when empty): new rows take the ids above it."""
    return int(conn.execute("SELECT coalesce(max(rowid), 0) FROM contact_events").fetchone()[0])


@dataclass(frozen=True)
class _StoredRows:
    """Contacts as a store writes them, columns ``(n,)``.

    Attributes
    ----------
    contact_id : sequence of str
    customer : int64
        Store keys (:func:`store_key`).
    channel : int64
        Index of the channel in the store's ``channels``.
    offer : sequence of str or None
    at_us : int64
    latest_us : int64
        ``at_us`` unless the contact may be sent later.
    delivered : bool
        The kind, the same for every row.
    """

    contact_id: Sequence[str]
    customer: np.ndarray
    channel: np.ndarray
    offer: Sequence[str | None]
    at_us: np.ndarray
    latest_us: np.ndarray
    delivered: bool

    def __len__(self) -> int:
        return len(self.contact_id)

    def packed(self, channel_codes: np.ndarray) -> PackedRows:
        """The rows for :data:`_UPSERT` (``channel_codes``: the code of each channel index;
        ``latest_us`` NULL where it is ``at_us``, which keeps index entries short), in the
        order of their customers: each insert into the customer index lands beside the last
        one (a part's 2,500 random keys otherwise jump across the index)."""
        order = np.argsort(self.customer, kind="stable")
        ids, offers = self.contact_id, self.offer
        at_us, latest_us = self.at_us[order], self.latest_us[order]
        return PackedRows.of(
            contact_id=text_field([ids[i] for i in order.tolist()]),
            customer=int_field(self.customer[order]),
            channel=int_field(channel_codes[self.channel[order]]),
            offer=text_field([offers[i] for i in order.tolist()]),
            at_us=int_field(at_us),
            latest_us=int_field(latest_us, null=latest_us == at_us),
        )

    def without(self, contact_ids: set[str]) -> _StoredRows:
        """These rows but those of ``contact_ids``."""
        keep = [i for i, c in enumerate(self.contact_id) if c not in contact_ids]
        return _StoredRows(
            [self.contact_id[i] for i in keep],
            self.customer[keep],
            self.channel[keep],
            [self.offer[i] for i in keep],
            self.at_us[keep],
            self.latest_us[keep],
            self.delivered,
        )


def _events_of(keys: np.ndarray, pending: list[_StoredRows], since_us: int) -> ContactEvents:
    """The contacts of ``pending`` writes that may be sent after ``since_us``, as events of
    the looked-up customers ``keys`` (store keys ``(n,)``; a customer listed twice gets its
    contacts twice, once per row)."""
    customer = np.concatenate([p.customer for p in pending])
    at_us = np.concatenate([p.at_us for p in pending])
    latest_us = np.concatenate([p.latest_us for p in pending])
    # each pending contact's range of rows among the sorted keys (empty: not looked up)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.searchsorted(ordered, customer, "left")
    counts = np.searchsorted(ordered, customer, "right") - first
    counts[latest_us <= since_us] = 0
    contact = np.repeat(np.arange(len(customer)), counts)
    within = np.arange(len(contact)) - np.repeat(np.cumsum(counts) - counts, counts)
    return ContactEvents(
        len(keys),
        order[first[contact] + within],
        np.concatenate([p.channel for p in pending])[contact],
        at_us[contact],
        np.concatenate([np.full(len(p), p.delivered) for p in pending])[contact],
        latest_us[contact],
    )


class _RowRanges:
    """The row ids a store's committed writes took, as the last :data:`KEPT` ranges
    ``(lo, hi]`` (adjacent ones merged). Lets :meth:`SqliteContactStore.record_if_unchanged`
    skip its check when no other process stored a row since the lookup (one worker, or a
    batch whose earlier parts are the only rows since): an old range forgotten, or one not
    yet published, only means checking once more. Thread-safe."""

    KEPT = 64

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def add(self, lo: int, hi: int) -> None:
        """Row ids ``lo + 1 .. hi`` are this store's (nothing when ``hi <= lo``)."""
        if hi <= lo:
            return
        with self._lock:
            if self._ranges and self._ranges[-1][1] == lo:
                self._ranges[-1] = (self._ranges[-1][0], hi)
            else:
                self._ranges.append((lo, hi))
                del self._ranges[: -self.KEPT]

    def cover(self, lo: int, hi: int) -> bool:
        """Whether every row id ``lo + 1 .. hi`` is this store's (True when ``hi <= lo``)."""
        if hi <= lo:
            return True
        with self._lock:
            return any(a <= lo and hi <= b for a, b in self._ranges)


def _log_prune_failure(future: Future[int]) -> None:
    if future.exception() is not None:
        log.warning("pruning the contact store failed: %s", future.exception())


class SqliteContactStore:
    """:class:`~serving.contact_history.ContactStore` in a SQLite file (WAL) shared by the
    workers of one host.

    Parameters
    ----------
    path : path
        The database file, or a state directory (``contacts.db`` inside it).
    channels : sequence of str
        Channel names in catalogue order (``catalog.channel_names``).
    retention : timedelta
        Contacts older than this are pruned; at least the longest window (30 days).
    prune_every : timedelta
        :meth:`record` also prunes when the last prune is older than this.
    synchronous : {"NORMAL", "FULL"}
        See :mod:`nextbest.sqlite_writer`.
    busy_timeout_ms : int
    """

    def __init__(
        self,
        path: str | Path,
        channels: Sequence[str],
        retention: timedelta = LONGEST_WINDOW,
        prune_every: timedelta = timedelta(hours=1),
        synchronous: Synchronous = "NORMAL",
        busy_timeout_ms: int = 10_000,
    ) -> None:
        if retention < LONGEST_WINDOW:
            raise ValueError(
                f"retention ({retention}) must cover the longest window ({LONGEST_WINDOW})"
            )
        path = Path(path)
        self.path = path / CONTACTS_FILENAME if path.is_dir() else path
        self.channels = tuple(channels)
        self.retention = retention
        self.prune_every = prune_every
        self._writer = GroupCommitWriter(
            self.path,
            CONTACTS_DDL,
            synchronous=synchronous,
            busy_timeout_ms=busy_timeout_ms,
            name="contact-store",
        )
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._last_prune = -np.inf
        self._pending: dict[int, _StoredRows] = {}
        """Contacts this store submitted and not yet committed, by write number;
        :meth:`contacts` counts them."""
        self._pending_lock = threading.Lock()
        self._writes = itertools.count()
        self._own_rows = _RowRanges()
        """Row ids this store's committed writes took."""
        self._transaction = (-1, 0)
        """(writer's transaction number, last row id when this store's first job in it
        ran); changed by write jobs only, which run one at a time."""
        try:
            codes, self.key_scheme = self._writer.submit(self._prepare).result()
        except BaseException:
            self._writer.close()
            raise
        self._index_of = {name: i for i, name in enumerate(self.channels)}
        self._code_of_index = np.array([codes[name] for name in self.channels], np.int64)
        self._channel_of_code = np.full(max(codes.values(), default=0) + 1, -1, np.int64)
        for i, name in enumerate(self.channels):
            self._channel_of_code[codes[name]] = i
        self._lookup = _lookup_sql(len(self._channel_of_code))

    def _retention_start_us(self, now_s: float) -> int:
        """The oldest contact time kept at ``now_s`` (seconds since the epoch), in
        microseconds."""
        return int(now_s * 1e6) - self.retention // timedelta(microseconds=1)

    def _prepare(self, conn: sqlite3.Connection) -> tuple[dict[str, int], KeyScheme]:
        """Give every channel a code, fix the file's key scheme and move a first-layout
        table's contacts over, on the writer's thread in one transaction; returns every
        channel code, by name, and the key scheme.

        A file without a scheme gets ``digest`` if it holds no contact, and ``hashed``
        otherwise (its integers were hashed, and cannot be recomputed from them).

        The move is one statement inside SQLite (a few microseconds a contact, so a million
        contacts take seconds; another process opening the file meanwhile waits for it, up
        to ``busy_timeout_ms``, then finds it done). It is one-way: every worker of a host
        restarts together (as ``nextbest serve`` does); an older worker still running would
        write to a table this layout no longer reads.
        """
        conn.executemany(
            "INSERT OR IGNORE INTO channel_codes (name) VALUES (?)", [(c,) for c in self.channels]
        )
        columns = {row[1] for row in conn.execute("PRAGMA table_info(contact_events)")}
        if "latest_us" not in columns:  # a file from before scheduled contacts' latest time
            conn.execute("ALTER TABLE contact_events ADD COLUMN latest_us INTEGER")
        conn.execute(BY_CUSTOMER_INDEX)  # built once (a million contacts: seconds)
        conn.execute("DROP INDEX IF EXISTS contact_events_by_customer")
        stored = conn.execute("SELECT EXISTS (SELECT 1 FROM contact_events)").fetchone()[0]
        conn.execute(
            "INSERT OR IGNORE INTO store_meta VALUES ('customer_keys', ?)",
            ("hashed" if stored else "digest",),
        )
        (scheme,) = conn.execute(
            "SELECT value FROM store_meta WHERE key = 'customer_keys'"
        ).fetchone()
        if scheme not in get_args(KeyScheme):
            raise ValueError(f"{self.path}: unknown customer key scheme {scheme!r}")
        legacy = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (LEGACY_TABLE,)
        ).fetchone()
        if legacy:
            conn.create_function(
                "nextbest_store_key", 1, lambda key: store_key(key, scheme), deterministic=True
            )
            conn.execute(
                "INSERT OR IGNORE INTO channel_codes (name) "
                f"SELECT DISTINCT channel FROM {LEGACY_TABLE}"
            )
            moved = conn.execute(  # older contacts would be pruned at once: not moved
                "INSERT INTO contact_events (contact_id, customer, channel, offer, at_us, kind) "
                "SELECT l.contact_id, nextbest_store_key(l.customer_key), c.code, l.offer, "
                f"l.at_us, l.kind FROM {LEGACY_TABLE} AS l "
                "JOIN channel_codes AS c ON c.name = l.channel WHERE l.at_us >= ? "
                + _LATER_KIND_REPLACES,
                (self._retention_start_us(time.time()),),
            ).rowcount
            conn.execute(f"DROP TABLE {LEGACY_TABLE}")
            log.info(
                "contact store %s: %d contacts moved to the integer-keyed layout", self.path, moved
            )
        codes = conn.execute("SELECT * FROM channel_codes")
        return {name: int(code) for code, name in codes}, scheme

    def record(self, contacts: ContactBatch, inline: bool = False) -> Future[int]:
        """Store contacts; idempotent per contact id, a delivery replaces a recommendation.
        The future gives the rows inserted or replaced (0 for a contact already stored); it
        fails with :class:`~serving.contact_history.ContactConflictError` (nothing written)
        if a delivery names a contact stored for another customer.

        Also prunes, at most every ``prune_every``, contacts older than the retention.
        ``inline``: commit on the calling thread when the writer is idle (see
        :meth:`~nextbest.sqlite_writer.GroupCommitWriter.submit_inline`).
        """
        kind = CONTACT_KINDS.index(contacts.kind)
        rows = self._rows(contacts)
        packed = rows.packed(self._code_of_index)

        taken: list[tuple[int, int]] = []

        def upsert(conn: sqlite3.Connection) -> int:
            if kind > 0:  # a recommendation's contact id is its new decision's
                other = conn.execute(packed.sql(_OTHER_CUSTOMER), (packed.param,)).fetchone()
                if other is not None:
                    raise ContactConflictError(other[0])
            before = conn.total_changes
            self._insert(conn, packed, kind, _last_row_id(conn), taken)
            return conn.total_changes - before

        return self._submit_write(rows, upsert, inline, taken)

    def record_if_unchanged(
        self,
        contacts: ContactBatch,
        position: int | None,
        inline: bool = False,
        more: bool = False,
    ) -> Future[list[str]]:
        """Store recommended contacts whose customers have no contact stored after
        ``position`` (the last row id the lookup saw,
        :attr:`~serving.contact_history.ContactEvents.position`); the future gives the contact
        ids refused, nothing stored for them.

        The check runs in the write's transaction, under SQLite's write lock: of two
        workers that decided for one customer on the same history, the second to commit is
        refused. It is skipped when every row since ``position`` is this store's own: those
        were counted by the lookup (pending then), or were submitted after these contacts,
        so their own lookups counted these (a process decides and submits without yielding
        in between): each decision knew of every earlier one, whichever of them commits
        first (an inline commit can overtake a group the writer thread has taken but not
        begun). When another process did write, this
        store's rows count too (a needless second decision at worst, never a missed
        contact). ``position`` None: every contact is stored. ``more``: the caller records
        more contacts right after these (the next part of a batch), which then commit in the
        same transaction (:meth:`~nextbest.sqlite_writer.GroupCommitWriter.submit`).
        """
        if contacts.kind != "recommended":
            raise ValueError(f"only recommendations are decided on a lookup, not {contacts.kind}")
        if not len(contacts):  # nothing to store; a transaction kept open for it goes on or ends
            return self._writer.submit_nothing([], more)
        rows = self._rows(contacts)
        packed = rows.packed(self._code_of_index)

        taken: list[tuple[int, int]] = []

        def upsert(conn: sqlite3.Connection) -> list[str]:
            accepted, refused = packed, []
            last = _last_row_id(conn)
            # every row since the lookup inserted by this store (committed, or earlier in
            # this very transaction): nothing to check
            earlier = min(last, self._transaction_start(last))
            if position is not None and not self._own_rows.cover(position, earlier):
                since = conn.execute(packed.sql(_CONTACTED_SINCE), (packed.param, position))
                refused = [r[0] for r in since]
            if refused:
                accepted = rows.without(set(refused)).packed(self._code_of_index)
            self._insert(conn, accepted, 0, last, taken)
            return refused

        return self._submit_write(rows, upsert, inline, taken, more)

    def _transaction_start(self, last: int) -> int:
        """The last row id before this store's first job of the running write transaction
        (``last``, the last row id now, if this is that job). Only this transaction can have
        added rows since: it holds the write lock, and the writer's connection is this
        store's alone."""
        number = self._writer.transactions
        if self._transaction[0] != number:
            self._transaction = (number, last)
        return self._transaction[1]

    @staticmethod
    def _insert(
        conn: sqlite3.Connection,
        rows: PackedRows,
        kind: int,
        last: int,
        taken: list[tuple[int, int]],
    ) -> None:
        """Upsert ``rows`` (in the write transaction, whose last row id was ``last``) and
        append the row ids they took to ``taken``, as ``(last, new last)``:
        :meth:`_submit_write` counts them as this store's once the transaction commits."""
        conn.execute(rows.sql(_UPSERT), (rows.param, kind))
        taken.append((last, _last_row_id(conn)))

    def _rows(self, contacts: ContactBatch) -> _StoredRows:
        """The contacts as the store writes them (store keys, channel indexes)."""
        n = len(contacts)
        index_of = self._index_of
        unknown = set(contacts.channel) - index_of.keys()
        if unknown:
            raise ValueError(f"channel(s) {sorted(unknown)} not among the store's {self.channels}")
        at = contacts.at_us
        at_us = np.full(n, at, np.int64) if np.ndim(at) == 0 else np.asarray(at, np.int64)
        latest = contacts.latest_us
        return _StoredRows(
            contact_id=contacts.contact_id,
            customer=store_keys(contacts.customer_key, self.key_scheme),
            channel=np.array([index_of[c] for c in contacts.channel], np.int64).reshape(n),
            offer=contacts.offer,
            at_us=at_us,
            latest_us=at_us if latest is None else np.asarray(latest, np.int64),
            delivered=contacts.kind == "delivered",
        )

    def _submit_write(
        self,
        rows: _StoredRows,
        apply: Callable[[sqlite3.Connection], T],
        inline: bool,
        taken: list[tuple[int, int]],
        more: bool = False,
    ) -> Future[T]:
        """Queue (or commit inline) ``apply`` writing ``rows``, counted by lookups until it
        is committed; prune first when the last prune is older than ``prune_every``. The
        row ids ``apply`` appends to ``taken`` become this store's once committed (a
        transaction rolled back leaves them to other writers)."""
        now = time.time()
        if now - self._last_prune > self.prune_every.total_seconds():
            self._last_prune = now
            self.prune(self._retention_start_us(now)).add_done_callback(_log_prune_failure)
        write = next(self._writes)
        with self._pending_lock:  # counted by lookups until committed
            self._pending[write] = rows
        submit = self._writer.submit_inline if inline else self._writer.submit
        try:
            future = submit(apply, rows=len(rows), more=more)
        except BaseException:
            self._forget_pending(write)
            raise

        def committed(future: Future[T]) -> None:
            self._forget_pending(write)
            if not future.cancelled() and future.exception() is None:
                for lo, hi in taken:
                    self._own_rows.add(lo, hi)

        future.add_done_callback(committed)
        return future

    def _pending_of(self, keys: np.ndarray, since_us: int) -> ContactEvents | None:
        """This store's contacts not yet committed for ``keys`` ``(n,)`` that may be sent
        after ``since_us`` (None: no write pending).

        Without them, a decision made while an earlier decision's contact is still being
        committed (a request of the next coalesced group, a batch meanwhile) would not see
        that contact, and both could be sent despite a cap or a minimum gap. Read before the
        store is queried, so a contact committed in between is counted twice (more blocking),
        never missed.
        """
        if not self._pending:
            return None
        with self._pending_lock:
            pending = list(self._pending.values())
        if not pending:
            return None
        return _events_of(keys, pending, since_us)

    def _forget_pending(self, write: int) -> None:
        """The write is committed (or failed): the store, not :attr:`_pending`, has its
        contacts."""
        with self._pending_lock:
            self._pending.pop(write, None)

    def contacts(self, customer_keys: Sequence[str], since_us: int) -> ContactEvents:
        """Stored contacts of ``customer_keys`` ``(n,)`` that may be sent after ``since_us``
        (by their latest time), in one query.

        Sees every write committed so far, by any process, and this store's writes still
        being committed. Contacts on channels not in ``channels`` (a catalogue that dropped
        one) are left out.
        """
        if len(customer_keys) == 0:
            return ContactEvents.empty(0)
        integers = store_keys(customer_keys, self.key_scheme)
        return self._contacts(integers, _json_keys(integers), int(since_us))

    def lookup(
        self, customer_keys: Sequence[str], since_us: int
    ) -> tuple[ContactEvents, CustomerRestrictions]:
        """:meth:`contacts` and :meth:`restrictions` of ``customer_keys`` together, their
        store keys computed once."""
        if len(customer_keys) == 0:
            return ContactEvents.empty(0), CustomerRestrictions.none(0)
        integers = store_keys(customer_keys, self.key_scheme)
        keys = _json_keys(integers)
        contacts = self._contacts(integers, keys, int(since_us))
        return contacts, self._restrictions(len(integers), keys)

    def _contacts(self, integers: np.ndarray, keys: str, since_us: int) -> ContactEvents:
        """:meth:`contacts` of the store keys ``integers`` ``(n,)`` (``keys``: as JSON)."""
        n = len(integers)
        # before the query: a write committed in between is then counted twice, never missed
        pending = self._pending_of(integers, since_us)
        position, text = self._reader().execute(self._lookup, (keys, since_us)).fetchone()
        stored = ContactEvents.empty(n, position)
        if text:
            triples = np.fromstring(text, np.int64, sep=",").reshape(-1, 3)
            cell, kind = np.divmod(triples[:, 0], 2)
            row, code = np.divmod(cell, len(self._channel_of_code))
            channel = self._channel_of_code[code]
            known = channel >= 0  # contacts on channels not in ``channels`` are left out
            if not known.all():
                row, channel, triples, kind = (
                    row[known],
                    channel[known],
                    triples[known],
                    kind[known],
                )
            stored = ContactEvents(
                n, row, channel, triples[:, 1], kind == 1, triples[:, 2], position
            )
        if pending is None or not len(pending.row):
            return stored
        return ContactEvents(
            stored.n,
            np.concatenate([stored.row, pending.row]),
            np.concatenate([stored.channel, pending.channel]),
            np.concatenate([stored.at_us, pending.at_us]),
            np.concatenate([stored.delivered, pending.delivered]),
            np.concatenate([np.asarray(stored.latest_us), np.asarray(pending.latest_us)]),
            position,
        )

    def restrict(self, restrictions: Sequence[Restriction]) -> Future[int]:
        """Store ``restrictions``: one row per customer, kind and channel, keeping its latest
        time (an earlier one changes nothing). The future gives the rows inserted or
        changed, once committed."""
        params = self._restriction_rows(restrictions)

        def upsert(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(_UPSERT_RESTRICTION, params)
            return conn.total_changes - before

        return self._writer.submit(upsert, rows=len(params))

    def consent(self, consent: Consent) -> Future[int]:
        """Store ``consent``: its restrictions (:meth:`Consent.restrictions`, as
        :meth:`restrict`) and one row a channel in the consent log, in one transaction. The
        future gives the restriction rows inserted or changed, once committed."""
        states = self._restriction_rows(consent.restrictions())
        log = [
            (customer, code, consent.given_us, consent.received_us, consent.reported_by)
            for customer, _, code, _ in states
        ]

        def write(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(_UPSERT_RESTRICTION, states)
            changed = conn.total_changes - before
            conn.executemany("INSERT INTO consent_log VALUES (?, ?, ?, ?, ?)", log)
            return changed

        return self._writer.submit(write, rows=len(states))

    def _restriction_rows(
        self, restrictions: Sequence[Restriction]
    ) -> list[tuple[int, int, int, int]]:
        """``restrictions`` as rows of the restrictions table: store key, kind index,
        channel code (:data:`EVERY_CHANNEL` for every channel), time."""
        return [
            (
                int(store_key(r.customer_key, self.key_scheme)),
                RESTRICTION_KINDS.index(r.kind),
                EVERY_CHANNEL
                if r.channel is None
                else int(self._code_of_index[self._index_of[r.channel]]),
                int(r.at_us),
            )
            for r in restrictions
        ]

    def restrictions(self, customer_keys: Sequence[str]) -> CustomerRestrictions:
        """The stored restrictions of ``customer_keys`` ``(n,)`` (committed by any process),
        in one query; restrictions on channels not in ``channels`` are left out."""
        if len(customer_keys) == 0:
            return CustomerRestrictions.none(0)
        integers = store_keys(customer_keys, self.key_scheme)
        return self._restrictions(len(integers), _json_keys(integers))

    def _restrictions(self, n: int, keys: str) -> CustomerRestrictions:
        """:meth:`restrictions` of ``n`` customers whose store keys are ``keys`` (JSON)."""
        rows = self._reader().execute(_RESTRICTIONS_OF, (keys,)).fetchall()
        if not rows:
            return CustomerRestrictions.none(n)
        row, kind, code, at_us = np.array(rows, np.int64).T
        every = code == EVERY_CHANNEL
        coded = (code >= 0) & (code < len(self._channel_of_code))
        channel = np.full(len(code), EVERY_CHANNEL, np.int64)
        channel[coded] = self._channel_of_code[code[coded]]
        known = every | (coded & (channel >= 0))
        return CustomerRestrictions(n, row[known], kind[known], channel[known], at_us[known])

    def history(self, customer_keys: Sequence[str], now: datetime) -> ContactEvents:
        """Stored contacts of ``customer_keys`` within the longest window before ``now``."""
        return self.contacts(customer_keys, epoch_us(now - LONGEST_WINDOW))

    def prune(self, before_us: int) -> Future[int]:
        """Delete contacts older than ``before_us`` (by the latest they may be sent); the
        future gives the rows deleted.

        Walks the table in rowid chunks, one short transaction each, so writers of other
        processes never wait long. The last row is never deleted: SQLite gives a new row the
        last row id plus one, and :meth:`record_if_unchanged` relies on new rows having row
        ids above every position a lookup returned.
        """
        done = Future[int]()
        deleted = 0

        def chunk(start: int) -> Callable[[sqlite3.Connection], int | None]:
            def delete(conn: sqlite3.Connection) -> int | None:
                nonlocal deleted
                deleted += conn.execute(
                    "DELETE FROM contact_events WHERE rowid >= ? AND rowid < ? "
                    "AND coalesce(latest_us, at_us) < ? "
                    "AND rowid < (SELECT max(rowid) FROM contact_events)",
                    (start, start + _PRUNE_CHUNK_ROWS, int(before_us)),
                ).rowcount
                (following,) = conn.execute(
                    "SELECT min(rowid) FROM contact_events WHERE rowid >= ?",
                    (start + _PRUNE_CHUNK_ROWS,),
                ).fetchone()
                return following

            return delete

        def next_chunk(future: Future[int | None]) -> None:
            try:
                start = future.result()
                if start is None:
                    done.set_result(deleted)
                else:
                    self._writer.submit(chunk(start)).add_done_callback(next_chunk)
            except BaseException as exc:  # a failed chunk, or the writer closed meanwhile
                done.set_exception(exc)

        self._writer.submit(chunk(0)).add_done_callback(next_chunk)
        return done

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every write submitted so far is committed."""
        self._writer.flush(timeout)

    def close(self) -> None:
        """Commit pending writes and close every connection (idempotent)."""
        self._writer.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # one read connection per thread (sqlite3 connections are not thread-safe)
            conn = open_sqlite(
                self.path,
                busy_timeout_ms=self._busy_timeout_ms,
                read_only=True,
                check_same_thread=False,
            )
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def __enter__(self) -> SqliteContactStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CONTACTS_FILENAME", "SqliteContactStore"]
