"""Accepting connections: bind, accept, the client's address (parsed once), PROXY protocol.

Theory of operation
-------------------
Every TCP and UNIX listener of every service (SMTP, submission, smtps, POP3,
POP3S, IMAP, IMAPS, the policy service) binds through
:class:`relaygate.servers.listeners.Listener`, which hands its sockets to an
:class:`Acceptor`: it accepts on them itself, so that something can happen between
``accept`` and the first byte the protocol (or the TLS layer) reads. For each
connection it works out the :class:`Peer` once, then hands the socket to
``loop.connect_accepted_socket`` with the service's protocol factory; on
implicit-TLS ports behind :func:`relaygate.servers.listeners.tls_acceptor`, which waits
for the client's first TLS record before any TLS state is made.

The PROXY protocol (:mod:`relaygate.protocols.proxy`) is that "something",
configured like Exim's ``hosts_proxy`` (``trusted_proxies``):

- a connection *from* a trusted proxy must begin with a valid PROXY header
  within ``proxy_timeout`` seconds, else it is closed and logged
  (``proxy.refused``); the header's source address becomes the client address
  (:attr:`Peer.ip`) for everything after: windows, decisions, per-address
  limits, throttling, Received lines, logs. The header is read *before* the TLS
  handshake, as HAProxy sends it on implicit-TLS ports;
- a v2 LOCAL command (HAProxy's health checks), v1 ``UNKNOWN`` and an
  unspecified family are the proxy's own connection: the peer stays the proxy
  (:attr:`Peer.local`), which relays nothing and opens no window
  (:class:`relaygate.control.WindowRefused`);
- a connection from any other address is served directly, and a PROXY header
  it sends is just bytes to the protocol, which answers it as the bad command
  it is (``500``, ``-ERR``, ``BAD``, a closed policy connection): never believed.

The header is read with ``MSG_PEEK``: only the header's own bytes are taken off
the socket (:func:`~relaygate.protocols.proxy.header_part`), so whatever the proxy forwarded
right behind it (a TLS ClientHello, an early command) stays in the kernel's
buffer for the TLS layer or the protocol to read.

Accepting mirrors asyncio's own server loop: up to the backlog per wake-up,
and a listener that runs out of descriptors (EMFILE, ENFILE, ENOBUFS, ENOMEM)
pauses for a second instead of spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relaygate.addresses import parse_ip
from relaygate.errors import InvalidAddress
from relaygate.log import event
from relaygate.networks import Networks
from relaygate.protocols.proxy import (
    MAX_HEADER_LENGTH,
    ProxyHeader,
    ProxyHeaderError,
    header_part,
)

log = logging.getLogger("relaygate.accept")

#: listen(2) backlog for every service: asyncio's default of 100 drops the tail of a
#: burst of connects (1000 clients at once left 100 without a greeting); the kernel
#: caps this at net.core.somaxconn.
LISTEN_BACKLOG = 4096

#: default seconds a trusted proxy has to send its header (Exim's proxy_protocol_timeout
#: is 3 s; HAProxy sends the header with its connect, so a few seconds is generous)
DEFAULT_PROXY_TIMEOUT = 5.0
#: seconds a listener pauses after running out of descriptors (asyncio's own value)
ACCEPT_RETRY_DELAY = 1.0
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a connection, worked out once at accept time."""

    #: the client's canonical address; None for a UNIX-socket client
    ip: str | None
    port: int | None = None
    #: the trusted proxy the connection came through (None: a direct connection)
    proxy: str | None = None
    #: the proxy's own connection (v2 LOCAL, v1 UNKNOWN): ``ip`` is the proxy's
    local: bool = False

    @property
    def shown(self) -> str:
        """The address for log lines and messages."""
        return self.ip or "unix"


#: makes the service's protocol for one connection
ProtocolFactory = Callable[[Peer], asyncio.BaseProtocol]
#: wraps a connection's protocol factory for implicit TLS, given the client as logged
#: (``relaygate.servers.listeners.tls_acceptor``)
TlsWrap = Callable[[Callable[[], asyncio.BaseProtocol], str],
                   Callable[[], asyncio.BaseProtocol]]


@dataclass(frozen=True)
class ProxyPolicy:
    """Whose PROXY header is believed, and how long to wait for it."""

    trusted: Networks
    timeout: float = DEFAULT_PROXY_TIMEOUT

    @classmethod
    def from_settings(cls, settings: object) -> ProxyPolicy:
        specs = getattr(settings, "trusted_proxies", ())
        timeout = getattr(settings, "proxy_timeout", DEFAULT_PROXY_TIMEOUT)
        return cls(Networks(specs), float(timeout))


NO_PROXIES = ProxyPolicy(Networks())


def bind_tcp(host: str | None, port: int, *, backlog: int = LISTEN_BACKLOG) -> list[socket.socket]:
    """Listening sockets for ``host`` (None or "": every address, IPv4 and IPv6), as
    ``loop.create_server`` makes them: SO_REUSEADDR, IPV6_V6ONLY on IPv6 sockets."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    seen = set()
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address "
                                         f"{addr!r}: {exc.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_unix(path: str, *, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening UNIX socket at ``path`` (a stale socket file there is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Acceptor:
    """Accepts on its sockets and starts one protocol per connection (see the module doc).

    The interface is the part of :class:`asyncio.Server` the services use:
    ``sockets``, ``close()``, ``wait_closed()``.
    """

    def __init__(self, sockets: list[socket.socket], factory: ProtocolFactory, *,
                 service: str, proxies: ProxyPolicy = NO_PROXIES,
                 tls_wrap: TlsWrap | None = None) -> None:
        self.sockets = sockets
        self.factory = factory
        self.service = service
        self.proxies = proxies
        self.tls_wrap = tls_wrap
        self._loop = asyncio.get_running_loop()
        self._serving = False
        #: connections between accept and their protocol (header, TLS handshake)
        self._starting: set[asyncio.Task[None]] = set()
        #: listeners paused after running out of descriptors
        self._paused: set[asyncio.TimerHandle] = set()

    def start(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)
        self._serving = True

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        """Stop accepting and close the sockets; connections being set up are dropped
        (those already running are the service's to stop)."""
        if not self._serving and not self.sockets:
            return
        self._serving = False
        for handle in self._paused:
            handle.cancel()
        self._paused.clear()
        for sock in self.sockets:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock.fileno())
            sock.close()
        for task in self._starting:
            task.cancel()

    async def wait_closed(self) -> None:
        if self._starting:
            await asyncio.gather(*self._starting, return_exceptions=True)

    # -- accepting ---------------------------------------------------------------

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(LISTEN_BACKLOG):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    log.error("%s: cannot accept connections (%s); pausing %.0fs",
                              self.service, exc.strerror, ACCEPT_RETRY_DELAY)
                    self._loop.remove_reader(sock.fileno())
                    handle: list[asyncio.TimerHandle] = []
                    handle.append(self._loop.call_later(
                        ACCEPT_RETRY_DELAY, self._resume, sock, handle))
                    self._paused.add(handle[0])
                    return
                log.warning("%s: accept failed: %s", self.service, exc)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._start(conn, addr))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    def _resume(self, sock: socket.socket, handle: list[asyncio.TimerHandle]) -> None:
        self._paused.difference_update(handle)
        if self._serving and sock.fileno() >= 0:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def _start(self, conn: socket.socket, addr: object) -> None:
        peer: Peer | None = None
        try:
            peer = await self._peer(conn, addr)
            if peer is None:
                conn.close()
                return
            made = peer

            def factory() -> asyncio.BaseProtocol:
                return self.factory(made)

            if self.tls_wrap is not None:
                # implicit TLS: a TlsAcceptor first (see servers.listeners)
                await self._loop.connect_accepted_socket(self.tls_wrap(factory, made.shown),
                                                         conn)
            else:
                await self._loop.connect_accepted_socket(factory, conn)
        except asyncio.CancelledError:
            conn.close()
            raise
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            # A client that went away at once: nothing to tell anyone. (TLS handshake
            # failures are TlsAcceptor's to log: one info line each.)
            who = peer.shown if peer is not None else "?"
            log.debug("%s: connection from %s failed: %r", self.service, who, exc)
            conn.close()
        except Exception:
            log.exception("%s: connection setup failed", self.service)
            conn.close()

    async def _peer(self, conn: socket.socket, addr: object) -> Peer | None:
        """The connection's Peer, after its PROXY header when it comes from a trusted
        proxy; None when the connection must be closed (the reason is logged)."""
        if not isinstance(addr, tuple) or not addr:
            return Peer(None)
        try:
            ip = parse_ip(str(addr[0]))
        except InvalidAddress:
            return Peer(None)
        port = int(addr[1])
        if ip not in self.proxies.trusted:
            return Peer(ip, port)
        try:
            header = await asyncio.wait_for(read_header(self._loop, conn),
                                            self.proxies.timeout)
        except TimeoutError:
            why = f"no PROXY header within {self.proxies.timeout:g}s"
        except ProxyHeaderError as exc:
            why = exc.why
        else:
            if header.local or header.source is None:
                return Peer(ip, port, proxy=ip, local=True)
            return Peer(header.source[0], header.source[1], proxy=ip)
        event("proxy.refused", level=logging.WARNING, service=self.service, proxy=ip,
              reason=why)
        return None


async def read_header(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> ProxyHeader:
    """Read one PROXY header off a non-blocking socket, and not a byte more.

    Raises ProxyHeaderError for a bad header or a connection closed before its end.
    """
    seen = bytearray()
    while True:
        await _readable(loop, conn)
        try:
            chunk = conn.recv(MAX_HEADER_LENGTH - len(seen), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as exc:
            raise ProxyHeaderError(f"connection failed before the PROXY header ended "
                                   f"({exc.strerror or exc})") from None
        if not chunk:
            raise ProxyHeaderError("connection closed before the PROXY header ended")
        take, header = header_part(seen, chunk)
        got = conn.recv(take)
        if len(got) != take:  # the kernel hands back what it let us peek at
            raise ProxyHeaderError("PROXY header bytes went missing")
        seen += got
        if header is not None:
            return header


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = conn.fileno()
    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def listen_tcp_or_unix(
    host: str | None, port: int | None, path: str | None, factory: ProtocolFactory, *,
    service: str, proxies: ProxyPolicy = NO_PROXIES, tls_wrap: TlsWrap | None = None,
    sock: socket.socket | None = None, backlog: int = LISTEN_BACKLOG,
) -> Acceptor:
    """Bind (or take ``sock``), start accepting, return the Acceptor (services bind
    through :class:`relaygate.servers.listeners.Listener`, which does the same)."""
    if sock is not None:
        sockets = [sock]
        sock.setblocking(False)
    elif path is not None:
        sockets = [bind_unix(path, backlog=backlog)]
    else:
        assert port is not None
        sockets = bind_tcp(host, port, backlog=backlog)
    listener = Acceptor(sockets, factory, service=service, proxies=proxies, tls_wrap=tls_wrap)
    listener.start()
    return listener


StreamCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Peer],
                          Awaitable[None] | None]


def stream_factory(callback: StreamCallback,
                   *, limit: int = 2**16) -> ProtocolFactory:
    """A protocol factory for a streams service (``asyncio.start_server`` style callback,
    with the Peer as a third argument)."""

    def make(peer: Peer) -> asyncio.BaseProtocol:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)

        def connected(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> Awaitable[None] | None:
            return callback(r, w, peer)

        return asyncio.StreamReaderProtocol(reader, connected, loop=loop)

    return make
