"""One message, three protocols, the same bytes (a real ``relaygate serve``).

A client at 127.0.0.3 sends over SMTP (``smtplib``) to a local user; the message is in the
user's Maildir, preceded by the ``Return-Path:`` and ``Received:`` lines relaygate adds
(RFC 5321 section 4.4). POP3 (``poplib``, RFC 1939) then sends exactly the stored bytes with
CRLF line ends and dot-stuffing on the wire (section 3), LIST sizes counting the unstuffed
octets; IMAP (``imaplib``, RFC 3501) serves the same octets for ``BODY.PEEK[]`` with
``RFC822.SIZE`` their length. Lines starting with "." survive SMTP's (RFC 5321 4.5.2) and
POP3's dot-stuffing. A POP3 RETR marks the message seen, which IMAP shows as ``\\Seen``.
"""

from __future__ import annotations

import email.utils
import imaplib
import poplib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_harness import Serve, smtp

PASSWORD = "correct horse battery staple"
SOURCE = "127.0.0.3"
HOSTNAME = "mx.example.org"
SENDER = "someone@example.com"
#: seconds a client waits for the server
TIMEOUT = 30.0
#: how far the Received: date may be from the test's clock (it is written at DATA time)
CLOCK_SLACK = 300.0


class _Tee:
    """Wraps poplib's socket file and keeps every line exactly as it came off the wire."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.raw = b""

    def readline(self, size: int = -1) -> bytes:
        line: bytes = self.f.readline(size)
        self.raw += line
        return line

    def close(self) -> None:
        self.f.close()


class POP3From(poplib.POP3):
    """``poplib.POP3`` connecting from a chosen loopback source address."""

    def __init__(self, source: str, host: str, port: int) -> None:
        self._source = source
        super().__init__(host, port, timeout=TIMEOUT)
        self.tee = _Tee(self.file)
        self.file = self.tee  # type: ignore[assignment]  # same readline/close

    def _create_socket(self, timeout: Any) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))


class IMAPFrom(imaplib.IMAP4):
    """``imaplib.IMAP4`` connecting from a chosen loopback source address."""

    def __init__(self, source: str, host: str, port: int) -> None:
        self._source = source
        super().__init__(host, port, timeout=TIMEOUT)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    s = Serve(tmp_path_factory.mktemp("roundtrip"), expiry=900,
              extra=("--hostname", HOSTNAME))
    for user in ("alice", "dottie", "carol"):
        s.add_user(user, PASSWORD)
    s.start()
    yield s
    rc = s.stop()
    assert rc == 0, s.log()


def send(serve: Serve, local: str, content: bytes) -> str:
    """Deliver ``content`` to ``local``@example.org from SOURCE; returns relaygate's id."""
    with smtp(SOURCE, "127.0.0.1", serve.ports["smtp"]) as c:
        assert c.mail(SENDER)[0] == 250
        code, msg = c.rcpt(f"{local}@example.org")
        assert code == 250, msg
        code, msg = c.data(content)
        assert code == 250, msg
    m = re.match(rb"2\.0\.0 OK id=([0-9a-f]{16})$", msg)
    assert m, msg
    return m.group(1).decode()


def maildir_files(serve: Serve, local: str) -> list[Path]:
    box = serve.data_dir / "mail" / serve.domain / local
    return sorted(p for sub in ("new", "cur") if (box / sub).is_dir()
                  for p in (box / sub).iterdir())


def check_stored(stored: bytes, msgid: str, content: bytes) -> None:
    """``stored`` is exactly Return-Path + Received (dated now) + what the client sent."""
    m = re.fullmatch(
        rb"Return-Path: <" + re.escape(SENDER.encode()) + rb">\r\n"
        rb"Received: from client\.test \(\[127\.0\.0\.3\]\)\r\n"
        rb"\tby " + re.escape(HOSTNAME.encode()) + rb" \(relaygate\) with ESMTP id "
        + msgid.encode() + rb";\r\n"
        rb"\t([^\r\n]+)\r\n(.*)", stored, re.DOTALL)
    assert m, stored[:400]
    when = email.utils.parsedate_to_datetime(m.group(1).decode())
    assert abs(when.timestamp() - time.time()) < CLOCK_SLACK
    assert m.group(2) == content


def dot_stuffed(data: bytes) -> bytes:
    """RFC 1939 section 3: a line starting with "." gets one more."""
    return b"".join(b"." + line if line.startswith(b".") else line
                    for line in data.splitlines(keepends=True))


def pop3_retrieve(serve: Serve, login: str) -> tuple[int, bytes, bytes]:
    """Log in, LIST and RETR message 1, QUIT: (LIST size, poplib's bytes, raw wire body)."""
    p = POP3From(SOURCE, "127.0.0.1", serve.ports["pop3"])
    try:
        p.user(login)
        p.pass_(PASSWORD)
        resp, listing, _ = p.list()
        assert resp.startswith(b"+OK"), resp
        assert len(listing) == 1, listing
        number, size = listing[0].split()
        assert number == b"1"
        single: Any = p.list(1)  # one message: its scan line (typeshed says a list)
        assert single == b"+OK 1 " + size, single
        p.tee.raw = b""
        resp, lines, octets = p.retr(1)
        assert resp.startswith(b"+OK"), resp
        raw = p.tee.raw
        assert p.quit().startswith(b"+OK")
    except BaseException:
        p.close()
        raise
    data = b"".join(line + b"\r\n" for line in lines)
    assert octets == len(data)
    # The wire: the status line, the stuffed message, the terminating "." line.
    status, _, rest = raw.partition(b"\r\n")
    assert status == resp
    assert rest.endswith(b"\r\n.\r\n"), rest[-40:]
    return int(size), data, rest[: -len(b".\r\n")]


def imap_fetch(serve: Serve, login: str) -> tuple[bytes, int, list[bytes]]:
    """Log in, SELECT INBOX, FETCH 1 (BODY.PEEK[] RFC822.SIZE FLAGS): (body, size, flags)."""
    m = IMAPFrom(SOURCE, "127.0.0.1", serve.ports["imap"])
    try:
        assert m.login(login, PASSWORD)[0] == "OK"
        typ, data = m.select("INBOX")
        assert typ == "OK" and data == [b"1"], data
        typ, fetched = m.fetch("1", "(BODY.PEEK[] RFC822.SIZE FLAGS)")
        assert typ == "OK", fetched
        m.logout()
    except BaseException:
        m.shutdown()
        raise
    literals = [part for part in fetched if isinstance(part, tuple)]
    assert len(literals) == 1, fetched
    head, body = literals[0]
    rest = b"".join(part for part in fetched if isinstance(part, bytes))
    items = head + rest
    assert re.match(rb"1 \(", items), items
    assert re.search(rb"BODY\[\] \{" + str(len(body)).encode() + rb"\}$", head), head
    size = re.search(rb"RFC822\.SIZE (\d+)", items)
    flags = re.search(rb"FLAGS \(([^)]*)\)", items)
    assert size and flags, items
    return body, int(size.group(1)), flags.group(1).split()


def test_smtp_to_maildir_then_the_same_bytes_over_pop3_and_imap(serve: Serve) -> None:
    content = (b"From: Someone <someone@example.com>\r\n"
               b"To: Alice <alice@example.org>\r\n"
               b"Subject: round trip\r\n"
               b"Message-ID: <roundtrip.1@example.com>\r\n"
               b"\r\n"
               b"Hello Alice,\r\n"
               b"\r\n"
               b"  indented, trailing blanks   \r\n"
               b"\tand a tab\r\n"
               + b"x" * 900 + b"\r\n"
               b"-- \r\n"
               b"Someone\r\n")
    msgid = send(serve, "alice", content)

    files = maildir_files(serve, "alice")
    assert [p.parent.name for p in files] == ["new"]
    stored = files[0].read_bytes()
    check_stored(stored, msgid, content)

    size, popped, wire = pop3_retrieve(serve, "alice")
    assert popped == stored
    assert wire == stored  # no line starts with "." here: nothing to stuff
    assert size == len(popped)

    body, rfc822_size, flags = imap_fetch(serve, "alice")
    assert body == popped
    assert rfc822_size == len(popped)
    assert b"\\Seen" in flags  # the RETR above


def test_lines_starting_with_a_dot_survive_smtp_pop3_and_imap(serve: Serve) -> None:
    content = (b"From: someone@example.com\r\n"
               b"To: dottie@example.org\r\n"
               b"Subject: dots\r\n"
               b"\r\n"
               b".\r\n"
               b"..\r\n"
               b".hidden line\r\n"
               b"...three\r\n"
               b"middle . line\r\n"
               b". \r\n"
               b".\r\n")
    msgid = send(serve, "dottie", content)

    files = maildir_files(serve, "dottie")
    assert len(files) == 1
    stored = files[0].read_bytes()
    check_stored(stored, msgid, content)
    assert stored.endswith(b"\r\n.\r\n")  # the last line is a lone ".", unstuffed on disk

    size, popped, wire = pop3_retrieve(serve, "dottie")
    assert popped == stored
    assert wire == dot_stuffed(stored)
    assert wire.endswith(b"middle . line\r\n.. \r\n..\r\n")
    assert size == len(stored)  # LIST counts octets before stuffing

    body, rfc822_size, _ = imap_fetch(serve, "dottie")
    assert body == stored
    assert rfc822_size == len(stored)


def test_pop3_retr_then_quit_shows_as_seen_over_imap(serve: Serve) -> None:
    content = b"From: someone@example.com\r\nSubject: seen?\r\n\r\nread me\r\n"
    send(serve, "carol", content)

    before, size_before, flags_before = imap_fetch(serve, "carol")
    assert b"\\Seen" not in flags_before  # BODY.PEEK[] marks nothing

    # An IMAP session stays selected meanwhile: it learns of the change at its next NOOP.
    watcher = IMAPFrom(SOURCE, "127.0.0.1", serve.ports["imap"])
    try:
        assert watcher.login("carol", PASSWORD)[0] == "OK"
        assert watcher.select("INBOX") == ("OK", [b"1"])
        # \Recent went to the first session (RFC 3501 2.3.2): this one sees no flags
        assert watcher.fetch("1", "(FLAGS)")[1] == [b"1 (FLAGS ())"]

        size, popped, _ = pop3_retrieve(serve, "carol")
        assert popped == before and size == size_before

        assert watcher.noop()[0] == "OK"
        _, untagged = watcher.response("FETCH")
        assert untagged and re.fullmatch(rb"1 \(FLAGS \([^)]*\\Seen[^)]*\)\)", untagged[-1])
        watcher.logout()
    except BaseException:
        watcher.shutdown()
        raise

    after, size_after, flags_after = imap_fetch(serve, "carol")
    assert b"\\Seen" in flags_after
    assert after == before and size_after == len(after)
    [path] = maildir_files(serve, "carol")
    assert path.parent.name == "cur" and path.name.endswith(":2,S")
