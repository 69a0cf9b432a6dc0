"""PIPELINING (RFC 2920): advertised, groups answered in order, replies written together.

The write counts come from the session's own transport (wrapped in the test),
so "one write per group" is checked exactly, not guessed from how TCP
happened to split the bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_smtp_support import LOCAL, STRANGER_IP, RawClient, SmtpHarness, tls_files

from relaygate.servers.smtp.service import RelaySMTP

MSG = b"From: alice@example.org\r\nSubject: pipelined\r\n\r\nhello\r\n"


@pytest.fixture
def h(tmp_path: Path) -> Iterator[SmtpHarness]:
    harness = SmtpHarness(tmp_path)
    yield harness
    harness.stop()


def session(h: SmtpHarness) -> RelaySMTP:
    """The one open session of the harness's smtp service."""
    def find() -> RelaySMTP:
        (proto,) = h.services[0].sessions
        return proto
    result: RelaySMTP = h.run(find)
    return result


def record_writes(h: SmtpHarness, proto: RelaySMTP) -> list[bytes]:
    """Every write the session makes to its transport from now on, in order."""
    writes: list[bytes] = []

    def wrap() -> None:
        transport: Any = proto.transport
        original = transport.write

        def write(data: bytes) -> None:
            writes.append(bytes(data))
            original(data)
        transport.write = write
    h.run(wrap)
    return writes


def connect(h: SmtpHarness) -> tuple[RawClient, list[bytes]]:
    r = RawClient("127.0.0.1", h.port(), STRANGER_IP)
    assert r.cmd("EHLO client.example").startswith("250")
    return r, record_writes(h, session(h))


def test_ehlo_advertises_pipelining(h: SmtpHarness) -> None:
    c = h.client()
    assert c.has_extn("pipelining")
    c.quit()


def test_a_group_is_answered_in_order_with_one_write(h: SmtpHarness) -> None:
    r, writes = connect(h)
    r.send(f"MAIL FROM:<s@sender.example>\r\nRCPT TO:<alice@{LOCAL}>\r\n"
           f"RCPT TO:<nobody@{LOCAL}>\r\nRCPT TO:<bob@{LOCAL}>\r\nDATA\r\n".encode())
    replies = [r.reply() for _ in range(5)]
    assert [x[:3] for x in replies] == ["250", "250", "550", "250", "354"]
    assert len(writes) == 1, writes
    assert writes[0].decode().splitlines() == [x for x in replies]
    r.send(MSG + b".\r\n")
    assert r.reply().startswith("250 2.0.0")
    assert len(writes) == 2
    assert r.cmd("QUIT").startswith("221")
    r.close()
    assert h.maildir_messages("alice")[0].endswith(MSG)
    assert h.maildir_messages("bob")[0].endswith(MSG)


def test_errors_in_the_middle_of_a_group_are_answered_in_place(h: SmtpHarness) -> None:
    r, writes = connect(h)
    # a bad sender: the recipients and DATA that follow get 503, not a 354
    r.send(f"MAIL FROM:<bad address\r\nRCPT TO:<alice@{LOCAL}>\r\nDATA\r\nNOOP\r\n".encode())
    assert [r.reply()[:3] for _ in range(4)] == ["553", "503", "503", "250"]
    assert len(writes) == 1
    # RSET inside a group ends the transaction it follows
    r.send(f"MAIL FROM:<s@sender.example>\r\nRSET\r\nRCPT TO:<alice@{LOCAL}>\r\n"
           "MAIL FROM:<t@sender.example>\r\nRCPT TO:<nobody@remote.invalid>\r\n"
           f"RCPT TO:<alice@{LOCAL}>\r\nDATA\r\n".encode())
    got = [r.reply()[:3] for _ in range(7)]
    assert got == ["250", "250", "503", "250", "553", "250", "354"]
    assert len(writes) == 2
    r.send(MSG + b".\r\n")
    assert r.reply().startswith("250 2.0.0")
    r.close()
    (stored,) = h.maildir_messages("alice")
    assert b"Return-Path: <t@sender.example>" in stored


def test_commands_after_the_end_of_data_are_answered_together(h: SmtpHarness) -> None:
    r, writes = connect(h)
    r.send(f"MAIL FROM:<s@sender.example>\r\nRCPT TO:<alice@{LOCAL}>\r\nDATA\r\n".encode())
    assert [r.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
    r.send(MSG + f".\r\nMAIL FROM:<u@sender.example>\r\nRCPT TO:<bob@{LOCAL}>\r\n"
                 "DATA\r\n".encode())
    assert [r.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
    # the 250 for the message and the replies to the next group: one write
    assert len(writes) == 2, writes
    r.send(MSG + b".\r\nQUIT\r\n")
    assert r.reply().startswith("250 2.0.0")
    assert r.reply().startswith("221")
    assert r.closed()
    assert len(h.maildir_messages("alice")) == 1 and len(h.maildir_messages("bob")) == 1


def test_a_partial_command_does_not_hold_the_replies_back(h: SmtpHarness) -> None:
    r, writes = connect(h)
    # the next command is still on its way: the client waits, so the reply goes now
    r.send(b"NOOP\r\nRCPT TO:<al")
    assert r.reply().startswith("250")
    r.send(f"ice@{LOCAL}>\r\n".encode())
    assert r.reply().startswith("503")
    assert len(writes) == 2
    r.close()


def test_smtplib_pipelined_group(h: SmtpHarness) -> None:
    c = h.client()
    assert c.has_extn("pipelining")
    c.send(f"MAIL FROM:<s@sender.example>\r\nRCPT TO:<alice@{LOCAL}>\r\nDATA\r\n")
    assert c.getreply()[0] == 250
    assert c.getreply()[0] == 250
    assert c.getreply()[0] == 354
    c.send(MSG + b".\r\n")
    code, text = c.getreply()
    assert code == 250 and text.startswith(b"2.0.0 OK id=")
    c.quit()
    assert len(h.maildir_messages("alice")) == 1


def test_the_error_budget_closes_after_the_held_replies(tmp_path: Path) -> None:
    h = SmtpHarness(tmp_path, smtp={"bad_command_limit": 3})
    try:
        r = RawClient("127.0.0.1", h.port(), STRANGER_IP)
        r.send(b"EHLO client.example\r\nBOGUS\r\nBOGUS\r\nBOGUS\r\nNOOP\r\n")
        assert r.reply().startswith("250-")
        assert [r.reply()[:3] for _ in range(4)] == ["500", "500", "500", "421"]
        assert r.closed()
    finally:
        h.stop()


def test_commands_behind_starttls_are_not_run_inside_tls(tmp_path: Path) -> None:
    tls, client_ctx = tls_files(tmp_path)
    h = SmtpHarness(tmp_path, tls=tls)
    try:
        r = RawClient("127.0.0.1", h.port(), STRANGER_IP)
        assert "PIPELINING" in r.cmd("EHLO client.example")
        # injected behind STARTTLS, in the same packet: must be thrown away
        r.send(f"STARTTLS\r\nMAIL FROM:<evil@sender.example>\r\nRCPT TO:<alice@{LOCAL}>\r\n"
               "DATA\r\n".encode())
        assert r.reply().startswith("220")
        assert r.buf == b""
        r.sock = client_ctx.wrap_socket(r.sock, server_hostname="mx.example.org")
        # the first reply inside TLS is the EHLO's: nothing was answered for the injection
        assert r.cmd("EHLO client.example").startswith("250-mx.example.org")
        assert r.cmd(f"RCPT TO:<alice@{LOCAL}>").startswith("503")
        assert r.cmd("DATA").startswith("503")
        assert r.cmd("QUIT").startswith("221")
        r.close()
        assert h.maildir_messages("alice") == []
    finally:
        h.stop()


def test_smtplib_starttls_still_works(tmp_path: Path) -> None:
    tls, client_ctx = tls_files(tmp_path)
    h = SmtpHarness(tmp_path, tls=tls)
    try:
        c = h.client()
        c.starttls(context=client_ctx)
        c.ehlo("client.example")
        assert c.has_extn("pipelining")
        assert c.sendmail("s@sender.example", [f"alice@{LOCAL}"], MSG) == {}
        c.quit()
        assert len(h.maildir_messages("alice")) == 1
    finally:
        h.stop()


def test_tls_error_reply_is_not_lost(tmp_path: Path) -> None:
    tls, _ = tls_files(tmp_path)
    h = SmtpHarness(tmp_path, tls=tls)
    try:
        r = RawClient("127.0.0.1", h.port(), STRANGER_IP)
        r.send(b"EHLO client.example\r\nNOOP\r\nSTARTTLS\r\n")
        assert r.reply().startswith("250-")
        assert r.reply().startswith("250")
        assert r.reply().startswith("220")
        r.send(b"this is not a TLS client hello\r\n" * 4)
        assert r.closed()
    finally:
        h.stop()
