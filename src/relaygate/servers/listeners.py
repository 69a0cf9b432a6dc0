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
  re-reads its certificate on SIGHUP;
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relaygate.addresses import DEFAULT_IPV6_PREFIX, client_group, is_loopback, parse_ip
from relaygate.errors import ConfigError, InvalidAddress, StoreError
from relaygate.grants import Grant
from relaygate.log import event

if TYPE_CHECKING:
    from relaygate.config import Settings
    from relaygate.context import Context
    from relaygate.interfaces import Account

log = logging.getLogger("relaygate.listeners")

#: listen(2) backlog for every service: asyncio's default of 100 drops the tail of a
#: burst of connects (1000 clients at once left 100 without a greeting); the kernel
#: caps this at net.core.somaxconn.
LISTEN_BACKLOG = 4096

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
        self.server: asyncio.Server | None = None
        #: every bound address is loopback (or a UNIX socket); False until bound
        self.loopback = False
        #: bound addresses as shown (``127.0.0.1:2525``, ``[::1]:2525``, ``unix:PATH``)
        self.addresses: list[str] = []

    def __str__(self) -> str:
        return ", ".join(self.addresses) if self.addresses else str(self.listen)

    async def bind(self, factory: Callable[[], asyncio.BaseProtocol], *,
                   tls: ssl.SSLContext | None = None,
                   sock: socket.socket | None = None) -> asyncio.Server:
        """Bind (or take ``sock``, already bound), note what was bound, start accepting."""
        loop = asyncio.get_running_loop()
        listen = self.listen
        extra: dict[str, Any] = {"ssl": tls, "start_serving": False}
        if tls is not None:
            extra["ssl_handshake_timeout"] = TLS_HANDSHAKE_TIMEOUT
        if sock is not None:
            if sock.family == socket.AF_UNIX:
                server = await loop.create_unix_server(factory, sock=sock, **extra)
            else:
                server = await loop.create_server(factory, sock=sock, **extra)
        elif listen.path is not None:
            server = await loop.create_unix_server(factory, listen.path,
                                                   backlog=LISTEN_BACKLOG, **extra)
        else:
            # ":PORT" means every address, IPv4 and IPv6.
            host = None if listen.host == "::" else listen.host
            server = await loop.create_server(factory, host, listen.port or 0,
                                              reuse_address=True, backlog=LISTEN_BACKLOG,
                                              **extra)
        self.server = server
        names = [s.getsockname() for s in server.sockets]
        self.loopback = bool(names) and all(loopback_sockname(n) for n in names)
        self.addresses = [shown_address(n) for n in names]
        await server.start_serving()
        return server

    async def bind_streams(
        self, callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any], *,
        tls: ssl.SSLContext | None = None, limit: int = 2**16,
    ) -> asyncio.Server:
        """:meth:`bind` for a ``(reader, writer)`` callback, as ``asyncio.start_server``."""
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.StreamReaderProtocol:
            reader = asyncio.StreamReader(limit=limit, loop=loop)
            return asyncio.StreamReaderProtocol(reader, callback, loop=loop)

        return await self.bind(factory, tls=tls)

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

