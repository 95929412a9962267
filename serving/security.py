"""API keys: stored hashed, checked in constant time, each with scopes.

A key looks like ``nbk_<key id>_<secret>``: the key id (8 hex characters) finds the stored
record, the secret (43 URL-safe characters, 256 random bits) is checked against its salted
SHA-256 digest with :func:`hmac.compare_digest`. A slow password hash (scrypt, argon2) only
helps against guessable secrets; these are 256-bit random, so one salted SHA-256 is as strong
and keeps the check to a microsecond per request. The clear key is printed once, when it is
created, and never stored.

Scopes: ``decide`` (``/v1/decisions``), ``reward`` (``/v1/rewards``, ``/v1/deliveries``),
``metrics`` (``/metrics``) and ``admin`` (everything, and ``/v1/admin/...``).

Create a key::

    python -m serving.security create --keys-file data/serving/api_keys.json \\
        --name campaign-platform --scope decide --scope reward
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

Scope = Literal["decide", "reward", "metrics", "admin"]
SCOPES: tuple[Scope, ...] = ("decide", "reward", "metrics", "admin")
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

    def __init__(self, keys: Iterable[StoredKey] | None) -> None:
        self.enabled = keys is not None
        self._by_id = {k.key_id: k for k in keys or ()}

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
        return cls(read_keys(path))

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
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [
            StoredKey(
                key_id=str(entry["key_id"]),
                name=str(entry["name"]),
                salt=bytes.fromhex(entry["salt"]),
                digest=bytes.fromhex(entry["sha256"]),
                scopes=frozenset(_checked_scopes(entry["scopes"])),
                created_at=str(entry.get("created_at", "")),
            )
            for entry in data["keys"]
        ]
    except FileNotFoundError:
        raise KeyFileError(f"{path}: API keys file not found") from None
    except OSError as exc:  # a directory, no permission ...
        raise KeyFileError(f"{path}: cannot read the API keys file ({exc.strerror})") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a valid API keys file ({exc})") from None


def _checked_scopes(scopes: Sequence[str]) -> list[str]:
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {list(SCOPES)}, got {scopes}")
    return list(scopes)


def create_api_key(path: str | Path, name: str, scopes: Sequence[str]) -> str:
    """Add a new key to the keys file (created if missing) and return the clear key.

    The clear key is returned once and never stored: only its salt and salted SHA-256. The
    file is replaced atomically and readable by its owner only.
    """
    scopes = _checked_scopes(list(scopes))
    path = Path(path)
    entries = json.loads(path.read_text(encoding="utf-8"))["keys"] if path.exists() else []
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
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"keys": entries}, handle, indent=2)
    partial.replace(path)
    return f"{KEY_PREFIX}{key_id}_{secret}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serving.security create ...``: create a key and print it once."""
    parser = argparse.ArgumentParser(prog="python -m serving.security", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create an API key and print it (once)")
    create.add_argument("--keys-file", type=Path, required=True)
    create.add_argument("--name", required=True, help="who the key is for (safe to log)")
    create.add_argument(
        "--scope", action="append", choices=SCOPES, required=True, help="repeatable"
    )
    args = parser.parse_args(argv)
    key = create_api_key(args.keys_file, args.name, args.scope)
    print(key)
    print(
        f"stored hashed in {args.keys_file}; this is the only time the key is shown",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
