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
_LABEL = b"nextbest pseudonymisation key fingerprint"


class PseudonymKeyError(RuntimeError):
    """The state directory was written under another pseudonymisation key."""


def key_fingerprint(key: bytes) -> str:
    """24 hex characters identifying ``key`` (a keyed BLAKE2b hash of a fixed label)."""
    return hashlib.blake2b(_LABEL, key=key, digest_size=12).hexdigest()


def bind_pseudonym_key(state_dir: Path, key: bytes, record: bool = True) -> None:
    """Check that the state files in ``state_dir`` were written under ``key``; with
    ``record``, a file without a fingerprint gets this key's (files that do not exist yet
    are skipped: their stores record it when they first open them through this function).

    Raises
    ------
    PseudonymKeyError
        Naming the file and what to do.
    """
    fingerprint = key_fingerprint(key)
    for name, table in STATE_FILES:
        path = Path(state_dir) / name
        if not path.is_file():
            continue
        conn = open_sqlite(path, read_only=not record)
        try:
            if record:
                conn.execute(
                    f"INSERT OR IGNORE INTO {table} VALUES (?, ?)", (FINGERPRINT_NAME, fingerprint)
                )
            try:
                found = conn.execute(
                    f"SELECT value FROM {table} WHERE key = ?", (FINGERPRINT_NAME,)
                ).fetchone()
            except sqlite3.OperationalError:  # a file its store has not prepared yet
                found = None
        finally:
            conn.close()
        if found is not None and found[0] != fingerprint:
            raise PseudonymKeyError(
                f"{path} was written under another pseudonymisation key "
                "(NEXTBEST_PSEUDONYMISATION_KEY): its customers' pseudonyms would not match "
                "this key's, so their stored contacts would not count towards caps and gaps. "
                "Set the key it was written with, or start on a new state directory "
                "(NEXTBEST_STATE_DIR)"
            )


__all__ = [
    "PseudonymKeyError",
    "bind_pseudonym_key",
    "key_fingerprint",
]
