"""Sans-I/O POP3 server core: bytes in, events out, replies out as bytes.

Theory of operation
-------------------
:class:`Pop3Connection` implements the server side of RFC 1939 (POP3: USER,
PASS, APOP, STAT, LIST, RETR, DELE, NOOP, RSET, QUIT, TOP, UIDL), RFC 2449
(CAPA, response codes, PIPELINING), RFC 3206 (``[SYS/TEMP]``, ``[AUTH]``),
RFC 2595 section 4 (STLS) and RFC 5034 (AUTH with SASL PLAIN, RFC 4616). It
never touches a socket, a file or a clock, in the manner of h11:

- the I/O layer feeds received bytes with :meth:`~Pop3Connection.receive_data`
  (or :meth:`~Pop3Connection.receive_eof`), asks :meth:`~Pop3Connection.next_event`
  for the next thing to do, and sends :meth:`~Pop3Connection.data_to_send`;
- events that need the outside world (:class:`Login`, :class:`ApopLogin`,
  :class:`StartTls`, :class:`Retrieve`, :class:`Update`) stop the core until
  the I/O layer answers with the matching method (``login_ok``,
  ``login_failed``, ``tls_started``, ``retrieve_started``/``retrieve_failed``,
  ``update_done``); commands the core can answer itself (CAPA, STAT, LIST,
  UIDL, DELE, RSET, NOOP, errors) never become events.

States follow RFC 1939 section 3: AUTHORIZATION -> TRANSACTION -> UPDATE
(entered only by QUIT, so a dropped connection deletes nothing) -> CLOSED.

Limits (all keep memory per connection bounded, see ``MAX_*`` below): a
command line is at most 255 octets with its CRLF (RFC 2449 section 4); a SASL
response line at most :data:`MAX_SASL_LINE`. The receive buffer never holds
more than one line limit when the core asks for data: a longer line is
discarded as it arrives and answered with ``-ERR`` when it ends. Unknown or
misplaced commands and syntax errors count against a bad-command budget,
failed logins against :data:`MAX_AUTH_FAILURES`, every command against a
per-session total; past any of them the core answers ``-ERR`` and closes.

Plaintext mechanisms (USER/PASS, AUTH PLAIN) are refused with ``-ERR [AUTH]``
unless the connection is under TLS or the configuration says plaintext is
acceptable (loopback listener, or ``auth.allow_plaintext``); APOP never sends
the password and is always accepted when configured.

After STLS, bytes the client pipelined behind the command are discarded (they
were sent in clear and could be an injection, cf. CVE-2011-0411), and the
session starts over as RFC 2595 requires.

:class:`MessageEncoder` turns stored message bytes into the RETR/TOP wire form:
CRLF line ends (a stored bare LF becomes CRLF), dot-stuffing (RFC 1939
section 3), and the terminating ``.CRLF``; for TOP it stops after the header,
the blank line and N body lines.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

#: RFC 2449 section 4: a command line, with its CRLF, is at most 255 octets.
MAX_COMMAND_LINE = 255
#: A SASL response line (RFC 5034 section 4 does not bound it): base64 of a
#: 255-octet user name and a 1024-character password fits with room to spare.
MAX_SASL_LINE = 4096
#: RFC 1939 section 3: keywords are 3 or 4 characters.
MAX_KEYWORD = 4
#: Failed logins on one connection before we hang up (clients retry on a new
#: one; the per-address throttle still counts every failure).
MAX_AUTH_FAILURES = 3
#: Default bad-command budget (unknown, misplaced or malformed commands).
DEFAULT_BAD_COMMANDS = 10
#: Default commands per session: generous for a 50 000-message mailbox
#: fetched with RETR+DELE, small enough to end a NOOP loop that defeats the
#: idle timeout.
DEFAULT_MAX_COMMANDS = 200_000
#: Longest run of a stored line the encoder holds before passing part of it
#: on (bounds memory for messages with megabyte-long lines).
ENCODER_MAX_CARRY = 64 * 1024


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


class LoginFailure(enum.Enum):
    """Why a login failed, as the I/O layer tells the core (each has one reply)."""

    #: wrong credentials, unknown or disabled user
    AUTH = "AUTH"
    #: the address or account is locked out by the throttle
    THROTTLED = "THROTTLED"
    #: another session holds the mailbox
    IN_USE = "IN-USE"
    #: the user database or the mailbox could not be read
    TEMPORARY = "TEMPORARY"


_FAILURE_REPLIES = {
    LoginFailure.AUTH: b"-ERR [AUTH] Authentication failed\r\n",
    LoginFailure.THROTTLED: b"-ERR [SYS/TEMP] Too many failed logins, try again later\r\n",
    LoginFailure.IN_USE: b"-ERR [IN-USE] Mailbox is in use by another session\r\n",
    LoginFailure.TEMPORARY: b"-ERR [SYS/TEMP] Temporary failure, try again later\r\n",
}
_PLAINTEXT_REFUSED = (b"-ERR [AUTH] Plaintext authentication is disabled on connections "
                      b"without TLS; use STLS first\r\n")


class Pop3UsageError(RuntimeError):
    """The I/O layer called the core out of order (a bug in the caller, not the client)."""


# -- events ------------------------------------------------------------------


@dataclass(frozen=True)
class NeedData:
    """Feed more bytes (or EOF) before asking again."""


@dataclass(frozen=True)
class StartTls:
    """Send what is queued (``+OK``), start TLS, then call ``tls_started()``."""


@dataclass(frozen=True)
class Login:
    """Check a plaintext password; answer ``login_ok(messages)`` or ``login_failed(why)``."""

    mechanism: str  # "USER" or "PLAIN"
    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class ApopLogin:
    """Check an APOP digest against the greeting's timestamp; answer as for Login."""

    user: str
    digest: str
    timestamp: str


@dataclass(frozen=True)
class Retrieve:
    """Send message ``index`` (0-based): call ``retrieve_started()``, send the body
    through a :class:`MessageEncoder` with ``top`` lines, then carry on; or call
    ``retrieve_failed()`` when the message cannot be read."""

    index: int
    top: int | None = None


@dataclass(frozen=True)
class Update:
    """QUIT in TRANSACTION: remove the ``deleted`` messages (0-based), then call
    ``update_done(failed)``."""

    deleted: tuple[int, ...]


@dataclass(frozen=True)
class Close:
    """Send what is queued, then close the connection."""

    reason: str


Event = NeedData | StartTls | Login | ApopLogin | Retrieve | Update | Close
NEED_DATA = NeedData()


@dataclass(frozen=True)
class Pop3Config:
    """What the core needs to know about its listener and limits."""

    #: STLS may be offered (a certificate is configured)
    tls_available: bool = False
    #: the connection is already under TLS (implicit-TLS listener)
    tls_active: bool = False
    #: plaintext passwords are acceptable without TLS (loopback or configured)
    plaintext_without_tls: bool = False
    #: RFC 1939 section 7 timestamp for APOP (``<...@host>``); None disables APOP
    apop_timestamp: str | None = None
    max_commands: int = DEFAULT_MAX_COMMANDS
    bad_command_limit: int = DEFAULT_BAD_COMMANDS
    max_auth_failures: int = MAX_AUTH_FAILURES
    greeting: str = "relaygate POP3 server ready"


@dataclass
class _Msg:
    size: int
    uid: str
    deleted: bool = False


class Pop3Connection:
    """One POP3 server session, without I/O (see the module docstring)."""

    def __init__(self, config: Pop3Config | None = None) -> None:
        self.config = config or Pop3Config()
        self.state = State.AUTHORIZATION
        self.tls_active = self.config.tls_active
        self.user: str | None = None  # the authenticated user (after login_ok)
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._discarding = False
        self._eof = False
        self._pending: Event | None = None
        self._close: Close | None = None
        self._pending_user: str | None = None  # USER given, waiting for PASS
        self._sasl = False  # waiting for an AUTH PLAIN response line
        self._messages: list[_Msg] = []
        self.commands = 0
        self.bad_commands = 0
        self.auth_failures = 0

    # -- the I/O-facing API ----------------------------------------------------

    def greeting(self) -> bytes:
        """The server greeting (send it first)."""
        stamp = f" {self.config.apop_timestamp}" if self.config.apop_timestamp else ""
        return f"+OK {self.config.greeting}{stamp}\r\n".encode("ascii", "replace")

    @property
    def line_limit(self) -> int:
        return MAX_SASL_LINE if self._sasl else MAX_COMMAND_LINE

    @property
    def buffered(self) -> int:
        """Bytes received and not yet processed."""
        return len(self._buf)

    def plaintext_ok(self) -> bool:
        return self.tls_active or self.config.plaintext_without_tls

    def is_deleted(self, index: int) -> bool:
        """Whether message ``index`` (0-based) is marked deleted (DELE, not undone by RSET)."""
        return self._messages[index].deleted

    def receive_data(self, data: bytes) -> None:
        if self.state is State.CLOSED or self._eof:
            return
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return
            data = data[nl + 1:]
            self._discarding = False
            if self._sasl:
                self._sasl = False
                self._bad(b"-ERR Authentication line too long\r\n")
            else:
                self._bad(b"-ERR Line too long\r\n")
        self._buf += data

    def receive_eof(self) -> None:
        self._eof = True

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self, max_output: int | None = None) -> Event:
        """The next thing the I/O layer must do.

        With ``max_output``, NEED_DATA also comes once the replies queued reach that
        many octets, though more command lines may be buffered: the caller sends them
        (waiting while its client does not read) and calls again. Without it, a client
        pipelining commands with large answers (UIDL, LIST) and reading none would
        have them all answered into memory at once.
        """
        if self._close is not None:
            self.state = State.CLOSED
            return self._close
        if self._pending is not None:
            raise Pop3UsageError(f"answer {type(self._pending).__name__} first")
        counted = queued = 0
        while True:
            if max_output is not None:
                queued += sum(len(b) for b in self._out[counted:])
                counted = len(self._out)
                if queued >= max_output:
                    return NEED_DATA
            line = self._next_line()
            if line is None:
                if self._close is not None:
                    self.state = State.CLOSED
                    return self._close
                if self._eof:
                    self.state = State.CLOSED
                    self._close = Close("client closed the connection")
                    return self._close
                return NEED_DATA
            ev = self._handle(line)
            if ev is not None:
                if not isinstance(ev, Close):
                    self._pending = ev
                else:
                    self.state = State.CLOSED
                    self._close = ev
                return ev
            if self._close is not None:
                self.state = State.CLOSED
                return self._close

    # answers to events

    def tls_started(self) -> None:
        self._expect(StartTls)
        self.tls_active = True
        # RFC 2595 section 4: the client must forget what it learned in clear;
        # so do we.
        self._pending_user = None

    def login_ok(self, user: str, messages: Sequence[tuple[int, str]]) -> None:
        """The login succeeded and the mailbox is open: ``messages`` are (size, uid)."""
        self._expect(Login, ApopLogin)
        self.user = user
        self._messages = [_Msg(size, uid) for size, uid in messages]
        self.state = State.TRANSACTION
        total = sum(m.size for m in self._messages)
        self._reply(f"+OK maildrop has {len(self._messages)} messages ({total} octets)")

    def login_failed(self, why: LoginFailure) -> None:
        self._expect(Login, ApopLogin)
        self._out.append(_FAILURE_REPLIES[why])
        if why in (LoginFailure.AUTH, LoginFailure.THROTTLED):
            self.auth_failures += 1
            if self.auth_failures >= self.config.max_auth_failures:
                self._close = Close("too many failed logins")

    def retrieve_started(self) -> None:
        """Queue the ``+OK`` of a RETR/TOP; the body follows from the I/O layer."""
        ev = self._expect(Retrieve)
        assert isinstance(ev, Retrieve)
        size = self._messages[ev.index].size
        if ev.top is None:
            self._reply(f"+OK {size} octets")
        else:
            self._reply("+OK top of message follows")

    def retrieve_failed(self) -> None:
        self._expect(Retrieve)
        self._out.append(b"-ERR [SYS/TEMP] Message cannot be read now\r\n")

    def update_done(self, failed: int = 0) -> None:
        self._expect(Update)
        if failed:
            self._reply(f"-ERR [SYS/TEMP] {failed} deleted messages not removed")
        else:
            self._reply("+OK relaygate POP3 server signing off")
        self._close = Close("quit")

    # -- line handling ---------------------------------------------------------

    def _expect(self, *kinds: type) -> Event:
        ev = self._pending
        if ev is None or not isinstance(ev, kinds):
            raise Pop3UsageError(f"no {'/'.join(k.__name__ for k in kinds)} is pending")
        self._pending = None
        return ev

    def _next_line(self) -> bytes | None:
        while True:
            limit = self.line_limit
            nl = self._buf.find(b"\n", 0, limit)
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buf) < limit:
                return None
            # Over-long line: drop it as it comes, answer when it ends.
            rest = self._buf.find(b"\n", limit)
            if rest < 0:
                self._buf.clear()
                self._discarding = True
                return None
            del self._buf[:rest + 1]
            was_sasl = self._sasl
            self._sasl = False
            if was_sasl:
                self._bad(b"-ERR Authentication line too long\r\n")
            else:
                self._bad(b"-ERR Line too long\r\n")
            if self._close is not None:
                return None

    def _reply(self, text: str) -> None:
        self._out.append(text.encode("ascii", "replace") + b"\r\n")

    def _multiline(self, first: str, lines: Sequence[str]) -> None:
        body = "".join(f"{line}\r\n" for line in lines)
        self._out.append(f"{first}\r\n{body}.\r\n".encode("ascii", "replace"))

    def _bad(self, reply: bytes) -> None:
        self._out.append(reply)
        self.bad_commands += 1
        if self.bad_commands >= self.config.bad_command_limit:
            self._out.append(b"-ERR Too many bad commands, closing\r\n")
            self._close = Close("too many bad commands")

    def _handle(self, line: bytes) -> Event | None:
        if self._sasl:
            self._sasl = False
            return self._sasl_response(line)
        self.commands += 1
        if self.commands > self.config.max_commands:
            self._out.append(b"-ERR Too many commands in one session\r\n")
            return Close("too many commands")
        keyword, _, rest = line.partition(b" ")
        if not (3 <= len(keyword) <= MAX_KEYWORD and keyword.isalpha() and keyword.isascii()):
            self._bad(b"-ERR Unknown command\r\n")
            return None
        cmd = keyword.upper().decode("ascii")
        if cmd == "PASS":
            return self._pass(rest)  # the password may hold any octet but CR/LF/NUL
        if not _printable(rest):
            self._bad(b"-ERR Invalid characters in command\r\n")
            return None
        args = rest.decode("ascii").split(" ") if rest else []
        if self.state is State.AUTHORIZATION:
            handler = _AUTH_COMMANDS.get(cmd)
        else:
            handler = _TRANSACTION_COMMANDS.get(cmd)
        if handler is None:
            known = cmd in _AUTH_COMMANDS or cmd in _TRANSACTION_COMMANDS or cmd == "PASS"
            self._bad(b"-ERR Command not valid in this state\r\n" if known
                      else b"-ERR Unknown command\r\n")
            return None
        return handler(self, args)

    # -- AUTHORIZATION -----------------------------------------------------------

    def _capa(self, args: list[str]) -> Event | None:
        if args:
            self._bad(b"-ERR CAPA takes no arguments\r\n")
            return None
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self.plaintext_ok():
                caps += ["USER", "SASL PLAIN"]
            if self.config.tls_available and not self.tls_active:
                caps.append("STLS")
        caps.append("IMPLEMENTATION relaygate")
        self._multiline("+OK Capability list follows", caps)
        return None

    def _user(self, args: list[str]) -> Event | None:
        if len(args) != 1 or not args[0]:
            self._bad(b"-ERR Usage: USER name\r\n")
            return None
        if not self.plaintext_ok():
            self._pending_user = None
            self._bad(_PLAINTEXT_REFUSED)
            return None
        self._pending_user = args[0]
        self._reply("+OK Send your password")
        return None

    def _pass(self, rest: bytes) -> Event | None:
        if self.state is not State.AUTHORIZATION:
            self._bad(b"-ERR Command not valid in this state\r\n")
            return None
        user, self._pending_user = self._pending_user, None
        if user is None:
            self._bad(b"-ERR USER first\r\n")
            return None
        if not self.plaintext_ok():
            self._bad(_PLAINTEXT_REFUSED)
            return None
        if not rest or b"\0" in rest:
            self._bad(b"-ERR Usage: PASS password\r\n")
            return None
        # RFC 1939 section 7: the whole rest of the line is the password, spaces too.
        return Login("USER", user, rest.decode("utf-8", "surrogateescape"))

    def _apop(self, args: list[str]) -> Event | None:
        stamp = self.config.apop_timestamp
        if stamp is None:
            self._bad(b"-ERR APOP is not available\r\n")
            return None
        if len(args) != 2 or not args[0] or not _is_md5_hex(args[1]):
            self._bad(b"-ERR Usage: APOP name digest\r\n")
            return None
        self._pending_user = None
        return ApopLogin(args[0], args[1].lower(), stamp)

    def _auth(self, args: list[str]) -> Event | None:
        if not args:
            # Pre-RFC 5034 clients list mechanisms with a bare AUTH.
            self._multiline("+OK Mechanisms follow", ["PLAIN"] if self.plaintext_ok() else [])
            return None
        if len(args) > 2:
            self._bad(b"-ERR Usage: AUTH mechanism [initial-response]\r\n")
            return None
        if args[0].upper() != "PLAIN":
            self._bad(b"-ERR Unsupported authentication mechanism\r\n")
            return None
        if not self.plaintext_ok():
            self._bad(_PLAINTEXT_REFUSED)
            return None
        self._pending_user = None
        if len(args) == 2:
            return self._sasl_response(args[1].encode("ascii"))
        self._sasl = True
        self._out.append(b"+ \r\n")
        return None

    def _sasl_response(self, line: bytes) -> Event | None:
        if line == b"*":
            self._bad(b"-ERR Authentication cancelled\r\n")
            return None
        if line == b"=":
            line = b""  # RFC 5034 section 4: "=" is an empty initial response
        try:
            raw = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._bad(b"-ERR Invalid base64\r\n")
            return None
        parts = raw.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            self._bad(b"-ERR Malformed PLAIN response\r\n")
            return None
        authzid, authcid, password = parts
        # No proxy authorization: the identity must be the authenticated user.
        if authzid and authzid != authcid:
            self._out.append(_FAILURE_REPLIES[LoginFailure.AUTH])
            self.auth_failures += 1
            if self.auth_failures >= self.config.max_auth_failures:
                self._close = Close("too many failed logins")
            return None
        return Login("PLAIN", authcid.decode("utf-8", "surrogateescape"),
                     password.decode("utf-8", "surrogateescape"))

    def _stls(self, args: list[str]) -> Event | None:
        if args:
            self._bad(b"-ERR STLS takes no arguments\r\n")
            return None
        if not self.config.tls_available or self.tls_active:
            self._bad(b"-ERR TLS is not available\r\n" if not self.tls_active
                      else b"-ERR TLS is already active\r\n")
            return None
        # Anything pipelined behind STLS came in clear: drop it.
        self._buf.clear()
        self._reply("+OK Begin TLS negotiation")
        return StartTls()

    def _quit(self, args: list[str]) -> Event | None:
        if self.state is State.TRANSACTION:
            self.state = State.UPDATE
            deleted = tuple(i for i, m in enumerate(self._messages) if m.deleted)
            return Update(deleted)
        self._reply("+OK relaygate POP3 server signing off")
        return Close("quit")

    # -- TRANSACTION -------------------------------------------------------------

    def _msg(self, arg: str) -> int | None:
        """0-based index of a live message number, or None (reply sent)."""
        if not arg.isdigit() or len(arg) > 10:
            self._bad(b"-ERR Invalid message number\r\n")
            return None
        n = int(arg)
        if not 1 <= n <= len(self._messages) or self._messages[n - 1].deleted:
            self._out.append(b"-ERR No such message\r\n")
            return None
        return n - 1

    def _stat(self, args: list[str]) -> Event | None:
        if args:
            self._bad(b"-ERR STAT takes no arguments\r\n")
            return None
        live = [m for m in self._messages if not m.deleted]
        self._reply(f"+OK {len(live)} {sum(m.size for m in live)}")
        return None

    def _list_or_uidl(self, args: list[str], uidl: bool) -> Event | None:
        if len(args) > 1:
            self._bad(b"-ERR Too many arguments\r\n")
            return None

        def value(m: _Msg) -> str:
            return m.uid if uidl else str(m.size)

        if args:
            i = self._msg(args[0])
            if i is not None:
                self._reply(f"+OK {i + 1} {value(self._messages[i])}")
            return None
        live = [(i, m) for i, m in enumerate(self._messages) if not m.deleted]
        lines = [f"{i + 1} {value(m)}" for i, m in live]
        # RFC 1939 section 5's wording; a bare "+OK" is NOOP's answer.
        first = ("+OK unique-id listing follows" if uidl else
                 f"+OK {len(live)} messages ({sum(m.size for _, m in live)} octets)")
        self._multiline(first, lines)
        return None

    def _list(self, args: list[str]) -> Event | None:
        return self._list_or_uidl(args, uidl=False)

    def _uidl(self, args: list[str]) -> Event | None:
        return self._list_or_uidl(args, uidl=True)

    def _retr(self, args: list[str]) -> Event | None:
        if len(args) != 1:
            self._bad(b"-ERR Usage: RETR msg\r\n")
            return None
        i = self._msg(args[0])
        return None if i is None else Retrieve(i)

    def _top(self, args: list[str]) -> Event | None:
        if len(args) != 2 or not args[1].isdigit() or len(args[1]) > 10:
            self._bad(b"-ERR Usage: TOP msg lines\r\n")
            return None
        i = self._msg(args[0])
        return None if i is None else Retrieve(i, int(args[1]))

    def _dele(self, args: list[str]) -> Event | None:
        if len(args) != 1:
            self._bad(b"-ERR Usage: DELE msg\r\n")
            return None
        i = self._msg(args[0])
        if i is not None:
            self._messages[i].deleted = True
            self._reply(f"+OK Message {i + 1} deleted")
        return None

    def _rset(self, args: list[str]) -> Event | None:
        if args:
            self._bad(b"-ERR RSET takes no arguments\r\n")
            return None
        for m in self._messages:
            m.deleted = False
        self._reply(f"+OK {len(self._messages)} messages")
        return None

    def _noop(self, args: list[str]) -> Event | None:
        if args:
            self._bad(b"-ERR NOOP takes no arguments\r\n")
            return None
        self._reply("+OK")
        return None


_Handler = Callable[[Pop3Connection, list[str]], Event | None]

_AUTH_COMMANDS: dict[str, _Handler] = {
    "CAPA": Pop3Connection._capa,
    "USER": Pop3Connection._user,
    "APOP": Pop3Connection._apop,
    "AUTH": Pop3Connection._auth,
    "STLS": Pop3Connection._stls,
    "QUIT": Pop3Connection._quit,
}
_TRANSACTION_COMMANDS: dict[str, _Handler] = {
    "CAPA": Pop3Connection._capa,
    "STAT": Pop3Connection._stat,
    "LIST": Pop3Connection._list,
    "UIDL": Pop3Connection._uidl,
    "RETR": Pop3Connection._retr,
    "TOP": Pop3Connection._top,
    "DELE": Pop3Connection._dele,
    "RSET": Pop3Connection._rset,
    "NOOP": Pop3Connection._noop,
    "QUIT": Pop3Connection._quit,
}


#: octets 0x20-0x7E: what a command's arguments may hold
_PRINTABLE = bytes(range(0x20, 0x7F))


def _printable(b: bytes) -> bool:
    return not b.translate(None, _PRINTABLE)  # nothing left once the printable are gone


def _is_md5_hex(s: str) -> bool:
    return len(s) == 32 and all(c in "0123456789abcdefABCDEF" for c in s)


# -- message encoding ----------------------------------------------------------


#: a line starting with "." (after the first): dot-stuffed by encode_message
_DOT_LINE = re.compile(rb"\n\.")


def encode_message(data: bytes) -> bytes:
    """A whole stored message -> RETR wire form, terminator included.

    The same bytes as :class:`MessageEncoder` (no ``top``) fed ``data`` in any
    pieces, made with a few C-level passes instead of a loop over lines: the
    server sends a message it read in one go this way. Stored mail usually has
    bare LF line ends and no CR, so the CRLF pass is skipped when there is no
    CR, and dot-stuffing is one regex pass (faster than ``bytes.replace`` with a
    two-octet pattern, which scans twice).
    """
    if not data:
        return b".\r\n"
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    wire = _DOT_LINE.sub(b"\n..", data).replace(b"\n", b"\r\n")
    if wire.startswith(b"."):
        wire = b"." + wire
    if wire.endswith(b"\r") and not wire.endswith(b"\r\n"):
        # A last line ending in a bare CR: that CR is its line end (as in the encoder).
        wire = wire[:-1] + b"\r\n"
    elif not wire.endswith(b"\n"):
        wire += b"\r\n"
    return wire + b".\r\n"


class MessageEncoder:
    """Stored message bytes -> RETR/TOP wire form (CRLF, dot-stuffed, ``.CRLF`` end).

    ``feed(chunk)`` returns wire bytes; ``finish()`` returns the rest and the
    terminator. With ``top=N`` the output stops after the header, the empty
    line and N body lines; :attr:`done` then tells the caller to stop reading.
    """

    def __init__(self, top: int | None = None) -> None:
        self.top = top
        self.done = False
        self._carry = b""
        self._at_start = True  # the next output byte starts a line
        self._in_header = True
        self._body_lines = 0
        self._finished = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done or not chunk:
            return b""
        data = self._carry + chunk
        lines = data.split(b"\n")
        self._carry = lines.pop()
        out: list[bytes] = []
        for line in lines:
            self._line(out, line[:-1] if line.endswith(b"\r") else line)
            if self.done:
                self._carry = b""
                return b"".join(out)
        if len(self._carry) > ENCODER_MAX_CARRY:
            # Keep the last octet back: it may be the CR of a CRLF.
            part, self._carry = self._carry[:-1], self._carry[-1:]
            self._partial(out, part)
        return b"".join(out)

    def finish(self) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        out: list[bytes] = []
        if not self.done and (self._carry or not self._at_start):
            carry = self._carry
            self._line(out, carry[:-1] if carry.endswith(b"\r") else carry)
        self._carry = b""
        self.done = True
        out.append(b".\r\n")
        return b"".join(out)

    def _partial(self, out: list[bytes], part: bytes) -> None:
        if not part:
            return
        if self._at_start and part.startswith(b"."):
            out.append(b".")
        out.append(part)
        self._at_start = False

    def _line(self, out: list[bytes], line: bytes) -> None:
        empty = self._at_start and not line
        self._partial(out, line)
        out.append(b"\r\n")
        self._at_start = True
        if self.top is None:
            return
        if self._in_header:
            if empty:
                self._in_header = False
                if self.top == 0:
                    self.done = True
            return
        self._body_lines += 1
        if self._body_lines >= self.top:
            self.done = True
