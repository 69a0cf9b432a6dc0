"""SMTP smuggling (CVE-2023-51764/51765/51766 style): bare LF/CR end-of-data tricks.

The server ends DATA only at <CR><LF>.<CR><LF> (aiosmtpd 1.4.5+), so a fake
end-of-data such as <LF>.<LF> never ends the message here; but the bytes would
still reach the next hop, whose parser may disagree. So relaygate refuses any
message data holding a bare CR or LF (``550 5.6.0``), locally delivered or
relayed, and the session goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_smtp_support import LOCAL, RULE_IP, STRANGER_IP, RawClient, SmtpHarness

SMUGGLED = (b"MAIL FROM:<ceo@victim.example>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
            b"From: ceo@victim.example\r\nSubject: smuggled\r\n\r\npay now\r\n")

PAYLOADS = {
    "LF.LF": b"Subject: a\r\n\r\nbody\n.\n" + SMUGGLED,
    "LF.CRLF": b"Subject: a\r\n\r\nbody\n.\r\n" + SMUGGLED,
    "CRLF.LF": b"Subject: a\r\n\r\nbody\r\n.\n" + SMUGGLED,
    "CR.CRLF": b"Subject: a\r\n\r\nbody\r.\r\n" + SMUGGLED,
    "CRLF.CR": b"Subject: a\r\n\r\nbody\r\n.\r" + SMUGGLED,
    "bare LF header": b"Subject: a\nX-Other: b\r\n\r\nbody\r\n",
    "bare CR body": b"Subject: a\r\n\r\nbo\rdy\r\n",
}


@pytest.fixture
def h(tmp_path: Path) -> Iterator[SmtpHarness]:
    harness = SmtpHarness(tmp_path)
    yield harness
    harness.stop()


def start_data(h: SmtpHarness, source: str, rcpt: str) -> RawClient:
    r = RawClient("127.0.0.1", h.port(), source)
    r.cmd("EHLO client.example")
    assert r.cmd("MAIL FROM:<a@sender.example>").startswith("250")
    assert r.cmd(f"RCPT TO:<{rcpt}>").startswith("250")
    assert r.cmd("DATA").startswith("354")
    return r


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_smuggling_refused_for_local_delivery(h: SmtpHarness, name: str) -> None:
    r = start_data(h, STRANGER_IP, f"alice@{LOCAL}")
    r.send(PAYLOADS[name] + b"\r\n.\r\n")
    assert r.reply().startswith("550 5.6.0")
    # exactly one reply: nothing after the fake end was run as a command
    assert r.cmd("NOOP").startswith("250")
    r.close()
    assert h.maildir_messages("alice") == []
    assert h.maildir_messages("bob") == []


@pytest.mark.parametrize("name", ["LF.LF", "CRLF.LF", "CR.CRLF"])
def test_smuggling_never_reaches_the_queue(h: SmtpHarness, name: str) -> None:
    r = start_data(h, RULE_IP, "x@remote.invalid")
    r.send(PAYLOADS[name] + b"\r\n.\r\n")
    assert r.reply().startswith("550 5.6.0")
    r.close()
    assert h.queue is not None and h.queue.items == []


def test_clean_message_after_a_refusal(h: SmtpHarness) -> None:
    r = start_data(h, STRANGER_IP, f"bob@{LOCAL}")
    r.send(PAYLOADS["LF.LF"] + b"\r\n.\r\n")
    assert r.reply().startswith("550")
    assert r.cmd("MAIL FROM:<a@sender.example>").startswith("250")
    assert r.cmd(f"RCPT TO:<bob@{LOCAL}>").startswith("250")
    assert r.cmd("DATA").startswith("354")
    # dot-stuffing (RFC 5321 4.5.2) is undone, CRLF kept
    assert r.cmd(b"Subject: ok\r\n\r\n..leading dot\r\nend\r\n.").startswith("250")
    r.close()
    (msg,) = h.maildir_messages("bob")
    assert msg.endswith(b"Subject: ok\r\n\r\n.leading dot\r\nend\r\n")
    assert b"\n" not in msg.replace(b"\r\n", b"")
