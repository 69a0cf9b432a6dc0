"""Fixtures for the qmail chain-program tests (helpers are in helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import Server


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """A spool as the seed README sets it up: parent 0700, allow/ inside."""
    parent = tmp_path / "relay-ctrl"
    parent.mkdir(mode=0o700)
    allow = parent / "allow"
    allow.mkdir(mode=0o700)
    return allow


@pytest.fixture
def envdir(tmp_path: Path, spool: Path) -> Path:
    """/etc/relay-ctrl as the seed article has it, read by daemontools' envdir."""
    d = tmp_path / "etc-relay-ctrl"
    d.mkdir()
    (d / "RELAY_CTRL_DIR").write_text(f"{spool}\n")
    (d / "RELAY_CTRL_EXPIRY").write_text("600\n")
    (d / "RELAY_CTRL_RELAYCLIENT").write_text("\n")
    (d / "RELAY_CTRL_LOG_IPS").write_text("1\n")
    return d


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers started by a test; stopped afterwards whatever happens."""
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()
