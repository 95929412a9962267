"""Pseudonymous keys: stable, keyed, not reversible by eye."""

from __future__ import annotations

import pytest

from nextbest.privacy import mask_number, pseudonymise

KEY = b"0123456789abcdef-test-key"


def test_pseudonymise_is_stable_and_keyed() -> None:
    a = pseudonymise("C-000123", KEY)
    assert a == pseudonymise("C-000123", KEY)
    assert a != pseudonymise("C-000124", KEY)
    assert a != pseudonymise("C-000123", KEY + b"x")
    assert a.startswith("cust_") and len(a) == 5 + 24
    assert "000123" not in a


def test_pseudonymise_short_key_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        pseudonymise("C-1", b"short")


def test_mask_number_keeps_last_four() -> None:
    assert mask_number("110101199003077777") == "*" * 14 + "7777"
    assert mask_number("123") == "***"
