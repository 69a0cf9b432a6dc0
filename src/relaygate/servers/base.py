"""What every server shares: listener addresses, the runtime context, the Service shape.

``relaygate serve`` builds one :class:`Context` and hands it to each service
factory; ``relaygate smtpd``/``pop3d``/``imapd``/``policyd`` do the same for one
service. A Service binds its listeners in ``start()`` and, in ``stop()``,
stops accepting, lets transactions in flight finish (up to a grace period),
then closes.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from relaygate.config import Settings
    from relaygate.control import RelayControl
    from relaygate.mail.directory import Directory
    from relaygate.metrics import Metrics


@dataclass
class Context:
    """Everything a service needs, built once by the command that runs it."""

    settings: Settings
    control: RelayControl
    metrics: Metrics
    directory: Directory | None = None
    #: the outbound queue (relaygate.mail.queue.Queue) when relayed mail is accepted
    queue: Any = None
    #: the server TLS context every service shares (see servers.listeners.tls_context_of)
    ssl_context: ssl.SSLContext | None = None
    #: free-form shared state (e.g. last errors for ``status``)
    extra: dict[str, Any] = field(default_factory=dict)


class Service(Protocol):
    name: str

    def listeners(self) -> list[str]:
        """Human-readable addresses it listens on, e.g. ``smtp 127.0.0.1:2525``."""
        ...

    async def start(self) -> None: ...

    async def stop(self, grace: float = 30.0) -> None: ...
