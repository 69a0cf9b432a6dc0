"""What every server shares: listener addresses, the runtime context, the Service shape.

``relaygate serve`` builds one :class:`Context` and hands it to each service
factory; ``relaygate smtpd``/``pop3d``/``imapd``/``policyd`` do the same for one
service. A Service binds its listeners in ``start()`` and, in ``stop()``,
stops accepting, lets transactions in flight finish (up to a grace period),
then closes.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from asyncio import sslproto
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from relaygate.errors import ConfigError

if TYPE_CHECKING:
    from relaygate.config import Settings
    from relaygate.control import RelayControl
    from relaygate.mail.directory import Directory
    from relaygate.metrics import Metrics


log = logging.getLogger("relaygate.tls")

#: listen(2) backlog for every service: asyncio's default of 100 drops the tail of a
#: burst of connects (1000 clients at once left 100 without a greeting); the kernel
#: caps this at net.core.somaxconn.
LISTEN_BACKLOG = 4096


@dataclass(frozen=True)
class Listen:
    """A parsed listener address: TCP host and port, or a UNIX socket path."""

    host: str | None
    port: int | None
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        """True for 127.0.0.0/8, ::1 and UNIX sockets (plaintext logins are safe there)."""
        if self.path is not None:
            return True
        host = self.host or ""
        return host.startswith("127.") or host in ("::1", "localhost")


def parse_listen(spec: str, *, origin: str = "listener") -> Listen:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` (all addresses) or ``unix:PATH``."""
    s = spec.strip()
    if s.startswith("unix:"):
        path = s[5:]
        if not path:
            raise ConfigError("UNIX listener needs a path", source=origin, value=spec)
        return Listen(None, None, path)
    if s.startswith("["):
        host, sep, port_s = s[1:].partition("]:")
        if not sep:
            raise ConfigError("expected [IPv6]:PORT", source=origin, value=spec)
    else:
        host, sep, port_s = s.rpartition(":")
        if not sep:
            raise ConfigError("expected HOST:PORT", source=origin, value=spec)
        if ":" in host:
            raise ConfigError("write IPv6 listeners as [ADDR]:PORT", source=origin, value=spec)
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError("bad port", source=origin, value=spec)
    return Listen(host or "::", int(port_s))


@dataclass
class Context:
    """Everything a service needs, built once by the command that runs it."""

    settings: Settings
    control: RelayControl
    metrics: Metrics
    directory: Directory | None = None
    #: the outbound queue (relaygate.mail.queue.Queue) when relayed mail is accepted
    queue: Any = None
    #: free-form shared state (e.g. last errors for ``status``)
    extra: dict[str, Any] = field(default_factory=dict)


class Service(Protocol):
    name: str

    def listeners(self) -> list[str]:
        """Human-readable addresses it listens on, e.g. ``smtp 127.0.0.1:2525``."""
        ...

    async def start(self) -> None: ...

    async def stop(self, grace: float = 30.0) -> None: ...


# -- implicit TLS (smtps, pop3s, imaps) -------------------------------------------------
#
# asyncio's own TLS listeners (``create_server(ssl=...)``) cost a failed handshake far
# more than it is worth, on every Python relaygate runs on:
#
# - each connection's SSLProtocol allocates and zero-fills a 256 KiB read buffer
#   before the first byte arrives, so 1000 clients that connect at once and send
#   garbage hold 256 MB (measured on 3.11.7, 3.12.1 and 3.13.0);
# - on Python before the fix of CPython gh-109534 (3.13.0 has it, 3.11.7 and 3.12.1
#   do not), the failed handshake's exception keeps the protocol, its buffer and its
#   OpenSSL object alive in a reference cycle until the garbage collector runs.
#
# Freed late and in bulk, that memory stays with the process (the allocator keeps it):
# 1000 such clients at once took ``relaygate serve`` from 44 to 356 MB, 3000 to 653 MB.
# So the implicit-TLS listeners accept plain connections and wait for the client's
# first TLS record themselves (a few bytes of buffer): anything that is not a
# handshake record of a possible length is closed without any TLS state; a real one
# goes to an SSLProtocol with a 32 KiB read buffer, and a failure's exception is
# stripped of its traceback, so everything is freed at once.

#: RFC 8446 5.1: a TLSPlaintext record (the ClientHello's) is at most 2^14 octets
TLS_RECORD_MAX = 2**14
#: TLS record header: content type, legacy version (2 octets), length (2 octets)
TLS_HEADER = 5
#: RFC 8446 5.1: ContentType handshake
TLS_HANDSHAKE = 0x16
#: read buffer of one TLS connection (asyncio's is 256 KiB); two full records fit
TLS_READ_BUFFER = 16 * 1024


class _SSLProtocol(sslproto.SSLProtocol):
    max_size = TLS_READ_BUFFER


def _forget_tracebacks(exc: BaseException | None) -> None:
    """Drop the frames an exception holds (they hold the TLS connection's objects)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


class TlsAcceptor(asyncio.Protocol):
    """A plain connection on an implicit-TLS listener, until its first TLS record.

    Then the connection goes to an SSLProtocol whose application protocol comes
    from ``factory``; it gets ``connection_made`` once the handshake succeeds,
    as with ``create_server(ssl=...)``. ``service`` names the listener in logs.
    """

    def __init__(self, factory: Callable[[], asyncio.BaseProtocol], context: ssl.SSLContext,
                 timeout: float, service: str, peer: str | None = None) -> None:
        self.factory = factory
        self.context = context
        self.timeout = timeout
        self.service = service
        self.transport: asyncio.Transport | None = None
        #: the client as logged (given when a PROXY header named it)
        self.given_peer = peer
        self.peer = peer or "?"
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.given_peer is None:
            peer = transport.get_extra_info("peername")
            self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else "unix"
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.timeout
        self.timer = loop.call_at(self.deadline, self._expired)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < TLS_HEADER:
            return
        kind, major = self.buffer[0], self.buffer[1]
        length = int.from_bytes(self.buffer[3:5], "big")
        if kind != TLS_HANDSHAKE or major != 3 or not 0 < length <= TLS_RECORD_MAX:
            self._fail("not a TLS handshake")
        elif len(self.buffer) >= TLS_HEADER + length:
            self.start()

    def eof_received(self) -> bool:
        self._fail("closed before the TLS handshake")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def _expired(self) -> None:
        self.timer = None
        self._fail("no TLS handshake in time")

    def _fail(self, why: str) -> None:
        log.info("%s: TLS handshake failed with %s: %s", self.service, self.peer, why)
        self.buffer = bytearray()
        if self.transport is not None:
            self.transport.close()

    def start(self) -> None:
        """Hand the connection to an SSLProtocol with what it sent so far."""
        transport = self.transport
        assert transport is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        service, peer = self.service, self.peer

        def done(fut: asyncio.Future[None]) -> None:
            exc = None if fut.cancelled() else fut.exception()
            if exc is not None:
                log.info("%s: TLS handshake failed with %s: %s: %s", service, peer,
                         type(exc).__name__, str(exc)[:200])
                _forget_tracebacks(exc)

        waiter.add_done_callback(done)
        protocol = _SSLProtocol(loop, _Deferred(self.factory), self.context, waiter,
                                server_side=True,
                                ssl_handshake_timeout=max(1, int(self.deadline - loop.time())))
        # A handshake that fails inside buffer_updated() below raises in a frame
        # called from this one; the failure's traceback then holds this frame, and
        # through it the waiter would hold its own exception (a reference cycle).
        del waiter
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data, self.buffer = memoryview(self.buffer), bytearray()
        self.transport = None  # the SSLProtocol owns it now
        while data and not transport.is_closing():
            view = protocol.get_buffer(len(data))
            n = min(len(view), len(data))
            view[:n] = data[:n]
            data = data[n:]
            protocol.buffer_updated(n)


class _Deferred(asyncio.Protocol):
    """Stands in for the application protocol until the handshake succeeds.

    The real one (a whole SMTP session object, say) is made only then, so a
    failed handshake never builds one.
    """

    def __init__(self, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self.factory = factory

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        protocol = self.factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


def tls_acceptor(factory: Callable[[], asyncio.BaseProtocol], context: ssl.SSLContext,
                 service: str, timeout: float = 30.0,
                 peer: str | None = None) -> Callable[[], TlsAcceptor]:
    """A protocol factory for an implicit-TLS listener (``loop.create_server(f, ...)``);
    ``peer``: the client's address for log lines, when the socket's is a proxy's."""
    return lambda: TlsAcceptor(factory, context, timeout, service, peer)


def stream_factory(callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
                   limit: int) -> Callable[[], asyncio.StreamReaderProtocol]:
    """What ``asyncio.start_server`` builds per connection, for use with tls_acceptor."""
    def factory() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=limit), callback)
    return factory
