"""Pseudonymous keys: stable, keyed, not reversible by eye."""

from __future__ import annotations

import hashlib

import pytest

from nextbest.privacy import message_key, pseudonymise, pseudonymise_many

KEY = b"0123456789abcdef-test-key"


def test_pseudonymise_is_stable_and_keyed() -> None:
    a = pseudonymise("C-000123", KEY)
    assert a == pseudonymise("C-000123", KEY)
    assert a != pseudonymise("C-000124", KEY)
    assert a != pseudonymise("C-000123", KEY + b"x")
    assert a.startswith("cust_") and len(a) == 5 + 24
    assert "000123" not in a


def test_pseudonymise_short_or_long_key_refused() -> None:
    """BLAKE2b keys are 16-64 bytes here: a longer key is refused, not cut (a cut key would
    ignore its tail, so rotating the tail would change nothing)."""
    for key in (b"short", b"K" * 65):
        with pytest.raises(ValueError, match=f"16-64 bytes, got {len(key)}"):
            pseudonymise("C-1", key)
        with pytest.raises(ValueError, match=f"16-64 bytes, got {len(key)}"):
            pseudonymise_many(["C-1"], key)
    assert pseudonymise("C-1", b"K" * 64) != pseudonymise("C-1", b"K" * 63 + b"L")


def test_pseudonymise_many_is_the_keyed_blake2b_of_each_id() -> None:
    """The batch form gives the same keys as the single form, and both are the documented
    MAC (stored keys must not change between versions, or a customer's history splits)."""
    ids = ["C-000123", "", "客户-42", "C-000123"]
    many = pseudonymise_many(ids, KEY)
    assert many == [pseudonymise(i, KEY) for i in ids]
    assert many == [
        "cust_" + hashlib.blake2b(i.encode(), key=KEY, digest_size=12).hexdigest() for i in ids
    ]
    assert pseudonymise_many([], KEY) == []


def test_message_key_is_keyed_and_apart_from_customer_pseudonyms() -> None:
    key = message_key("m-1", KEY)
    assert key.startswith("msg_") and len(key) == 4 + 24
    assert key == message_key("m-1", KEY) != message_key("m-1", KEY[::-1])
    assert key[4:] != pseudonymise("m-1", KEY)[5:]  # the same text as a customer id
