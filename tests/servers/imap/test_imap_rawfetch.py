"""FETCH from the files' bytes (relaygate.servers.imap.rawfetch) against pymap's general path.

Two accounts hold the same Maildir (copied after the first SELECT numbered it);
every command runs on alice's session through the raw path and on bob's through
pymap's general path (``rawfetch.eligible`` switched off), and the complete
responses must be the same bytes: line ends, literal lengths, sizes, header
sections, partials, \\Seen and its FLAGS, UID and sequence sets, messages gone
before and during the command, large files streamed in pieces.
"""

from __future__ import annotations

import errno
import imaplib
import io
import os
import re
import shutil
import socket
import ssl
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymap.message import BaseLoadedMessage
from pymap.mime import MessageContent
from test_imap import (  # noqa: F401 (certs: a fixture)
    MULTIPART,
    PASSWORD,
    BoundIMAP,
    BoundIMAPSSL,
    Harness,
    Raw,
    certs,
)

from relaygate.mail import uidlist
from relaygate.mail.maildir import deliver
from relaygate.mail.uidlist import FileMeta
from relaygate.servers.imap import pymap_fixes, rawfetch
from relaygate.servers.imap.backend import to_crlf

#: messages that stress the edges: line ends, 8-bit, where (and whether) the header ends
MESSAGES = [
    b"From: Carol <carol@example.test>\nTo: alice@example.test\nSubject: bare LF\n"
    b"Message-ID: <1@example.test>\n\nline one\nline two\n",
    b"From: dave@example.test\r\nSubject: crlf\r\nContent-Type: text/plain; charset=utf-8"
    b"\r\n\r\nbody \xc3\xa9\r\n",
    b"Subject: mixed\r\nX-A: 1\n\r\ncr cr lf\r\r\nbare\rcr\nend",
    b"Subject: caf\xc3\xa9 \xff\r\nX-Bin: \x80\x81\r\n\r\n\x00\xfe\xff 8-bit body \x80\n",
    b"",
    b"Subject: only a header\r\n",
    b"Subject: no line end at all",
    b"\r\nno header, a body\r\n",
    b"Subject: header ends at a blank-looking line\r\n \t\r\nbody\r\n",
    b"Subject: folded\r\n  over two lines\r\nX-A: 1\r\nx-a: 2\r\nnocolon line\r\n"
    b"From: a@example.test\r\n\r\nbody",
    b"Subject: ends with CR\r\n\r\nlast\r",
    b"Subject: empty body\r\n\r\n",
    MULTIPART,
    b"Subject: large\n\n" + b"0123456789 bare LF line of some length\n" * 60_000,
]

PEEK_COMMANDS = [
    b"FETCH 1:* BODY.PEEK[]",
    b"FETCH 1:* RFC822.SIZE",
    b"UID FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])",
    b"FETCH 1:* (BODY.PEEK[HEADER] BODY.PEEK[TEXT])",
    b"FETCH 1:* RFC822.HEADER",
    b"FETCH 1:* BODY.PEEK[HEADER.FIELDS (From Subject X-A X-Missing)]",
    b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS.NOT (Subject)] EMAILID THREADID)",
    b"FETCH 1:* (BODY.PEEK[]<0.10> BODY.PEEK[]<5.100000> BODY.PEEK[TEXT]<2.3>"
    b" BODY.PEEK[]<99999999.5> BODY.PEEK[HEADER]<3.1>)",
    b"FETCH 2,4:5 (FLAGS BODY.PEEK[])",
    b"FETCH *:12 BODY.PEEK[HEADER.FIELDS (SUBJECT)]<1.4>",
    b"UID FETCH 3:* BODY.PEEK[]",
    b"FETCH 1:* (BODY.PEEK[] UID BODY.PEEK[] RFC822.SIZE UID)",
]

SEEN_COMMANDS = [
    b"FETCH 1:3 BODY[]",
    b"FETCH 4 RFC822",
    b"UID FETCH 5:7 (FLAGS RFC822.TEXT)",
    b"FETCH 8:* (BODY[HEADER] FLAGS)",
    b"FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (Subject)])",
]


class Pair:
    """alice's session on the raw path, bob's on pymap's, over copies of one Maildir."""

    def __init__(self, h: Harness, monkeypatch: pytest.MonkeyPatch,
                 messages: list[bytes]) -> None:
        self.h = h
        for data in messages:
            deliver(h.alice.maildir, data)
        first = self.session("alice", PASSWORD)  # numbers the messages, new/ -> cur/
        first.cmd(b"z", b"LOGOUT")
        first.close()
        shutil.copytree(h.alice.maildir, h.mail / "example.test" / "bob")
        self.raw_fetches = 0
        self.raw = True
        original_eligible = rawfetch.eligible
        original_fetch = rawfetch.fetch

        def eligible(attributes: Any) -> bool:
            return self.raw and original_eligible(attributes)

        async def fetch(*args: Any) -> Any:
            self.raw_fetches += 1
            return await original_fetch(*args)

        monkeypatch.setattr(rawfetch, "eligible", eligible)
        monkeypatch.setattr(rawfetch, "fetch", fetch)
        self.alice = self.session("alice", PASSWORD)
        self.bob = self.session("bob", "bob-password")

    def session(self, user: str, password: str) -> Raw:
        r = Raw(self.h.port, timeout=30.0)
        assert r.cmd(b"a", f"LOGIN {user} \"{password}\"".encode())[-1].startswith(b"a OK")
        assert r.cmd(b"b", b"SELECT INBOX")[-1].startswith(b"b OK")
        return r

    def both(self, command: bytes) -> tuple[bytes, bytes]:
        """The command's whole response: raw path (alice), general path (bob)."""
        self.raw = True
        fast = b"".join(self.alice.cmd(b"t", command))
        self.raw = False
        general = b"".join(self.bob.cmd(b"t", command))
        self.raw = True
        return fast, general

    def same(self, command: bytes) -> bytes:
        before = self.raw_fetches
        fast, general = self.both(command)
        assert fast == general, (command, _diff(fast, general))
        assert re.search(rb"\r\nt OK [^\r\n]*completed\.\r\n\Z", fast), fast[-200:]
        assert self.raw_fetches == before + 1, "the raw path was not used"
        return fast

    def close(self) -> None:
        for r in (self.alice, self.bob):
            r.close()


def _diff(a: bytes, b: bytes) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
             min(len(a), len(b)))
    return f"differ at {i} of {len(a)}/{len(b)}: {a[max(0, i - 60):i + 60]!r} vs " \
           f"{b[max(0, i - 60):i + 60]!r}"


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path).start()
    yield h
    h.stop()
    h.assert_clean()


@pytest.fixture(params=["default", "tiny-pieces"])
def pieces(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run with the real sizes, and with every file above 100 octets streamed in
    7-octet pieces (CRLF split across pieces, headers found across pieces)."""
    if request.param == "tiny-pieces":
        monkeypatch.setattr(rawfetch, "STREAM_ABOVE", 100)
        monkeypatch.setattr(rawfetch, "PIECE", 7)
        monkeypatch.setattr(rawfetch, "CHUNK", 50)
    str_param: str = request.param
    return str_param


def test_peek_fetches_match_the_general_path(harness: Harness, pieces: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rawfetch._SIZES.clear()
    # (the large message in 7-octet pieces would take minutes)
    pair = Pair(harness, monkeypatch, MESSAGES if pieces == "default" else MESSAGES[:-1])
    for command in PEEK_COMMANDS:
        pair.same(command)
        pair.same(command)  # again, with the sizes learnt
    whole = pair.same(b"FETCH 1:* BODY.PEEK[]")
    for data in MESSAGES if pieces == "default" else MESSAGES[:-1]:
        crlf = to_crlf(data)
        assert b"BODY[] {%d}\r\n%b)\r\n" % (len(crlf), crlf) in whole
    pair.close()


def test_seen_is_set_as_by_the_general_path(harness: Harness,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair(harness, monkeypatch, MESSAGES)
    out = [pair.same(command) for command in SEEN_COMMANDS]
    assert out[0].count(b"FLAGS (\\Seen)") == 3  # BODY[] set \Seen and says so
    assert b"\\Seen" not in pair.same(b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (X-A)])")
    for box in (harness.alice.maildir, harness.mail / "example.test" / "bob"):
        names = sorted(p.name for p in (box / "cur").iterdir())
        assert len(names) == len(MESSAGES)
        assert all(name.endswith(":2,S") for name in names), names
    pair.close()


def test_peek_does_not_set_seen(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair(harness, monkeypatch, MESSAGES[:3])
    for command in (b"FETCH 1:* BODY.PEEK[]", b"FETCH 1:* RFC822.HEADER",
                    b"FETCH 1:* (RFC822.SIZE BODY.PEEK[TEXT])"):
        assert b"\\Seen" not in pair.same(command)
    assert not [p for p in (harness.alice.maildir / "cur").iterdir() if ":2,S" in p.name]
    pair.same(b"FETCH 2 BODY[TEXT]")
    seen = [p.name for p in (harness.alice.maildir / "cur").iterdir() if p.name.endswith("S")]
    assert len(seen) == 1
    pair.close()


def test_examine_never_sets_seen(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair(harness, monkeypatch, MESSAGES[:2])
    for r in (pair.alice, pair.bob):
        assert r.cmd(b"e", b"EXAMINE INBOX")[-1].startswith(b"e OK")
    assert b"\\Seen" not in pair.same(b"FETCH 1:* (FLAGS BODY[])")
    assert not [p for p in (harness.alice.maildir / "cur").iterdir() if ":2,S" in p.name]
    pair.close()


def _cur(box: Path) -> list[Path]:
    return sorted((box / "cur").iterdir(), key=lambda p: p.name)


def test_messages_gone_before_the_fetch(harness: Harness,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair(harness, monkeypatch, MESSAGES[:5])
    for box in (harness.alice.maildir, harness.mail / "example.test" / "bob"):
        _cur(box)[1].unlink()  # POP3 DELE or another program
    out = pair.same(b"FETCH 1:* (UID RFC822.SIZE BODY.PEEK[])")
    assert b"OK [EXPUNGEISSUED]" in out
    assert re.search(rb"\* \d FETCH \(UID \d RFC822.SIZE 0 BODY\[\] \{0\}\r\n\)", out)
    pair.same(b"UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    pair.close()


def test_messages_gone_while_the_fetch_reads(harness: Harness,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair(harness, monkeypatch, MESSAGES[:5])
    victim = _cur(harness.alice.maildir)[2].name.split(":")[0]

    def vanishing(original: Callable[[str, str, FileMeta], int | None]) -> Any:
        def open_message(root: str, key: str, meta: FileMeta) -> int | None:
            if key == victim:
                for p in (Path(root) / "cur").iterdir():
                    if p.name.startswith(victim):
                        p.unlink()
            return original(root, key, meta)
        return open_message

    monkeypatch.setattr(rawfetch, "open_message", vanishing(rawfetch.open_message))
    monkeypatch.setattr(uidlist, "open_message", vanishing(uidlist.open_message))
    rawfetch._SIZES.clear()
    out = pair.same(b"FETCH 1:* (RFC822.SIZE BODY.PEEK[] BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"FETCH (RFC822.SIZE 0 BODY[] {0}\r\n BODY[HEADER.FIELDS (SUBJECT)] {0}\r\n)" in out
    pair.close()


@pytest.mark.parametrize("sendfile", ["native", "unavailable"])
def test_huge_messages_are_streamed_and_framed(harness: Harness, sendfile: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 MB of bare-LF lines with a CR at a read boundary (converted piece by
    # piece), and 2.5 MB of CRLF lines (sent by os.sendfile, or read in pieces
    # when the transport cannot)
    line = b"x" * (rawfetch.PIECE - 1) + b"\r"
    lf = b"Subject: huge\n\n" + line + b"\n" + b"a bare LF line\n" * 200_000
    crlf = b"Subject: huge, CRLF\r\n\r\n" + b"a line ending in CRLF\r\n" * 110_000
    sent: list[int] = []
    real_sendfile = os.sendfile

    def counting_sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        if sendfile == "unavailable":
            sent.append(0)
            raise OSError(errno.EINVAL, "not for this socket")
        n = real_sendfile(out_fd, in_fd, offset, count)
        sent.append(n)
        return n

    pair = Pair(harness, monkeypatch, [lf, crlf, MESSAGES[1]])
    monkeypatch.setattr(os, "sendfile", counting_sendfile)  # (after copying the Maildir)
    rawfetch._SIZES.clear()
    for _ in range(2):  # sizes counted, then known
        out = pair.same(b"FETCH 1:* (RFC822.SIZE BODY.PEEK[] BODY.PEEK[TEXT]<1000.20>)")
        for data in (lf, crlf):
            c = to_crlf(data)
            assert b"RFC822.SIZE %d BODY[] {%d}\r\n%b BODY[TEXT]<1000> {20}\r\n" % (
                len(c), len(c), c) in out
    # the CRLF file's BODY[], twice (or one refused try per FETCH)
    assert sum(sent) == 2 * len(crlf) if sendfile == "native" else sent == [0, 0], sent
    pair.close()


# -- the pieces, without a server -------------------------------------------------


CRLF_TEXT = st.binary().map(lambda b: bytes(b"a\r\n"[x % 3] for x in b))


@given(CRLF_TEXT)
def test_to_crlf_replaces_exactly_the_bare_line_feeds(data: bytes) -> None:
    assert to_crlf(data) == re.sub(rb"(?<!\r)\n", b"\r\n", data)


@given(CRLF_TEXT, st.integers(1, 9))
def test_streamed_pieces_are_the_converted_file(data: bytes, piece: int) -> None:
    old = rawfetch.PIECE
    rawfetch.PIECE = piece
    try:
        f = io.BytesIO(data)
        assert b"".join(rawfetch.crlf_pieces(f)) == to_crlf(data)
        assert rawfetch.crlf_size(f) == len(to_crlf(data))
    finally:
        rawfetch.PIECE = old


LINES = st.lists(st.sampled_from([
    b"Subject: s", b"X-A: 1", b"x-a: 2", b"From: f", b" folded", b"\tfolded", b"",
    b" ", b" \t", b"\r", b"no colon", b"body text", b"Subject:", b": empty name",
    b"--XX", b"Content-Type: multipart/mixed; boundary=XX",
]), max_size=12)


@settings(max_examples=300)
@given(LINES, st.sampled_from([b"\r\n", b"\n"]), st.booleans(), st.integers(1, 8))
def test_header_sections_match_pymap(lines: list[bytes], eol: bytes, final_eol: bool,
                                     piece: int) -> None:
    pymap_fixes.apply()
    data = to_crlf(eol.join(lines) + (eol if final_eol else b""))
    loaded = BaseLoadedMessage(None, None, MessageContent.parse(data))  # type: ignore[arg-type]
    src = rawfetch.Source(data)
    old = rawfetch.PIECE
    rawfetch.PIECE = piece
    try:
        streamed = rawfetch.Streamed(io.BytesIO(data), None, ("", "", 0))
        assert streamed.header_end() == src.header_end()
        assert streamed.size == len(data)
    finally:
        rawfetch.PIECE = old
    end = src.header_end()
    assert bytes(loaded.get_body()) == data
    assert bytes(loaded.get_message_headers()) == (data[:end] if end is not None else b"")
    assert bytes(loaded.get_message_text()) == (data[end:] if end is not None else data)
    for wanted in (frozenset({b"SUBJECT"}), frozenset({b"X-A", b"FROM", b"NONE"})):
        for inverse in (False, True):
            assert src.fields(wanted, inverse=inverse) == \
                bytes(loaded.get_message_headers(None, wanted, inverse))


def test_get_raw_fix_keeps_the_last_octet() -> None:
    """pymap lost the last octet of a message whose header has no empty line after
    it (and read its empty header or body as nearly the whole message)."""
    pymap_fixes.apply()
    for data in (b"Subject: only a header\r\n", b"Subject: no line end"):
        parsed = MessageContent.parse(data)
        assert bytes(parsed) == data
        loaded = BaseLoadedMessage(None, None, parsed)  # type: ignore[arg-type]
        assert bytes(loaded.get_message_headers()) + bytes(loaded.get_message_text()) == data


def test_streaming_holds_pieces_not_the_file(tmp_path: Path) -> None:
    data = b"Subject: big\n\n" + b"line of a big message, bare LF\n" * 700_000  # ~21 MB
    (tmp_path / "cur").mkdir()
    (tmp_path / "cur" / "1.big:2,").write_bytes(data)
    meta = FileMeta("cur", "1.big:2,", 0.0, len(data))
    rawfetch._SIZES.clear()
    tracemalloc.start()
    try:
        src = rawfetch.open_source(str(tmp_path), "1.big", meta)
        assert isinstance(src, rawfetch.Streamed)
        sent = 0
        for fragment in rawfetch.answer(rawfetch.Item(b"BODY[]", None), src):
            sent += len(fragment)
        src.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    crlf_len = len(data) + data.count(b"\n")
    assert sent == len(b"BODY[] {%d}\r\n" % crlf_len) + crlf_len
    assert peak < 4 * rawfetch.PIECE + (1 << 20), peak  # the file is 21 MB
    assert rawfetch.known_size(str(tmp_path), "1.big", len(data)) == crlf_len
    assert os.path.exists(tmp_path / "cur" / "1.big:2,")


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_a_client_that_stops_reading_is_dropped(tmp_path: Path, eol: bytes) -> None:
    """A FETCH of a large message to a client that reads nothing: the write times out
    (imap.idle_timeout), the connection is dropped, the send stops (the file is
    sent by os.sendfile, or converted in pieces in a worker thread), and the
    server goes on serving."""
    h = Harness(tmp_path, imap={"idle_timeout": 1.0}).start()
    try:
        data = b"Subject: big" + eol + eol + (b"z" * 78 + eol) * 200_000
        deliver(h.alice.maildir, data)
        r = Raw(h.port)
        r.cmd(b"a", f'LOGIN alice "{PASSWORD}"'.encode())
        r.cmd(b"b", b"SELECT INBOX")
        r.send(b"c FETCH 1 BODY.PEEK[]\r\n")
        time.sleep(3.0)  # read nothing: the server's write times out meanwhile
        got = 0
        with pytest.raises((ConnectionError, TimeoutError)):
            while chunk := r.sock.recv(1 << 20):
                got += len(chunk)
            raise ConnectionResetError("closed")
        assert got < len(to_crlf(data))  # the message never arrived whole
        r.close()
        other = Raw(h.port)
        assert other.cmd(b"a", f'LOGIN alice "{PASSWORD}"'.encode())[-1].startswith(b"a OK")
        assert other.cmd(b"b", b"SELECT INBOX")[-1].startswith(b"b OK")
        assert other.cmd(b"c", b"FETCH 1 RFC822.SIZE")[-1].startswith(b"c OK")
        other.close()
    finally:
        h.stop()
    h.assert_clean()


def test_stalled_sendfile_readers_do_not_hold_the_worker_threads(tmp_path: Path) -> None:
    """As many clients as the loop has worker threads FETCH a large CRLF message
    (sent by os.sendfile) and read nothing: while their writes wait for the
    socket (up to imap.idle_timeout), other sessions' FETCHes, which need a
    worker thread, still get answered."""
    h = Harness(tmp_path, imap={"idle_timeout": 120.0}).start()
    stalled: list[Raw] = []
    try:
        data = b"Subject: big\r\n\r\n" + b"y" * 78 + b"\r\n" + (b"z" * 78 + b"\r\n") * 200_000
        deliver(h.alice.maildir, data)
        workers = min(32, (os.cpu_count() or 1) + 4)  # the default executor's threads
        for _ in range(workers + 1):
            r = Raw(h.port)
            r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            assert r.cmd(b"a", f'LOGIN alice "{PASSWORD}"'.encode())[-1].startswith(b"a OK")
            assert r.cmd(b"b", b"SELECT INBOX")[-1].startswith(b"b OK")
            r.send(b"c FETCH 1 BODY.PEEK[]\r\n")
            stalled.append(r)
        time.sleep(1.0)  # their FETCHes fill the socket buffers and wait
        other = Raw(h.port, timeout=20.0)
        assert other.cmd(b"a", f'LOGIN alice "{PASSWORD}"'.encode())[-1].startswith(b"a OK")
        assert other.cmd(b"b", b"EXAMINE INBOX")[-1].startswith(b"b OK")
        out = other.cmd(b"c", b"FETCH 1 BODY.PEEK[]<0.12>")
        assert out[-1].startswith(b"c OK") and b"Subject: big" in b"".join(out), out
        other.close()
    finally:
        for r in stalled:
            r.close()
        h.stop()
    h.assert_clean()


@pytest.mark.parametrize("how", ["implicit", "starttls"])
def test_no_sendfile_over_tls(tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch,
                              certs: tuple[Path, Path, ssl.SSLContext],  # noqa: F811
                              ) -> None:
    """A large CRLF message (sent by os.sendfile on a plain connection) reaches a
    TLS client whole and encrypted: os.sendfile is never called for it."""
    certfile, keyfile, client = certs
    calls: list[int] = []
    real_sendfile = os.sendfile

    def recording_sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        calls.append(count)
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", recording_sendfile)
    h = Harness(tmp_path, public=True, tls=(certfile, keyfile)).start()
    try:
        data = b"Subject: big over TLS\r\n\r\n" + (b"t" * 78 + b"\r\n") * 40_000
        deliver(h.alice.maildir, data)
        if how == "implicit":
            assert h.tls_port is not None
            c: imaplib.IMAP4 = BoundIMAPSSL("127.0.0.1", h.tls_port, "127.0.0.3", client)
        else:
            c = BoundIMAP("127.0.0.1", h.port, "127.0.0.2")
            assert c.starttls(ssl_context=client)[0] == "OK"
        assert c.login("alice", PASSWORD)[0] == "OK"
        c.select("INBOX", readonly=True)
        typ, got = c.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and isinstance(got[0], tuple) and got[0][1] == data
        assert calls == []
        c.logout()
    finally:
        h.stop()
    h.assert_clean()
