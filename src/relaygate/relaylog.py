"""Who relayed what: one ``relayed`` event per relayed message (serve's SMTP) or
per policy OK (Postfix's policy service), with the same fields in both, so one
grep answers "who relayed this"::

    relayed service=policy ip=192.0.2.7 user=alice basis=grant sender=alice@example.org
        recipient=bob@example.net helo=laptop queue_id=4XyZ1 reason="window of alice ..."

``basis`` is how the client was allowed (``grant``: a POP/IMAP window, ``auth``:
SMTP AUTH, ``rule``: a static rule, ``env``: RELAYCLIENT of the chain); ``user``
is whose window (or login) it was. This is the one call site both servers share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from relaygate.log import event


def relayed(ctx: Any, *, service: str, basis: str, user: str | None, ip: str | None,
            sender: str | None, recipients: Sequence[str], helo: str | None,
            queue_id: str | None, reason: str | None = None) -> None:
    """Log one relayed message (or policy OK). ``ctx`` is the process's Context."""
    event("relayed", service=service, ip=ip, user=user, basis=basis,
          sender=sender if sender else "<>",
          recipient=",".join(recipients) or None, helo=helo or None,
          queue_id=queue_id or None, reason=reason)
