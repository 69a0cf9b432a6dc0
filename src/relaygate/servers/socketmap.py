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
iteration, the idle sweep and the stop. This module adds the connection: a
:class:`~relaygate.protocols.socketmap.SocketmapReader` per client, requests
answered in order, a malformed netstring closes the connection (there is no
error reply in the protocol), as does ``socketmap.idle_timeout`` of silence.
"""

from __future__ import annotations

import asyncio
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
from relaygate.servers.policy import PolicyService

log = logging.getLogger("relaygate.socketmap")
_EVENTS = logging.getLogger("relaygate.events")

#: Bytes a client may send ahead while a lookup is pending before we stop reading
#: (Sendmail and Postfix wait for each answer; a request is a few dozen bytes).
_PIPELINE_LIMIT = 64 * 1024


class _SocketmapConnection(asyncio.BufferedProtocol):
    def __init__(self, service: SocketmapService) -> None:
        self.service = service
        # read into the service's one buffer, as the policy service does (no 256 KiB
        # allocation per read); the reader copies what it keeps
        self.buffer = service.read_buffer
        self.reader = SocketmapReader()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        #: a lookup for this connection is being made (requests wait in the reader)
        self.pending = False
        self.paused = False
        self.write_paused = False
        self.loop = asyncio.get_running_loop()
        self.last_active = self.loop.time()
        self.out: list[bytes] = []

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "unix"
        self.service.connections.add(self)
        self.service.ctx.metrics.connections.labels("socketmap").inc()

    def connection_lost(self, exc: Exception | None) -> None:
        self.service.connections.discard(self)
        self.service.ctx.metrics.connections.labels("socketmap").dec()
        self.transport = None
        self.out.clear()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        try:
            self.reader.receive_data(data)
        except SocketmapProtocolError as exc:
            self._abort(str(exc))
            return
        self.last_active = self.loop.time()
        if self.pending:
            if self.reader.buffered > _PIPELINE_LIMIT and self.transport is not None:
                self.transport.pause_reading()
                self.paused = True
            return
        self._process()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.paused:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.reader.receive_data(b"")
        self._process()
        self.flush()
        return self.pending

    # -- requests ------------------------------------------------------------

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
            self.pending = True
            service.batcher.submit(ip, self._decided)

    def _decided(self, ip: str, decision: Decision) -> None:
        self.pending = False
        self._reply(ip, decision)
        if self.transport is None:
            return
        if self.paused:
            self.paused = False
            if not self.write_paused:
                self.transport.resume_reading()
        self._process()

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

    def _send(self, answer: bytes) -> None:
        if self.transport is None:
            return
        if not self.out:
            self.service.queue_output(self)
        self.out.append(answer)

    def flush(self) -> None:
        out = self.out
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def _abort(self, why: str) -> None:
        # Answers to the good requests before the bad one still go out.
        log.warning("socketmap client %s: %s; closing the connection", self.peer, why)
        self.flush()
        if self.transport is not None:
            self.transport.abort()

    def close_if_idle(self, now: float) -> None:
        if self.pending or now - self.last_active < self.service.idle_timeout:
            return
        log.info("socketmap client %s idle for %ss; closing", self.peer,
                 self.service.idle_timeout)
        self.close()


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
