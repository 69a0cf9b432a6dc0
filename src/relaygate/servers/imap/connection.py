"""One IMAP connection: pymap's connection loop and state machine with relaygate's limits
and login rules (RFC 3501 5.4, RFC 7888 4, RFC 7889; see the service module).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from proxyprotocol.sock import SocketInfo
from pymap.backend.maildir import Config as MaildirConfig
from pymap.backend.maildir import FilterSet
from pymap.context import current_command
from pymap.exceptions import AuthorizationFailure, InvalidAuth, NotAllowedError, ResponseError
from pymap.imap import IMAPConnection
from pymap.imap.state import ConnectionState
from pymap.interfaces.login import IdentityInterface, LoginInterface
from pymap.parsing import Params
from pymap.parsing.command import Command
from pymap.parsing.command.nonauth import AuthenticateCommand, LoginCommand, StartTLSCommand
from pymap.parsing.command.select import FetchCommand
from pymap.parsing.commands import Commands
from pymap.parsing.response import (
    CommandResponse,
    Response,
    ResponseBad,
    ResponseBye,
    ResponseCode,
    ResponseContinuation,
    ResponseNo,
    ResponseOk,
)
from pymap.parsing.state import ExpectContinuation, ParsingInterrupt, ParsingState
from pymap.selected import SelectedMailbox
from pymap.token import AllTokens
from pymap.user import UserMetadata
from pysasl.creds.server import ServerCredentials
from pysasl.exception import MechanismUnusable

from relaygate.interfaces import Account
from relaygate.mail.maildir import ensure_maildir
from relaygate.servers.imap import rawfetch
from relaygate.servers.imap.backend import (
    AccountMailboxes,
    AccountSession,
    FolderLayout,
    RawMaildir,
)
from relaygate.servers.imap.rawfetch import RawFetchOk
from relaygate.servers.listeners import (
    TLS_HANDSHAKE_TIMEOUT,
    Listener,
)

if TYPE_CHECKING:
    from relaygate.servers.imap.service import ImapConfig, ImapService

log = logging.getLogger("relaygate.imap")

#: tagged BAD replies in a row before BYE (pymap's own rule, kept)
CONSECUTIVE_BAD_LIMIT = 5
#: longest command line: RFC 7162 section 4 asks for at least 8192 octets; long
#: UID sets from real clients fit easily in 64 KiB, and the read buffer is capped
MAX_LINE = 64 * 1024
#: seconds a client may stay silent before logging in; it holds a connection
#: without having proved anything (RFC 3501 5.4's 30 minutes is for sessions)
PREAUTH_TIMEOUT = 180.0
#: commands accepted before a successful login; a real client needs about five
MAX_PREAUTH_COMMANDS = 30
#: failed LOGIN/AUTHENTICATE per connection before BYE (throttling is per address too)
MAX_AUTH_FAILURES = 3
#: tagged BAD replies per session before BYE; pymap only counts them in a row
MAX_BAD_COMMANDS = 50
#: seconds spent trying to deliver a BYE to a client that is being dropped
BYE_TIMEOUT = 10.0
#: commands per session: bounds one runaway client; a client polling every 10 s
#: reaches it only after 115 days connected
MAX_SESSION_COMMANDS = 1_000_000
_LITERAL_PLUS = re.compile(rb"\{(\d+)\+\}\r?\n\Z")
#: RFC 3501 9: tag = 1*<ASTRING-CHAR except "+">
_TAG = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c-\x7e]{1,64} ")
#: literal lengths beyond this many digits are refused without int() (Python
#: refuses to convert more than 4300 digits, and no literal needs 13)
_MAX_LENGTH_DIGITS = 12


# -- login ---------------------------------------------------------------------


class Unavailable(ResponseError):
    """A login that cannot be answered now (store or database trouble, lockout)."""

    def __init__(self, text: bytes) -> None:
        super().__init__()
        self._text = text

    def get_response(self, tag: bytes) -> Response:
        return ResponseNo(tag, self._text, ResponseCode.of(b"UNAVAILABLE"))


class CapturedSecret:
    """A pysasl Identity that records the secret it is compared with.

    ``credentials.verify(identity)`` is pysasl's public way to check a secret;
    relaygate checks it itself (argon2id, off the loop), so this identity
    accepts any secret and keeps it for :meth:`Directory.authenticate`.
    """

    def __init__(self) -> None:
        self.secret: str | None = None

    @property
    def authcid(self) -> str:
        return ""

    def compare_authcid(self, authcid: str) -> bool:
        return True

    def compare_secret(self, secret: str) -> bool:
        self.secret = secret
        return True

    def get_clear_secret(self) -> str | None:
        return None


def valid_text(value: str) -> bool:
    # pymap decodes LOGIN arguments with surrogateescape: invalid UTF-8 survives
    # as lone surrogates, which neither SQLite nor argon2 can encode.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


class Identity(IdentityInterface):
    """A logged-in relaygate account, as pymap sees it."""

    def __init__(self, account: Account, config: MaildirConfig, typed: str) -> None:
        self.account = account
        self.config = config
        #: the login name as the client typed it (the SASL authzid is compared to it)
        self.typed = typed

    @property
    def name(self) -> str:
        return self.account.login

    @property
    def roles(self) -> frozenset[str]:
        return frozenset()

    async def new_token(self, *, expiration: datetime | None = None) -> str | None:
        return None

    @asynccontextmanager
    async def new_session(self) -> AsyncIterator[AccountSession]:
        root = self.account.maildir
        await asyncio.to_thread(ensure_maildir, root)
        layout = FolderLayout(str(root), RawMaildir)
        inbox = RawMaildir(str(root), create=False)
        yield AccountSession(self.account, self.config, AccountMailboxes(inbox, layout),
                       FilterSet(str(root)))

    # pymap's user-administration API (its admin gRPC service): relaygate
    # manages users with ``relaygate users``, never through IMAP.
    async def get(self) -> UserMetadata:
        raise NotAllowedError("User metadata is managed by relaygate.")

    async def set(self, metadata: UserMetadata) -> int | None:
        raise NotAllowedError("User metadata is managed by relaygate.")

    async def delete(self) -> None:
        raise NotAllowedError("User metadata is managed by relaygate.")


class Login(LoginInterface):
    """Checks LOGIN/AUTHENTICATE credentials against the relaygate directory.

    One per connection: it knows the client address.
    """

    def __init__(self, service: ImapService, conn: ConnInfo) -> None:
        self._service = service
        self._conn = conn

    @property
    def tokens(self) -> AllTokens:
        return self._service.tokens

    async def authenticate(self, credentials: ServerCredentials) -> Identity:
        svc = self._service
        captured = CapturedSecret()
        try:
            usable = credentials.verify(captured)
        except MechanismUnusable:
            usable = False
        login = credentials.authcid
        password = captured.secret
        if not usable or password is None:
            raise InvalidAuth()
        if not valid_text(login):
            login = login.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            login = login.replace("\x00", "\ufffd")
            password = secrets.token_hex(16)
        elif not valid_text(password):
            # No stored password can match; still ask the directory, so the
            # failure is counted and costs the usual time.
            password = secrets.token_hex(16)
        result = await svc.check_password(login, password, self._conn)
        if result.throttled:
            raise Unavailable(b"Too many failed logins; try again later.")
        if result.account is None or not result.ok:
            raise InvalidAuth()
        return Identity(result.account, svc.config, credentials.authcid)

    async def authorize(self, authenticated: IdentityInterface, authzid: str) -> Identity:
        if not isinstance(authenticated, Identity):
            raise AuthorizationFailure()
        wanted = authzid.lower()
        if wanted and wanted not in (authenticated.typed.lower(), authenticated.name.lower()):
            raise AuthorizationFailure()
        return authenticated


# -- the connection ------------------------------------------------------------


@dataclass
class ConnInfo:
    """Per-connection facts and counters shared by the adapter's pieces."""

    ip: str | None
    peer: str
    listener: Listener
    tls: bool
    plaintext_ok: bool
    authenticated: bool = False
    account: Account | None = None
    commands: int = 0
    bad: int = 0
    auth_failures: int = 0
    bad_in_a_row: int = 0
    #: set when the session must end: the BYE text
    kick: bytes | None = None
    refresher: asyncio.Task[None] | None = field(default=None, repr=False)


class Disconnect(EOFError):
    """End the session quietly (the BYE, if any, has been sent). pymap breaks on EOFError."""


class Refused(Command):
    """A command the adapter answers itself, before pymap sees it."""

    command = b"[REFUSED]"

    def __init__(self, tag: bytes, response: CommandResponse) -> None:
        super().__init__(tag)
        self.response = response

    @classmethod
    def parse(cls, buf: memoryview, params: Params) -> tuple[Command, memoryview]:
        # Never registered, so pymap never parses one; defined because Command requires it.
        return cls(params.tag, ResponseBad(params.tag, b"Invalid command.")), buf[0:0]


class SessionState(ConnectionState):
    """pymap's per-connection state machine, with relaygate's login rules."""

    def __init__(self, login: Login, config: ImapConfig, conn: ConnInfo,
                 service: ImapService) -> None:
        super().__init__(login, config)
        self._conn = conn
        self._service = service
        if conn.tls and b"STARTTLS" in self._capability:
            self._capability.remove(b"STARTTLS")

    async def do_greeting(self) -> CommandResponse:
        # Replaces pymap's, which allows plaintext logins from any loopback
        # *client*; relaygate decides by listener (and TLS), see ConnInfo.
        self.auth = self.config.tls_auth if self._conn.plaintext_ok else self.config.initial_auth
        return ResponseOk(b"*", self.config.greeting, self.capability)

    async def do_command(self, cmd: Command) -> CommandResponse:
        if isinstance(cmd, Refused):
            return cmd.response
        return await super().do_command(cmd)

    async def do_authenticate(self, cmd: AuthenticateCommand | LoginCommand,
                              creds: ServerCredentials | None) -> CommandResponse:
        if self._session is not None:
            # pymap runs AUTHENTICATE without its state check: a second login
            # on one connection would open a second session.
            return ResponseBad(cmd.tag, b"Already authenticated.")
        try:
            response = await super().do_authenticate(cmd, creds)
        except (InvalidAuth, Unavailable):
            self._fail()
            raise
        except ResponseError:
            raise
        except Exception:
            log.exception("IMAP login from %s failed unexpectedly", self._conn.peer)
            raise Unavailable(b"Login temporarily unavailable.") from None
        if creds is None:
            self._fail()
            return response
        session = self.session
        assert isinstance(session, AccountSession)
        await self._service.logged_in(session.account, self._conn)
        return response

    async def do_fetch(self, cmd: FetchCommand) -> tuple[CommandResponse,
                                                         SelectedMailbox | None]:
        if not rawfetch.eligible(cmd.attributes):
            return await super().do_fetch(cmd)
        return await rawfetch.fetch(self.session, self.selected, cmd)

    def _fail(self) -> None:
        self._conn.auth_failures += 1
        if self._conn.auth_failures >= MAX_AUTH_FAILURES:
            self._conn.kick = b"Too many failed logins."


class Connection(IMAPConnection):
    """pymap's connection loop with relaygate's limits on everything it reads."""

    def __init__(self, commands: Commands, config: ImapConfig, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, sock_info: SocketInfo, conn: ConnInfo,
                 service: ImapService) -> None:
        super().__init__(commands, config, reader, writer, sock_info)
        self.conn = conn
        self.service = service
        self.budget = 0
        self.closing = False

    # limits and timeouts

    @property
    def timeout(self) -> float:
        idle = self.service.settings.imap.idle_timeout
        return idle if self.conn.authenticated else min(idle, PREAUTH_TIMEOUT)

    @property
    def literal_cap(self) -> int:
        imap = self.service.settings.imap
        return imap.max_literal if self.conn.authenticated else imap.max_literal_unauth

    async def bye(self, text: bytes, code: bytes | None = None) -> None:
        """Send BYE, then end the session (raises :class:`Disconnect`)."""
        if not self.closing:
            self.closing = True
            resp = ResponseBye(text, ResponseCode.of(code) if code else None)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(BYE_TIMEOUT):
                    await self._write(resp)
        raise Disconnect()

    async def _read(self, coro: Awaitable[bytes]) -> bytes:
        # asyncio.timeout, not wait_for: no extra task, no extra trip through
        # the loop (see start_tls for why that matters)
        try:
            async with asyncio.timeout(self.timeout):
                return await coro
        except TimeoutError:
            await self.bye(b"Autologout; idle for too long.")
            raise  # unreachable: bye() raises

    def _charge(self, n: int) -> bool:
        self.budget -= n
        return self.budget >= 0

    async def _line(self) -> bytes:
        try:
            line = await self._read(self.reader.readline())
        except ValueError:  # asyncio: the line is longer than the stream limit
            await self.bye(b"Command line too long.", b"TOOBIG")
            raise
        if not self._charge(len(line)):
            await self.bye(b"Command too large.", b"TOOBIG")
        return line

    async def readline(self) -> memoryview:
        # pymap's version reads LITERAL+ literals of any size (RFC 7888); here
        # each must fit the literal cap and the command's byte budget.
        buf = bytearray(await self._line())
        while True:
            if not buf.endswith(b"\n"):
                raise EOFError()
            m = _LITERAL_PLUS.search(buf)
            if m is None:
                return memoryview(buf)
            digits = m.group(1)
            n = int(digits) if len(digits) <= _MAX_LENGTH_DIGITS else -1
            if n < 0 or n > self.literal_cap or not self._charge(n):
                await self.bye(b"Literal too large.", b"TOOBIG")
            buf += await self._read(self.reader.readexactly(n))
            buf += await self._line()

    async def read_continuation(self, literal_length: int) -> memoryview:
        extra = b""
        if literal_length:
            extra = await self._read(self.reader.readexactly(literal_length))
        line = await self.readline()
        return memoryview(extra + bytes(line))

    async def read_command(self, state: ConnectionState) -> Command:
        conn = self.conn
        if conn.kick is not None:
            await self.bye(conn.kick)
        conn.commands += 1
        if conn.commands > (MAX_SESSION_COMMANDS if conn.authenticated
                            else MAX_PREAUTH_COMMANDS):
            await self.bye(b"Too many commands.")
        cap = self.literal_cap
        self.budget = cap + MAX_LINE
        line = await self.readline()
        conts: list[memoryview] = []
        while True:
            params = self.params.copy(ParsingState(continuations=conts))
            try:
                cmd, _ = self.commands.parse(line, params)
            except ParsingInterrupt as interrupt:
                expected = interrupt.expected
                if not isinstance(expected, ExpectContinuation):
                    return self._refuse(line, b"Unexpected command structure.")
                n = expected.literal_length
                if n > cap or n > self.budget:
                    # A synchronizing literal: the client waits for "+", so
                    # refusing leaves the stream in sync (RFC 7889 TOOBIG).
                    return Refused(tag_of(line), ResponseNo(
                        tag_of(line), b"Literal too large.", ResponseCode.of(b"TOOBIG")))
                self.budget -= n
                await self.write_response(ResponseContinuation(expected.message))
                conts.append(await self.read_continuation(n))
            except Exception:
                # e.g. int() of a 5000-digit literal length inside pymap's parser
                log.debug("unparseable IMAP command from %s", conn.peer, exc_info=True)
                return self._refuse(line, b"Invalid command.")
            else:
                return cmd

    def _refuse(self, line: memoryview | bytes, text: bytes) -> Refused:
        tag = tag_of(line)
        return Refused(tag, ResponseBad(tag, text))

    async def read_idle_done(self, cmd: Any) -> bool:
        self.budget = MAX_LINE
        return await super().read_idle_done(cmd)

    async def authenticate(self, state: ConnectionState, mech_name: bytes) \
            -> ServerCredentials | None:
        self.budget = MAX_LINE * 2
        return await super().authenticate(state, mech_name)

    # writing

    async def _write(self, resp: Response) -> None:
        writer = self.writer
        if isinstance(resp, CommandResponse):
            if isinstance(resp, RawFetchOk):
                await rawfetch.send(resp, writer)  # chunks built in a thread
            # One untagged response at a time, draining in between, so FETCH
            # 1:* BODY[] holds one message in memory, not the whole mailbox.
            for untagged in resp._untagged:
                await untagged.async_write(writer)
                await writer.drain()
            Response.write(resp, writer)
        else:
            await resp.async_write(writer)
        await writer.drain()

    async def write_response(self, resp: Response) -> None:
        conn = self.conn
        if isinstance(resp, CommandResponse) and resp.tag not in (b"*", b"+"):
            if isinstance(resp, ResponseBad):
                conn.bad += 1
                conn.bad_in_a_row += 1
                if conn.bad >= MAX_BAD_COMMANDS:
                    conn.kick = b"Too many errors."
            else:
                conn.bad_in_a_row = 0
            if (isinstance(resp, ResponseOk)
                    and isinstance(current_command.get(None), StartTLSCommand)):
                # Written without a trip through the loop: the client's TLS
                # ClientHello may follow at once, and must reach the TLS layer
                # that start_tls() installs, not the plaintext read buffer.
                resp.write(self.writer)
                return
        try:
            async with asyncio.timeout(self.service.settings.imap.idle_timeout):
                await self._write(resp)
                if conn.bad_in_a_row >= CONSECUTIVE_BAD_LIMIT:
                    # pymap adds its BYE after writing the reply, so it never
                    # reaches the client; pymap then closes the connection.
                    conn.bad_in_a_row = 0
                    await self._write(ResponseBye(b"Too many errors, disconnecting."))
        except (TimeoutError, ConnectionError, OSError):
            # the client stopped reading (or is gone): drop it
            self.closing = True
            self.writer.transport.abort()
            raise Disconnect() from None

    async def send_error_disconnect(self) -> None:
        if self.closing:
            return
        self.closing = True
        with contextlib.suppress(Exception):
            await super().send_error_disconnect()

    async def start_tls(self) -> None:
        # Bytes that arrived after STARTTLS, before the handshake, were sent in
        # plaintext: executing them as if protected is CVE-2011-0411's bug.
        if getattr(self.reader, "_buffer", b""):
            log.info("IMAP client %s pipelined data after STARTTLS; disconnecting",
                     self.conn.peer)
            raise ConnectionError("data after STARTTLS")
        # Called right after the OK was written, with no await in between:
        # loop.start_tls pauses reading before anything else reads the socket.
        await self.writer.start_tls(self.config.ssl_context,
                                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        self.conn.tls = True


def tag_of(line: memoryview | bytes) -> bytes:
    m = _TAG.match(bytes(line[:80]))
    return m.group(0)[:-1] if m else b"*"


