"""relaygate.log: the one duration formatter."""

from __future__ import annotations

import pytest

from relaygate.log import duration


@pytest.mark.parametrize(("seconds", "short", "long"), [
    (0, "0s", "0s"), (-3, "0s", "0s"), (59.9, "59s", "59s"), (119, "119s", "119s"),
    (120, "2m", "2m"), (7199, "119m", "119m"), (7200, "2h", "2h00m"),
    (7500, "2h", "2h05m"), (172799, "47h", "47h59m"), (172800, "2d", "2d"),
])
def test_duration(seconds: float, short: str, long: str) -> None:
    assert duration(seconds) == short
    assert duration(seconds, minutes_in_hours=True) == long
