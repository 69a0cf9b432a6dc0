"""POP/IMAP-before-SMTP with the real Postfix and Dovecot: the post-login hook.

Postfix asks ``relaygate policyd`` in smtpd_relay_restrictions; Dovecot runs
``relaygate dovecot-postlogin`` (POP3) and ``python -m
relaygate.integrations.dovecot`` (IMAP) after each login; both share one
SQLite store. Each scenario uses its own client address so windows of one
cannot help another.
"""

from __future__ import annotations

import json
import subprocess
import time

import _postfix_testbed as testbed
import pytest

from .pfdc_support import EXPIRY, RELAYGATE, USERS, Stack, start_dovecot

LOCAL = f"alice@{testbed.LOCAL_DOMAIN}"
REMOTE = f"someone@{testbed.REMOTE_DOMAIN}"


def relay(stack: Stack, source: str) -> tuple[int, str]:
    host, port = ("::1", stack.postfix.v6_port) if ":" in source else \
        ("127.0.0.1", stack.postfix.port)
    assert port is not None
    return testbed.smtp_rcpt(source, host, port, REMOTE, send=True)


def windows(stack: Stack) -> dict[str, dict[str, object]]:
    out = subprocess.run([RELAYGATE, "--store", stack.store, "list", "--json"],
                         capture_output=True, text=True, check=True, timeout=30)
    return {g["ip"]: g for g in json.loads(out.stdout)}


def wait_expired(stack: Stack, ip: str) -> None:
    deadline = time.monotonic() + EXPIRY + 5
    time.sleep(EXPIRY)
    while ip in windows(stack):
        assert time.monotonic() < deadline, f"window of {ip} did not expire"
        time.sleep(0.2)


def test_stranger_cannot_relay_but_can_deliver_locally(stack: Stack) -> None:
    code, msg = relay(stack, "127.0.0.3")
    assert code == 554, msg
    assert "5.7.1" in msg and "Relay access denied" in msg
    before = len(stack.postfix.delivered("alice"))
    code, msg = testbed.smtp_rcpt("127.0.0.3", "127.0.0.1", stack.postfix.port, LOCAL,
                                  send=True)
    assert code == 250, msg
    deadline = time.monotonic() + 20
    while len(stack.postfix.delivered("alice")) <= before:
        assert time.monotonic() < deadline, stack.postfix.log_tail()
        time.sleep(0.1)
    # The policy was asked and said DUNNO (logged at debug level).
    assert "action=DUNNO" in stack.policyd.log_text()


def test_pop3_login_opens_window_until_expiry(stack: Stack, dovecot_hooked: object) -> None:
    dovecot = dovecot_hooked
    assert isinstance(dovecot, testbed.DovecotTestbed)
    assert relay(stack, "127.0.0.3")[0] == 554
    reply = testbed.pop3_login("127.0.0.3", "127.0.0.1", dovecot.pop3_port, "alice",
                               USERS["alice"])
    assert reply.startswith(b"+OK")
    grant = windows(stack)["127.0.0.3"]
    assert grant["user"] == "alice" and grant["source"] == "dovecot"
    code, msg = relay(stack, "127.0.0.3")
    assert code == 250, f"{msg}\n{stack.policyd.log_text()[-2000:]}"
    assert "window opened by alice via dovecot" in stack.policyd.log_text()
    # Another address is still a stranger.
    assert relay(stack, "127.0.0.7")[0] == 554
    wait_expired(stack, "127.0.0.3")
    code, msg = relay(stack, "127.0.0.3")
    assert code == 554, msg


def test_imap_login_opens_window_until_expiry(stack: Stack, dovecot_hooked: object) -> None:
    dovecot = dovecot_hooked
    assert isinstance(dovecot, testbed.DovecotTestbed)
    assert relay(stack, "127.0.0.4")[0] == 554
    assert testbed.imap_login("127.0.0.4", "127.0.0.1", dovecot.imap_port, "bob@example.test",
                              USERS["bob@example.test"]) == "OK"
    grant = windows(stack)["127.0.0.4"]
    assert grant["user"] == "bob@example.test" and grant["domain"] == "example.test"
    assert relay(stack, "127.0.0.4")[0] == 250
    wait_expired(stack, "127.0.0.4")
    assert relay(stack, "127.0.0.4")[0] == 554


def test_failed_login_opens_nothing(stack: Stack, dovecot_hooked: object) -> None:
    dovecot = dovecot_hooked
    assert isinstance(dovecot, testbed.DovecotTestbed)
    with pytest.raises(testbed.poplib.error_proto):
        testbed.pop3_login("127.0.0.8", "127.0.0.1", dovecot.pop3_port, "alice", "wrong")
    assert "127.0.0.8" not in windows(stack)
    assert relay(stack, "127.0.0.8")[0] == 554


def test_ipv6_login_opens_window(stack: Stack, dovecot_hooked: object) -> None:
    if not stack.ipv6:
        pytest.skip("no IPv6 loopback here")
    dovecot = dovecot_hooked
    assert isinstance(dovecot, testbed.DovecotTestbed)
    assert relay(stack, "::1")[0] == 554
    testbed.pop3_login("::1", "::1", dovecot.pop3_port, "alice", USERS["alice"])
    assert windows(stack)["::1"]["source"] == "dovecot"
    code, msg = relay(stack, "::1")
    assert code == 250, msg
    wait_expired(stack, "::1")
    assert relay(stack, "::1")[0] == 554


def test_unreachable_store_does_not_fail_the_login(stack: Stack) -> None:
    """The hook logs and goes on: the user reads mail, only relaying is not opened."""
    broken = "redis://127.0.0.1:1/0"
    dovecot = start_dovecot(stack.root / "dovecot-broken", ipv6=False, postlogin={
        "pop3": [RELAYGATE, "dovecot-postlogin", "--store", broken, "--timeout", "3"]})
    try:
        reply = testbed.pop3_login("127.0.0.6", "127.0.0.1", dovecot.pop3_port, "alice",
                                   USERS["alice"])
        assert reply.startswith(b"+OK")
        deadline = time.monotonic() + 10
        while "no relay window" not in dovecot.log_tail(50):
            assert time.monotonic() < deadline, dovecot.log_tail()
            time.sleep(0.1)
    finally:
        dovecot.stop()
    assert relay(stack, "127.0.0.6")[0] == 554
