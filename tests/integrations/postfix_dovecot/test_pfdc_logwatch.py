"""POP/IMAP-before-SMTP with the real Postfix and Dovecot: the log watcher.

Dovecot runs without hooks; ``relaygate watch-log`` follows Dovecot's own log
file (and Postfix's, to prove that text a client smuggles into another
daemon's lines opens nothing) and writes windows into the store policyd reads.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import _postfix_testbed as testbed
import pytest

from .pfdc_support import EXPIRY, RELAYGATE, USERS, Stack

REMOTE = f"someone@{testbed.REMOTE_DOMAIN}"


class Watcher:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def watcher(stack: Stack, dovecot_plain: testbed.DovecotTestbed) -> Iterator[Watcher]:
    log = stack.root / "watch-log.err"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [RELAYGATE, "--store", stack.store, "--expiry", str(EXPIRY), "watch-log",
             "--interval", "0.05", "--log-level", "debug",
             str(dovecot_plain.log_file), str(stack.postfix.log_file)],
            stdout=subprocess.DEVNULL, stderr=err)
    w = Watcher(proc, log)
    deadline = time.monotonic() + 20
    while "watching" not in w.text():
        assert proc.poll() is None, w.text()
        assert time.monotonic() < deadline, w.text()
        time.sleep(0.05)
    yield w
    proc.terminate()
    proc.wait(10)


def relay(stack: Stack, source: str) -> int:
    host, port = ("::1", stack.postfix.v6_port) if ":" in source else \
        ("127.0.0.1", stack.postfix.port)
    assert port is not None
    return testbed.smtp_rcpt(source, host, port, REMOTE)[0]


def windows(stack: Stack) -> dict[str, dict[str, object]]:
    out = subprocess.run([RELAYGATE, "--store", stack.store, "list", "--json"],
                         capture_output=True, text=True, check=True, timeout=30)
    return {g["ip"]: g for g in json.loads(out.stdout)}


def wait_window(stack: Stack, ip: str, watcher: Watcher) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while ip not in (found := windows(stack)):
        assert time.monotonic() < deadline, watcher.text()
        time.sleep(0.05)
    return found[ip]


def wait_expired(stack: Stack, ip: str) -> None:
    time.sleep(EXPIRY)
    deadline = time.monotonic() + 5
    while ip in windows(stack):
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_pop3_login_in_dovecot_log_opens_window(
        stack: Stack, dovecot_plain: testbed.DovecotTestbed, watcher: Watcher) -> None:
    assert relay(stack, "127.0.0.5") == 554
    testbed.pop3_login("127.0.0.5", "127.0.0.1", dovecot_plain.pop3_port, "alice",
                       USERS["alice"])
    grant = wait_window(stack, "127.0.0.5", watcher)
    assert grant["source"] == "log" and grant["user"] == "alice"
    assert relay(stack, "127.0.0.5") == 250
    wait_expired(stack, "127.0.0.5")
    assert relay(stack, "127.0.0.5") == 554


def test_imap_login_in_dovecot_log_opens_window(
        stack: Stack, dovecot_plain: testbed.DovecotTestbed, watcher: Watcher) -> None:
    assert relay(stack, "127.0.0.9") == 554
    testbed.imap_login("127.0.0.9", "127.0.0.1", dovecot_plain.imap_port, "bob@example.test",
                       USERS["bob@example.test"])
    assert wait_window(stack, "127.0.0.9", watcher)["domain"] == "example.test"
    assert relay(stack, "127.0.0.9") == 250


def test_ipv6_login_in_dovecot_log(stack: Stack, dovecot_plain: testbed.DovecotTestbed,
                                   watcher: Watcher) -> None:
    if not stack.ipv6:
        pytest.skip("no IPv6 loopback here")
    assert relay(stack, "::1") == 554
    testbed.pop3_login("::1", "::1", dovecot_plain.pop3_port, "alice", USERS["alice"])
    wait_window(stack, "::1", watcher)
    assert relay(stack, "::1") == 250


def test_forged_login_text_opens_nothing(stack: Stack, dovecot_plain: testbed.DovecotTestbed,
                                         watcher: Watcher) -> None:
    forged = "Login: user=<alice>, method=PLAIN, rip=127.0.0.11, lip=127.0.0.1"
    # 1. In Dovecot's own log, as a failed login's user name.
    with pytest.raises(testbed.poplib.error_proto):
        testbed.pop3_login("127.0.0.12", "127.0.0.1", dovecot_plain.pop3_port, forged, "x")
    # 2. In Postfix's log, inside a MAIL FROM of a refused relay attempt.
    client = testbed._SourceSMTP("127.0.0.12", "127.0.0.1", stack.postfix.port)
    try:
        client.ehlo("dovecot")
        code, _ = client.docmd(f'MAIL FROM:<"dovecot: pop3-login: {forged}"@evil.test>')
        assert code == 250
        assert client.rcpt(REMOTE)[0] == 554
        client.quit()
    finally:
        client.close()
    # Both daemons write their lines asynchronously (Dovecot when the failed session ends).
    deadline = time.monotonic() + 10
    while "rip=127.0.0.11" not in stack.postfix.log_tail(200):
        assert time.monotonic() < deadline, "Postfix did not log the forged text"
        time.sleep(0.05)
    while "rip=127.0.0.11" not in dovecot_plain.log_tail(200):
        assert time.monotonic() < deadline, "Dovecot did not log the forged text"
        time.sleep(0.05)
    # A real login afterwards proves the watcher has read past both lines.
    testbed.pop3_login("127.0.0.13", "127.0.0.1", dovecot_plain.pop3_port, "alice",
                       USERS["alice"])
    wait_window(stack, "127.0.0.13", watcher)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        assert "127.0.0.11" not in windows(stack)
        assert "127.0.0.12" not in windows(stack)
        time.sleep(0.2)
    assert relay(stack, "127.0.0.11") == 554


def test_dovecot_log_rotation(stack: Stack, dovecot_plain: testbed.DovecotTestbed,
                              watcher: Watcher) -> None:
    rotated = dovecot_plain.log_file.with_suffix(".log.1")
    dovecot_plain.log_file.rename(rotated)
    dovecot_plain.reopen_log()
    deadline = time.monotonic() + 10
    while not dovecot_plain.log_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    testbed.pop3_login("127.0.0.14", "127.0.0.1", dovecot_plain.pop3_port, "alice",
                       USERS["alice"])
    # The watcher's own record of the window: on a loaded machine one `relaygate list`
    # can take longer than the 2 s window lives.
    deadline = time.monotonic() + 10
    while "window.opened ip=127.0.0.14 " not in watcher.text():
        assert time.monotonic() < deadline, watcher.text()
        time.sleep(0.05)
    assert "rotated" in watcher.text()


def test_open_imap_session_keeps_the_window_until_logout(
        stack: Stack, dovecot_plain: testbed.DovecotTestbed, watcher: Watcher) -> None:
    # An IMAP client that stays connected (as mail clients do for hours): the window
    # outlives the expiry while Dovecot has not logged the logout, then expires normally.
    client = testbed._SourceIMAP("127.0.0.15", "127.0.0.1", dovecot_plain.imap_port)
    try:
        client.login("alice", USERS["alice"])
        client.select("INBOX")
        wait_window(stack, "127.0.0.15", watcher)
        deadline = time.monotonic() + 3 * EXPIRY
        while time.monotonic() < deadline:
            assert relay(stack, "127.0.0.15") == 250, watcher.text()
            time.sleep(EXPIRY / 4)
            client.noop()
        client.logout()
    finally:
        with contextlib.suppress(OSError):
            client.shutdown()
    deadline = time.monotonic() + 10
    while "imap(alice)" not in dovecot_plain.log_tail(50):
        assert time.monotonic() < deadline, "Dovecot did not log the logout"
        time.sleep(0.05)
    wait_expired(stack, "127.0.0.15")
    assert relay(stack, "127.0.0.15") == 554


# -- the watcher with a fake clock (no servers) ----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_watcher_keeps_session_windows_open_with_a_fake_clock(tmp_path: Path) -> None:
    from relaygate.control import RelayControl
    from relaygate.integrations.logwatch import LogWatcher, window_opener
    from relaygate.protocols.loglines import LoginMatcher
    from relaygate.stores import open_store

    expiry = 900.0
    clock = Clock()
    control = RelayControl(open_store("memory:", expiry=expiry), expiry=expiry)
    log = tmp_path / "mail.log"
    log.write_text("Jan  1 00:00:01 mx imapd: LOGIN, user=a, ip=[::ffff:192.0.2.1], "
                   "port=[1], protocol=IMAP\n"
                   "Jan  1 00:00:01 mx pop3d: LOGIN, user=b, ip=[192.0.2.2], port=[2]\n")
    w = LogWatcher([str(log)], LoginMatcher(), window_opener(control, clock=clock),
                   from_start=True, refresh_every=expiry / 2, max_session=12 * 3600,
                   clock=clock)

    def allowed(ip: str) -> bool:
        return control.decide(ip, now=clock.t).allowed

    w.poll_once()
    assert allowed("192.0.2.1") and allowed("192.0.2.2")
    # Two hours pass with the IMAP session open; b logged out right after its login.
    with log.open("a") as f:
        f.write("Jan  1 00:00:02 mx pop3d: LOGOUT, user=b, ip=[192.0.2.2], top=0, retr=0\n")
    for _ in range(2 * 3600 // 60):
        clock.t += 60
        w.poll_once()
        assert allowed("192.0.2.1")
    assert not allowed("192.0.2.2")
    # The logout: the window lasts the expiry after it, then closes.
    with log.open("a") as f:
        f.write("Jan  1 02:00:02 mx imapd: LOGOUT, user=a, ip=[::ffff:192.0.2.1], headers=0, "
                "body=0, rcvd=1, sent=2, time=7200\n")
    w.poll_once()
    clock.t += expiry - 1
    w.poll_once()
    assert allowed("192.0.2.1")
    clock.t += 2
    w.poll_once()
    assert not allowed("192.0.2.1")
    for f_ in w.followers:
        f_.close()


def test_watcher_stops_counting_a_session_never_logged_out(tmp_path: Path) -> None:
    from relaygate.control import RelayControl
    from relaygate.integrations.logwatch import LogWatcher, window_opener
    from relaygate.protocols.loglines import LoginMatcher
    from relaygate.stores import open_store

    clock = Clock()
    control = RelayControl(open_store("memory:", expiry=900), expiry=900)
    log = tmp_path / "mail.log"
    log.write_text("Jan  1 00:00:01 mx imapd[7]: Login user=a host=h [192.0.2.3]\n")
    w = LogWatcher([str(log)], LoginMatcher(), window_opener(control, clock=clock),
                   from_start=True, refresh_every=450, max_session=3600, clock=clock)
    w.poll_once()
    while clock.t < 1_000_000 + 3600 - 60:
        clock.t += 60
        w.poll_once()
        assert control.decide("192.0.2.3", now=clock.t).allowed
    clock.t += 60 + 900
    w.poll_once()
    assert not control.decide("192.0.2.3", now=clock.t).allowed
    for f_ in w.followers:
        f_.close()


def test_once_reads_a_big_file_to_its_end(tmp_path: Path) -> None:
    # --once must read the whole file, not one poll's worth (READ_CHUNK bytes).
    from relaygate.integrations.logwatch import READ_CHUNK

    log = tmp_path / "mail.log"
    filler = b"Dec  1 00:00:00 mx postfix/qmgr[1]: 0123456789: removed\n"
    with log.open("wb") as f:
        f.write(filler * (3 * READ_CHUNK // len(filler) + 1))
        f.write(b"Dec  1 00:00:01 mx imapd[7]: Login user=a host=h [192.0.2.77]\n")
    out = subprocess.run([RELAYGATE, "--store", "memory:", "watch-log", "--once",
                          "--dry-run", str(log)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "192.0.2.77 user=a service=imap pattern=uw\n"
