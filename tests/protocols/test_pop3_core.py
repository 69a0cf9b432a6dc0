"""The sans-I/O POP3 core, in pure bytes (RFC 1939, 2449, 2595, 5034)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from relaygate.protocols.pop3 import (
    MAX_COMMAND_LINE,
    ApopLogin,
    Close,
    Event,
    Login,
    LoginFailure,
    MessageEncoder,
    NeedData,
    Pop3Config,
    Pop3Connection,
    Pop3UsageError,
    Retrieve,
    StartTls,
    State,
    Update,
)

LOGGED_IN = b"+OK maildrop has 3 messages (81 octets)\r\n"
MESSAGES = {0: b"Subject: one\n\nbody one\n", 1: b"Subject: two\r\n\r\n.dot\r\nx\r\n",
            2: b"Subject: three\n\nl1\nl2\nl3\n"}


def _sizes() -> list[tuple[int, str]]:
    from relaygate.mail.mailbox import wire_size

    return [(wire_size(MESSAGES[i]), f"uid{i}") for i in range(len(MESSAGES))]


@dataclass
class Driver:
    """Plays the I/O layer: answers events from a script, collects what is sent."""

    conn: Pop3Connection
    password: str = "pw"
    failure: LoginFailure | None = None
    events: list[Event] = field(default_factory=list)
    closed: Close | None = None
    update_failed: int = 0
    on_tls: Callable[[], None] | None = None

    def send(self, data: bytes) -> bytes:
        self.conn.receive_data(data)
        return self.pump()

    def eof(self) -> bytes:
        self.conn.receive_eof()
        return self.pump()

    def pump(self) -> bytes:
        out = b""
        while True:
            ev = self.conn.next_event()
            out += self.conn.data_to_send()
            if isinstance(ev, NeedData):
                return out
            self.events.append(ev)
            if isinstance(ev, Close):
                self.closed = ev
                return out
            if isinstance(ev, (Login, ApopLogin)):
                good = (isinstance(ev, ApopLogin) and ev.digest == "0" * 32) or (
                    isinstance(ev, Login) and ev.password == self.password)
                if self.failure is not None or not good:
                    self.conn.login_failed(self.failure or LoginFailure.AUTH)
                else:
                    self.conn.login_ok(ev.user, _sizes())
            elif isinstance(ev, StartTls):
                self.conn.tls_started()
            elif isinstance(ev, Retrieve):
                self.conn.retrieve_started()
                out += self.conn.data_to_send()
                enc = MessageEncoder(ev.top)
                out += enc.feed(MESSAGES[ev.index]) + enc.finish()
            elif isinstance(ev, Update):
                self.conn.update_done(self.update_failed)


def new(**kw: object) -> tuple[Driver, bytes]:
    conn = Pop3Connection(Pop3Config(plaintext_without_tls=True, **kw))  # type: ignore[arg-type]
    return Driver(conn), conn.greeting()


def logged_in(**kw: object) -> Driver:
    d, _ = new(**kw)
    assert d.send(b"USER alice\r\nPASS pw\r\n") == b"+OK Send your password\r\n" + LOGGED_IN
    return d


def test_greeting_has_the_apop_timestamp() -> None:
    _, g = new(apop_timestamp="<1.2@host>")
    assert g == b"+OK relaygate POP3 server ready <1.2@host>\r\n"
    _, g = new()
    assert g == b"+OK relaygate POP3 server ready\r\n"


def test_capa_before_and_after_login() -> None:
    d, _ = new(tls_available=True)
    out = d.send(b"CAPA\r\n")
    assert out.startswith(b"+OK") and out.endswith(b"\r\n.\r\n")
    caps = out.split(b"\r\n")[1:-2]
    assert set(caps) >= {b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING",
                         b"USER", b"SASL PLAIN", b"STLS"}
    d.send(b"USER a\r\nPASS pw\r\n")
    caps = d.send(b"CAPA\r\n").split(b"\r\n")[1:-2]
    assert b"USER" not in caps and b"STLS" not in caps and b"TOP" in caps


def test_user_pass_login_and_transaction_commands() -> None:
    d = logged_in()
    assert d.events[0] == Login("USER", "alice", "pw")
    assert d.conn.state is State.TRANSACTION
    assert d.send(b"STAT\r\n") == b"+OK 3 81\r\n"
    assert d.send(b"LIST\r\n") == b"+OK 3 messages (81 octets)\r\n1 26\r\n2 25\r\n3 30\r\n.\r\n"
    assert d.send(b"LIST 2\r\n") == b"+OK 2 25\r\n"
    assert d.send(b"UIDL\r\n") == \
        b"+OK unique-id listing follows\r\n1 uid0\r\n2 uid1\r\n3 uid2\r\n.\r\n"
    assert d.send(b"UIDL 3\r\n") == b"+OK 3 uid2\r\n"
    assert d.send(b"NOOP\r\n") == b"+OK\r\n"
    assert d.send(b"LIST 4\r\n") == b"-ERR No such message\r\n"
    assert d.send(b"LIST 0\r\n") == b"-ERR No such message\r\n"


def test_retr_is_crlf_and_dot_stuffed() -> None:
    d = logged_in()
    assert d.send(b"RETR 1\r\n") == b"+OK 26 octets\r\nSubject: one\r\n\r\nbody one\r\n.\r\n"
    assert d.send(b"RETR 2\r\n") == b"+OK 25 octets\r\nSubject: two\r\n\r\n..dot\r\nx\r\n.\r\n"
    assert d.events[-1] == Retrieve(1)


def test_top() -> None:
    d = logged_in()
    assert d.send(b"TOP 3 0\r\n") == b"+OK top of message follows\r\nSubject: three\r\n\r\n.\r\n"
    assert d.send(b"TOP 3 2\r\n") == \
        b"+OK top of message follows\r\nSubject: three\r\n\r\nl1\r\nl2\r\n.\r\n"
    assert d.send(b"TOP 3 99\r\n").endswith(b"l3\r\n.\r\n")
    assert d.send(b"TOP 3\r\n").startswith(b"-ERR")
    assert d.send(b"TOP 3 -1\r\n").startswith(b"-ERR")


def test_dele_rset_and_quit_update() -> None:
    d = logged_in()
    assert d.send(b"DELE 2\r\n") == b"+OK Message 2 deleted\r\n"
    assert d.send(b"DELE 2\r\n") == b"-ERR No such message\r\n"
    assert d.send(b"RETR 2\r\n") == b"-ERR No such message\r\n"
    assert d.send(b"STAT\r\n") == b"+OK 2 56\r\n"
    assert d.send(b"LIST\r\n") == b"+OK 2 messages (56 octets)\r\n1 26\r\n3 30\r\n.\r\n"
    assert d.send(b"RSET\r\n") == b"+OK 3 messages\r\n"
    assert d.send(b"STAT\r\n") == b"+OK 3 81\r\n"
    d.send(b"DELE 1\r\nDELE 3\r\n")
    assert d.send(b"QUIT\r\n") == b"+OK relaygate POP3 server signing off\r\n"
    assert Update((0, 2)) in d.events
    assert d.closed == Close("quit")
    assert d.conn.state is State.CLOSED


def test_quit_reports_failed_deletions() -> None:
    d = logged_in()
    d.update_failed = 1
    d.send(b"DELE 1\r\n")
    assert d.send(b"QUIT\r\n").startswith(b"-ERR [SYS/TEMP]")


def test_eof_without_quit_updates_nothing() -> None:
    d = logged_in()
    d.send(b"DELE 1\r\n")
    d.eof()
    assert not any(isinstance(e, Update) for e in d.events)
    assert d.closed is not None and d.conn.state is State.CLOSED


def test_quit_in_authorization() -> None:
    d, _ = new()
    assert d.send(b"QUIT\r\n") == b"+OK relaygate POP3 server signing off\r\n"
    assert d.closed == Close("quit")


def test_pass_keeps_spaces_and_needs_user_first() -> None:
    d, _ = new()
    assert d.send(b"PASS pw\r\n") == b"-ERR USER first\r\n"
    d.password = "pass with  spaces "
    out = d.send(b"USER bob\r\nPASS pass with  spaces \r\n")
    assert out.endswith(LOGGED_IN)
    assert d.events[-1] == Login("USER", "bob", "pass with  spaces ")


def test_failed_logins_answer_with_codes_and_hang_up_after_three() -> None:
    d, _ = new()
    assert d.send(b"USER a\r\nPASS bad\r\n").endswith(b"-ERR [AUTH] Authentication failed\r\n")
    d.failure = LoginFailure.THROTTLED
    assert d.send(b"USER a\r\nPASS pw\r\n").endswith(
        b"-ERR [SYS/TEMP] Too many failed logins, try again later\r\n")
    assert d.closed is None
    d.failure = LoginFailure.AUTH
    d.send(b"USER a\r\nPASS pw\r\n")
    assert d.closed == Close("too many failed logins")


@pytest.mark.parametrize("why,reply", [
    (LoginFailure.IN_USE, b"-ERR [IN-USE] Mailbox is in use by another session\r\n"),
    (LoginFailure.TEMPORARY, b"-ERR [SYS/TEMP] Temporary failure, try again later\r\n"),
])
def test_in_use_and_temporary_failures(why: LoginFailure, reply: bytes) -> None:
    d, _ = new()
    d.failure = why
    assert d.send(b"USER a\r\nPASS pw\r\n").endswith(reply)
    assert d.conn.state is State.AUTHORIZATION


def test_plaintext_refused_without_tls_then_allowed_after_stls() -> None:
    conn = Pop3Connection(Pop3Config(tls_available=True))
    d = Driver(conn)
    caps = d.send(b"CAPA\r\n")
    assert b"USER" not in caps and b"SASL" not in caps and b"STLS" in caps
    out = d.send(b"USER alice\r\n")
    assert out.startswith(b"-ERR [AUTH] Plaintext authentication is disabled")
    assert d.send(b"AUTH PLAIN AGFsaWNlAHB3\r\n").startswith(b"-ERR [AUTH]")
    assert not any(isinstance(e, Login) for e in d.events)
    assert d.send(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    assert d.conn.tls_active
    caps = d.send(b"CAPA\r\n")
    assert b"USER" in caps and b"STLS" not in caps
    assert d.send(b"USER alice\r\nPASS pw\r\n").endswith(LOGGED_IN)


def test_stls_discards_pipelined_plaintext() -> None:
    conn = Pop3Connection(Pop3Config(tls_available=True, plaintext_without_tls=True))
    d = Driver(conn)
    out = d.send(b"STLS\r\nUSER mallory\r\nPASS pw\r\n")
    assert out == b"+OK Begin TLS negotiation\r\n"
    assert not any(isinstance(e, Login) for e in d.events)
    assert d.send(b"STLS\r\n") == b"-ERR TLS is already active\r\n"


def test_stls_unavailable() -> None:
    d, _ = new()
    assert d.send(b"STLS\r\n") == b"-ERR TLS is not available\r\n"


def test_implicit_tls_allows_plaintext() -> None:
    d = Driver(Pop3Connection(Pop3Config(tls_active=True, tls_available=True)))
    assert b"STLS" not in d.send(b"CAPA\r\n")
    assert d.send(b"USER a\r\nPASS pw\r\n").endswith(b"(81 octets)\r\n")


def test_auth_plain_initial_response_and_continuation() -> None:
    d, _ = new()
    ir = base64.b64encode(b"\0alice\0pw")
    assert d.send(b"AUTH PLAIN " + ir + b"\r\n") == LOGGED_IN
    assert d.events[-1] == Login("PLAIN", "alice", "pw")
    d, _ = new()
    assert d.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert d.send(base64.b64encode(b"alice\0alice\0pw") + b"\r\n").startswith(b"+OK maildrop has 3")


def test_auth_plain_errors() -> None:
    d, _ = new()
    assert d.send(b"AUTH PLAIN\r\n*\r\n") == b"+ \r\n-ERR Authentication cancelled\r\n"
    assert d.send(b"AUTH PLAIN !!!\r\n") == b"-ERR Invalid base64\r\n"
    assert d.send(b"AUTH PLAIN " + base64.b64encode(b"no-nuls") + b"\r\n") == \
        b"-ERR Malformed PLAIN response\r\n"
    # proxy authorization (authzid != authcid) is refused as a failed login
    out = d.send(b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0pw") + b"\r\n")
    assert out == b"-ERR [AUTH] Authentication failed\r\n"
    assert d.send(b"AUTH CRAM-MD5\r\n") == b"-ERR Unsupported authentication mechanism\r\n"
    assert d.send(b"AUTH\r\n") == b"+OK Mechanisms follow\r\nPLAIN\r\n.\r\n"
    assert not any(isinstance(e, Login) for e in d.events)


def test_apop() -> None:
    d, _ = new(apop_timestamp="<9.9@h>")
    out = d.send(b"APOP alice " + b"0" * 32 + b"\r\n")
    assert out == LOGGED_IN
    assert d.events[-1] == ApopLogin("alice", "0" * 32, "<9.9@h>")
    d, _ = new(apop_timestamp="<9.9@h>")
    assert d.send(b"APOP alice xyz\r\n") == b"-ERR Usage: APOP name digest\r\n"
    d, _ = new()
    assert d.send(b"APOP alice " + b"0" * 32 + b"\r\n") == b"-ERR APOP is not available\r\n"


def test_commands_in_the_wrong_state() -> None:
    d, _ = new()
    assert d.send(b"STAT\r\n") == b"-ERR Command not valid in this state\r\n"
    assert d.send(b"RETR 1\r\n") == b"-ERR Command not valid in this state\r\n"
    d = logged_in()
    assert d.send(b"USER x\r\n") == b"-ERR Command not valid in this state\r\n"
    assert d.send(b"PASS x\r\n") == b"-ERR Command not valid in this state\r\n"
    assert d.send(b"STLS\r\n") == b"-ERR Command not valid in this state\r\n"


def test_case_insensitive_keywords_and_bare_lf() -> None:
    d = logged_in()
    assert d.send(b"stat\n") == b"+OK 3 81\r\n"
    assert d.send(b"StAt\r\n") == b"+OK 3 81\r\n"


def test_pipelining_in_one_packet() -> None:
    d, _ = new()
    out = d.send(b"USER alice\r\nPASS pw\r\nSTAT\r\nLIST 1\r\nQUIT\r\n")
    assert out == (b"+OK Send your password\r\n" + LOGGED_IN + b"+OK 3 81\r\n"
                   b"+OK 1 26\r\n+OK relaygate POP3 server signing off\r\n")


def test_byte_at_a_time() -> None:
    d, _ = new()
    out = b""
    for b in b"USER alice\r\nPASS pw\r\nSTAT\r\n":
        out += d.send(bytes([b]))
    assert out.endswith(b"+OK 3 81\r\n")


def test_line_too_long_is_discarded_and_answered_once_it_ends() -> None:
    d, _ = new()
    out = d.send(b"NOOP " + b"x" * 1000)
    assert out == b""
    assert d.conn.buffered < MAX_COMMAND_LINE
    out = d.send(b"y" * 5000)
    assert out == b"" and d.conn.buffered < MAX_COMMAND_LINE
    assert d.send(b"\r\nQUIT\r\n") == b"-ERR Line too long\r\n+OK relaygate POP3 server " \
                                      b"signing off\r\n"


def test_line_of_exactly_255_octets_is_accepted() -> None:
    d, _ = new()
    line = b"USER " + b"a" * (MAX_COMMAND_LINE - 7) + b"\r\n"
    assert len(line) == MAX_COMMAND_LINE
    assert d.send(line) == b"+OK Send your password\r\n"
    d, _ = new()
    line = b"USER " + b"a" * (MAX_COMMAND_LINE - 6) + b"\r\n"
    assert d.send(line) == b"-ERR Line too long\r\n"


def test_sasl_response_may_be_longer_than_a_command() -> None:
    d, _ = new()
    d.password = "p" * 600
    resp = base64.b64encode(b"\0alice\0" + b"p" * 600)
    assert len(resp) > MAX_COMMAND_LINE
    assert d.send(b"AUTH PLAIN\r\n" + resp + b"\r\n").endswith(LOGGED_IN)


def test_bad_command_budget() -> None:
    d, _ = new(bad_command_limit=3)
    d.send(b"FOO\r\nBAR\r\n")
    assert d.closed is None
    out = d.send(b"BAZ\r\nUSER x\r\n")
    assert out.endswith(b"-ERR Too many bad commands, closing\r\n")
    assert d.closed == Close("too many bad commands")
    assert d.send(b"USER x\r\n") == b""  # nothing after close


def test_command_budget() -> None:
    d = logged_in(max_commands=4)
    assert d.send(b"NOOP\r\nNOOP\r\n") == b"+OK\r\n+OK\r\n"
    assert d.send(b"NOOP\r\n") == b"-ERR Too many commands in one session\r\n"
    assert d.closed == Close("too many commands")


@pytest.mark.parametrize("line", [b"", b"X", b"TOOLONG", b"US3R x", b"\x00\x01\x02",
                                  b"USER \x00", b"LIST \xff", b"USER", b"USER a b"])
def test_garbage_gets_err(line: bytes) -> None:
    d, _ = new()
    out = d.send(line + b"\r\n")
    assert out.startswith(b"-ERR ") and out.endswith(b"\r\n") and out.count(b"\r\n") == 1


def test_message_numbers_are_strict() -> None:
    d = logged_in()
    for arg in (b"+1", b"-1", b"1.0", b"0x1", b" 1", b"99999999999", b"\xd9\xa1"):
        assert d.send(b"RETR " + arg + b"\r\n").startswith(b"-ERR")


def test_usage_errors_from_the_io_layer() -> None:
    conn = Pop3Connection()
    with pytest.raises(Pop3UsageError):
        conn.login_ok("x", [])
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    assert isinstance(conn.next_event(), NeedData)  # plaintext refused: no Login
    conn2 = Pop3Connection(Pop3Config(plaintext_without_tls=True))
    conn2.receive_data(b"USER a\r\nPASS b\r\n")
    assert isinstance(conn2.next_event(), Login)
    with pytest.raises(Pop3UsageError):
        conn2.next_event()  # the Login is not answered yet
    with pytest.raises(Pop3UsageError):
        conn2.retrieve_started()


def test_encoder_top_stops_reading() -> None:
    enc = MessageEncoder(top=1)
    out = enc.feed(b"H: 1\n\nb1\nb2\n")
    assert enc.done
    assert out + enc.finish() == b"H: 1\r\n\r\nb1\r\n.\r\n"
    assert enc.feed(b"more\n") == b""


def test_encoder_long_lines_are_passed_on_in_pieces() -> None:
    enc = MessageEncoder()
    out = enc.feed(b"." + b"x" * 200_000)
    assert len(out) > 100_000  # not held back whole
    assert out.startswith(b"..")
    out += enc.feed(b"\r\n.tail\n") + enc.finish()
    assert out == b".." + b"x" * 200_000 + b"\r\n..tail\r\n.\r\n"
