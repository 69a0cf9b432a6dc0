"""The Postfix policy service: asyncio glue around ``relaygate.protocols.policy``.

Theory of operation
-------------------
Postfix's ``check_policy_service`` (SMTPD_POLICY_README) opens a connection
per smtpd process and keeps it for many requests, one at a time: it sends a
request and waits for the answer before the next. So each connection is an
:class:`asyncio.Protocol` with a :class:`~relaygate.protocols.policy.PolicyReader`;
a complete request is triaged, and when it needs a relay decision,
``RelayControl.decide`` runs in a small thread pool (stores are synchronous;
a lookup must never block the event loop that serves every other smtpd).
While a decision is pending, further requests wait in the reader (Postfix
never sends ahead); a client that pipelines more than 64 KiB is no longer read
until the answer is out, so it cannot make the server buffer without bound.
Lookups go to the thread pool in batches (see :class:`_Batcher`).

Answers are only ``action=OK`` (rule or open window; the reason is logged) or
``action=DUNNO``; a store failure is DUNNO plus a warning (Postfix then
refuses the relay with its own ``reject_unauth_destination``: fail closed).
A protocol error is logged and the connection closed without an answer, as
the README asks. A connection silent for ``policy.idle_timeout`` is closed.

Listeners: TCP (IPv4, IPv6) and UNIX sockets. A UNIX socket is created with
``policy.socket_mode`` (and ``policy.socket_group``) before anyone can connect
(the umask is set around ``bind``) and removed on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from relaygate.decision import Decision, Verdict
from relaygate.errors import ConfigError
from relaygate.log import event
from relaygate.protocols.policy import (
    Answer,
    Ask,
    PolicyProtocolError,
    PolicyReader,
    answer_for,
    format_answer,
    triage,
)
from relaygate.servers.base import Context, Listen, parse_listen

log = logging.getLogger("relaygate.policy")

#: Bytes a client may send ahead while its decision is pending before we stop
#: reading (Postfix never sends ahead; a request is 1-3 KiB).
_PIPELINE_LIMIT = 64 * 1024


class _PolicyConnection(asyncio.Protocol):
    def __init__(self, service: PolicyService) -> None:
        self.service = service
        self.reader = PolicyReader()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        #: a decision for this connection is being made (requests wait in the reader)
        self.pending = False
        self.paused = False
        self.loop = asyncio.get_running_loop()
        self.last_active = self.loop.time()
        self.requests = 0

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "unix"
        self.service.connections.add(self)
        self.service.ctx.metrics.connections.labels("policy").inc()
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.service.connections.discard(self)
        self.service.ctx.metrics.connections.labels("policy").dec()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.receive_data(data)
        except PolicyProtocolError as exc:
            self._abort(str(exc))
            return
        self._arm_idle()
        if self.pending:
            # Postfix waits for each answer; a client that pipelines while a decision
            # is pending is held back once it has a request's worth buffered.
            if self.reader.buffered > _PIPELINE_LIMIT and self.transport is not None:
                self.transport.pause_reading()
                self.paused = True
            return
        self._process()

    def eof_received(self) -> bool:
        with contextlib.suppress(PolicyProtocolError):
            self.reader.receive_data(b"")
        self._process()
        # Returning False closes our side once the pending answer (if any) is written;
        # a pending decision keeps the transport open until it completes.
        return self.pending

    # -- requests ------------------------------------------------------------

    def _process(self) -> None:
        while not self.pending and self.transport is not None:
            try:
                request = self.reader.next_request()
            except PolicyProtocolError as exc:
                self._abort(str(exc))
                return
            if request is None:
                if self.reader.closed and self.transport is not None:
                    self.transport.close()
                return
            self.requests += 1
            what = triage(request)
            if isinstance(what, Answer):
                self._reply(what, None)
                continue
            self._ask(what)

    def _ask(self, ask: Ask) -> None:
        self.pending = True
        self.service.batcher.submit(ask.ip, self._decided)

    def _decided(self, ip: str, decision: Decision) -> None:
        self.pending = False
        self.service.ctx.metrics.decisions.labels(decision.verdict.value, decision.kind).inc()
        self._reply(answer_for(decision), (ip, decision))
        if self.transport is None:
            return
        if self.reader.closed:
            self.transport.close()
            return
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self._process()

    def _reply(self, answer: Answer, decided: tuple[str, Decision] | None) -> None:
        if self.transport is None:
            return
        self.transport.write(format_answer(answer.action))
        if decided is None:
            if answer.kind != "other-request":
                event("relay.decision", level=logging.DEBUG, service="policy",
                      action=answer.action, reason=answer.reason)
            return
        ip, decision = decided
        if decision.verdict is Verdict.ALLOW:
            event("relay.decision", service="policy", ip=ip, action=answer.action,
                  reason=decision.reason, user=decision.user)
        elif decision.verdict is Verdict.TEMPFAIL:
            event("relay.decision", level=logging.WARNING, service="policy", ip=ip,
                  action=answer.action, reason=decision.reason)
        else:
            event("relay.decision", level=logging.DEBUG, service="policy", ip=ip,
                  action=answer.action, reason=decision.reason)

    def _abort(self, why: str) -> None:
        log.warning("policy client %s: %s; closing without an answer", self.peer, why)
        if self.transport is not None:
            self.transport.abort()

    def _arm_idle(self) -> None:
        # A timestamp, not a timer per request: the service's sweep closes idle ones.
        self.last_active = self.loop.time()

    def close_if_idle(self, now: float) -> None:
        if self.pending or now - self.last_active < self.service.idle_timeout:
            return
        log.info("policy client %s idle for %ss; closing", self.peer, self.service.idle_timeout)
        if self.transport is not None:
            self.transport.close()


class _Batcher:
    """Runs ``decide`` in the thread pool for batches of addresses.

    Handing one lookup to a thread and waking the loop for its answer costs
    more CPU than an SQLite lookup (measured: ~200 us against ~110 us per
    decision inline, bench/postfix.py). So at most ``threads`` batches are in
    flight: a request that arrives while they run waits for them and then
    leaves with every other request that arrived meanwhile, in one hand-off.
    An idle service sends a lone request at once (``call_soon``), so batching
    adds no latency when there is nothing to batch.
    """

    def __init__(self, decide: Callable[[str], Decision], executor: ThreadPoolExecutor,
                 max_in_flight: int) -> None:
        self.decide = decide
        self.executor = executor
        self.max_in_flight = max_in_flight
        self.waiting: list[tuple[str, Callable[[str, Decision], None]]] = []
        self.scheduled = False
        self.in_flight = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.in_flight > 0

    def submit(self, ip: str, done: Callable[[str, Decision], None]) -> None:
        self.waiting.append((ip, done))
        self._schedule()

    def _schedule(self) -> None:
        if self.waiting and not self.scheduled and self.in_flight < self.max_in_flight:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.scheduled = False
        batch, self.waiting = self.waiting, []
        if not batch:
            return
        self.in_flight += 1
        fut = asyncio.get_running_loop().run_in_executor(
            self.executor, self._run, [ip for ip, _ in batch])
        fut.add_done_callback(lambda f: self._deliver(batch, f))

    def _run(self, ips: list[str]) -> list[Decision]:
        out = []
        for ip in ips:
            try:
                out.append(self.decide(ip))
            except Exception as exc:
                # decide() never raises by contract; if it does, fail closed and say so.
                log.error("relay decision for %s failed: %r", ip, exc)
                out.append(Decision(Verdict.TEMPFAIL, "internal error", "error"))
        return out

    def _deliver(self, batch: list[tuple[str, Callable[[str, Decision], None]]],
                 fut: asyncio.Future[list[Decision]]) -> None:
        self.in_flight -= 1
        if fut.cancelled() or fut.exception() is not None:
            results = [Decision(Verdict.TEMPFAIL, "internal error", "error")] * len(batch)
        else:
            results = fut.result()
        for (ip, done), decision in zip(batch, results, strict=True):
            done(ip, decision)
        self._schedule()


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError("policy.socket_mode must be octal, e.g. 0660", value=text) from None
    if not 0 <= mode <= 0o777:
        raise ConfigError("policy.socket_mode must be between 0000 and 0777", value=text)
    return mode


class PolicyService:
    """``check_policy_service`` server on every configured listener."""

    name = "policy"

    def __init__(self, ctx: Context, listens: list[Listen]) -> None:
        settings = ctx.settings.policy
        self.ctx = ctx
        self.listens = listens
        self.idle_timeout = float(settings.idle_timeout)
        self.socket_mode = _octal_mode(settings.socket_mode)
        self.socket_gid: int | None = None
        if settings.socket_group:
            try:
                self.socket_gid = grp.getgrnam(settings.socket_group).gr_gid
            except KeyError:
                raise ConfigError("no such group", source="policy.socket_group",
                                  value=settings.socket_group) from None
        self.threads = int(settings.threads)
        self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="relaygate-policy")
        self.batcher = _Batcher(ctx.control.decide, self.executor, self.threads)
        self.connections: set[_PolicyConnection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[tuple[str, int, int]] = []
        self._bound: list[str] = []
        self._sweeper: asyncio.TimerHandle | None = None

    def listeners(self) -> list[str]:
        return [f"policy {b}" for b in (self._bound or [str(x) for x in self.listens])]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for listen in self.listens:
                if listen.path is not None:
                    sock = self._unix_socket(listen.path)
                    server = await loop.create_unix_server(
                        lambda: _PolicyConnection(self), sock=sock)
                    self._bound.append(str(listen))
                else:
                    server = await loop.create_server(
                        lambda: _PolicyConnection(self), listen.host, listen.port or 0,
                        reuse_address=True)
                    for s in server.sockets:
                        addr = s.getsockname()
                        host = addr[0]
                        self._bound.append(f"[{host}]:{addr[1]}" if ":" in host
                                           else f"{host}:{addr[1]}")
                self._servers.append(server)
        except BaseException:
            await self.stop(0)
            raise
        for b in self._bound:
            log.info("policy service listening on %s", b)
        self._sweep()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self.connections):
            conn.close_if_idle(now)
        self._sweeper = loop.call_later(min(self.idle_timeout / 4, 30.0), self._sweep)

    def _unix_socket(self, path: str) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError("exists and is not a socket", source="policy.listen",
                                  value=path)
            os.unlink(path)  # a stale socket from a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Nobody may connect before the final mode is set: bind with a umask that
        # already yields it, then chmod (and chgrp) to the exact value.
        old = os.umask(0o777 & ~self.socket_mode)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, self.socket_mode)
        if self.socket_gid is not None:
            os.chown(path, -1, self.socket_gid)
        st = os.stat(path)
        self._unix_paths.append((path, st.st_dev, st.st_ino))
        sock.listen(128)
        return sock

    async def stop(self, grace: float = 30.0) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for server in self._servers:
            server.close()
        for path, dev, ino in self._unix_paths:
            # Remove only the socket we made (another instance may have replaced it).
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)
        self._unix_paths.clear()
        deadline = asyncio.get_running_loop().time() + max(grace, 0.0)
        while any(c.pending for c in self.connections) or self.batcher.busy:
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=1.0)
        self._servers.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)


def make_service(ctx: Context) -> PolicyService:
    """The policy service on ``ctx.settings.policy.listen``."""
    listens = [parse_listen(spec, origin="policy.listen") for spec in ctx.settings.policy.listen]
    return PolicyService(ctx, listens)

