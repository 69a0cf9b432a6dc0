"""Who relayed what: one ``relayed`` event per relayed message (serve's SMTP) or
per policy OK (Postfix's policy service), with the same fields in both, so one
grep answers "who relayed this"::

    relayed service=policy ip=192.0.2.7 action=OK user=alice basis=grant sender=alice@example.org
        recipient=bob@example.net helo=laptop queue_id=4XyZ1 reason="window of alice ..."

``basis`` is how the client was allowed (``grant``: a POP/IMAP window, ``auth``:
SMTP AUTH, ``rule``: a static rule, ``env``: RELAYCLIENT of the chain); ``user``
is whose window (or login) it was; ``sender=<>`` is the null sender, a missing
``sender`` one the request did not carry. :func:`relayed` is the one call site
both servers share for a relayed message: it also counts it for the migration
report (:func:`relaygate.relaystats.count_relayed`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from relaygate.log import event
from relaygate.relaystats import count_relayed

_EVENTS = logging.getLogger("relaygate.events")


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the log says about the message: sender ('' = null sender; None = not known),
    the relayed recipients, the HELO name and the queue id."""

    sender: str | None
    recipients: Sequence[str]
    helo: str | None
    queue_id: str | None


def relayed(ctx: Any, *, service: str, basis: str, user: str | None, ip: str | None,
            envelope: Callable[[], Envelope], reason: str | None = None,
            action: str | None = None, client_ip: str | None = None) -> None:
    """Count and log one relayed message (or policy OK). ``ctx`` is the process's
    Context; ``ip`` the address as logged, ``client_ip`` the canonical one counted
    (default ``ip``); ``envelope`` is only called when the line is logged."""
    count_relayed(ctx, basis, user, client_ip if client_ip is not None else ip)
    if not _EVENTS.isEnabledFor(logging.INFO):
        return
    env = envelope()
    sender = env.sender if env.sender is None else (env.sender or "<>")
    event("relayed", service=service, ip=ip, action=action, user=user, basis=basis, sender=sender,
          recipient=",".join(env.recipients) or None, helo=env.helo or None,
          queue_id=env.queue_id or None, reason=reason)
