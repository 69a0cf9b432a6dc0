"""SMTP AUTH (RFC 4954), STARTTLS/implicit TLS with trustme certificates, sender binding."""

from __future__ import annotations

import base64
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_smtp_support import (
    LOCAL,
    PASSWORDS,
    RULE_IP,
    STRANGER_IP,
    WINDOW_IP,
    RawClient,
    SmtpHarness,
    tls_files,
)

from relaygate.interfaces import LoginResult

MSG = b"Subject: auth test\r\n\r\nhello\r\n"
RELAY_DENIED = "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[SmtpHarness]:
    harness = SmtpHarness(tmp_path)
    yield harness
    harness.stop()


@pytest.fixture
def tls_h(tmp_path: Path) -> Iterator[tuple[SmtpHarness, ssl.SSLContext]]:
    """STARTTLS on smtp, implicit TLS on smtps, and loopback NOT trusted for plaintext AUTH."""
    tls, client_ctx = tls_files(tmp_path)
    harness = SmtpHarness(tmp_path, tls=tls,
                          smtp={"smtps": ("127.0.0.1:0",), "submission": ("127.0.0.1:0",),
                                "loopback_plaintext_auth": False})
    yield harness, client_ctx
    harness.stop()


# -- AUTH on a loopback listener ----------------------------------------------------------


def test_auth_plain_lets_a_stranger_relay(h: SmtpHarness) -> None:
    c = h.client(STRANGER_IP)
    assert "PLAIN" in c.esmtp_features["auth"] and "LOGIN" in c.esmtp_features["auth"]
    code, _ = c.login("alice", PASSWORDS["alice"])
    assert code == 235
    assert c.sendmail(f"alice@{LOCAL}", ["friend@remote.invalid"], MSG) == {}
    c.quit()
    assert h.queue is not None
    data = h.queue.items[0][2]
    assert b"with ESMTPA id" in data and b"(relay allowed: SMTP AUTH as alice);" in data


def test_auth_login_mechanism(h: SmtpHarness) -> None:
    r = RawClient("127.0.0.1", h.port(), STRANGER_IP)
    r.cmd("EHLO client.example")
    assert r.cmd("AUTH LOGIN") == "334 " + b64(b"Username:")
    assert r.cmd(b64(b"bob")) == "334 " + b64(b"Password:")
    assert r.cmd(b64(PASSWORDS["bob"].encode())).startswith("235")
    assert r.cmd("MAIL FROM:<bob@example.org>").startswith("250")
    assert r.cmd("RCPT TO:<x@remote.invalid>").startswith("250")
    r.close()


def test_auth_plain_variants(h: SmtpHarness) -> None:
    r = RawClient("127.0.0.1", h.port(), STRANGER_IP)
    r.cmd("EHLO client.example")
    # lower-case mechanism name, initial response given as a challenge answer
    assert r.cmd("auth plain") == "334 "
    assert r.cmd(b64(b"\0bob\0wrong")).startswith("535 5.7.8")
    # an authorization identity other than the login is not supported
    assert r.cmd("AUTH PLAIN " + b64(b"alice\0bob\0" + PASSWORDS["bob"].encode())
                 ).startswith("535 5.7.8")
    assert r.cmd("AUTH PLAIN !!notbase64").startswith("501 5.5.2")
    assert r.cmd("AUTH PLAIN " + b64(b"no-nuls-here")).startswith("501 5.5.2")
    assert r.cmd("AUTH PLAIN " + b64(b"bob\0bob\0" + PASSWORDS["bob"].encode())
                 ).startswith("235")
    assert r.cmd("AUTH PLAIN " + b64(b"\0bob\0x")).startswith("503")  # already authenticated
    r.close()


def test_auth_not_during_a_transaction(h: SmtpHarness) -> None:
    r = RawClient("127.0.0.1", h.port(), STRANGER_IP)
    r.cmd("EHLO client.example")
    r.cmd("MAIL FROM:<a@sender.example>")
    assert r.cmd("AUTH PLAIN " + b64(b"\0bob\0" + PASSWORDS["bob"].encode())
                 ).startswith("503 5.5.1")
    r.close()


def test_failed_auth_does_not_relay(h: SmtpHarness) -> None:
    c = h.client(STRANGER_IP)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        c.login("alice", "wrong")
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        c.sendmail(f"alice@{LOCAL}", ["friend@remote.invalid"], MSG)
    c.close()


def test_throttled_login_is_a_temporary_failure(h: SmtpHarness) -> None:
    assert h.directory is not None

    async def throttled(login: str, password: str, ip: str) -> LoginResult:
        return LoginResult(None, throttled=True)

    h.directory.authenticate = throttled  # type: ignore[method-assign]
    r = RawClient("127.0.0.1", h.port(), STRANGER_IP)
    r.cmd("EHLO client.example")
    assert r.cmd("AUTH PLAIN " + b64(b"\0alice\0" + PASSWORDS["alice"].encode())
                 ).startswith("454 4.7.0")
    r.close()


def test_smtp_auth_opens_no_window(h: SmtpHarness) -> None:
    c = h.client(STRANGER_IP)
    c.login("alice", PASSWORDS["alice"])
    c.quit()
    assert h.control.list() == []
    r = RawClient("127.0.0.1", h.port(), STRANGER_IP)
    r.cmd("EHLO client.example")
    r.cmd("MAIL FROM:<alice@example.org>")
    assert r.cmd("RCPT TO:<x@remote.invalid>") == RELAY_DENIED
    r.close()


def test_no_auth_without_a_directory(tmp_path: Path) -> None:
    h = SmtpHarness(tmp_path, with_directory=False)
    try:
        r = RawClient("127.0.0.1", h.port(), STRANGER_IP)
        assert "AUTH" not in r.cmd("EHLO client.example")
        r.close()
    finally:
        h.stop()


# -- TLS -----------------------------------------------------------------------------------


def test_plaintext_auth_refused_on_untrusted_listener(
        tls_h: tuple[SmtpHarness, ssl.SSLContext]) -> None:
    h, _ = tls_h
    for service in ("smtp", "submission"):
        r = RawClient("127.0.0.1", h.port(service), STRANGER_IP)
        ehlo = r.cmd("EHLO client.example")
        assert "STARTTLS" in ehlo and "AUTH" not in ehlo
        assert r.cmd("AUTH PLAIN " + b64(b"\0alice\0" + PASSWORDS["alice"].encode())
                     ).startswith("538 5.7.11")
        r.close()


def test_starttls_then_auth(tls_h: tuple[SmtpHarness, ssl.SSLContext]) -> None:
    h, client_ctx = tls_h
    c = smtplib.SMTP("127.0.0.1", h.port("submission"), source_address=(STRANGER_IP, 0),
                     timeout=10)
    c.ehlo("laptop.example")
    c.starttls(context=client_ctx)
    c.ehlo("laptop.example")
    assert "PLAIN" in c.esmtp_features["auth"]
    c.login("alice", PASSWORDS["alice"])
    assert c.sendmail(f"alice@{LOCAL}", ["friend@remote.invalid"], MSG) == {}
    c.quit()
    assert h.queue is not None
    assert b"with ESMTPSA id" in h.queue.items[0][2]


def test_starttls_without_auth_is_esmtps(tls_h: tuple[SmtpHarness, ssl.SSLContext]) -> None:
    h, client_ctx = tls_h
    c = smtplib.SMTP("127.0.0.1", h.port("smtp"), source_address=(STRANGER_IP, 0), timeout=10)
    c.starttls(context=client_ctx)
    c.sendmail("a@sender.example", [f"bob@{LOCAL}"], MSG)
    c.quit()
    (msg,) = h.maildir_messages("bob")
    assert b"with ESMTPS id" in msg


def test_implicit_tls_allows_auth(tls_h: tuple[SmtpHarness, ssl.SSLContext]) -> None:
    h, client_ctx = tls_h
    c = smtplib.SMTP_SSL("127.0.0.1", h.port("smtps"), source_address=(STRANGER_IP, 0),
                         context=client_ctx, timeout=10)
    c.ehlo("laptop.example")
    assert "STARTTLS" not in c.esmtp_features
    c.login("bob", PASSWORDS["bob"])
    assert c.sendmail(f"bob@{LOCAL}", ["friend@remote.invalid"], MSG) == {}
    c.quit()
    assert h.queue is not None
    assert b"with ESMTPSA id" in h.queue.items[0][2]


def test_starttls_forgets_earlier_auth(tmp_path: Path) -> None:
    tls, client_ctx = tls_files(tmp_path)
    h = SmtpHarness(tmp_path, tls=tls)  # loopback: plaintext AUTH allowed
    try:
        c = smtplib.SMTP("127.0.0.1", h.port(), source_address=(STRANGER_IP, 0), timeout=10)
        c.ehlo("laptop.example")
        c.login("alice", PASSWORDS["alice"])
        c.starttls(context=client_ctx)  # RFC 3207 4.2: AUTH state is discarded
        c.ehlo("laptop.example")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail(f"alice@{LOCAL}", ["friend@remote.invalid"], MSG)
        c.close()
    finally:
        h.stop()


# -- sender binding ---------------------------------------------------------------------------


@pytest.fixture
def bound(tmp_path: Path) -> Iterator[SmtpHarness]:
    harness = SmtpHarness(tmp_path, settings={"sender_binding": True})
    yield harness
    harness.stop()


def try_relay(h: SmtpHarness, source: str, sender: str, login: str | None = None,
              rcpt: str = "friend@remote.invalid") -> str:
    r = RawClient("127.0.0.1", h.port(), source)
    r.cmd("EHLO client.example")
    if login:
        assert r.cmd("AUTH PLAIN " + b64(f"\0{login}\0{PASSWORDS[login]}".encode())
                     ).startswith("235")
    assert r.cmd(f"MAIL FROM:<{sender}>").startswith("250")
    reply = r.cmd(f"RCPT TO:<{rcpt}>")
    r.close()
    return reply


def test_window_binds_the_sender(bound: SmtpHarness) -> None:
    bound.open_window(WINDOW_IP, user="alice")
    for own in ("alice@example.org", "A.Smith@Example.ORG.", "alice@home.example"):
        assert try_relay(bound, WINDOW_IP, own).startswith("250"), own
    for other in ("bob@example.org", "alice@elsewhere.example", ""):
        assert try_relay(bound, WINDOW_IP, other).startswith("553 5.7.1"), other
    # local mail is not relaying: no binding
    assert try_relay(bound, WINDOW_IP, "bob@example.org", rcpt=f"bob@{LOCAL}").startswith("250")


def test_auth_binds_the_sender(bound: SmtpHarness) -> None:
    assert try_relay(bound, STRANGER_IP, "bob@example.org", login="bob").startswith("250")
    assert try_relay(bound, STRANGER_IP, "alice@example.org", login="bob").startswith(
        "553 5.7.1")


def test_static_rule_is_not_bound(bound: SmtpHarness) -> None:
    assert try_relay(bound, RULE_IP, "anyone@anywhere.example").startswith("250")


def test_window_without_user_cannot_be_bound(bound: SmtpHarness) -> None:
    bound.open_window(WINDOW_IP, user=None)
    assert try_relay(bound, WINDOW_IP, "alice@example.org").startswith("553 5.7.1")


def test_binding_is_off_by_default(h: SmtpHarness) -> None:
    h.open_window(WINDOW_IP, user="alice")
    assert try_relay(h, WINDOW_IP, "bob@example.org").startswith("250")
