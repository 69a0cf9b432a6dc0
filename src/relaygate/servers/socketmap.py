"""The socketmap service for Sendmail and Postfix: asyncio glue around
``relaygate.protocols.socketmap``.

Theory of operation
-------------------
Sendmail (a ``K`` map of type ``socket``) and Postfix (``socketmap:`` tables)
open a connection per process and keep it for many lookups, one at a time.
Each lookup's key is a client address; the answer is ``OK VALUE`` when it may
relay (a static rule or an open POP/IMAP window), ``NOTFOUND`` when not, and
``TEMP`` when the grant store cannot be asked: never ``OK`` (fail closed).

Everything but the protocol is the policy service's
(:class:`~relaygate.servers.policy.PolicyService`): listeners (TCP and UNIX
sockets with their mode and group), lookups on the event loop for the local
stores and in a thread pool for the others, answers written once per loop
iteration, the idle sweep and the stop; and the connection's plumbing
(:class:`~relaygate.servers.policy.ServiceConnection`: the shared read buffer, flow
control, answer writing, the client's address from the PROXY header behind a trusted
load balancer). This module adds the protocol: a
:class:`~relaygate.protocols.socketmap.SocketmapReader` per client, requests
answered in order, a malformed netstring closes the connection (there is no
error reply in the protocol), as does ``socketmap.idle_timeout`` of silence.
"""

from __future__ import annotations

import logging

from relaygate.context import Context
from relaygate.decision import Decision, Verdict
from relaygate.errors import ConfigError
from relaygate.log import event
from relaygate.protocols.socketmap import (
    MAX_ANSWER_TEXT,
    NOTFOUND,
    SocketmapProtocolError,
    SocketmapReader,
    answer_for,
    client_address,
    found,
)
from relaygate.relaystats import count_relayed
from relaygate.servers.listeners import Listen, parse_listen
from relaygate.servers.policy import PolicyService, ServiceConnection

log = logging.getLogger("relaygate.socketmap")
_EVENTS = logging.getLogger("relaygate.events")


class _SocketmapConnection(ServiceConnection):
    service_name = "socketmap"
    log = log
    protocol_error = SocketmapProtocolError
    reader: SocketmapReader

    def __init__(self, service: SocketmapService) -> None:
        super().__init__(service)
        self.reader = SocketmapReader()
        self.service: SocketmapService = service

    def _process(self) -> None:
        service = self.service
        decider = service.decider
        while not self.pending and self.transport is not None:
            try:
                request = self.reader.next_request()
            except SocketmapProtocolError as exc:
                self._abort(str(exc))
                return
            if request is None:
                if self.reader.closed:
                    self.close()
                return
            ip = client_address(request.key)
            if ip is None:
                self._send(NOTFOUND)
                if _EVENTS.isEnabledFor(logging.DEBUG):
                    event("relay.decision", level=logging.DEBUG, service="socketmap",
                          key=request.key.decode("ascii", "replace")[:80], action="NOTFOUND",
                          reason="key is no client address")
                continue
            if decider is not None:
                decision = decider.decide(ip)
                if decision is not None:
                    self._reply(ip, decision)
                    continue
            self._ask(ip)

    def _reply(self, ip: str, decision: Decision) -> None:
        service = self.service
        service.count(decision)
        answer = answer_for(decision, service.ok)
        self._send(answer)
        verdict = decision.verdict
        if verdict is Verdict.ALLOW:
            # the MTA asks once per recipient: relayed recipients, as the policy service
            count_relayed(service.ctx, decision.kind, decision.user, ip)
        if verdict is Verdict.DENY:
            if _EVENTS.isEnabledFor(logging.DEBUG):
                event("relay.decision", level=logging.DEBUG, service="socketmap", ip=ip,
                      action="NOTFOUND", reason=decision.reason)
        elif _EVENTS.isEnabledFor(logging.INFO):
            # A store failure was warned about by RelayControl (once, then every few
            # seconds): the per-request line is info, as for the policy service.
            action = "OK" if verdict is Verdict.ALLOW else "TEMP"
            event("relay.decision", service="socketmap", ip=ip, action=action,
                  reason=decision.reason, user=decision.user)


def _answer_value(text: str) -> str:
    if not text or len(text) > MAX_ANSWER_TEXT or not all(" " <= c <= "~" for c in text):
        raise ConfigError("must be 1 to 1024 printable ASCII characters",
                          source="socketmap.value", value=text)
    return text


class SocketmapService(PolicyService):
    """Socketmap server (Sendmail ``K ... socket``, Postfix ``socketmap:``) on every
    configured listener."""

    name = "socketmap"
    connection = _SocketmapConnection  # type: ignore[assignment]

    def __init__(self, ctx: Context, listens: list[Listen]) -> None:
        super().__init__(ctx, listens)
        self.value = _answer_value(ctx.settings.socketmap.value)
        #: the answer for an address that may relay, made once
        self.ok = found(self.value)


def make_service(ctx: Context) -> SocketmapService:
    """The socketmap service on ``ctx.settings.socketmap.listen``."""
    listens = [parse_listen(spec, origin="socketmap.listen")
               for spec in ctx.settings.socketmap.listen]
    return SocketmapService(ctx, listens)
