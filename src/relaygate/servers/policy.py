"""The Postfix policy service: asyncio glue around ``relaygate.protocols.policy``.

Theory of operation
-------------------
Postfix's ``check_policy_service`` (SMTPD_POLICY_README) opens a connection
per smtpd process and keeps it for many requests, one at a time: it sends a
request and waits for the answer before the next. So each connection is an
:class:`asyncio.Protocol` with a :class:`~relaygate.protocols.policy.PolicyReader`;
a complete request is triaged, and when it needs a relay decision,
``RelayControl.decide`` makes it, in one of two places:

- **On the event loop** (:class:`_LoopDecider`) for the local stores,
  ``sqlite`` and ``memory``, whose lookup is an index probe of a few
  microseconds. Handing such a lookup to a thread and waking the loop for
  the answer costs more than the lookup (the GIL changes hands twice per
  request). It is safe because an SQLite reader does not wait for writers:
  the database runs in WAL mode (https://sqlite.org/wal.html: "readers do
  not block writers and a writer does not block readers"). The few cases
  where a WAL reader can still meet a lock (another process running recovery
  after a crash, or holding the database in exclusive locking mode) are
  bounded by a connection of the service's own with a busy timeout of
  :data:`INLINE_BUSY_TIMEOUT` (20 ms, instead of the store's 5 s; see
  :class:`~relaygate.stores.sqlite.SqliteReader`). A lookup that fails on the loop, lock or anything
  else, is not answered there: it goes to the thread path below, which asks
  the store itself with its full busy timeout and fails closed (DUNNO plus a
  warning) if the store still fails. So the loop stalls for at most
  :data:`INLINE_BUSY_TIMEOUT` and a transient lock costs no refusal.
- **In a small thread pool** (``policy.threads``) for the stores that may
  wait on a network or a slow disk (``redis``, ``spool``): such a lookup must
  never block the event loop that serves every other smtpd. While a decision
  is pending, further requests wait in the reader (Postfix never sends
  ahead); a client that pipelines more than 64 KiB is no longer read until
  the answer is out, so it cannot make the server buffer without bound.
  Lookups go to the thread pool in batches (see :class:`_Batcher`).

Answers are written once per loop iteration, after every ready connection
has been read (:meth:`PolicyService.queue_output`): the clients are woken in
one burst rather than once per answer.

Connections read into one buffer the service owns (:class:`asyncio.BufferedProtocol`,
``recv_into``). A plain :class:`asyncio.Protocol` gets a new bytes object per read,
for which asyncio calls ``recv`` with room for 256 KiB: a 256 KiB allocation shrunk
to the request's few hundred bytes, every request. Until glibc's dynamic mmap
threshold has grown past 256 KiB, each of those is an ``mmap``, ``mremap`` and
``munmap`` with fresh pages (strace of a bare asyncio server under the benchmark's
load shows exactly that; on a socket pair, ``recv`` costs ~15 us more per message
than ``recv_into``). The buffer can be shared because the transport hands it over
and back within one callback, and the reader copies what it keeps.

No answer is ever cached: every request asks the store (the SQLite lookups
made in one loop iteration share one read transaction, see
:class:`~relaygate.stores.sqlite.SqliteReader`), so a revoked window stops relaying from the next
loop iteration on, and an expired one at once (the lookup compares with the
current time).

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
import functools
import grp
import logging
import os
import socket
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.decision import Decision, Verdict
from relaygate.errors import ConfigError, StoreError
from relaygate.grants import Grant
from relaygate.log import event
from relaygate.protocols.policy import (
    Answer,
    PolicyProtocolError,
    PolicyReader,
    PolicyRequest,
    action_for,
    format_answer,
    triage,
)
from relaygate.relaylog import Envelope, relayed
from relaygate.servers.accept import Peer
from relaygate.servers.listeners import (
    LISTEN_BACKLOG,
    Listen,
    Listener,
    parse_listen,
    proxy_policy,
)
from relaygate.stores.base import GrantStore
from relaygate.stores.sqlite import SqliteReader, SqliteStore

log = logging.getLogger("relaygate.policy")

#: Bytes a client may send ahead while its decision is pending before we stop
#: reading (Postfix never sends ahead; a request is 1-3 KiB).
_PIPELINE_LIMIT = 64 * 1024

#: Size of the service's read buffer (the most one read takes in).
READ_BUFFER_SIZE = 64 * 1024

#: Store kinds decided on the event loop (a local lookup of microseconds); every other
#: kind (redis, spool) is asked from the thread pool.
INLINE_KINDS = frozenset({"sqlite", "memory"})

#: Longest an SQLite lookup on the event loop waits for a lock (the longest the loop
#: can stall on one) before the lookup is handed to the thread path, which waits up to
#: the store's own busy timeout.
INLINE_BUSY_TIMEOUT = 0.02

_EVENTS = logging.getLogger("relaygate.events")

#: A decide() that raised (it never should): fail closed.
_INTERNAL_ERROR = Decision(Verdict.TEMPFAIL, "internal error", "error")


class _Reader(Protocol):
    """What :class:`ServiceConnection` needs of a protocol's reader."""

    @property
    def closed(self) -> bool: ...

    @property
    def buffered(self) -> int: ...

    def receive_data(self, data: bytes | memoryview) -> None: ...


class ServiceConnection(asyncio.BufferedProtocol):
    """One client connection of a :class:`PolicyService` (policy or socketmap): reads
    into the service's buffer, holds the client back while a decision is pending or
    its answers are not read, and writes the answers through the service.

    A subclass names its ``service`` (metrics label and log wording), ``log``,
    ``protocol_error`` and reader, and handles the requests (``_process``, ``_reply``).
    """

    #: the service's name: the connections metric's label and the log lines' wording
    service_name = "?"
    #: where the connection's warnings and idle closes are logged
    log = logging.getLogger("relaygate.policy")
    #: what the reader raises on a malformed request
    protocol_error: type[Exception] = Exception
    #: the end of the log line when a protocol error closes the connection
    abort_wording = "closing the connection"
    #: after the client's EOF, a decision that completes closes the connection at once
    #: (requests still buffered get no answer) rather than answering them first
    close_after_eof = False
    reader: _Reader

    def __init__(self, service: PolicyService) -> None:
        self.service = service
        # read into the service's one buffer (module docstring); the reader copies
        # what it keeps
        self.buffer = service.read_buffer
        self.transport: asyncio.Transport | None = None
        #: the client (named by the PROXY header behind a load balancer), set by the
        #: service when the connection is accepted
        self.peer = "?"
        #: a decision for this connection is being made (requests wait in the reader)
        self.pending = False
        #: reading paused: the client pipelines while a decision is pending ...
        self.paused = False
        #: ... or does not read its answers (the transport's buffer is over its limit)
        self.write_paused = False
        self.loop = asyncio.get_running_loop()
        self.last_active = self.loop.time()
        #: answers not written yet: the service writes them at the end of the loop
        #: iteration (:meth:`PolicyService.queue_output`), all of a connection's at once
        self.out: list[bytes] = []

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.service.connections.add(self)
        self.service.ctx.metrics.connections.labels(self.service_name).inc()
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.service.connections.discard(self)
        self.service.ctx.metrics.connections.labels(self.service_name).dec()
        self.transport = None
        self.out.clear()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        try:
            self.reader.receive_data(data)
        except self.protocol_error as exc:
            self._abort(str(exc))
            return
        self._arm_idle()
        if self.pending:
            # The MTA waits for each answer; a client that pipelines while a decision
            # is pending is held back once it has a request's worth buffered.
            if self.reader.buffered > _PIPELINE_LIMIT and self.transport is not None:
                self.transport.pause_reading()
                self.paused = True
            return
        self._process()

    def pause_writing(self) -> None:
        # Answers pile up in the transport: a client that sends requests without reading
        # the answers is not read either, so it cannot make the server buffer without bound.
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.paused:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        with contextlib.suppress(self.protocol_error):
            self.reader.receive_data(b"")
        self._process()
        # Returning False closes our side once the answers are written (so write them
        # now); a pending decision keeps the transport open until it completes.
        self.flush()
        return self.pending

    # -- requests ------------------------------------------------------------

    def _process(self) -> None:
        """Answer the complete requests in the reader, until a decision is pending."""
        raise NotImplementedError

    def _reply(self, ip: str, decision: Decision) -> None:
        """Count, answer and log one relay decision."""
        raise NotImplementedError

    def _ask(self, ip: str) -> None:
        """Have the thread path decide for ``ip``; requests wait until it has."""
        self.pending = True
        self.service.batcher.submit(ip, self._decided)

    def _decided(self, ip: str, decision: Decision) -> None:
        self.pending = False
        self._reply(ip, decision)
        if self.transport is None:
            return
        if self.close_after_eof and self.reader.closed:
            self.close()
            return
        if self.paused:
            self.paused = False
            if not self.write_paused:
                self.transport.resume_reading()
        self._process()

    def _send(self, answer: bytes) -> None:
        if self.transport is None:
            return
        if not self.out:
            self.service.queue_output(self)
        self.out.append(answer)

    def flush(self) -> None:
        """Write the answers made so far (one write, so one send(2) for all of them)."""
        out = self.out
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def close(self) -> None:
        """Close after the answers made so far are written."""
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def _abort(self, why: str) -> None:
        # The answers to the good requests before the bad one still go out; the bad one
        # gets none, and whatever the client sent after it is dropped.
        self.log.warning("%s client %s: %s; %s", self.service_name, self.peer, why,
                         self.abort_wording)
        self.flush()
        if self.transport is not None:
            self.transport.abort()

    def _arm_idle(self) -> None:
        # A timestamp, not a timer per request: the service's sweep closes idle ones.
        self.last_active = self.loop.time()

    def close_if_idle(self, now: float) -> None:
        if self.pending or now - self.last_active < self.service.idle_timeout:
            return
        self.log.info("%s client %s idle for %ss; closing", self.service_name, self.peer,
                      self.service.idle_timeout)
        self.close()


class _PolicyConnection(ServiceConnection):
    service_name = "policy"
    protocol_error = PolicyProtocolError
    abort_wording = "closing without an answer"
    close_after_eof = True
    reader: PolicyReader

    def __init__(self, service: PolicyService) -> None:
        super().__init__(service)
        self.reader = PolicyReader()
        self.requests = 0
        #: the request being answered (its sender, recipient... go into the relayed log)
        self.request: PolicyRequest | None = None

    def _process(self) -> None:
        service = self.service
        decider = service.decider
        while not self.pending and self.transport is not None:
            try:
                request = self.reader.next_request()
            except PolicyProtocolError as exc:
                self._abort(str(exc))
                return
            if request is None:
                if self.reader.closed:
                    self.close()
                return
            self.requests += 1
            self.request = request
            what = triage(request)
            if isinstance(what, Answer):
                self._reply_other(what)
                continue
            if decider is not None:
                decision = decider.decide(what.ip)
                if decision is not None:
                    self._reply(what.ip, decision)
                    continue
            self._ask(what.ip)

    def _reply(self, ip: str, decision: Decision) -> None:
        """Count, answer and log one relay decision."""
        self.service.count(decision)
        action = action_for(decision)
        self._send(format_answer(action))
        verdict = decision.verdict
        if verdict is Verdict.ALLOW:
            relayed(self.service.ctx, service="policy", basis=decision.kind,
                    user=decision.user, ip=ip, reason=decision.reason, action=action,
                    envelope=functools.partial(_envelope, self.request))
        elif verdict is Verdict.TEMPFAIL:
            # RelayControl has warned (once, then every few seconds): not per request.
            if _EVENTS.isEnabledFor(logging.INFO):
                event("relay.decision", service="policy", ip=ip, action=action,
                      reason=decision.reason)
        elif _EVENTS.isEnabledFor(logging.DEBUG):
            event("relay.decision", level=logging.DEBUG, service="policy", ip=ip,
                  action=action, reason=decision.reason)

    def _reply_other(self, answer: Answer) -> None:
        """Answer a request that needs no decision (SASL client, other request type)."""
        self._send(format_answer(answer.action))
        if answer.kind != "other-request":
            event("relay.decision", level=logging.DEBUG, service="policy",
                  action=answer.action, reason=answer.reason)


class _Batcher:
    """Runs ``decide`` in the thread pool for batches of addresses (redis, spool).

    Handing one lookup to a thread and waking the loop for its answer costs
    about as much CPU as a whole decision made on the loop. So at most
    ``threads`` batches are in flight: a request that arrives while they run
    waits for them and then leaves with every other request that arrived
    meanwhile, in one hand-off. An idle service sends a lone request at once
    (``call_soon``), so batching adds no latency when there is nothing to
    batch.
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
                out.append(_INTERNAL_ERROR)
        return out

    def _deliver(self, batch: list[tuple[str, Callable[[str, Decision], None]]],
                 fut: asyncio.Future[list[Decision]]) -> None:
        self.in_flight -= 1
        if fut.cancelled() or fut.exception() is not None:
            results = [_INTERNAL_ERROR] * len(batch)
        else:
            results = fut.result()
        for (ip, done), decision in zip(batch, results, strict=True):
            done(ip, decision)
        self._schedule()


class _HandOff(Exception):
    """The store failed on the event loop: ask again from the thread path."""


class _LoopStore:
    """The store as the event loop sees it: ``lookup`` for ``get``, and a
    StoreError there becomes :class:`_HandOff`, so a lookup that fails on the
    loop (a lock held beyond :data:`INLINE_BUSY_TIMEOUT`, a broken connection)
    is neither answered nor logged there: the thread path asks the store and
    reports. The decision only reads; the other methods are the store's own.
    """

    def __init__(self, lookup: Callable[[str, float], Grant | None], store: GrantStore) -> None:
        self.lookup = lookup
        self.store = store
        self.kind = store.kind

    def get(self, ip: str, now: float) -> Grant | None:
        try:
            return self.lookup(ip, now)
        except StoreError as exc:
            raise _HandOff(str(exc)) from None

    def put(self, grant: Grant) -> None:
        self.store.put(grant)

    def delete(self, ip: str) -> bool:
        return self.store.delete(ip)

    def delete_user(self, user: str) -> int:
        return self.store.delete_user(user)

    def age(self, now: float) -> int:
        return self.store.age(now)

    def list(self, now: float) -> list[Grant]:
        return self.store.list(now)

    def close(self) -> None:
        self.store.close()


class _LoopDecider:
    """Relay decisions made on the event loop, for the local stores (module docstring).

    SQLite is read through a :class:`~relaygate.stores.sqlite.SqliteReader`; a memory store is asked
    directly. The rules are always the service's current ones (``relaygate
    serve`` reloads them).
    """

    def __init__(self, control: RelayControl) -> None:
        self.control = control
        store = control.store
        self.reader: SqliteReader | None = None
        lookup = store.get
        if isinstance(store, SqliteStore):
            # one read transaction per loop iteration (see SqliteReader)
            self.reader = SqliteReader(
                store.path, busy_timeout=INLINE_BUSY_TIMEOUT,
                end_soon=lambda end: asyncio.get_running_loop().call_soon(end))
            lookup = self.reader.get
        self.local = RelayControl(_LoopStore(lookup, store), control.rules,
                                  expiry=control.expiry, relayclient=control.relayclient)
        # One account of the store's health: the thread path reports failures, a
        # lookup that works again on the loop reports the recovery.
        self.local.health = control.health
        #: lookups the loop could not answer and handed to the thread path
        self.handed_off = 0

    @staticmethod
    def suits(store: GrantStore) -> bool:
        """A local store with a lookup of microseconds (an in-memory SQLite database
        is private to its connection, so it cannot be read through a second one)."""
        return store.kind in INLINE_KINDS and getattr(store, "path", None) != ":memory:"

    def decide(self, ip: str) -> Decision | None:
        """The decision, or None when the thread path must make it."""
        local = self.local
        local.rules = self.control.rules
        try:
            return local.decide_canonical(ip)
        except _HandOff:
            self.handed_off += 1
            return None
        except Exception as exc:
            # decide() never raises by contract; if it does, fail closed and say so.
            log.error("relay decision for %s failed: %r", ip, exc)
            return _INTERNAL_ERROR

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def _octal_mode(text: str, section: str = "policy") -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(f"{section}.socket_mode must be octal, e.g. 0660",
                          value=text) from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{section}.socket_mode must be between 0000 and 0777", value=text)
    return mode


class PolicyService:
    """``check_policy_service`` server on every configured listener.

    The socketmap service (:mod:`relaygate.servers.socketmap`) is this service with
    another ``name`` (its settings section) and ``connection`` (its protocol).
    """

    name = "policy"
    #: the asyncio protocol of one client connection
    connection: Callable[[PolicyService], asyncio.BaseProtocol] = _PolicyConnection

    def __init__(self, ctx: Context, listens: list[Listen]) -> None:
        settings = getattr(ctx.settings, self.name)
        self.ctx = ctx
        self.listens = listens
        self.idle_timeout = float(settings.idle_timeout)
        self.socket_mode = _octal_mode(settings.socket_mode, self.name)
        self.socket_gid: int | None = None
        if settings.socket_group:
            try:
                self.socket_gid = grp.getgrnam(settings.socket_group).gr_gid
            except KeyError:
                raise ConfigError("no such group", source=f"{self.name}.socket_group",
                                  value=settings.socket_group) from None
        self.threads = int(settings.threads)
        self.executor = ThreadPoolExecutor(self.threads,
                                           thread_name_prefix=f"relaygate-{self.name}")
        # Addresses reach the deciders canonical already (triage parsed them).
        self.batcher = _Batcher(ctx.control.decide_canonical, self.executor, self.threads)
        self.decider = (_LoopDecider(ctx.control) if _LoopDecider.suits(ctx.control.store)
                        else None)
        self._counters: dict[tuple[Verdict, str], Callable[[float], None]] = {}
        #: decisions not yet added to the metric (see :meth:`count`)
        self._tally: dict[tuple[Verdict, str], int] = {}
        self._outbox: list[Any] = []
        #: what every connection reads into (module docstring)
        self.read_buffer = memoryview(bytearray(READ_BUFFER_SIZE))
        self.connections: set[Any] = set()
        self._listeners: list[Listener] = []
        self._unix_paths: list[tuple[str, int, int]] = []
        self._sweeper: asyncio.TimerHandle | None = None

    def queue_output(self, conn: Any) -> None:
        """Have ``conn``'s answers written once every ready connection has been read.

        The loop reads all ready connections in one iteration; writing every answer
        right after its request would wake the client (smtpd) once per answer, and a
        wake-up costs more than the decision. Written together at the end of the
        iteration (``call_soon`` runs before the loop waits again), the answers reach
        the clients in one burst; no answer waits for anything but the requests that
        arrived with it.
        """
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._write_out)
        self._outbox.append(conn)

    def _write_out(self) -> None:
        box, self._outbox = self._outbox, []
        for conn in box:
            conn.flush()
        self.add_tally()

    def count(self, decision: Decision) -> None:
        """Count a decision for ``relaygate_relay_decisions``.

        Tallied here and added to the metric once per loop iteration (by
        :meth:`_write_out`, which every answer goes through): the metric takes
        a lock per increment, which cost more than the tally.
        """
        key = (decision.verdict, decision.kind)
        tally = self._tally
        tally[key] = tally.get(key, 0) + 1

    def add_tally(self) -> None:
        """Add the decisions tallied so far to the metric (labelled children cached)."""
        tally, self._tally = self._tally, {}
        for key, n in tally.items():
            inc = self._counters.get(key)
            if inc is None:
                inc = self._counters[key] = self.ctx.metrics.decisions.labels(
                    key[0].value, key[1]).inc
            inc(n)

    def listeners(self) -> list[str]:
        bound = [addr for listener in self._listeners for addr in listener.addresses]
        return [f"{self.name} {b}" for b in (bound or [str(x) for x in self.listens])]

    def _connection(self, peer: Peer) -> asyncio.BaseProtocol:
        proto = self.connection(self)
        if isinstance(proto, ServiceConnection):
            proto.peer = peer.shown  # the smtpd's address, PROXY header included
        return proto

    async def start(self) -> None:
        try:
            for listen in self.listens:
                listener = Listener(self.name, listen)
                self._listeners.append(listener)
                sock = self._unix_socket(listen.path) if listen.path is not None else None
                await listener.bind(self._connection, sock=sock,
                                    proxies=proxy_policy(self.ctx.settings))
        except BaseException:
            await self.stop(0)
            raise
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
                raise ConfigError("exists and is not a socket", source=f"{self.name}.listen",
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
        sock.listen(LISTEN_BACKLOG)
        return sock

    def reload(self) -> None:
        """SIGHUP: nothing of its own (the runner reloads the rules every decision uses)."""

    async def stop(self, grace: float = 30.0) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for listener in self._listeners:
            listener.close()
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
            conn.close()
        for listener in self._listeners:
            await listener.wait_closed(1.0)
        self._listeners.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.decider is not None:
            self.decider.close()
        self.add_tally()


def _text(raw: bytes | None) -> str | None:
    """An attribute value for the log (its escaping keeps a client from forging lines)."""
    return raw.decode("utf-8", "replace") if raw else None


def _envelope(request: PolicyRequest | None) -> Envelope:
    """The message a policy request asks about, for the ``relayed`` line."""
    got = request.fields if request is not None else {}
    raw_sender = got.get(b"sender")
    sender = None if raw_sender is None else raw_sender.decode("utf-8", "replace")
    recipient = _text(got.get(b"recipient"))
    return Envelope(sender, [recipient] if recipient else [], _text(got.get(b"helo_name")),
                    _text(got.get(b"queue_id")))


def make_service(ctx: Context) -> PolicyService:
    """The policy service on ``ctx.settings.policy.listen``."""
    listens = [parse_listen(spec, origin="policy.listen") for spec in ctx.settings.policy.listen]
    return PolicyService(ctx, listens)

