"""Relay statistics and ``relaygate report`` (issue 17 point 7: the migration report)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from relaygate.cli import main
from relaygate.relaystats import (
    STATS_FILE,
    NoStatistics,
    RelayStats,
    basis_of,
    count_relayed,
    read_report,
)

DAY = 86400.0


def test_basis_of_each_decision_kind() -> None:
    assert basis_of("grant", "alice") == "window"
    assert basis_of("auth", "alice") == "auth"
    assert basis_of("rule", None) == "rule"
    assert basis_of("env", "alice") == "window"  # relay-ctrl-check names the window's user
    assert basis_of("env", None) == "rule"  # tcprules set RELAYCLIENT
    for kind in ("none", "rule-deny", "store", "invalid"):
        assert basis_of(kind, None) is None


def test_counts_summed_per_account_basis_and_day(tmp_path: Path) -> None:
    now = time.time() // DAY * DAY + DAY / 2  # noon UTC today: periods count whole days
    stats = RelayStats(tmp_path / STATS_FILE)
    for _ in range(3):
        stats.add("alice", "window", now=now)
    stats.add("alice", "auth", now=now - 1)
    stats.add("alice", "window", now=now - 40 * DAY)
    stats.add("[192.0.2.7]", "rule", 2, now=now - 2 * DAY)
    stats.add("bob", "auth", now=now)
    stats.flush()
    stats.add("alice", "window", now=now)  # a second flush adds to the same row
    stats.flush()
    rows = sqlite3.connect(tmp_path / STATS_FILE).execute(
        "SELECT account, basis, n FROM counts ORDER BY account, basis, day").fetchall()
    assert ("alice", "window", 4) in rows and ("alice", "window", 1) in rows

    report = read_report(tmp_path, since_days=30, now=now)
    assert [u.account for u in report] == ["alice", "[192.0.2.7]", "bob"]
    alice = report[0]
    assert alice.counts == {"window": 4, "auth": 1, "rule": 0}
    assert alice.window_share == pytest.approx(0.8)
    # the last use of each basis is over the whole history, the counts over the period
    assert alice.last["window"] == pytest.approx(now) and alice.last["rule"] is None
    everything = read_report(tmp_path, since_days=None, now=now)
    assert everything[0].counts["window"] == 5
    assert [u.account for u in read_report(tmp_path, since_days=1.5, now=now)] == [
        "alice", "bob"]


def test_report_never_creates_the_file(tmp_path: Path) -> None:
    with pytest.raises(NoStatistics):
        read_report(tmp_path)
    r = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "report"])
    assert r.exit_code == 1 and "no relay statistics" in r.output
    assert str(tmp_path / STATS_FILE) in r.output
    assert list(tmp_path.iterdir()) == []


def test_report_command_text_and_json(tmp_path: Path) -> None:
    now = time.time()
    stats = RelayStats(tmp_path / STATS_FILE)
    stats.add("carol", "auth", 5, now=now)
    stats.add("alice", "window", 2, now=now)
    stats.add("alice", "auth", 2, now=now - 3 * DAY)
    stats.add("dave", "window", 1, now=now - 60 * DAY)
    stats.flush()
    r = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "report"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1].split()[:5] == ["ACCOUNT", "WINDOW", "AUTH", "RULE", "WINDOW%"]
    assert lines[2].split()[:5] == ["alice", "2", "2", "0", "50%"]
    assert lines[3].split()[:5] == ["carol", "0", "5", "0", "0%"]
    assert "never" in lines[3]
    assert "dave" not in r.output  # older than 30 days
    assert "1 account still relaying through windows" in r.output
    doc = json.loads(CliRunner().invoke(
        main, ["--data-dir", str(tmp_path), "report", "--since", "90", "--json"]).output)
    assert doc["period_days"] == 90
    assert [a["account"] for a in doc["accounts"]] == ["alice", "dave", "carol"]
    assert doc["accounts"][0]["counts"] == {"window": 2, "auth": 2, "rule": 0}
    assert CliRunner().invoke(main, ["--data-dir", str(tmp_path), "report",
                                     "--since", "0"]).exit_code == 2


def test_count_relayed_never_invents_a_data_directory(tmp_path: Path) -> None:
    ctx = SimpleNamespace(settings=SimpleNamespace(data_dir=tmp_path / "missing"),
                          relay_stats=None)
    count_relayed(ctx, "grant", "alice", "192.0.2.1")
    assert ctx.relay_stats is False
    assert not (tmp_path / "missing").exists()


def test_failed_write_keeps_the_counts(tmp_path: Path) -> None:
    target = tmp_path / "gone" / STATS_FILE  # its directory does not exist: writes fail
    stats = RelayStats(target)
    stats.add("alice", "window", 3)
    stats.flush()
    (tmp_path / "gone").mkdir()
    stats.flush()
    assert read_report(tmp_path / "gone")[0].counts["window"] == 3
