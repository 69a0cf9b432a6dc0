"""Per-connection plumbing shared by every server: change a listener here, once.

This is the one place for what happens between a socket and a protocol
session, whatever the protocol (SMTP, POP3, IMAP, the policy service, metrics):

- **addresses**: :class:`Listen` / :func:`parse_listen` (``HOST:PORT``,
  ``[V6]:PORT``, ``:PORT``, ``unix:PATH``);
- **bind, accept, stop**: :class:`Listener` binds one address, decides
  whether it is loopback from the addresses actually bound (never from the
  host name's text: ``127.0.0.1.nip.io`` is a name, not an address), then
  starts accepting; :func:`resolves_to_loopback` answers the same question
  before binding (``serve``'s root trial mode);
- **the client address**: :func:`peer_address` parses the socket's peer
  once, into the canonical form (:func:`relaygate.addresses.parse_ip`) that
  the services carry to :meth:`RelayControl.decide_canonical
  <relaygate.control.RelayControl.decide_canonical>` and into grants;
- **per-address limits**: :class:`AddressLimiter` counts open connections
  per client address (one limiter may be shared by several listeners);
- **TLS**: :func:`server_tls_context` is the only builder of a server
  ``SSLContext`` (TLS 1.2 at least, RFC 8996), and :func:`reload_certificate`
  re-reads its certificate on SIGHUP; an implicit-TLS listener accepts through
  :class:`TlsAcceptor`, which reads the first TLS record itself so a failed
  handshake costs no 256 KiB buffer and leaves no reference cycle;
- **after a login**: :func:`open_window_after_login` opens (or refreshes) the
  relay window of the client address with one exception policy: a store that
  fails, or a store bug, never breaks the login; it is logged and counted.

Protocol sessions live in their services (``smtp/``, ``pop3.py``, ``imap/``,
``policy.py``); what every one of them does with a connection lives here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relaygate.addresses import DEFAULT_IPV6_PREFIX, client_group, is_loopback, parse_ip
from relaygate.control import WindowRefused
from relaygate.errors import ConfigError, InvalidAddress, StoreError
from relaygate.grants import Grant
from relaygate.log import event
from relaygate.servers.accept import (
    LISTEN_BACKLOG,
    NO_PROXIES,
    Acceptor,
    Peer,
    ProxyPolicy,
    bind_tcp,
    bind_unix,
)

if TYPE_CHECKING:
    from relaygate.config import Settings
    from relaygate.context import Context
    from relaygate.interfaces import Account

log = logging.getLogger("relaygate.listeners")

__all__ = ["LISTEN_BACKLOG", "TLS_HANDSHAKE_TIMEOUT", "AddressLimiter", "Listen", "Listener",
           "Peer", "ProxyPolicy", "TlsAcceptor", "open_window_after_login", "parse_listen",
           "peer_address", "proxy_policy", "reload_certificate", "resolves_to_loopback",
           "server_tls_context", "shown_address", "stream_factory", "tls_acceptor",
           "tls_context_of"]
#: failed TLS handshakes: a client's noise, under a name of its own
tls_log = logging.getLogger("relaygate.tls")


#: seconds a TLS handshake (implicit TLS, STARTTLS, STLS) may take
TLS_HANDSHAKE_TIMEOUT = 30.0


# -- addresses -------------------------------------------------------------------


@dataclass(frozen=True)
class Listen:
    """A parsed listener address: TCP host and port, or a UNIX socket path.

    Whether it is loopback is known once it is bound (:attr:`Listener.loopback`)
    or resolved (:func:`resolves_to_loopback`): ``host`` may be a name.
    """

    host: str | None
    port: int | None
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


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


def loopback_sockname(addr: object) -> bool:
    """True when a socket address (``getsockname()``) is loopback: 127.0.0.0/8, ::1
    (also as ``::ffff:127.x``) or a UNIX socket path."""
    if not isinstance(addr, tuple):
        return True  # AF_UNIX: a path (str or bytes)
    try:
        return is_loopback(parse_ip(str(addr[0])))
    except InvalidAddress:
        return False


def resolves_to_loopback(listen: Listen) -> bool:
    """Whether ``listen`` would bind loopback addresses only, decided on what its host
    resolves to (``localhost`` usually is; ``127.0.0.1.nip.io`` is whatever DNS says,
    and a name that does not resolve is not loopback)."""
    if listen.path is not None:
        return True
    try:
        infos = socket.getaddrinfo(listen.host, listen.port or 0, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(loopback_sockname(info[4]) for info in infos)


def peer_address(transport: asyncio.BaseTransport | asyncio.StreamWriter) -> str | None:
    """The client's address in canonical form, parsed once per connection.

    None for a UNIX-socket client (it has no address: no window can be opened
    for it and no relay decision is asked for it).
    """
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        return parse_ip(str(peer[0]))
    except InvalidAddress:
        return None


def shown_address(addr: object) -> str:
    """``getsockname()`` as people write it: ``127.0.0.1:25``, ``[::1]:25``, ``unix:PATH``."""
    if not isinstance(addr, tuple):
        path = addr.decode("utf-8", "replace") if isinstance(addr, bytes) else str(addr)
        return f"unix:{path}"
    host = str(addr[0])
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


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
        tls_log.info("%s: TLS handshake failed with %s: %s", self.service, self.peer, why)
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
                tls_log.info("%s: TLS handshake failed with %s: %s: %s", service, peer,
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
    """A protocol factory for an implicit-TLS listener; ``peer``: the client's address
    for log lines, when the socket's is a proxy's."""
    return lambda: TlsAcceptor(factory, context, timeout, service, peer)


def stream_factory(callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
                   limit: int) -> Callable[[], asyncio.StreamReaderProtocol]:
    """What ``asyncio.start_server`` builds per connection (usable with :func:`tls_acceptor`)."""
    def factory() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=limit), callback)
    return factory


# -- bind, accept, stop --------------------------------------------------------------


class Listener:
    """One listener address of a service, bound.

    ``kind`` names it in logs and ``status`` (``smtp``, ``pop3s``...). A
    service builds its protocol factory with the Listener in hand and reads
    :attr:`loopback` when a connection comes: accepting starts only after the
    bound addresses have been looked at.
    """

    def __init__(self, kind: str, listen: Listen) -> None:
        self.kind = kind
        self.listen = listen
        self.server: Acceptor | None = None
        #: every bound address is loopback (or a UNIX socket); False until bound
        self.loopback = False
        #: bound addresses as shown (``127.0.0.1:2525``, ``[::1]:2525``, ``unix:PATH``)
        self.addresses: list[str] = []

    def __str__(self) -> str:
        return ", ".join(self.addresses) if self.addresses else str(self.listen)

    async def bind(self, factory: Callable[[Peer], asyncio.BaseProtocol], *,
                   tls: ssl.SSLContext | None = None, sock: socket.socket | None = None,
                   proxies: ProxyPolicy = NO_PROXIES) -> Acceptor:
        """Bind (or take ``sock``, already bound), note what was bound, start accepting.

        ``factory`` makes the protocol of one connection from its Peer (worked out once,
        PROXY header included: :mod:`relaygate.servers.accept`); ``proxies`` says whose
        header is believed. Implicit TLS (``tls``) goes through a :class:`TlsAcceptor`
        (see above), not asyncio's ``ssl=``.
        """
        listen = self.listen
        if sock is not None:
            sock.setblocking(False)
            sockets = [sock]
        elif listen.path is not None:
            sockets = [bind_unix(listen.path, backlog=LISTEN_BACKLOG)]
        else:
            # ":PORT" means every address, IPv4 and IPv6.
            host = None if listen.host == "::" else listen.host
            sockets = await asyncio.to_thread(bind_tcp, host, listen.port or 0,
                                              backlog=LISTEN_BACKLOG)
        wrap = None
        if tls is not None:
            context, kind = tls, self.kind

            def wrap(make: Callable[[], asyncio.BaseProtocol],
                     who: str) -> Callable[[], asyncio.BaseProtocol]:
                return tls_acceptor(make, context, kind, TLS_HANDSHAKE_TIMEOUT, peer=who)

        server = Acceptor(sockets, factory, service=self.kind, proxies=proxies, tls_wrap=wrap)
        self.server = server
        names = [s.getsockname() for s in sockets]
        self.loopback = bool(names) and all(loopback_sockname(n) for n in names)
        self.addresses = [shown_address(n) for n in names]
        server.start()
        return server

    async def bind_streams(
        self, callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter, Peer], Any], *,
        tls: ssl.SSLContext | None = None, limit: int = 2**16,
        proxies: ProxyPolicy = NO_PROXIES,
    ) -> Acceptor:
        """:meth:`bind` for a ``(reader, writer, peer)`` callback, as
        ``asyncio.start_server`` (with the Peer as a third argument)."""

        def factory(peer: Peer) -> asyncio.BaseProtocol:
            def connected(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> Any:
                return callback(r, w, peer)

            return stream_factory(connected, limit)()

        return await self.bind(factory, tls=tls, proxies=proxies)

    def ports(self) -> list[int]:
        """TCP ports bound (useful with port 0)."""
        if self.server is None:
            return []
        out = []
        for s in self.server.sockets:
            addr = s.getsockname()
            if isinstance(addr, tuple):
                out.append(int(addr[1]))
        return out

    def close(self) -> None:
        """Stop accepting (connections already accepted go on)."""
        if self.server is not None:
            self.server.close()

    async def wait_closed(self, timeout: float = 1.0) -> None:
        server = self.server
        if server is None:
            return
        try:
            await asyncio.wait_for(server.wait_closed(), timeout)
        except (Exception, asyncio.CancelledError):  # noqa: S110 - best effort at stop
            pass


def proxy_policy(settings: Settings) -> ProxyPolicy:
    """``trusted_proxies`` and ``proxy_timeout`` for :meth:`Listener.bind`."""
    return ProxyPolicy.from_settings(settings)


# -- per-address limits -----------------------------------------------------------


class AddressLimiter:
    """Open connections per client address, shared by the listeners of a service.

    IPv4 counts per address, IPv6 per network of ``ipv6_prefix`` bits (one host
    owns a /64; :func:`relaygate.addresses.client_group`). A UNIX-socket client
    (address None) has no address: it is counted under ``unix_key`` when one is
    given (POP3: every local client together), else not at all (SMTP).
    """

    def __init__(self, limit: int, ipv6_prefix: int = DEFAULT_IPV6_PREFIX, *,
                 unix_key: str | None = None) -> None:
        self.limit = limit
        self.ipv6_prefix = ipv6_prefix
        self.unix_key = unix_key
        self.counts: dict[str, int] = {}

    def key(self, ip: str | None) -> str | None:
        """What is counted for ``ip``: the address, IPv6 by its network (None: nothing)."""
        if ip is None:
            return self.unix_key
        return client_group(ip, self.ipv6_prefix)

    def acquire(self, ip: str | None) -> bool:
        """Count one more connection; False (nothing counted) when over the limit."""
        k = self.key(ip)
        if k is None:
            return True
        n = self.counts.get(k, 0)
        if n >= self.limit:
            return False
        self.counts[k] = n + 1
        return True

    def release(self, ip: str | None) -> None:
        k = self.key(ip)
        if k is None:
            return
        n = self.counts.get(k, 0) - 1
        if n > 0:
            self.counts[k] = n
        else:
            self.counts.pop(k, None)


# -- TLS ---------------------------------------------------------------------------


def server_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server ``SSLContext`` for ``tls.cert``/``tls.key`` (None without them).

    TLS 1.2 at least (RFC 8996 deprecates 1.0 and 1.1). Every service and
    ``serve`` build theirs here; ConfigError names the file when it cannot be loaded.
    """
    tls = settings.tls
    if tls.cert is None or tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate and key ({exc})",
                          source="tls.cert", value=str(tls.cert)) from None
    return context


def tls_context_of(ctx: Context) -> ssl.SSLContext | None:
    """The server TLS context of ``ctx``: built here on first use, then shared.

    One context per process: every service of a Context uses the same one, and
    the process's runner reloads it on SIGHUP (:func:`reload_certificate`), so
    new handshakes on every listener get the new certificate.
    """
    if ctx.ssl_context is None:
        ctx.ssl_context = server_tls_context(ctx.settings)
    return ctx.ssl_context


def reload_certificate(context: ssl.SSLContext, settings: Settings) -> bool:
    """SIGHUP: load the certificate again into ``context`` (new handshakes use it).

    A file that cannot be loaded is logged and the old certificate kept; returns
    whether the new one was loaded.
    """
    tls = settings.tls
    if tls.cert is None or tls.key is None:
        return False
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        log.error("reload: keeping the old TLS certificate: cannot load %s: %s", tls.cert, exc)
        return False
    return True


# -- after a login -----------------------------------------------------------------


async def open_window_after_login(ctx: Context, ip: str | None, account: Account, source: str,
                                  *, refresh: bool = False) -> Grant | None:
    """Open (``refresh``: extend) the relay window of ``ip`` for ``account``'s login.

    ``ip`` is canonical (:func:`peer_address`); None (a UNIX-socket client)
    opens nothing. Whatever goes wrong in the store, a StoreError or a bug, is
    logged and counted (``relaygate_windows{event="failed"}``) and None is
    returned: the login stands, and relaying fails closed elsewhere until the
    store is back.
    """
    if ip is None:
        return None
    control = ctx.control
    grant = Grant.opening(ip, account.login, account.domain, source, time.time(),
                          control.expiry)
    try:
        await asyncio.to_thread(control.allow, grant)
    except WindowRefused:
        # The address is a trusted proxy's own (a LOCAL connection, or a misconfigured
        # upstream): a window would let everyone behind the proxy relay.
        event("window.refused", ip=ip, user=account.login, source=source,
              reason="trusted proxy")
        return None
    except Exception as exc:
        # A store outage is a warning; anything else is a bug of ours: ERROR, with traceback.
        bug = not isinstance(exc, StoreError)
        log.log(logging.ERROR if bug else logging.WARNING,
                "%s: could not %s the relay window of %s for %s: %s", source,
                "refresh" if refresh else "open", ip, account.login, exc, exc_info=bug)
        ctx.metrics.windows.labels("failed").inc()
        event("window.failed", level=logging.WARNING, ip=ip, user=account.login, source=source)
        return None
    expires = int(grant.expires_at - grant.opened_at)
    if refresh:
        ctx.metrics.windows.labels("refreshed").inc()
        event("window.refreshed", level=logging.DEBUG, ip=grant.ip, user=account.login,
              source=source, expires=expires)
    else:
        ctx.metrics.windows.labels("opened").inc()
        event("window.opened", ip=grant.ip, user=account.login, domain=account.domain,
              source=source, expires=expires)
    return grant

