"""RFC 3464 delivery status notifications."""

from __future__ import annotations

import email
import email.policy

import pytest

from relaygate.mail.delivery.dsn import (
    MAX_DIAGNOSTIC,
    DsnRecipient,
    build_dsn,
    enhanced_status,
    one_line,
    original_headers,
)

ORIGINAL = (b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
            b"Subject: lunch?\r\nMessage-ID: <1@example.org>\r\n\r\nSee you at noon.\r\n")


def build(**kw) -> bytes:
    args = dict(reporting_mta="relay.test", to="alice@example.org",
                recipients=[DsnRecipient("bob@example.net", "failed", "5.1.1",
                                         "550 5.1.1 no such user", "mx.example.net",
                                         last_attempt=1_700_000_000.0)],
                original=ORIGINAL, arrival=1_699_999_000.0, now=1_700_000_001.0,
                queue_id="0123456789abcdef01234567")
    args.update(kw)
    return build_dsn(**args)


def test_structure_follows_rfc3464() -> None:
    raw = build()
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.test>"
    assert msg["To"] == "<alice@example.org>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, headers = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    assert "<bob@example.net> (remote server mx.example.net): 550 5.1.1 no such user" in \
        human.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_rcpt = (dict(b.items()) for b in status.get_payload())
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_message["Arrival-Date"].endswith("+0000")
    assert per_rcpt == {
        "Final-Recipient": "rfc822; bob@example.net",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
        "Last-Attempt-Date": per_rcpt["Last-Attempt-Date"],
    }
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: lunch?" in headers.get_payload()
    assert "See you at noon" not in raw.decode()


def test_several_recipients_and_delayed() -> None:
    raw = build(recipients=[
        DsnRecipient("a@x.test", "delayed", "4.4.1", "451 4.4.1 connect failed",
                     will_retry_until=1_700_400_000.0),
        DsnRecipient("b@x.test", "delayed", "4.2.2", None)])
    msg = email.message_from_bytes(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    blocks = [dict(b.items()) for b in msg.get_payload()[1].get_payload()]
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; a@x.test", "rfc822; b@x.test"]
    assert blocks[1]["Action"] == "delayed" and "Will-Retry-Until" in blocks[1]
    assert "Diagnostic-Code" not in blocks[2]


def test_utf8_recipient_uses_rfc6533_global_types() -> None:
    raw = build(recipients=[DsnRecipient("jörg@bücher.test", "failed", "5.6.7",
                                         "553 5.6.7 needs SMTPUTF8")],
                original="Subject: grüße\r\n\r\nx\r\n".encode())
    assert b"Content-Type: message/global-delivery-status" in raw
    assert "Final-Recipient: utf-8; jörg@bücher.test".encode() in raw
    assert b"Content-Type: message/global-headers" in raw


def test_postmaster_copy_returns_whole_message() -> None:
    raw = build(to="postmaster@relay.test", return_message=True, postmaster_copy=True,
                original_sender="")
    msg = email.message_from_bytes(raw)
    assert msg["Subject"] == "Postmaster Copy: Undelivered Mail"
    third = msg.get_payload()[2]
    assert third.get_content_type() == "message/rfc822"
    assert b"See you at noon." in raw


def test_hostile_diagnostic_and_boundary_in_content() -> None:
    evil = "550 bad\r\nX-Injected: yes\r\n\r\n--" + "x" * 2000
    raw = build(recipients=[DsnRecipient("b@x.test", "failed", "5.0.0", evil)],
                original=b"Subject: --dsn\r\n\r\n")
    msg = email.message_from_bytes(raw)
    status_text = raw.split(b"message/delivery-status")[1]
    assert b"\r\nX-Injected" not in status_text
    diag = dict(msg.get_payload()[1].get_payload()[1].items())["Diagnostic-Code"]
    assert len(diag) <= MAX_DIAGNOSTIC + len("smtp; ")
    assert len(msg.get_payload()) == 3


def test_needs_a_recipient() -> None:
    with pytest.raises(ValueError):
        build(recipients=[])


@pytest.mark.parametrize("code, text, want", [
    (550, "5.1.1 no such user", "5.1.1"),
    (550, "no such user", "5.0.0"),
    (451, "4.7.1 greylisted", "4.7.1"),
    (451, "5.7.1 mismatched class", "4.0.0"),
    (421, "", "4.0.0"),
    (250, "2.0.0 ok", "2.0.0"),
    (999, "weird", "4.0.0"),
    (554, "5.1.10 null MX", "5.1.10"),
])
def test_enhanced_status(code: int, text: str, want: str) -> None:
    assert enhanced_status(code, text) == want


def test_one_line_and_headers() -> None:
    assert one_line("a\nb\r\n\tc") == "a b c"
    assert len(one_line("x" * 5000)) == MAX_DIAGNOSTIC
    assert original_headers(b"A: 1\nB: 2\n\nbody") == b"A: 1\r\nB: 2\r\n"
    assert original_headers(b"A: 1\r\n\r\nbody\r\n\r\nmore") == b"A: 1\r\n"
    assert original_headers(b"only: headers") == b"only: headers\r\n"
    assert len(original_headers(b"X: " + b"y" * 100000)) <= 64 * 1024 + 2
