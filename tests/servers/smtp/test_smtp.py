"""The relay decision per RCPT, local delivery, the address-trick battery, attribution."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_smtp_support import (
    FIXUP_IP,
    LOCAL,
    RULE_IP,
    STRANGER_IP,
    WINDOW_IP,
    EventCapture,
    FailingStore,
    RawClient,
    SmtpHarness,
)

from conftest import have_ipv6_loopback

RELAY_DENIED = "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts"
MSG = b"From: alice@example.org\r\nSubject: test\r\n\r\nhello\r\n"


@pytest.fixture
def h(tmp_path: Path) -> Iterator[SmtpHarness]:
    harness = SmtpHarness(tmp_path)
    yield harness
    harness.stop()


def raw(h: SmtpHarness, source: str = STRANGER_IP) -> RawClient:
    r = RawClient("127.0.0.1", h.port(), source)
    assert r.cmd("EHLO client.example").startswith("250")
    return r


def rcpt(r: RawClient, address: str, sender: str = "someone@sender.example") -> str:
    r.cmd("RSET")
    assert r.cmd(f"MAIL FROM:<{sender}>").startswith("250")
    return r.cmd(f"RCPT TO:<{address}>")


# -- who may relay -----------------------------------------------------------------


def test_stranger_may_not_relay(h: SmtpHarness) -> None:
    r = raw(h)
    assert rcpt(r, "someone@remote.invalid") == RELAY_DENIED
    r.close()
    assert h.queue is not None and h.queue.items == []


@pytest.mark.parametrize("address", [
    f"postmaster@{LOCAL}.evil.test",  # a local domain followed by a dot is not local
    f"alice@{LOCAL}.evil.test",
    f"postmaster@mail.{LOCAL}",  # nor is a subdomain without a ".domain" line
    f"postmaster@not{LOCAL}",
    f"postmaster@{LOCAL[:-1]}",
])
def test_names_that_begin_or_end_like_a_local_domain_are_not_local(
        h: SmtpHarness, address: str) -> None:
    r = raw(h)
    assert rcpt(r, address) == RELAY_DENIED, address
    r.close()
    assert h.queue is not None and h.queue.items == []


def test_local_delivery_works_for_anyone(h: SmtpHarness) -> None:
    c = h.client(STRANGER_IP)
    c.sendmail("stranger@far.example", [f"alice@{LOCAL}"], MSG)
    c.quit()
    (msg,) = h.maildir_messages("alice")
    assert msg.startswith(b"Return-Path: <stranger@far.example>\r\nReceived: from client.example"
                          b" ([127.0.0.3])\r\n\tby mx.example.org (relaygate) with ESMTP id ")
    assert msg.endswith(MSG)
    assert b"relay allowed" not in msg
    assert h.queue is not None and h.queue.items == []


def test_open_window_relays_with_attribution(h: SmtpHarness) -> None:
    h.open_window(WINDOW_IP, user="alice")
    c = h.client(WINDOW_IP)
    refused = c.sendmail(f"alice@{LOCAL}", ["friend@remote.invalid", f"bob@{LOCAL}"], MSG)
    c.quit()
    assert refused == {}
    assert h.queue is not None
    ((sender, rcpts, data),) = h.queue.items
    assert sender == f"alice@{LOCAL}" and rcpts == ["friend@remote.invalid"]
    assert b"(relay allowed: pop3 window of alice);" in data
    assert b"from client.example ([127.0.0.2])" in data
    # the local recipient of the same message goes to the Maildir, not the queue
    (local,) = h.maildir_messages("bob")
    assert local.endswith(MSG)


def test_static_rule_relays(h: SmtpHarness) -> None:
    c = h.client(RULE_IP)
    assert c.sendmail("anyone@sender.example", ["x@remote.invalid"], MSG) == {}
    c.quit()
    assert h.queue is not None
    assert h.queue.items[0][1] == ["x@remote.invalid"]
    assert b"(relay allowed: static rule)" in h.queue.items[0][2]


def test_relayclient_value_is_appended(h: SmtpHarness) -> None:
    c = h.client(FIXUP_IP)
    c.sendmail("anyone@sender.example", ["x@remote.invalid", f"bob@{LOCAL}"], MSG)
    c.quit()
    assert h.queue is not None
    assert h.queue.items[0][1] == ["x@remote.invalid@fixup.example.net"]
    assert len(h.maildir_messages("bob")) == 1  # local recipients get no fixup


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_client_window(tmp_path: Path) -> None:
    h = SmtpHarness(tmp_path, smtp={"listen": ("127.0.0.1:0", "[::1]:0")})
    try:
        c = h.client("::1")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("a@sender.example", ["x@remote.invalid"], MSG)
        h.open_window("::1", user="bob")
        c.rset()
        assert c.sendmail("bob@example.org", ["x@remote.invalid"], MSG) == {}
        c.quit()
        assert h.queue is not None
        assert b"from client.example ([IPv6:::1])" in h.queue.items[0][2]
        assert b"pop3 window of bob" in h.queue.items[0][2]
    finally:
        h.stop()


def test_expired_window_does_not_relay(h: SmtpHarness) -> None:
    h.control.open_window(WINDOW_IP, user="alice", source="pop3", now=time.time() - 1000,
                          ttl=900)
    r = raw(h, WINDOW_IP)
    assert rcpt(r, "x@remote.invalid") == RELAY_DENIED
    r.close()
    h.open_window(WINDOW_IP, ttl=1)
    r = raw(h, WINDOW_IP)
    assert rcpt(r, "x@remote.invalid").startswith("250")
    r.close()
    time.sleep(1.3)
    r = raw(h, WINDOW_IP)
    assert rcpt(r, "x@remote.invalid") == RELAY_DENIED
    r.close()


def test_window_opened_during_the_session_counts(h: SmtpHarness) -> None:
    r = raw(h, WINDOW_IP)
    assert rcpt(r, "x@remote.invalid") == RELAY_DENIED
    h.open_window(WINDOW_IP)  # e.g. the mail client checked POP3 meanwhile
    assert rcpt(r, "x@remote.invalid").startswith("250")
    r.close()


def test_allow_is_cached_for_the_session(h: SmtpHarness) -> None:
    h.open_window(WINDOW_IP)
    r = raw(h, WINDOW_IP)
    assert rcpt(r, "x@remote.invalid").startswith("250")
    h.control.revoke(WINDOW_IP)
    # the decision was taken for this connection, as qmail-smtpd's $RELAYCLIENT is
    assert rcpt(r, "y@remote.invalid").startswith("250")
    r.close()
    r = raw(h, WINDOW_IP)
    assert rcpt(r, "x@remote.invalid") == RELAY_DENIED
    r.close()


def test_store_failure_tempfails_relay_but_local_mail_flows(tmp_path: Path) -> None:
    h = SmtpHarness(tmp_path, store=FailingStore())
    try:
        r = raw(h, WINDOW_IP)
        reply = rcpt(r, "x@remote.invalid")
        assert reply.startswith("451 4.3.0") and "redis" not in reply and "10.9" not in reply
        assert r.cmd(f"RCPT TO:<bob@{LOCAL}>").startswith("250")
        assert r.cmd("DATA").startswith("354")
        assert r.cmd(MSG + b".").startswith("250")
        r.close()
        assert len(h.maildir_messages("bob")) == 1
        assert h.queue is not None and h.queue.items == []
        # the static rule is consulted before the store: it still works
        r = raw(h, RULE_IP)
        assert rcpt(r, "x@remote.invalid").startswith("250")
        r.close()
    finally:
        h.stop()


def test_without_a_queue_relaying_tempfails(tmp_path: Path) -> None:
    h = SmtpHarness(tmp_path, with_queue=False)
    try:
        r = raw(h, RULE_IP)
        assert rcpt(r, "x@remote.invalid").startswith("451 4.3.0")
        r.close()
    finally:
        h.stop()


# -- local recipients ----------------------------------------------------------------


def test_unknown_local_mailbox(h: SmtpHarness) -> None:
    r = raw(h)
    assert rcpt(r, f"nobody@{LOCAL}") == "550 5.1.1 sorry, no mailbox here by that name"
    r.close()


@pytest.mark.parametrize("address", [
    f"ALICE@{LOCAL.upper()}", f"alice@{LOCAL}.", "a.smith@Example.Org.",
])
def test_local_variants_reach_the_mailbox(h: SmtpHarness, address: str) -> None:
    r = raw(h)
    assert rcpt(r, address).startswith("250")
    r.close()


def test_postmaster_is_always_reachable(h: SmtpHarness) -> None:
    r = raw(h)
    for address in ("Postmaster", "POSTMASTER", f"postmaster@{LOCAL}",
                    "postmaster@XN--BCHER-KVA.example."):
        assert rcpt(r, address).startswith("250"), address
    assert r.cmd("DATA").startswith("354")
    assert r.cmd(MSG + b".").startswith("250")
    r.close()
    assert len(h.maildir_messages("admin")) == 1


def test_idna_local_domain(h: SmtpHarness) -> None:
    r = raw(h)
    # bücher.example is local; only its postmaster exists, through the fallback
    assert rcpt(r, "postmaster@xn--bcher-kva.example").startswith("250")
    assert rcpt(r, "x@xn--bcher-kva.example").startswith("550 5.1.1")
    # not spellings of the local domain: invalid Punycode, doubled dots
    assert rcpt(r, "postmaster@xn--bcher-kva-.example").startswith("553")
    assert rcpt(r, f"postmaster@{LOCAL}..").startswith("553")
    r.close()


def test_local_address_literal_only_when_configured(tmp_path: Path) -> None:
    h = SmtpHarness(tmp_path, settings={"domains": (LOCAL, "[127.0.0.1]")})
    try:
        r = raw(h)
        assert rcpt(r, "postmaster@[127.0.0.1]").startswith("250")
        assert rcpt(r, "postmaster@[127.0.0.2]") == RELAY_DENIED
        assert rcpt(r, "postmaster@[IPv6:::ffff:127.0.0.1]").startswith("250")
        r.close()
    finally:
        h.stop()


# -- the address-trick battery ---------------------------------------------------------

TRICKS = [
    "someone@remote.invalid",
    "SOMEONE@REMOTE.INVALID.",
    "user%remote.invalid@example.org",
    "alice%remote.invalid@example.org",
    "user%remote.invalid",
    "remote.invalid!user@example.org",
    "remote.invalid!user",
    "@example.org:user@remote.invalid",
    "@example.org,@mx.example.org:user@remote.invalid",
    "@remote.invalid:alice@example.org",
    '"user@remote.invalid"@example.org',
    '"user%remote.invalid"@example.org',
    '"remote.invalid!user"@example.org',
    '"user@remote.invalid"',
    '"user@remote.invalid"@[127.0.0.1]',
    "user@remote.invalid@example.org",
    "user@remote.invalid@mx.example.org",
    "user@[192.0.2.1]",
    "user@[127.0.0.1]",
    "user@[IPv6:2001:db8::1]",
    "user%remote.invalid@[127.0.0.1]",
    "user@mx.example.org",
]


@pytest.mark.parametrize("address", TRICKS)
def test_trick_refused_for_a_stranger(h: SmtpHarness, address: str) -> None:
    r = raw(h)
    reply = rcpt(r, address)
    r.close()
    assert reply.startswith("553 5.7.1"), (address, reply)
    assert h.queue is not None and h.queue.items == []


@pytest.mark.parametrize("address", [
    b"user\x00@example.org", b"alice@exam\x00ple.org", b"us\ter@example.org",
    b"user\r@example.org", b"user\x7f@example.org", b'"a\x01b"@example.org',
])
def test_control_characters_refused(h: SmtpHarness, address: bytes) -> None:
    h.open_window(STRANGER_IP)  # even a client that may relay
    r = raw(h)
    r.cmd("MAIL FROM:<a@sender.example>")
    reply = r.cmd(b"RCPT TO:<" + address + b">")
    r.close()
    assert reply.startswith("553 5.7.1"), (address, reply)


def test_tricks_from_an_authorized_client(h: SmtpHarness) -> None:
    """A client that may relay: legitimate relay works, odd forms are taken literally."""
    h.open_window(WINDOW_IP, user="alice")
    r = raw(h, WINDOW_IP)
    sender = f"alice@{LOCAL}"
    assert rcpt(r, "friend@remote.invalid", sender).startswith("250")
    assert rcpt(r, "FRIEND@Remote.Invalid.", sender).startswith("250")
    assert rcpt(r, "user@[192.0.2.1]", sender).startswith("250")
    assert rcpt(r, '"john doe"@remote.invalid', sender).startswith("250")
    # percent hack to a local domain: looked up literally, there is no such mailbox
    assert rcpt(r, "user%remote.invalid@example.org", sender).startswith("550 5.1.1")
    # a source route is ignored (RFC 5321 4.1.1.3): the mailbox decides
    assert rcpt(r, "@remote.invalid:bob@example.org", sender).startswith("250")
    assert rcpt(r, "@example.org:friend@remote.invalid", sender).startswith("250")
    assert rcpt(r, "user@remote.invalid@example.org", sender).startswith("501 5.1.3")
    r.close()


def test_authorized_client_relay_end_to_end(h: SmtpHarness) -> None:
    h.open_window(WINDOW_IP, user="alice")
    c = h.client(WINDOW_IP)
    assert c.sendmail(f"alice@{LOCAL}", ["Friend@Remote.Invalid.", "x@[IPv6:2001:DB8::1]"],
                      MSG) == {}
    c.quit()
    assert h.queue is not None
    assert h.queue.items[0][1] == ["Friend@remote.invalid", "x@[IPv6:2001:db8::1]"]


# -- errors and attribution ---------------------------------------------------------------


def test_delivery_failure_is_451_without_details(h: SmtpHarness) -> None:
    assert h.queue is not None
    h.queue.fail = True
    r = raw(h, RULE_IP)
    assert rcpt(r, "x@remote.invalid").startswith("250")
    assert r.cmd("DATA").startswith("354")
    reply = r.cmd(MSG + b".")
    r.close()
    assert reply.startswith("451 4.3.0")
    assert "disk" not in reply and "secret" not in reply and "OSError" not in reply
    assert h.queue.items == [] and h.queue.partial_files() == []


def test_spool_that_cannot_be_opened_is_451_to_data(h: SmtpHarness) -> None:
    assert h.queue is not None
    h.queue.fail_open = True
    r = raw(h, RULE_IP)
    assert rcpt(r, "x@remote.invalid").startswith("250")
    reply = r.cmd("DATA")
    assert reply.startswith("451 4.3.0") and "disk" not in reply
    h.queue.fail_open = False
    assert r.cmd("DATA").startswith("354")  # the transaction is still open
    assert r.cmd(MSG + b".").startswith("250")
    r.close()
    assert len(h.queue.items) == 1


def test_unexpected_exception_is_451_without_details(h: SmtpHarness) -> None:
    assert h.directory is not None

    def boom(address: str) -> None:
        raise RuntimeError("/etc/relaygate/secret exploded")

    h.directory.find_recipient = boom  # type: ignore[method-assign]
    r = raw(h)
    reply = rcpt(r, f"alice@{LOCAL}")
    assert reply.startswith("451 4.3.0") and "secret" not in reply and "Runtime" not in reply
    assert r.cmd("NOOP").startswith("250")  # the session goes on
    r.close()


def test_one_log_line_per_message(h: SmtpHarness) -> None:
    h.open_window(WINDOW_IP, user="alice")
    with EventCapture() as cap:
        c = h.client(WINDOW_IP)
        c.sendmail(f"alice@{LOCAL}", ["x@remote.invalid", f"bob@{LOCAL}"], MSG)
        c.quit()
        h.wait_for(lambda: bool(cap.events("message.accepted")))
    (line,) = cap.events("message.accepted")
    assert line["ip"] == WINDOW_IP and line["user"] == "alice"
    assert "window opened by alice" in line["reason"]
    assert line["recipients"] == 2 and line["rcpts"] == f"x@remote.invalid,bob@{LOCAL}"
    assert line["queue_id"] == "q1" and line["maildir"] and line["id"]
    assert line["size"] > len(MSG)
    (decision,) = cap.events("relay.decision")
    assert decision["verdict"] == "allow" and decision["user"] == "alice"


def test_helo_gives_smtp_protocol(h: SmtpHarness) -> None:
    r = RawClient("127.0.0.1", h.port(), STRANGER_IP)
    assert r.cmd("HELO old.client").startswith("250")
    assert r.cmd("MAIL FROM:<a@sender.example>").startswith("250")
    assert r.cmd(f"RCPT TO:<bob@{LOCAL}>").startswith("250")
    assert r.cmd("DATA").startswith("354")
    assert r.cmd(MSG + b".").startswith("250 2.0.0")
    r.close()
    (msg,) = h.maildir_messages("bob")
    assert b"Received: from old.client ([127.0.0.3])\r\n\tby mx.example.org (relaygate) " \
           b"with SMTP id " in msg


def test_null_sender_and_bad_sender(h: SmtpHarness) -> None:
    r = raw(h)
    assert r.cmd("MAIL FROM:<>").startswith("250")
    assert r.cmd(f"RCPT TO:<bob@{LOCAL}>").startswith("250")
    r.cmd("RSET")
    assert r.cmd("MAIL FROM:<a..b@x.example>").startswith("501 5.1.7")
    assert r.cmd("MAIL FROM:<a@b.example").startswith("553")  # unclosed bracket
    r.close()


def test_metrics_count_messages_and_decisions(h: SmtpHarness) -> None:
    c = h.client(RULE_IP)
    c.sendmail("a@sender.example", ["x@remote.invalid"], MSG)
    c.quit()
    reg = h.metrics.registry
    assert reg.get_sample_value("relaygate_messages_total", {"event": "accepted"}) == 1
    assert reg.get_sample_value("relaygate_messages_total", {"event": "relayed"}) == 1
    assert reg.get_sample_value("relaygate_relay_decisions_total",
                                {"verdict": "allow", "kind": "rule"}) == 1


def test_disabled_account_still_receives_mail(h: SmtpHarness) -> None:
    import dataclasses

    assert h.directory is not None
    account, password = h.directory.accounts["bob"]
    h.directory.accounts["bob"] = (dataclasses.replace(account, enabled=False), password)
    c = h.client(STRANGER_IP)
    assert c.sendmail("a@sender.example", [f"bob@{LOCAL}"], MSG) == {}
    c.quit()
    assert len(h.maildir_messages("bob")) == 1


def test_unix_socket_listener(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "smtp.sock"
    h = SmtpHarness(tmp_path, smtp={"listen": (f"unix:{path}",)})
    try:
        assert h.services[0].listeners() == [f"smtp unix:{path}"]
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.settimeout(10)
        f = s.makefile("rwb")

        def cmd(line: bytes) -> bytes:
            f.write(line + b"\r\n")
            f.flush()
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            return reply

        assert f.readline().startswith(b"220")
        assert cmd(b"EHLO local.client").startswith(b"250 ")
        assert cmd(b"MAIL FROM:<a@sender.example>").startswith(b"250")
        assert cmd(b"RCPT TO:<x@remote.invalid>").startswith(b"553 5.7.1")
        assert cmd(f"RCPT TO:<bob@{LOCAL}>".encode()).startswith(b"250")
        assert cmd(b"DATA").startswith(b"354")
        assert cmd(MSG + b".").startswith(b"250")
        s.close()
        (msg,) = h.maildir_messages("bob")
        assert b"Received: from local.client (UNIX socket)\r\n" in msg
    finally:
        h.stop()


def test_relayed_messages_counted_for_the_migration_report(tmp_path: Path) -> None:
    from relaygate.relaystats import RelayStats, read_report

    (tmp_path / "data").mkdir()
    h = SmtpHarness(tmp_path)
    try:
        h.open_window(WINDOW_IP, user="alice")
        for _ in range(2):
            c = h.client(WINDOW_IP)
            c.sendmail(f"alice@{LOCAL}", ["friend@remote.invalid"], MSG)
            c.quit()
        c = h.client(STRANGER_IP)
        c.login("bob", "bob-secret")
        c.sendmail(f"bob@{LOCAL}", ["friend@remote.invalid"], MSG)
        c.sendmail(f"bob@{LOCAL}", [f"alice@{LOCAL}"], MSG)  # local: not relayed, not counted
        c.quit()
        c = h.client(RULE_IP)
        c.sendmail("anyone@sender.example", ["x@remote.invalid", "y@remote.invalid"], MSG)
        c.quit()
        assert isinstance(h.ctx.relay_stats, RelayStats)
        h.ctx.relay_stats.flush()
    finally:
        h.stop()
    by_account = {u.account: u.counts for u in read_report(tmp_path / "data")}
    assert by_account == {"alice": {"window": 2, "auth": 0, "rule": 0},
                          "bob": {"window": 0, "auth": 1, "rule": 0},
                          f"[{RULE_IP}]": {"window": 0, "auth": 0, "rule": 1}}
