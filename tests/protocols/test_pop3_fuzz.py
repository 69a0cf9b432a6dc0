"""Property tests: the POP3 core under arbitrary bytes split at arbitrary points.

Whatever arrives, no exception escapes the core, every reply is a well-formed
POP3 response (status line, or a dot-terminated multi-line block), and the
receive buffer never holds more than one line limit.
"""

from __future__ import annotations

import base64
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaygate.protocols.pop3 import (
    MAX_SASL_LINE,
    ApopLogin,
    Close,
    Login,
    LoginFailure,
    MessageEncoder,
    NeedData,
    Pop3Config,
    Pop3Connection,
    Retrieve,
    StartTls,
    Update,
    encode_message,
)

BODIES = [b"Subject: a\n\n.x\nbody\n", b"no newline at end", b"", b"\r\n.\r\n..\r\n"]

TOKENS = [
    b"USER alice\r\nPASS pw\r\n", b"AUTH PLAIN " + base64.b64encode(b"\0alice\0pw") + b"\r\n",
    b"USER alice\r\n", b"PASS pw\r\n", b"PASS wrong\r\n", b"STAT\r\n", b"LIST\r\n",
    b"LIST 1\r\n", b"LIST 9\r\n", b"RETR 1\r\n", b"RETR 2\r\n", b"TOP 1 0\r\n",
    b"TOP 4 3\r\n", b"DELE 1\r\n", b"DELE 3\r\n", b"RSET\r\n", b"UIDL\r\n", b"UIDL 2\r\n",
    b"NOOP\r\n", b"QUIT\r\n", b"CAPA\r\n", b"STLS\r\n", b"AUTH\r\n", b"AUTH PLAIN\r\n",
    b"AUTH PLAIN " + base64.b64encode(b"\0alice\0pw") + b"\r\n",
    base64.b64encode(b"\0alice\0pw") + b"\r\n", b"*\r\n", b"=\r\n",
    b"APOP alice " + b"0" * 32 + b"\r\n", b"\r\n", b"\n", b"\r", b".\r\n", b"\0",
    b"x" * 300, b"A" * 5000 + b"\r\n",
]

_MULTI = re.compile(rb"^\+OK (Capability list follows|Mechanisms follow|\d+ octets"
                    rb"|top of message follows|unique-id listing follows"
                    rb"|\d+ messages \(\d+ octets\))$")


class Checker:
    """Parses everything the server sends and fails on anything malformed."""

    def __init__(self) -> None:
        self.in_block = False

    def feed(self, data: bytes) -> None:
        if not data:
            return
        assert data.endswith(b"\r\n"), data[-50:]
        lines = data[:-2].split(b"\r\n")
        for line in lines:
            # A stored message may hold a bare CR (it is data); never a bare LF.
            assert b"\n" not in line, line
            if self.in_block:
                if line == b".":
                    self.in_block = False
                else:
                    assert not line.startswith(b".") or line.startswith(b".."), line
                continue
            assert b"\r" not in line, line
            assert line.startswith((b"+OK", b"-ERR", b"+ ")), line
            assert len(line) + 2 <= 512, line  # RFC 2449: status lines <= 512 octets
            if _MULTI.match(line):
                self.in_block = True
        # Every response is sent whole.
        assert not self.in_block


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    chunks = []
    for c in cuts:
        if not stream:
            break
        chunks.append(stream[:c])
        stream = stream[c:]
    if stream:
        chunks.append(stream)
    return chunks


def run_session(config: Pop3Config, chunks: list[bytes], data: st.DataObject,
                always_ok: bool = False) -> dict[str, int]:
    """Drive the core like the I/O layer would; return what happened."""
    conn = Pop3Connection(config)
    check = Checker()
    check.feed(conn.greeting())
    seen: dict[str, int] = {}
    closed = False

    def pump() -> None:
        nonlocal closed
        while True:
            ev = conn.next_event()
            check.feed(conn.data_to_send())
            seen[type(ev).__name__] = seen.get(type(ev).__name__, 0) + 1
            if isinstance(ev, NeedData):
                # Memory stays bounded: never more than one line limit buffered.
                assert conn.buffered < conn.line_limit <= MAX_SASL_LINE
                return
            if isinstance(ev, Close):
                closed = True
                return
            if isinstance(ev, (Login, ApopLogin)):
                outcome = "ok" if always_ok else data.draw(
                    st.sampled_from(["ok", "ok", *LoginFailure]))
                if outcome == "ok":
                    n = len(BODIES) if always_ok else data.draw(st.integers(0, len(BODIES)))
                    conn.login_ok(ev.user, [(len(BODIES[i]), f"u{i}") for i in range(n)])
                else:
                    assert isinstance(outcome, LoginFailure)
                    conn.login_failed(outcome)
            elif isinstance(ev, StartTls):
                conn.tls_started()
            elif isinstance(ev, Retrieve):
                if data.draw(st.booleans()):
                    conn.retrieve_started()
                    enc = MessageEncoder(ev.top)
                    check.feed(conn.data_to_send() + enc.feed(BODIES[ev.index]) + enc.finish())
                else:
                    conn.retrieve_failed()
            elif isinstance(ev, Update):
                assert all(0 <= i < len(BODIES) for i in ev.deleted)
                assert len(set(ev.deleted)) == len(ev.deleted)
                conn.update_done(data.draw(st.integers(0, 2)))

    pump()
    for chunk in chunks:
        if closed:
            break
        conn.receive_data(chunk)
        pump()
    if not closed:
        conn.receive_eof()
        pump()
        assert closed
    # After close the core ignores input and keeps saying Close.
    conn.receive_data(b"STAT\r\n")
    assert isinstance(conn.next_event(), Close)
    assert conn.data_to_send() == b""
    return seen


_token = st.sampled_from(TOKENS) | st.sampled_from(TOKENS) | st.binary(max_size=80)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.lists(_token, max_size=30),
    cuts=st.lists(st.integers(min_value=1, max_value=300), max_size=40),
    config=st.builds(Pop3Config, tls_available=st.booleans(), tls_active=st.booleans(),
                     plaintext_without_tls=st.booleans(),
                     apop_timestamp=st.sampled_from([None, "<1.2@h>"]),
                     bad_command_limit=st.sampled_from([1, 3, 10, 50]),
                     max_commands=st.sampled_from([2, 10, 200_000])),
    data=st.data(),
)
def test_arbitrary_input(tokens: list[bytes], cuts: list[int], config: Pop3Config,
                         data: st.DataObject) -> None:
    run_session(config, split(b"".join(tokens), cuts), data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.lists(_token, max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=300), max_size=40),
    data=st.data(),
)
def test_arbitrary_input_after_login(tokens: list[bytes], cuts: list[int],
                                     data: st.DataObject) -> None:
    config = Pop3Config(plaintext_without_tls=True, bad_command_limit=1000)
    stream = b"USER alice\r\nPASS pw\r\n" + b"".join(tokens)
    seen = run_session(config, split(stream, cuts), data, always_ok=True)
    assert seen.get("Login", 0) >= 1


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=3000), st.integers(min_value=0, max_value=5) | st.none(),
       st.lists(st.integers(1, 200), max_size=20))
def test_encoder_output_is_well_formed(body: bytes, top: int | None, cuts: list[int]) -> None:
    enc = MessageEncoder(top)
    out = b""
    rest = body
    for c in cuts:
        out += enc.feed(rest[:c])
        rest = rest[c:]
    out += enc.feed(rest) + enc.finish()
    check = Checker()
    check.feed(b"+OK 1 octets\r\n" + out)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000) | st.lists(st.sampled_from(
    [b"\r", b"\n", b".", b"\r\n", b"a", b".\r\n", b"\n."]), max_size=40).map(b"".join),
       st.lists(st.integers(1, 200), max_size=20))
def test_whole_message_encoding_equals_the_streaming_encoder(body: bytes,
                                                             cuts: list[int]) -> None:
    enc = MessageEncoder()
    out = b""
    rest = body
    for c in cuts:
        out += enc.feed(rest[:c])
        rest = rest[c:]
    out += enc.feed(rest) + enc.finish()
    assert encode_message(body) == out
