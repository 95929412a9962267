"""Personal data protection: pseudonymous customer keys and masking of sensitive numbers.

Raw customer identifiers are never written to logs, metrics or decision files: they are
replaced by a keyed hash (BLAKE2b in its keyed MAC mode), so records of one customer can be
joined without the identifier being visible ("usable but not visible"). The key is a
secret of the deployment.
"""

from __future__ import annotations

import hashlib

PSEUDONYM_PREFIX = "cust_"
PSEUDONYM_HEX_CHARS = 24


def pseudonymise(customer_id: str, key: bytes) -> str:
    """Stable pseudonymous key for ``customer_id`` under the secret ``key``.

    Returns
    -------
    str
        ``cust_`` followed by 24 hex characters (a 96-bit keyed BLAKE2b MAC).

    Raises
    ------
    ValueError
        If ``key`` is shorter than 16 bytes (a short key makes the hash easy to reverse by
        trying every identifier).
    """
    if len(key) < 16:
        raise ValueError("pseudonymisation key must be at least 16 bytes")
    digest = hashlib.blake2b(
        customer_id.encode("utf-8"), key=key[:64], digest_size=PSEUDONYM_HEX_CHARS // 2
    ).hexdigest()
    return PSEUDONYM_PREFIX + digest


def mask_number(value: str, keep_last: int = 4) -> str:
    """Mask a national ID or account number, keeping only the last ``keep_last`` characters."""
    if len(value) <= keep_last:
        return "*" * len(value)
    return "*" * (len(value) - keep_last) + value[-keep_last:]
