"""A service state directory belongs to one pseudonymisation key.

The journal and the contact store keep customers by their pseudonyms, which the key makes.
A service started on a state directory with another key would find none of its customers'
stored contacts: caps and minimum gaps would count from zero, and the rules would let
through contacts they block. The first start records a fingerprint of the key in both files
(a keyed hash of a fixed label: it reveals nothing about the key); a later start with another
key is refused, naming the file.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from nextbest.decision_journal import JOURNAL_FILENAME
from nextbest.sqlite_writer import open_sqlite
from serving.sqlite_contact_store import CONTACTS_FILENAME

FINGERPRINT_NAME = "pseudonym_key"
"""The meta entry holding the key's fingerprint."""
STATE_FILES = ((JOURNAL_FILENAME, "journal_meta"), (CONTACTS_FILENAME, "store_meta"))
"""The state files bound to the key, with their meta table (``key``, ``value``)."""


class PseudonymKeyError(RuntimeError):
    """The state directory was written under another pseudonymisation key."""


def key_fingerprint(key: bytes) -> str:
    """24 hex characters identifying ``key``: BLAKE2b keyed with it, personalised apart from
    every other hash made with the key (pseudonyms, message keys)."""
    return hashlib.blake2b(b"", key=key, digest_size=12, person=b"nextbest-keyfp").hexdigest()


def bind_pseudonym_key(state_dir: Path, key: bytes, record: bool = True) -> None:
    """Check that the state files in ``state_dir`` were written under ``key``; then, with
    ``record``, give the files without a fingerprint this key's. Every file is checked before
    any is written, so a refused key leaves no trace. Files that do not exist yet, or whose
    store has not made its meta table, are skipped (``ScoringService.start`` calls this
    after opening its stores).

    Raises
    ------
    PseudonymKeyError
        Naming the file and what to do.
    """
    fingerprint = key_fingerprint(key)
    unbound = []
    for name, table in STATE_FILES:
        path = Path(state_dir) / name
        if not path.is_file():
            continue
        prepared, found = _recorded(path, table)
        if not prepared:
            continue
        if found is None:
            unbound.append((path, table))
        elif found != fingerprint:
            raise PseudonymKeyError(
                f"{path} was written under another pseudonymisation key "
                "(NEXTBEST_PSEUDONYMISATION_KEY): its customers' pseudonyms would not match "
                "this key's, so their stored contacts would not count towards caps and gaps. "
                "Set the key it was written with, or start on a new state directory "
                "(NEXTBEST_STATE_DIR)"
            )
    if not record:
        return
    for path, table in unbound:
        conn = open_sqlite(path)
        try:  # another worker may record the same fingerprint first: then this is a no-op
            conn.execute(
                f"INSERT OR IGNORE INTO {table} VALUES (?, ?)", (FINGERPRINT_NAME, fingerprint)
            )
        finally:
            conn.close()
    if unbound:  # two starts with different keys at once: one of them is refused here
        bind_pseudonym_key(state_dir, key, record=False)


def _recorded(path: Path, table: str) -> tuple[bool, str | None]:
    """Whether ``path`` has its meta ``table`` yet, and the fingerprint recorded there."""
    try:
        conn = open_sqlite(path, read_only=True)
    except sqlite3.DatabaseError as exc:  # not a database at all
        raise PseudonymKeyError(f"{path} cannot be read as a SQLite database: {exc}") from None
    try:
        row = conn.execute(
            f"SELECT value FROM {table} WHERE key = ?", (FINGERPRINT_NAME,)
        ).fetchone()
    except sqlite3.OperationalError:  # no such table: its store has not prepared the file
        return False, None
    except sqlite3.DatabaseError as exc:
        raise PseudonymKeyError(f"{path} cannot be read as a SQLite database: {exc}") from None
    finally:
        conn.close()
    return True, None if row is None else str(row[0])


__all__ = [
    "PseudonymKeyError",
    "bind_pseudonym_key",
    "key_fingerprint",
]
