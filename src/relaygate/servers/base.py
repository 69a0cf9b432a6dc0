"""What every server shares: listener addresses, the runtime context, the Service shape.

``relaygate serve`` builds one :class:`Context` and hands it to each service
factory; ``relaygate smtpd``/``pop3d``/``imapd``/``policyd`` do the same for one
service. A Service binds its listeners in ``start()`` and, in ``stop()``,
stops accepting, lets transactions in flight finish (up to a grace period),
then closes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from relaygate.errors import ConfigError

if TYPE_CHECKING:
    from relaygate.config import Settings
    from relaygate.control import RelayControl
    from relaygate.mail.directory import Directory
    from relaygate.metrics import Metrics


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
