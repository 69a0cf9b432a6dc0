"""The SMTP services: smtp, submission and smtps listeners on aiosmtpd, and ``--stdio``.

Theory of operation
-------------------
aiosmtpd speaks the protocol (RFC 5321, ESMTP SIZE RFC 1870, 8BITMIME
RFC 6152, STARTTLS RFC 3207, AUTH RFC 4954); :class:`RelaySMTP` is a thin
subclass that adds what a public server needs and aiosmtpd leaves out, and
:class:`relaygate.servers.smtp.handler.RelayHandler` makes every decision.
The subclass:

- offers PIPELINING (RFC 2920): commands are taken one at a time from the
  input buffer, as always, but a reply is held while the next command is
  already buffered, and the held replies go out in one write when the buffer
  holds no complete command (the client is then waiting), or at once before
  the client must act on them (``354``, ``334``, the ``220`` before a TLS
  handshake, ``221``/``421`` before a close). The plaintext bytes still
  buffered when STARTTLS's handshake starts are thrown away (aiosmtpd),
  so commands injected behind STARTTLS are never run inside TLS;
- parses MAIL/RCPT paths with relaygate's strict RFC 5321 parser instead of
  the RFC 5322 header parser (which silently drops source routes and
  comments), so the handler sees exactly what the client sent;
- limits connections per client address (``421 4.7.0``), ends a session with
  ``421 4.7.0`` after ``bad_command_limit`` error replies or
  ``max_refused_recipients`` refused recipients, and says ``421 4.4.2``
  before closing an idle connection;
- times DATA by inactivity (``data_timeout`` since the last bytes), not by
  the command timeout, so a large message on a slow link is not cut off;
- refuses AUTH inside a mail transaction (RFC 4954 section 4) and accepts
  mechanism names in any case.

Services (``make_services``): ``smtp`` (port 25 style; STARTTLS when a
certificate is configured), ``submission`` (RFC 6409; same rules, STARTTLS)
and ``smtps`` (RFC 8314 implicit TLS, only with a certificate). All share one
handler and one per-address connection count. Plaintext AUTH is offered only
after TLS, unless the listener is loopback (and ``loopback_plaintext_auth``),
or ``smtp.auth_require_tls = false`` / ``auth.allow_plaintext = true``.

``serve_stdio`` runs one session on descriptors 0 and 1 (qmail-smtpd's place
under tcpserver): the client address comes from ``$TCPREMOTEIP`` and the
relay decision from ``$RELAYCLIENT`` (read by the command, passed in here).
The protocol runs on one end of a socketpair and two pumps copy bytes between
the other end and stdin/stdout, so STARTTLS and timeouts work as on a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import ssl
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AnyStr

from aiosmtpd.smtp import SMTP, TLSSetupException, _AuthMechAttr, login_always_fail, syntax

from relaygate.addresses import is_loopback
from relaygate.decision import Decision, Verdict
from relaygate.mail.rcpthosts import RcptHosts
from relaygate.protocols.smtp_address import split_path
from relaygate.protocols.smtp_data import DataDecoder
from relaygate.servers.accept import Peer
from relaygate.servers.listeners import (
    AddressLimiter,
    Listen,
    Listener,
    parse_listen,
    peer_address,
    proxy_policy,
    tls_context_of,
)
from relaygate.servers.smtp.data import IncomingMessage
from relaygate.servers.smtp.handler import (
    ClientState,
    RelayEnvelope,
    RelayHandler,
    RelaySession,
)

if TYPE_CHECKING:
    from relaygate.context import Context
    from relaygate.interfaces import Service

log = logging.getLogger("relaygate.smtp")

IDENT = "ESMTP relaygate"
#: RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
COMMAND_LINE_LIMIT = 512
#: RFC 1870 3: SIZE adds up to 26 octets to a MAIL command line.
SIZE_PARAMETER_EXTRA = 26
#: bytes moved per read by the --stdio pumps
PUMP_CHUNK = 65536
#: exceptions a client causes (not relaygate bugs): logged as one info line
CLIENT_FAILURES: tuple[type[BaseException], ...] = (
    TLSSetupException, ConnectionError, TimeoutError, ssl.SSLError,
    asyncio.IncompleteReadError)
#: bytes taken from the connection at a time during DATA
DATA_READ_SIZE = 64 * 1024
#: how often stop() looks for sessions that finished their transaction
STOP_POLL = 0.05
#: a timer firing this close to its session's deadline times the session out
TIMER_SLACK = 0.01
#: replies held for pipelined commands are written once they reach this many bytes
HELD_REPLIES_LIMIT = 16 * 1024
#: replies written at once (with those held before them): TLS handshake next, or a close
_WRITE_AT_ONCE = (b"220", b"221", b"421")
#: a trusted proxy's own connection (PROXY v2 LOCAL: a health check) relays nothing
PROXY_LOCAL = Decision(Verdict.DENY, "the proxy's own connection (PROXY LOCAL)", "proxy")


@dataclass(frozen=True)
class ListenerInfo:
    """Per-listener facts a session needs."""

    service: str
    plaintext_auth: bool
    implicit_tls: bool = False
    #: ``--stdio``: the client address from $TCPREMOTEIP (None: unknown)
    ip_override: str | None = None
    use_override: bool = False
    fixed: Decision | None = None


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with limits, strict paths and relaygate's session state."""

    client: ClientState

    def __dir__(self) -> list[str]:
        # aiosmtpd's __init__ finds smtp_*/auth_* methods with dir() and
        # inspect.getmembers() on every new connection, which evaluates every
        # attribute (about a millisecond a connection); list only those names.
        return _SMTP_NAMES

    def __init__(self, handler: RelayHandler, *, info: ListenerInfo, owner: SmtpService,
                 data_timeout: float, bad_command_limit: int, max_refused: int,
                 peer: Peer | None = None, **kwargs: Any) -> None:
        # aiosmtpd keeps these limits in a class-level dict that every
        # connection would share and grow; give each connection its own.
        self.command_size_limits = _command_limits()
        if _FAST_INIT and kwargs.keys() <= _FAST_INIT_ARGS:
            self._fast_init(handler, **kwargs)
        else:
            super().__init__(handler, **kwargs)
        self._info = info
        self._peer = peer
        self._owner = owner
        self._data_timeout = data_timeout
        self._bad_limit = bad_command_limit
        self._max_refused = max_refused
        self._bad = 0
        self._in_data = False
        self._last_read = 0.0
        self._refused = False
        self._gone = False
        self._eof_pending = False
        self._incoming: IncomingMessage | None = None
        self._deadline = 0.0
        self._timer_armed = False
        #: replies held while more pipelined commands wait in the input buffer
        self._held: list[bytes] = []
        self._held_size = 0
        self.client = ClientState(None, info.service, info.plaintext_auth,
                                  tls=info.implicit_tls, fixed=info.fixed)

    def _fast_init(self, handler: RelayHandler, *, hostname: str, ident: str,
                   data_size_limit: int, tls_context: ssl.SSLContext | None, timeout: float,
                   auth_require_tls: bool, loop: asyncio.AbstractEventLoop,
                   enable_SMTPUTF8: bool = False, decode_data: bool = False) -> None:
        """aiosmtpd's ``SMTP.__init__`` for the options relaygate uses, minus its inspection.

        aiosmtpd looks for ``smtp_*``/``auth_*``/``handle_*`` methods with
        ``inspect.getmembers`` and reads ``handle_EHLO``'s signature on every
        connection: a fifth of the CPU of a one-message session. The names are
        the same every time, so they are found once (``_SMTP_NAMES``,
        ``_HANDLER_NAMES``) and only bound here. The attributes set are
        aiosmtpd 1.4's; tests/servers/smtp/test_smtp_limits.py compares them
        with what aiosmtpd's own ``__init__`` sets, so an aiosmtpd that sets
        more fails the tests instead of breaking sessions.
        """
        self.__ident__ = ident
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = tls_context and False
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = auth_require_tls
        self._proxy_timeout = None
        self._auth_callback = login_always_fail
        self._authenticator = None
        self._auth_required = False
        # aiosmtpd declares these as dicts; it only reads them as mappings
        objects = (self, handler)
        self._auth_methods = _Bound(objects, _AUTH_MECHANISMS, auth=True)  # type: ignore[assignment]
        self._handle_hooks = _Bound(objects, _HANDLER_HOOKS)  # type: ignore[assignment]
        self._ehlo_hook_ver = "new"
        self._smtp_methods = _Bound(objects, _SMTP_COMMANDS)  # type: ignore[assignment]
        self._enforce_call_limit = False

    # -- connection bookkeeping ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:
            self.client.ip = self._client_ip(transport)
            if not self._owner.limiter.acquire(self.client.ip):
                self._refused = True
                log.warning("too many connections from %s", self.client.ip)
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(f"421 4.7.0 {self.hostname} too many connections from your "
                                "address, try again later\r\n".encode("ascii", "replace"))
                transport.close()
                return
            self._owner.opened(self)
        else:
            # STARTTLS: RFC 3207 4.2, forget what the client told us before.
            self.client.account = None
            self.client.tls = True
        self._last_read = self.loop.time()
        super().connection_made(transport)
        peer = self._peer
        if peer is not None and peer.proxy is not None and self.session is not None:
            # aiosmtpd took the proxy's address from the socket: name the client
            self.session.peer = (peer.ip, peer.port)  # type: ignore[assignment]

    def _client_ip(self, transport: asyncio.BaseTransport) -> str | None:
        if self._info.use_override:
            return self._info.ip_override
        if self._peer is not None:
            return self._peer.ip  # worked out at accept (PROXY header included)
        return peer_address(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if not self._gone:
            self._gone = True
            self._owner.limiter.release(self.client.ip)
            self._owner.closed(self)
        if self._handler_coroutine is None:
            return
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        # aiosmtpd drops every command still buffered when the client half-closes
        # (a script piping a whole session into --stdio does that): answer them
        # first, then close (see push()).
        if not self.client.tls and b"\n" in self._buffered() and self._handler_coroutine \
                and not self._handler_coroutine.done():
            self._eof_pending = True
            return True
        return super().eof_received()

    def _buffered(self) -> bytes | bytearray:
        buffer: bytes | bytearray = getattr(self._reader, "_buffer", b"")
        return buffer

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        super().data_received(data)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's, without a new timer for every command.

        aiosmtpd cancels the timer and makes a new one for each command; here
        a command only moves the deadline on, and a timer that fires before
        it re-arms itself for the rest.
        """
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is not None:
            if self._timer_armed and not handle.cancelled() and handle.when() <= self._deadline:
                return
            handle.cancel()
        self._timer_armed = True
        self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer_armed = False
        if self._deadline - self.loop.time() > TIMER_SLACK:
            self._timer_armed = True
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        if self._in_data:
            idle = self.loop.time() - self._last_read
            incoming = self._incoming
            if incoming is not None and incoming.waiting:
                idle = 0.0  # waiting for the disk, not for the client
            if idle < self._data_timeout:
                self._reset_timeout(self._data_timeout - idle)
                return
        log.info("timeout for %s", self.client.shown_ip)
        self._say(f"421 4.4.2 {self.hostname} timeout, closing connection")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _say(self, line: str | None) -> None:
        """Write the held replies and a final line straight to the transport (no flow control)."""
        data = b"".join(self._held)
        self._held.clear()
        self._held_size = 0
        if line is not None:
            data += line.encode("ascii", "replace") + b"\r\n"
        transport = self.transport
        if data and isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            with contextlib.suppress(Exception):
                transport.write(data)

    @property
    def busy(self) -> bool:
        """True while a mail transaction is open (stop() lets it finish)."""
        env = self.envelope
        return self._in_data or bool(env is not None and env.mail_from)

    def shutdown(self, text: str = "Service shutting down") -> None:
        self._say(f"421 4.3.2 {self.hostname} {text}")
        if self.transport is not None:
            self.transport.close()

    # -- replies and budgets -------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        """Queue a reply; write what is queued when the client waits for it (RFC 2920).

        Replies to pipelined commands are held while the next command is
        already in the input buffer, and written together, in one write, once
        the buffer holds no complete command: the client is then waiting.
        Replies the client must see before it sends more (``3xx`` such as
        ``354`` and ``334``, the ``220`` before a TLS handshake, ``221`` and
        ``421`` before a close) are written at once.
        """
        response = status if isinstance(status, bytes) else status.encode(
            "utf-8" if self.enable_SMTPUTF8 else "ascii")
        self._held.append(response + b"\r\n")
        self._held_size += len(response) + 2
        if (response[:1] == b"3" or response[:3] in _WRITE_AT_ONCE
                or self._held_size >= HELD_REPLIES_LIMIT or b"\n" not in self._buffered()):
            data = b"".join(self._held)
            self._held.clear()
            self._held_size = 0
            self._writer.write(data)
            await self._writer.drain()
        if self._eof_pending and b"\n" not in self._buffered() and self.transport is not None:
            self.transport.close()
        first = status[:1]
        if first not in ("5", b"5"):
            self.client.policy_reply = False
            return
        if self.client.policy_reply:
            self.client.policy_reply = False
            if self.client.refused_recipients < self._max_refused:
                return
            why = "too many refused recipients"
        else:
            self._bad += 1
            if self._bad < self._bad_limit:
                return
            why = "too many errors"
        # The client's doing, handled: an info line, not one of the "last errors".
        log.info("ending session with %s: %s", self.client.shown_ip, why)
        self._say(f"421 4.7.0 {self.hostname} {why}, closing connection")
        if self.transport is not None:
            self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        """A client's failure (TLS setup, reset, timeout) is an info line; ours go on.

        Tracebacks are for relaygate's own bugs (the handler logs those); a client
        that sends garbage after STARTTLS or goes away mid-command is not one.
        """
        if isinstance(error, CLIENT_FAILURES):
            cause = error.__cause__ if isinstance(error, TLSSetupException) else error
            what = "TLS handshake failed" if isinstance(error, TLSSetupException) \
                else "connection failed"
            log.info("%s with %s: %s", what, self.client.shown_ip, _describe(cause))
            self._say(None)  # the replies held for the commands before
            if self.transport is not None:
                self.transport.close()
            return "421 4.7.0 connection failed, closing"
        status: str = await super().handle_exception(error)
        return status

    # -- commands --------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """RFC 5321 4.1.1.4, with the message written to disk as it arrives.

        aiosmtpd's own DATA keeps the whole message in memory as a list of lines;
        here the data goes through a DataDecoder (end of data, dot-unstuffing,
        bare CR/LF and line length noted) to the handler's files. Whatever is
        wrong with a message, the client's data is read to its end before the
        reply (RFC 5321 4.2.5), and nothing of a refused message stays on disk.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert isinstance(envelope, RelayEnvelope)
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        handler = self.event_handler
        assert isinstance(handler, RelayHandler)
        opened = await handler.begin_data(self, self.session, envelope)
        if isinstance(opened, str):
            await self.push(opened)
            return
        incoming = opened
        self._incoming = incoming
        self._in_data = True
        self._last_read = self.loop.time()
        self._reset_timeout(self._data_timeout)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            decoder = DataDecoder()
            if not await self._receive(decoder, incoming):
                return
            reply = await handler.end_data(self, self.session, envelope, incoming, decoder)
        finally:
            incoming.discard()  # refused, failed or cut off; a committed message is not touched
            self._incoming = None
            self._in_data = False
            if self.transport is not None:
                self._reset_timeout()
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(reply)

    async def _receive(self, decoder: DataDecoder, incoming: IncomingMessage) -> bool:
        """Read the data to its end into ``incoming``; False when the client went away."""
        limit = self.data_size_limit
        reader = self._reader
        while not decoder.done:
            data = await reader.read(DATA_READ_SIZE)
            if not data:
                log.info("connection from %s closed during DATA", self.client.shown_ip)
                if self.transport is not None:
                    self.transport.close()
                return False
            content, used = decoder.feed(data)
            if used < len(data):
                self._unread(data[used:])  # the client's next commands, pipelined
            if incoming.discarded:
                continue
            if decoder.bare or decoder.too_long or (limit and decoder.size > limit):
                incoming.discard()  # refused at the end; stop writing now
                continue
            await incoming.add(content)
            self._last_read = self.loop.time()
        return True

    def _unread(self, rest: bytes) -> None:
        """Put bytes read past the end of data back in front of the reader's buffer."""
        buffer = getattr(self._reader, "_buffer", None)
        assert isinstance(buffer, bytearray), "asyncio.StreamReader without its buffer"
        buffer[:0] = rest

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if self.envelope is not None and self.envelope.mail_from:
            await self.push("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        if arg:
            mechanism, sp, rest = arg.partition(" ")
            arg = mechanism.upper() + sp + rest
        await super().smtp_AUTH(arg)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        await super().smtp_EHLO(hostname)
        # aiosmtpd adds the SIZE allowance on every EHLO; keep it fixed.
        self.command_size_limits["MAIL"] = COMMAND_LINE_LIMIT + SIZE_PARAMETER_EXTRA

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The raw path (the handler parses it) and the parameters; ``<>`` for the null path."""
        if not arg.strip():
            return "", ""
        split = split_path(arg)
        if split is None:
            return None, None
        path, rest = split
        return (path or "<>"), rest

    def _create_session(self) -> RelaySession:
        return RelaySession(self.loop)

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()


def _describe(exc: BaseException | None) -> str:
    """One line for a client's failure: the exception's name and text, no traceback."""
    if exc is None:
        return "unknown reason"
    text = str(exc).replace("\r", " ").replace("\n", " ")[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: the names aiosmtpd looks up on the protocol object (see RelaySMTP.__dir__)
_SMTP_NAMES = sorted(n for n in dir(RelaySMTP) if n.startswith(("smtp_", "auth_")))
#: command -> (0: on the protocol, attribute); likewise the handler's hooks (1: on the handler)
_SMTP_COMMANDS = {n[5:]: (0, n) for n in _SMTP_NAMES if n.startswith("smtp_")}
_HANDLER_HOOKS = {n[7:]: (1, n) for n in dir(RelayHandler) if n.startswith("handle_")}
#: AUTH mechanism -> where, as aiosmtpd names them: a handler's auth_X replaces the protocol's
_AUTH_MECHANISMS = {
    getattr(getattr(cls, n), "__auth_mechanism_name__",
            n.replace("auth_", "").replace("__", "-")): (which, n)
    for which, cls in enumerate((RelaySMTP, RelayHandler))
    for n in sorted(dir(cls)) if n.startswith("auth_")}


class _Bound(Mapping[str, Any]):
    """A name -> bound method table (aiosmtpd's dicts), each method bound when first used.

    A session uses five or six of its twenty-odd commands and hooks: binding
    them all up front was most of what a session's set-up still cost.
    """

    __slots__ = ("_auth", "_bound", "_names", "_objects")

    def __init__(self, objects: tuple[Any, Any], names: dict[str, tuple[int, str]], *,
                 auth: bool = False) -> None:
        self._objects = objects
        self._names = names
        self._auth = auth
        self._bound: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        try:
            return self._bound[key]
        except KeyError:
            which, attr = self._names[key]
        found: Any = getattr(self._objects[which], attr)
        if self._auth:
            found = _AuthMechAttr(found, which == 0)
        self._bound[key] = found
        return found

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


#: keyword arguments _fast_init takes; anything else goes to aiosmtpd's __init__
_FAST_INIT_ARGS = {"hostname", "ident", "data_size_limit", "tls_context", "timeout",
                   "auth_require_tls", "loop", "enable_SMTPUTF8", "decode_data"}
#: off: every connection through aiosmtpd's own __init__ (the tests compare the two)
_FAST_INIT = True


def _command_limits() -> Any:
    import collections

    return collections.defaultdict(lambda: COMMAND_LINE_LIMIT)


class SmtpService:
    """One kind of SMTP listener (smtp, submission or smtps) on one or more addresses."""

    def __init__(self, name: str, ctx: Context, handler: RelayHandler,
                 listens: list[Listen], *, tls_context: ssl.SSLContext | None,
                 implicit_tls: bool = False, limiter: AddressLimiter | None = None) -> None:
        self.name = name
        self.ctx = ctx
        self.handler = handler
        self.listens = listens
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        s = ctx.settings.smtp
        self.limiter = limiter or AddressLimiter(s.max_connections_per_ip,
                                                 ctx.settings.ipv6_prefix)
        self._listeners: list[Listener] = []
        self.sessions: set[RelaySMTP] = set()
        self._started = False
        #: called when the last session closes (``serve_stdio`` waits on it)
        self.on_empty: Callable[[], None] | None = None

    @property
    def bound(self) -> list[str]:
        """The addresses bound, as shown (``127.0.0.1:2525``, ``[::1]:2525``, ``unix:PATH``)."""
        return [addr for listener in self._listeners for addr in listener.addresses]

    def listeners(self) -> list[str]:
        shown = self.bound or [str(x) for x in self.listens]
        return [f"{self.name} {x}" for x in shown]

    def plaintext_auth(self, loopback: bool) -> bool:
        """May AUTH PLAIN/LOGIN run without TLS on a listener of this kind?"""
        st = self.ctx.settings
        return (not st.smtp.auth_require_tls or st.auth.allow_plaintext
                or (loopback and st.smtp.loopback_plaintext_auth))

    def make_protocol(self, info: ListenerInfo, peer: Peer | None = None) -> RelaySMTP:
        st = self.ctx.settings
        s = st.smtp
        if peer is not None and peer.proxy is not None:
            # Forwarded by a trusted proxy: the client's address decides, not the listener's.
            info = dataclasses.replace(
                info, plaintext_auth=self.plaintext_auth(peer.ip is not None
                                                         and is_loopback(peer.ip)),
                fixed=PROXY_LOCAL if peer.local else info.fixed)
        starttls = None if self.implicit_tls else self.tls_context
        return RelaySMTP(
            self.handler, info=info, owner=self,
            data_timeout=s.data_timeout, bad_command_limit=s.bad_command_limit,
            max_refused=s.max_refused_recipients, peer=peer,
            hostname=self.handler.hostname, ident=IDENT,
            data_size_limit=s.max_message_size, tls_context=starttls,
            timeout=s.command_timeout,
            auth_require_tls=not (info.plaintext_auth or info.implicit_tls),
            enable_SMTPUTF8=False, decode_data=False,
            loop=asyncio.get_running_loop())

    def _factory(self, listener: Listener) -> Callable[[Peer], RelaySMTP]:
        def make(peer: Peer) -> RelaySMTP:
            # listener.loopback is known: accepting starts once the bound addresses are seen
            info = ListenerInfo(self.name, self.plaintext_auth(listener.loopback),
                                self.implicit_tls)
            return self.make_protocol(info, peer)

        return make

    async def start(self) -> None:
        tls = self.tls_context if self.implicit_tls else None
        self._listeners = []
        try:
            for listen in self.listens:
                listener = Listener(self.name, listen)
                self._listeners.append(listener)
                await listener.bind(self._factory(listener), tls=tls,
                                    proxies=proxy_policy(self.ctx.settings))
        except BaseException:
            for listener in self._listeners:
                listener.close()
            self._listeners.clear()
            raise
        self.handler.retain()
        self._started = True

    def opened(self, proto: RelaySMTP) -> None:
        self.sessions.add(proto)
        self.ctx.metrics.connections.labels(self.name).inc()

    def closed(self, proto: RelaySMTP) -> None:
        if proto in self.sessions:
            self.sessions.discard(proto)
            self.ctx.metrics.connections.labels(self.name).dec()
            if not self.sessions and self.on_empty is not None:
                self.on_empty()

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; idle sessions get 421, open transactions up to ``grace`` seconds."""
        for listener in self._listeners:
            listener.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.sessions:
            for proto in list(self.sessions):
                if not proto.busy:
                    proto.shutdown()
                    self.closed(proto)
            if not self.sessions or loop.time() >= deadline:
                break
            await asyncio.sleep(STOP_POLL)
        for proto in list(self.sessions):
            proto.shutdown("Service shutting down, transaction aborted")
            self.closed(proto)
        for listener in self._listeners:
            await listener.wait_closed(1.0)
        if self._started:
            self._started = False
            self.handler.release()

    def reload(self) -> None:
        """SIGHUP: re-read rcpthosts (shared by every SMTP service)."""
        self.handler.reload()


def make_services(ctx: Context) -> list[Service]:
    """smtp, submission and (with a certificate) smtps services from ``ctx.settings``."""
    s = ctx.settings
    handler = RelayHandler(ctx, RcptHosts.from_settings(s))
    limiter = AddressLimiter(s.smtp.max_connections_per_ip, s.ipv6_prefix)
    tls = tls_context_of(ctx)
    out: list[Service] = []
    kinds = (("smtp", "smtp.listen", s.smtp.listen, False),
             ("submission", "smtp.submission", s.smtp.submission, False),
             ("smtps", "smtp.smtps", s.smtp.smtps, True))
    for name, key, specs, implicit in kinds:
        if not specs or (implicit and tls is None):
            continue
        listens = [parse_listen(spec, origin=key) for spec in specs]
        out.append(SmtpService(name, ctx, handler, listens, tls_context=tls,
                               implicit_tls=implicit, limiter=limiter))
    return out


# -- one session on stdin/stdout ------------------------------------------------


async def serve_stdio(ctx: Context, *, remote_ip: str | None, fixed: Decision | None,
                      local_loopback: bool = False, stdin_fd: int = 0,
                      stdout_fd: int = 1) -> None:
    """Run one SMTP session on ``stdin_fd``/``stdout_fd`` and return when it ends.

    ``fixed`` replaces RelayControl for this session (None: ask it).
    """
    handler = RelayHandler(ctx, RcptHosts.from_settings(ctx.settings))
    service = SmtpService("smtp-stdio", ctx, handler, [], tls_context=tls_context_of(ctx),
                          limiter=AddressLimiter(1))
    info = ListenerInfo(service.name, service.plaintext_auth(local_loopback),
                        ip_override=remote_ip, use_override=True, fixed=fixed)
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()
    service.on_empty = ended.set
    handler.retain()
    try:
        if stat.S_ISSOCK(os.fstat(stdin_fd).st_mode):
            # tcpserver/inetd: descriptors 0 and 1 are the client's socket; use it directly.
            sock = socket.socket(fileno=os.dup(stdin_fd))
            try:
                await loop.connect_accepted_socket(lambda: service.make_protocol(info), sock)
                await ended.wait()
            finally:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # FIN now, not when the process exits
        else:
            await _bridge(loop, service, info, stdin_fd, stdout_fd)
    finally:
        handler.release()


async def _bridge(loop: asyncio.AbstractEventLoop, service: SmtpService, info: ListenerInfo,
                  stdin_fd: int, stdout_fd: int) -> None:
    """Pipes or files: the session runs on a socketpair, two pumps copy the bytes."""
    server_sock, client_sock = socket.socketpair()
    try:
        await loop.connect_accepted_socket(lambda: service.make_protocol(info), server_sock)
        reader, writer = await asyncio.open_connection(sock=client_sock)
    except BaseException:
        server_sock.close()
        client_sock.close()
        raise
    out = await _Output.open(loop, stdout_fd)
    pump_in = asyncio.create_task(_pump_stdin(loop, stdin_fd, writer))
    try:
        while True:
            chunk = await reader.read(PUMP_CHUNK)
            if not chunk:
                break
            await out.write(chunk)
    finally:
        pump_in.cancel()
        with contextlib.suppress(BaseException):
            await pump_in
        await out.close()
        writer.close()
        for proto in list(service.sessions):
            proto.shutdown()


async def _pump_stdin(loop: asyncio.AbstractEventLoop, fd: int,
                      writer: asyncio.StreamWriter) -> None:
    if _is_stream(fd):
        reader = asyncio.StreamReader(limit=PUMP_CHUNK)
        pipe = os.fdopen(fd, "rb", buffering=0, closefd=False)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            while chunk := await reader.read(PUMP_CHUNK):
                writer.write(chunk)
                await writer.drain()
        finally:
            transport.close()
    else:
        # A regular file never blocks, so a thread read cannot hang the exit.
        while chunk := await asyncio.to_thread(os.read, fd, PUMP_CHUNK):
            writer.write(chunk)
            await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


def _is_stream(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)


class _Output:
    """stdout as an asyncio write pipe (pipes, sockets, ttys) or plain writes (files)."""

    def __init__(self, fd: int, writer: asyncio.StreamWriter | None) -> None:
        self.fd = fd
        self.writer = writer

    @classmethod
    async def open(cls, loop: asyncio.AbstractEventLoop, fd: int) -> _Output:
        if not _is_stream(fd):
            return cls(fd, None)
        pipe = os.fdopen(fd, "wb", buffering=0, closefd=False)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, pipe)
        return cls(fd, asyncio.StreamWriter(transport, protocol, None, loop))

    async def write(self, data: bytes) -> None:
        if self.writer is not None:
            self.writer.write(data)
            await self.writer.drain()
            return
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    async def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                await self.writer.drain()
            self.writer.close()
