"""The real Sendmail (Debian's 8.17) asks ``relaygate socketmap`` through the map and
the Local_check_rcpt ruleset of deploy/sendmail/relaygate.mc.

sendmail.cf is built with m4 from a minimal .mc that includes the shipped fragment;
``sendmail -bt`` queries the map (``/map relaygate KEY``) and runs the recipient
check with ``${client_addr}`` set as the SMTP server sets it (``.D{client_addr}``).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .mta_support import (
    REMOTE,
    SENDMAIL,
    Daemon,
    allow,
    free_port,
    need,
    sendmail_bt,
    sendmail_cf,
    start_relaygate,
)

LOCAL = "postmaster"  # an unqualified local recipient: Sendmail delivers it itself


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="relaygate-sendmail-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def socketmap(root: Path) -> Iterator[tuple[Daemon, str, int]]:
    need(SENDMAIL, "Sendmail")
    store = f"sqlite://{root / 'grants.db'}"
    port = free_port()
    daemon = start_relaygate(["--store", store, "socketmap", "--listen", f"127.0.0.1:{port}"],
                             root / "socketmap.err", port=port)
    allow(store, "127.0.0.5")
    allow(store, "2001:db8::7")
    yield daemon, store, port
    daemon.stop()


@pytest.fixture(scope="module")
def cf(root: Path, socketmap: tuple[Daemon, str, int]) -> Path:
    d = root / "tcp"
    d.mkdir()
    return sendmail_cf(d, f"inet:{socketmap[2]}@127.0.0.1")


def lookups(root: Path, cf: Path, keys: list[str]) -> list[str | None]:
    out = sendmail_bt(root, cf, [f"/map relaygate {k}" for k in keys])
    got: list[str | None] = []
    for m in re.finditer(r"map_lookup: relaygate \((.*?)\) (returns (\S*)|no match)", out):
        got.append(m.group(3))
    assert len(got) == len(keys), out
    return got


def rcpt_checks(root: Path, cf: Path, cases: list[tuple[str, str]]) -> list[str]:
    """check_rcpt's verdict for each (client address, recipient)."""
    lines = []
    for client, rcpt in cases:
        lines += [f".D{{client_addr}}{client}", f"check_rcpt {rcpt}"]
    out = sendmail_bt(root, cf, lines)
    got = re.findall(r"^check_rcpt\s+returns: (.*)$", out, re.MULTILINE)
    assert len(got) == len(cases), out
    return got


def test_map_lookups_in_sendmail_key_forms(root: Path, cf: Path) -> None:
    assert lookups(root, cf, ["127.0.0.5", "127.0.0.6", "IPv6:2001:db8::7", "IPv6:2001:db8::8",
                              "POP:127.0.0.5", "bob@example.org"]) == [
        "OK<RELAYGATE>", None, "OK<RELAYGATE>", None, "OK<RELAYGATE>", None]


def test_window_relays_stranger_does_not_local_mail_flows(root: Path, cf: Path) -> None:
    got = rcpt_checks(root, cf, [("127.0.0.5", REMOTE), ("127.0.0.6", REMOTE),
                                 ("IPv6:2001:db8::7", REMOTE), ("IPv6:2001:db8::8", REMOTE),
                                 ("127.0.0.6", LOCAL)])
    assert got[0] == "$# OK"
    assert "Relaying denied" in got[1]
    assert got[2] == "$# OK"
    assert "Relaying denied" in got[3]
    assert "Relaying denied" not in got[4] and "error" not in got[4]


def test_service_down_means_no_relay(root: Path) -> None:
    d = root / "dead"
    d.mkdir()
    cf = sendmail_cf(d, f"inet:{free_port()}@127.0.0.1")
    got = rcpt_checks(root, cf, [("127.0.0.5", REMOTE), ("127.0.0.5", LOCAL)])
    assert "Relaying denied" in got[0]
    assert "error" not in got[1]


def test_store_down_is_temp_and_no_relay(root: Path) -> None:
    port = free_port()
    daemon = start_relaygate(["--store", f"redis://127.0.0.1:{free_port()}/0", "socketmap",
                              "--listen", f"127.0.0.1:{port}"], root / "socketmap-redis.err",
                             port=port)
    try:
        d = root / "redisdown"
        d.mkdir()
        cf = sendmail_cf(d, f"inet:{port}@127.0.0.1")
        out = sendmail_bt(root, cf, ["/map relaygate 127.0.0.5"])
        assert "returns OK" not in out
        got = rcpt_checks(root, cf, [("127.0.0.5", REMOTE), ("127.0.0.5", LOCAL)])
        assert "Relaying denied" in got[0]
        assert "error" not in got[1]
    finally:
        daemon.stop()
    assert "ip=127.0.0.5 action=TEMP" in daemon.text()


def test_unix_socket_variant(root: Path, socketmap: tuple[Daemon, str, int]) -> None:
    # Sendmail refuses a socket below a world-writable directory (/tmp): /run, as in
    # production (/run/relaygate)
    run = Path(tempfile.mkdtemp(prefix="relaygate-test-", dir="/run"))
    sock = run / "socketmap.sock"
    daemon = start_relaygate(["--store", socketmap[1], "socketmap", "--listen",
                              f"unix:{sock}"], root / "socketmap-unix.err", path=sock)
    try:
        d = root / "unix"
        d.mkdir()
        cf = sendmail_cf(d, f"local:{sock}")
        assert lookups(root, cf, ["127.0.0.5", "127.0.0.6"]) == ["OK<RELAYGATE>", None]
    finally:
        daemon.stop()
        shutil.rmtree(run, ignore_errors=True)
