"""API keys: stored hashed, checked in constant time, each with scopes.

A key looks like ``nbk_<key id>_<secret>``: the key id (8 hex characters) finds the stored
record, the secret (43 URL-safe characters, 256 random bits) is checked against its salted
SHA-256 digest with :func:`hmac.compare_digest`. A slow password hash (scrypt, argon2) only
helps against guessable secrets; these are 256-bit random, so one salted SHA-256 is as strong
and keeps the check to a microsecond per request. The clear key is printed once, when it is
created, and never stored.

Scopes: ``decide`` (``/v1/decisions``), ``reward`` (``/v1/rewards``, ``/v1/deliveries``),
``metrics`` (``/metrics``) and ``admin`` (everything, and ``/v1/admin/...``).

Create a key, list the keys, revoke one (a running service reads the file again when it
changes, at its next model check or on SIGHUP)::

    python -m serving.security create --keys-file data/serving/api_keys.json \\
        --name campaign-platform --scope decide --scope reward
    python -m serving.security list --keys-file data/serving/api_keys.json
    python -m serving.security revoke --keys-file data/serving/api_keys.json --key-id 1a2b3c4d
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from serving.file_stamp import FileStamp, file_stamp

Scope = Literal["decide", "reward", "consent", "metrics", "admin"]
SCOPES: tuple[Scope, ...] = ("decide", "reward", "consent", "metrics", "admin")
"""``consent`` lifts stored opt-outs (``POST /v1/consents``): a key of its own, apart from the
platform's ``reward`` key that reports them."""
KEY_PREFIX = "nbk_"
API_KEY_HEADER = "X-API-Key"


class KeyFileError(ValueError):
    """A keys file that cannot be read (names the file and the reason)."""


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One API key as stored: never the key itself."""

    key_id: str
    name: str
    salt: bytes
    digest: bytes
    scopes: frozenset[str]
    created_at: str

    def matches(self, secret: str) -> bool:
        """Whether ``secret`` is this key's secret (constant time)."""
        return hmac.compare_digest(_digest(self.salt, secret), self.digest)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's id and name (safe to log) and its scopes."""

    key_id: str
    name: str
    scopes: frozenset[str]

    def allows(self, scope: Scope) -> bool:
        """Whether the key carries ``scope`` (``admin`` carries every scope)."""
        return scope in self.scopes or "admin" in self.scopes


LOCAL_PRINCIPAL = Principal("local", "local (authentication disabled)", frozenset(SCOPES))
"""The caller when the service runs without a keys file (``local`` environment only)."""


class AuthError(Exception):
    """An authentication (401) or authorisation (403) failure."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


class ApiKeys:
    """The keys of a keys file, by key id.

    Parameters
    ----------
    keys : the stored keys; None means authentication is disabled (every call is
        :data:`LOCAL_PRINCIPAL`).
    """

    def __init__(
        self,
        keys: Iterable[StoredKey] | None,
        path: Path | None = None,
        stamp: FileStamp | None = None,
    ) -> None:
        self.enabled = keys is not None
        self._by_id = {k.key_id: k for k in keys or ()}
        self.path = path
        """The keys file they were read from (None: given directly)."""
        self._stamp = stamp

    def __len__(self) -> int:
        return len(self._by_id)

    @classmethod
    def from_file(cls, path: str | Path | None) -> ApiKeys:
        """Load a keys file (None: authentication disabled).

        Raises
        ------
        KeyFileError
            Missing file, malformed JSON, or a record without its fields.
        """
        if path is None:
            return cls(None)
        path = Path(path)
        stamp = file_stamp(path)  # before reading: a change meanwhile is read next time
        return cls(read_keys(path), path, stamp)

    def reloaded(self) -> ApiKeys | None:
        """The keys file read again if it changed since these keys were read (a key created
        or revoked); None when it did not, or for keys not read from a file.

        Raises
        ------
        KeyFileError
            The changed file cannot be read (the caller keeps these keys).
        """
        if self.path is None or file_stamp(self.path) == self._stamp:
            return None
        return ApiKeys.from_file(self.path)

    def authenticate(self, presented: str | None, scope: Scope) -> Principal:
        """The principal of the presented key, if it carries ``scope``.

        Raises
        ------
        AuthError
            401 without a key or with an unknown one, 403 when the key lacks ``scope``.
        """
        if not self.enabled:
            return LOCAL_PRINCIPAL
        if not presented:
            raise AuthError(401, f"missing API key (send it in the {API_KEY_HEADER} header)")
        key_id, secret = _split(presented)
        stored = self._by_id.get(key_id)
        # compare against a dummy record when the id is unknown: same work either way
        if not (stored or _DUMMY).matches(secret) or stored is None:
            raise AuthError(401, "invalid API key")
        principal = Principal(stored.key_id, stored.name, stored.scopes)
        if not principal.allows(scope):
            raise AuthError(403, f"this API key lacks the {scope!r} scope")
        return principal


_DUMMY = StoredKey("", "", b"\0" * 16, b"\0" * 32, frozenset(), "")


def _split(presented: str) -> tuple[str, str]:
    if not presented.startswith(KEY_PREFIX):
        return "", presented
    key_id, _, secret = presented[len(KEY_PREFIX) :].partition("_")
    return key_id, secret


def read_keys(path: str | Path) -> list[StoredKey]:
    """The stored keys of a keys file (``{"keys": [...]}``)."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[list[StoredKey], list[dict[str, object]]]:
    """The stored keys of a keys file and its raw records, from one read.

    Raises
    ------
    KeyFileError
        Missing or unreadable file, malformed JSON, or a record without its fields.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyFileError(f"{path}: API keys file not found") from None
    except OSError as exc:  # a directory, no permission ...
        raise KeyFileError(f"{path}: cannot read the API keys file ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: not a valid API keys file (not JSON: {exc})") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise KeyFileError(f'{path}: not a valid API keys file (expected {{"keys": [...]}})')
    return [_stored_key(path, i, entry) for i, entry in enumerate(entries)], list(entries)


def _stored_key(path: Path, i: int, entry: object) -> StoredKey:
    """Record ``i`` of a keys file as a :class:`StoredKey`.

    Raises
    ------
    KeyFileError
        Naming the record and field (``keys.2.salt``) and the reason.
    """

    def bad(field: str, reason: str) -> KeyFileError:
        where = f"keys.{i}.{field}" if field else f"keys.{i}"
        return KeyFileError(f"{path}: not a valid API keys file ({where}: {reason})")

    if not isinstance(entry, dict):
        raise bad("", "must be an object")
    for field in ("key_id", "name", "salt", "sha256"):
        if not isinstance(entry.get(field), str):
            raise bad(field, "missing" if field not in entry else "must be a string")
    raw: dict[str, bytes] = {}
    for field in ("salt", "sha256"):
        try:
            raw[field] = bytes.fromhex(entry[field])
        except ValueError:
            raise bad(field, "must be hexadecimal") from None
    scopes = entry.get("scopes")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise bad("scopes", "must be a list of scope names")
    try:
        checked = _checked_scopes(scopes)
    except ValueError as exc:
        raise bad("scopes", str(exc)) from None
    return StoredKey(
        key_id=entry["key_id"],
        name=entry["name"],
        salt=raw["salt"],
        digest=raw["sha256"],
        scopes=frozenset(checked),
        created_at=str(entry.get("created_at", "")),
    )


def _checked_scopes(scopes: Sequence[str]) -> list[str]:
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {list(SCOPES)}, got {scopes}")
    return list(scopes)


def create_api_key(path: str | Path, name: str, scopes: Sequence[str]) -> str:
    """Add a new key to the keys file (created if missing) and return the clear key.

    The clear key is returned once and never stored: only its salt and salted SHA-256. The
    file is replaced atomically and readable by its owner only. Several keys may share a
    name (a key being rotated: create the new one, move the callers, revoke the old one).

    Raises
    ------
    KeyFileError
        The existing file is not a valid keys file (it is left as it is).
    """
    scopes = _checked_scopes(list(scopes))
    if not name.strip():
        raise ValueError("the key's name must not be empty")
    path = Path(path)
    entries = _read(path)[1] if path.exists() else []
    taken = {e["key_id"] for e in entries}
    key_id = secrets.token_hex(4)
    while key_id in taken:
        key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    salt = os.urandom(16)
    entries.append(
        {
            "key_id": key_id,
            "name": name,
            "salt": salt.hex(),
            "sha256": _digest(salt, secret).hex(),
            "scopes": scopes,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    _write_entries(path, entries)
    return f"{KEY_PREFIX}{key_id}_{secret}"


def revoke_api_key(path: str | Path, key_id: str) -> StoredKey:
    """Remove the key ``key_id`` from the keys file; returns it. A running service stops
    accepting it at its next keys check (``NEXTBEST_RELOAD_POLL_SECONDS``) or on SIGHUP.

    Raises
    ------
    KeyFileError
        The file is missing or not a valid keys file, or holds no key ``key_id`` (nothing
        is changed).
    """
    path = Path(path)
    keys, entries = _read(path)
    revoked = [k for k in keys if k.key_id == key_id]
    if not revoked:
        raise KeyFileError(
            f"{path}: no key with id {key_id!r} (python -m serving.security list shows them)"
        )
    _write_entries(path, [e for e in entries if e["key_id"] != key_id])
    return revoked[0]


def _write_entries(path: Path, entries: list[dict[str, object]]) -> None:
    """Replace the keys file atomically (a reader sees the old file or the new one), readable
    by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"keys": entries}, handle, indent=2)
    partial.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serving.security create|list|revoke ...``: manage the keys of a keys file
    (a created key is printed once)."""
    parser = argparse.ArgumentParser(prog="python -m serving.security", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create an API key and print it (once)")
    create.add_argument("--keys-file", type=Path, required=True)
    create.add_argument("--name", required=True, help="who the key is for (safe to log)")
    create.add_argument(
        "--scope", action="append", choices=SCOPES, required=True, help="repeatable"
    )
    listing = sub.add_parser("list", help="list the keys: id, name, scopes, created (no secret)")
    listing.add_argument("--keys-file", type=Path, required=True)
    revoke = sub.add_parser("revoke", help="remove a key (running services drop it on reload)")
    revoke.add_argument("--keys-file", type=Path, required=True)
    revoke.add_argument("--key-id", required=True, help="the 8 hex characters after nbk_")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            key = create_api_key(args.keys_file, args.name, args.scope)
            print(key)
            print(
                f"stored hashed in {args.keys_file}; this is the only time the key is shown",
                file=sys.stderr,
            )
        elif args.command == "list":
            for k in read_keys(args.keys_file):
                print(f"{k.key_id}  {k.name}  {','.join(sorted(k.scopes))}  {k.created_at}")
        else:
            revoked = revoke_api_key(args.keys_file, args.key_id)
            print(f"revoked {revoked.key_id} ({revoked.name}) in {args.keys_file}", file=sys.stderr)
    except (KeyFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
