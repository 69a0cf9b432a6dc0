"""Property tests: arbitrary bytes, split at arbitrary points, against the live IMAP adapter.

Each example opens a real loopback connection (from 127.0.0.2), optionally
logs in, sends the chunks with tiny pauses (so the server really sees the
split points), half-closes, and reads everything until the server hangs up.
Properties: the server always hangs up (no hang), every reply line is a
well-formed IMAP response (RFC 3501 7: "* ", "+ " or "TAG OK|NO|BAD", CRLF,
literals counted), no error is logged and no exception reaches the event
loop, and the memory the server allocates per example stays bounded
(tracemalloc peak), even when the bytes announce huge literals.
"""

from __future__ import annotations

import re
import socket
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_imap import CRLF_MESSAGE, MULTIPART, PASSWORD, Harness

from relaygate.mail.maildir import deliver

#: the server may allocate this much per example at most (a literal cap of
#: 64 KiB after login, 8 KiB before, plus parsing and one message)
MEMORY_BOUND = 8 * 1024 * 1024

TOKENS = [
    b"a1 ", b"t ", b"* ", b"LOGIN ", b"alice ", b'"' + PASSWORD.encode() + b'"',
    b"AUTHENTICATE PLAIN", b"AUTHENTICATE LOGIN", b"AGFsaWNlAGNvcnJlY3QgaG9yc2UgYmF0dGVyeQ==",
    b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS", b"ID (\"name\" \"x\")", b"SELECT INBOX",
    b"EXAMINE INBOX", b"FETCH 1:* (FLAGS UID RFC822.SIZE ENVELOPE BODYSTRUCTURE)",
    b"FETCH 1 BODY.PEEK[1.MIME]", b"FETCH * BODY[HEADER.FIELDS (SUBJECT)]", b"UID FETCH 1:* ",
    b"STORE 1 +FLAGS (\\Seen)", b"SEARCH TEXT ", b"SEARCH OR ALL UNSEEN", b"EXPUNGE",
    b"CLOSE", b"LIST \"\" *", b"LSUB \"\" %", b"STATUS INBOX (MESSAGES UIDNEXT)",
    b"CREATE ", b"DELETE ", b"RENAME ", b"APPEND INBOX ", b"APPEND INBOX (\\Seen) ",
    b"IDLE", b"DONE", b"COPY 1 ", b"MOVE 1 ", b"{5}", b"{5+}", b"{0}", b"{70000}",
    b"{99999999999+}", b"{" + b"9" * 30 + b"}", b"~{3+}", b"\r\n", b"\n", b"\r", b" ", b"(",
    b")", b"[", b"]", b'"', b"\\", b"\x00", b"\xff\xfe", b"&AAA-", b"Sent", b"a/b", b"..",
    b'"/"', b"INBOX/",
]

chunks = st.lists(
    st.one_of(st.sampled_from(TOKENS), st.binary(max_size=64)), min_size=1, max_size=24,
).map(b"".join)
splits = st.lists(st.integers(min_value=0, max_value=2000), max_size=6)

_LITERAL = re.compile(rb"\{(\d+)\}\r\n\Z")
#: RFC 3501 9: tag = 1*<ASTRING-CHAR except "+"> (so "]" is a valid tag)
_TAGGED = re.compile(rb"[^\x00-\x20\x7f(){%*\"\\+]+ (OK|NO|BAD)( |\r\n)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("fuzz"), imap={"max_literal": 64 * 1024}).start()
    deliver(h.alice.maildir, CRLF_MESSAGE)
    deliver(h.alice.maildir, MULTIPART)
    h.bob_message = deliver(h.mail / "example.test" / "bob", CRLF_MESSAGE)  # type: ignore[attr-defined]
    tracemalloc.start()
    yield h
    tracemalloc.stop()
    h.stop()
    h.assert_clean()


def _talk(port: int, data: bytes, cuts: list[int], logged_in: bool) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", port))
        prefix = f'L LOGIN alice "{PASSWORD}"\r\nS SELECT INBOX\r\n'.encode() if logged_in else b""
        pieces: list[bytes] = []
        last = 0
        for cut in sorted({c % (len(data) + 1) for c in cuts}):
            pieces.append(data[last:cut])
            last = cut
        pieces.append(data[last:])
        try:
            if prefix:
                s.sendall(prefix)
            for piece in pieces:
                if piece:
                    s.sendall(piece)
                    time.sleep(0.002)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server hung up first (LOGOUT, BYE): fine
        out = bytearray()
        while True:
            try:
                got = s.recv(65536)
            except ConnectionResetError:
                break
            if not got:
                break
            out += got
        return bytes(out)


def _check_replies(out: bytes) -> None:
    assert out.startswith(b"* OK "), out[:200]
    pos = 0
    while pos < len(out):
        end = out.find(b"\r\n", pos)
        assert end >= 0, f"unterminated reply line: {out[pos:pos + 200]!r}"
        line = out[pos:end + 2]
        start = pos
        pos = end + 2
        # an untagged reply may carry literals: {n}CRLF then n octets, then more line
        while (m := _LITERAL.search(line)) is not None:
            pos += int(m.group(1))
            end = out.find(b"\r\n", pos)
            assert end >= 0, "reply ends inside a literal"
            line = out[pos:end + 2]
            pos = end + 2
        first = out[start:start + 2]
        assert first in (b"* ", b"+ ") or _TAGGED.match(out, start), \
            f"malformed reply: {out[start:start + 200]!r}"


def _example(server: Harness, data: bytes, cuts: list[int], logged_in: bool) -> None:
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    out = _talk(server.port, data, cuts, logged_in)
    _, peak = tracemalloc.get_traced_memory()
    _check_replies(out)
    server.assert_clean()
    assert peak - base < MEMORY_BOUND, f"server allocated {peak - base} bytes"
    # nothing outside alice's Maildir was touched
    assert server.bob_message.read_bytes() == CRLF_MESSAGE  # type: ignore[attr-defined]
    assert sorted(p.name for p in (server.mail / "example.test").iterdir()) == ["alice", "bob"]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=chunks, cuts=splits)
def test_fuzz_before_login(server: Harness, data: bytes, cuts: list[int]) -> None:
    _example(server, data, cuts, logged_in=False)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=chunks, cuts=splits)
def test_fuzz_after_login(server: Harness, data: bytes, cuts: list[int]) -> None:
    _example(server, data, cuts, logged_in=True)


@pytest.mark.parametrize("payload", [
    b"a CREATE {3}\r\na\x00b\r\n",
    b"a CREATE \"x\\\"y\"\r\nb CREATE {2}\r\n..\r\nc CREATE \"/\"\r\nd RENAME INBOX x\r\n",
    b"a APPEND INBOX {0}\r\n\r\n",
    b"a APPEND INBOX (\\Seen) \"01-Jan-1970 00:00:00 +0000\" {3+}\r\nx\r\n\r\n",
    b"a FETCH 1:4294967295 (BODY[99.99])\r\nb UID FETCH 0:* RFC822\r\n",
    b"a SEARCH CHARSET utf-8 TEXT {2}\r\n\xc3\xa9\r\n",
    b"a SELECT {5}\r\nINBOX\r\nb IDLE\r\nDONE\r\nc NOOP\r\n",
])
def test_edge_cases(server: Harness, payload: bytes) -> None:
    """Byte strings that once broke something, or look like they could."""
    _example(server, payload, [len(payload) // 2], logged_in=True)


def test_server_survives(server: Harness, tmp_path: Path) -> None:
    out = _talk(server.port, b"z CAPABILITY\r\nq LOGOUT\r\n", [], logged_in=False)
    assert b"z OK" in out and b"q OK" in out
