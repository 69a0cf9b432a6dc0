"""The one reader of relay window lengths (RELAY_CTRL_EXPIRY, expiry)."""

from __future__ import annotations

import pytest

from relaygate.expiry import DEFAULT_EXPIRY, MAX_EXPIRY, parse_expiry


@pytest.mark.parametrize(("value", "seconds"), [
    ("600", 600), ("1", 1), (" 600\n", 600), ("\t0600 ", 600), ("31536000", MAX_EXPIRY),
    (900, 900), (1, 1),
])
def test_plain_positive_integers(value: object, seconds: int) -> None:
    assert parse_expiry(value) == seconds


@pytest.mark.parametrize("value", [
    "1e3", "30s", "abc", "-5", "0", "99999999999999999999", "", "   ", "+600", "2.5", "600 s",
    "\uff16\uff10\uff10",  # full-width digits
    "31536001", "9" * 5000, 0, -5, MAX_EXPIRY + 1, 900.0, 1e3, True, None, b"600",
])
def test_everything_else_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match=rf"^must be a whole number of seconds from 1 to "
                                         rf"{MAX_EXPIRY}$"):
        parse_expiry(value)


def test_constants() -> None:
    assert DEFAULT_EXPIRY == 900
    assert MAX_EXPIRY == 365 * 24 * 3600
