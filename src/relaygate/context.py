"""The typed Context: everything a service needs, built once by the command that runs it.

``relaygate serve`` builds one Context and hands it to each service factory;
``relaygate smtpd``/``pop3d``/``imapd``/``policyd``/``queue run`` do the same for
one service (see ``servers.runtime``).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relaygate.config import Settings
    from relaygate.control import RelayControl
    from relaygate.interfaces import Directory
    from relaygate.mail.queue import Queue
    from relaygate.metrics import Metrics
    from relaygate.relaystats import RelayStats


@dataclass
class Context:
    """Everything a service needs, built once by the command that runs it."""

    settings: Settings
    control: RelayControl
    metrics: Metrics
    #: the user directory (None: no mailboxes, no logins)
    directory: Directory | None = None
    #: the outbound queue, when relayed mail is accepted
    queue: Queue | None = None
    #: the server TLS context every service shares (``servers.listeners.tls_context_of``)
    ssl_context: ssl.SSLContext | None = None
    #: relayed-message counts (``relaystats.count_relayed``): None until first used,
    #: False when the data directory has no place for them
    relay_stats: RelayStats | bool | None = None  # for_data_dir's answer, once asked
