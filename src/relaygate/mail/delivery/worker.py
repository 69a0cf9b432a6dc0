"""The delivery worker: takes messages from the queue to the next hop, or bounces them.

Theory of operation
-------------------
One asyncio task (:class:`DeliveryWorker`) keeps an in-memory schedule (a heap
of ``(next attempt, queue id)``) built from the envelopes on disk. It is fed
by a directory scan at start, every ``RESCAN_INTERVAL`` seconds, on ``queue
flush`` (the ``flush`` trigger file, polled every ``FLUSH_POLL`` seconds) and,
without delay, by :meth:`Queue.enqueue` in the same process (a listener).
Only one worker may run per queue directory (an flock), so ``relaygate queue
run`` and ``relaygate serve`` cannot deliver the same message twice at once.

For each due message the worker groups the pending recipients by domain and
delivers each group in one SMTP transaction (RFC 5321 section 3.3), groups in
parallel. Concurrency is bounded twice: ``queue.concurrency`` connections in
all and ``queue.per_destination`` per destination (the domain, or the relay
of its smtproutes line), so one slow site cannot take every slot.

Per recipient (RFC 5321 section 4.2.1 reply classes):

* 2xx to DATA: ``done``.
* 4xx, a lost connection, a timeout, a temporary DNS failure: stays
  ``pending``; retried after ``queue.retry_schedule[attempt]`` (the last entry
  repeats), never later than the end of ``queue.lifetime``. When the lifetime
  is over it fails with status 5.4.7 and the last error as diagnostic.
* 5xx, null MX (RFC 7505, 556 5.1.10), NXDOMAIN: ``failed`` now.

Failed recipients get one DSN (RFC 3464, :mod:`relaygate.mail.delivery.dsn`) per
message and run, sent with the null sender: into the sender's Maildir when the
sender's domain is local and the directory knows the account, otherwise queued
for remote delivery. A message with the null sender is never bounced (RFC 5321
section 6.1); its failure is a double bounce, delivered to the postmaster's
Maildir (``queue.postmaster`` at the first local domain) or, without one,
kept in ``quarantine/postmaster/``. Recipients in a local domain (when a
directory is configured) are delivered into their Maildir instead of over SMTP.

The SMTP client (EHLO, opportunistic STARTTLS, SMTPUTF8, the connection cache)
is :mod:`relaygate.mail.delivery.smtp_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relaygate.log import duration, event
from relaygate.mail import maildir
from relaygate.mail.delivery.dsn import DsnRecipient, build_dsn
from relaygate.mail.delivery.routes import (
    SMTP_PORT,
    DnsPythonResolver,
    Resolver,
    Routes,
    RoutingError,
    resolve_targets,
)
from relaygate.mail.delivery.smtp_client import (
    DONE_R,
    LOCAL_DIAGNOSTIC,
    PERM,
    Outcome,
    SmtpClient,
    address_problem,
    domain_of,
    local_outcome,
)
from relaygate.mail.queue import (
    DONE,
    FAILED,
    CorruptEnvelope,
    Envelope,
    MessageGone,
    Queue,
    QueueLock,
    Recipient,
)
from relaygate.mail.rcpthosts import RcptHosts
from relaygate.protocols.smtp_address import canonical_address

if TYPE_CHECKING:
    from relaygate.context import Context
    from relaygate.interfaces import Account

log = logging.getLogger("relaygate.delivery")


#: seconds between directory scans: picks up mail queued by other processes
RESCAN_INTERVAL = 60.0
#: seconds between checks for the ``flush`` trigger file (a stat; costs nothing)
FLUSH_POLL = 1.0
#: messages worked on at once; the rest wait in the schedule (bounds tasks and memory)
MAX_ACTIVE_MESSAGES = 1000
#: a zero or negative retry_schedule entry must not make the worker spin
MIN_RETRY_DELAY = 0.1
#: stale schedule entries tolerated before the heap is rebuilt (bounds its memory)
HEAP_SLACK = 1000
#: seconds between updates of the queue-size gauges (counting is O(queue size))
GAUGE_INTERVAL = 0.5
#: RFC 3463 X.4.7 "delivery time expired"
EXPIRED_STATUS = "5.4.7"


@dataclass
class _Slot:
    sem: asyncio.Semaphore
    users: int = 0


class DeliveryWorker:
    """The ``queue`` service (see the module docstring). Build it with ``make_worker``."""

    name = "queue"

    def __init__(self, ctx: Context, *, queue: Queue, routes: Routes,
                 resolver: Resolver | None = None, mx_port: int = SMTP_PORT) -> None:
        self.ctx = ctx
        #: port for MX targets: 25, except in tests (loopback sinks on free ports)
        self.mx_port = mx_port
        self.settings = ctx.settings
        self.qs = ctx.settings.queue
        self.queue = queue
        self.routes = routes
        self.resolver: Resolver = resolver if resolver is not None else DnsPythonResolver()
        self.client = SmtpClient(helo=self.settings.hostname,
                                 connect_timeout=self.qs.connect_timeout,
                                 command_timeout=self.qs.command_timeout,
                                 cache_size=self.qs.per_destination)
        self._global = asyncio.Semaphore(self.qs.concurrency)
        self._slots: dict[str, _Slot] = {}
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._attempts: dict[str, int] = {}
        self._active: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._lock: QueueLock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gauges_at = 0.0
        #: local domains as the SMTP server sees them: ``domains``, the rcpthosts file
        #: (and morercpthosts), ``.suffix`` lines, IDNA and case variants
        self.rcpthosts = RcptHosts.from_settings(self.settings)

    # -- Service -----------------------------------------------------------------

    def listeners(self) -> list[str]:
        return []

    async def start(self) -> None:
        await self._prepare()
        self._task = asyncio.create_task(self._run(), name="relaygate-queue")

    def reload(self) -> None:
        """SIGHUP: re-read the local domains and smtproutes; a bad file raises, the old stay."""
        rcpthosts = RcptHosts.from_settings(self.settings)
        routes = Routes.from_settings(self.settings)
        self.rcpthosts, self.routes = rcpthosts, routes

    async def stop(self, grace: float = 30.0) -> None:
        """Stop taking work; let deliveries in flight finish for ``grace`` s, then cancel."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        active = [t for t in self._active.values() if not t.done()]
        if active:
            _, pending = await asyncio.wait(active, timeout=max(0.0, grace))
            for t in pending:
                t.cancel()
            if pending:
                log.warning("queue: cancelled %d deliveries still in flight after %.0fs; "
                            "they stay queued", len(pending), grace)
                await asyncio.gather(*pending, return_exceptions=True)
        await self.client.close()
        self.queue.remove_listener(self._on_enqueue)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._update_gauges(force=True)

    async def run_once(self) -> int:
        """Deliver what is due now (and the bounces that creates), then stop.

        Returns the number of messages worked on.
        """
        await self._prepare()
        count = 0
        try:
            while True:
                count += self._dispatch(time.time())
                if not self._active:
                    break
                await asyncio.wait(list(self._active.values()),
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self.stop(grace=0.0)
        return count

    # -- schedule ------------------------------------------------------------------

    async def _prepare(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock = await asyncio.to_thread(self.queue.lock)
        try:
            report = await asyncio.to_thread(self.queue.cleanup)
            for name in report.orphans_moved:
                event("queue.orphan", level=logging.WARNING, id=name, action="quarantined")
            self.queue.add_listener(self._on_enqueue)
            flush = self.queue.take_flush_request()
            await self._scan()
            if flush:
                self._flush_now()
        except BaseException:
            self._lock.release()
            self._lock = None
            raise

    def _on_enqueue(self, qid: str) -> None:
        # Called in whatever thread enqueued (the SMTP server may use to_thread).
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._schedule, qid, 0.0, 0)

    def _schedule(self, qid: str, when: float, attempts: int) -> None:
        self._due[qid] = when
        self._attempts[qid] = attempts
        heapq.heappush(self._heap, (when, qid))
        if len(self._heap) > 2 * len(self._due) + HEAP_SLACK:
            # Rescheduling leaves stale entries behind; drop them once they pile up.
            self._heap = [(w, q) for q, w in self._due.items()]
            heapq.heapify(self._heap)
        self._wake.set()

    def _forget(self, qid: str) -> None:
        self._due.pop(qid, None)
        self._attempts.pop(qid, None)

    def _flush_now(self) -> None:
        for qid in list(self._due):
            self._due[qid] = 0.0
            heapq.heappush(self._heap, (0.0, qid))
        self._wake.set()
        event("queue.flush", messages=len(self._due))

    async def _scan(self) -> None:
        # Only forget what was scheduled before the listing: a message enqueued in this
        # process while the directory is being read is not in the listing yet.
        known = set(self._due)
        ids = await asyncio.to_thread(self.queue.ids)
        present = set(ids)
        for qid in known - present:
            if qid in self._due:
                self._forget(qid)
        new = [q for q in ids if q not in self._due and q not in self._active]
        if not new:
            return
        loaded = await asyncio.to_thread(self._load_many, new)
        for qid, item in loaded:
            if qid in self._due or qid in self._active:
                continue  # scheduled by an enqueue while the files were being read
            if isinstance(item, CorruptEnvelope):
                await self._quarantine(qid, f"corrupt envelope: {item}")
            elif item is not None:
                self._schedule(qid, item.next_attempt, item.attempts)

    def _load_many(self, ids: list[str]) -> list[tuple[str, Envelope | CorruptEnvelope | None]]:
        out: list[tuple[str, Envelope | CorruptEnvelope | None]] = []
        for qid in ids:
            try:
                out.append((qid, self.queue.load(qid)))
            except FileNotFoundError:
                continue
            except CorruptEnvelope as exc:
                out.append((qid, exc))
            except OSError as exc:
                log.error("queue: cannot read envelope %s: %s", qid, exc)
        return out

    def _dispatch(self, now: float) -> int:
        started = 0
        while self._heap and len(self._active) < MAX_ACTIVE_MESSAGES and not self._stopping:
            when, qid = self._heap[0]
            if when > now:
                break
            heapq.heappop(self._heap)
            if self._due.get(qid) != when or qid in self._active:
                continue
            del self._due[qid]
            task = asyncio.create_task(self._process_safe(qid), name=f"relaygate-queue-{qid}")
            self._active[qid] = task
            task.add_done_callback(functools.partial(self._done, qid))
            started += 1
        return started

    def _done(self, qid: str, _task: asyncio.Task[None]) -> None:
        self._active.pop(qid, None)
        self._wake.set()

    def _next_due(self) -> float | None:
        while self._heap:
            when, qid = self._heap[0]
            if self._due.get(qid) == when and qid not in self._active:
                return when
            heapq.heappop(self._heap)
        return None

    async def _run(self) -> None:
        last_scan = time.monotonic()
        last_flush = last_scan
        while not self._stopping:
            self._wake.clear()
            try:
                mono = time.monotonic()
                if mono - last_flush >= FLUSH_POLL:
                    last_flush = mono
                    if self.queue.take_flush_request():
                        await self._scan()
                        self._flush_now()
                        last_scan = mono
                if mono - last_scan >= RESCAN_INTERVAL:
                    last_scan = mono
                    await self._scan()
                await self.client.reap()
                self._dispatch(time.time())
                self._update_gauges()
            except Exception:
                # Never let one bad scan (a full disk, a permission error) stop delivery.
                log.exception("queue: worker loop error")
            delay = FLUSH_POLL
            nxt = self._next_due()
            if nxt is not None and len(self._active) < MAX_ACTIVE_MESSAGES:
                delay = min(delay, max(0.0, nxt - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _update_gauges(self, *, force: bool = False) -> None:
        mono = time.monotonic()
        if not force and mono - self._gauges_at < GAUGE_INTERVAL:
            return
        self._gauges_at = mono
        fresh = sum(1 for q in self._due if not self._attempts.get(q))
        gauge = self.ctx.metrics.queue_size
        gauge.labels(state="queued").set(fresh)
        gauge.labels(state="deferred").set(len(self._due) - fresh)
        gauge.labels(state="in_flight").set(len(self._active))

    # -- one message ---------------------------------------------------------------

    async def _process_safe(self, qid: str) -> None:
        try:
            nxt = await self._process(qid)
        except asyncio.CancelledError:
            # Stopped mid-delivery: the envelope still lists the recipients as pending.
            raise
        except Exception:
            log.exception("queue: unexpected error while delivering %s; will retry", qid)
            attempts = self._attempts.get(qid, 0)
            nxt = (time.time() + self._retry_delay(attempts + 1), attempts)
        # Leave the active set before rescheduling, or the dispatcher would skip it.
        self._active.pop(qid, None)
        if nxt is not None:
            self._schedule(qid, *nxt)
        else:
            self._forget(qid)

    async def _quarantine(self, qid: str, why: str) -> None:
        self._forget(qid)
        try:
            path = await asyncio.to_thread(self.queue.quarantine, qid, why)
        except OSError as exc:
            log.error("queue: cannot quarantine %s (%s): %s", qid, why, exc)
            return
        event("queue.quarantined", level=logging.ERROR, id=qid, reason=why, path=str(path))

    def _retry_delay(self, attempts: int) -> float:
        schedule = self.qs.retry_schedule or (60.0,)
        delay = schedule[min(max(attempts, 1), len(schedule)) - 1]
        return max(MIN_RETRY_DELAY, delay)

    def _load_message(self, qid: str) -> tuple[Envelope, bytes | None]:
        # One thread hop for both files (they are read together for every attempt).
        env = self.queue.load(qid)
        try:
            return env, self.queue.read_message(qid)
        except FileNotFoundError:
            return env, None

    async def _process(self, qid: str) -> tuple[float, int] | None:
        """Work on one message; the (time, attempts) of its next try, or None when done."""
        try:
            env, maybe_data = await asyncio.to_thread(self._load_message, qid)
        except FileNotFoundError:
            self._forget(qid)
            return None
        except CorruptEnvelope as exc:
            await self._quarantine(qid, f"corrupt envelope: {exc}")
            return None
        if maybe_data is None:
            await self._quarantine(qid, "message file missing")
            return None
        data = maybe_data
        self._attempts[qid] = env.attempts
        gone = False
        pending = env.pending()
        if pending:
            groups: dict[str, list[Recipient]] = {}
            sender_bad = address_problem(env.sender, sender=True) if env.sender else None
            for r in pending:
                problem = sender_bad or address_problem(r.addr)
                if problem is not None:
                    self._apply(env, [r], [problem])
                else:
                    groups.setdefault(domain_of(r.addr), []).append(r)
            if groups:
                lock = asyncio.Lock()
                save_each = len(groups) > 1

                async def one(domain: str, rcpts: list[Recipient]) -> None:
                    nonlocal gone
                    outcomes = await self._deliver_domain(env, domain, rcpts, data)
                    async with lock:
                        self._apply(env, rcpts, outcomes)
                        if save_each and not gone:
                            # Record finished groups now: a crash must not resend them.
                            try:
                                await asyncio.to_thread(self.queue.save, env)
                            except MessageGone:
                                gone = True

                await asyncio.gather(*(one(d, rs) for d, rs in groups.items()))
                env.attempts += 1
        if gone:
            event("queue.deleted", id=qid, note="deleted while in flight")
            self._forget(qid)
            return None
        now = time.time()
        still = env.pending()
        if still and now >= env.created + self.qs.lifetime:
            for r in still:
                # The last error stays the diagnostic; 5.4.7 says why we gave up (RFC 3463).
                r.state = FAILED
                r.status = EXPIRED_STATUS
                self.ctx.metrics.messages.labels(event="bounced").inc()
                event("delivery.expired", id=qid, rcpt=r.addr)
        failed = [r for r in env.recipients if r.state == FAILED and not r.notified]
        if failed:
            try:
                await self._notify(env, failed, data, now, action="failed")
            except Exception:
                log.exception("queue: cannot write the DSN for %s; will retry", qid)
            else:
                for r in failed:
                    r.notified = True
        still = env.pending()
        if (still and self.qs.delay_warning > 0 and not env.warned and env.sender
                and now - env.created >= self.qs.delay_warning):
            try:
                await self._notify(env, still, data, now, action="delayed")
            except Exception:
                log.exception("queue: cannot write the delay warning for %s", qid)
            else:
                env.warned = True
        unfinished = still or any(r.state == FAILED and not r.notified for r in env.recipients)
        if not unfinished:
            await asyncio.to_thread(self.queue.remove, qid)
            self._forget(qid)
            event("queue.done", id=qid,
                  delivered=sum(1 for r in env.recipients if r.state == DONE),
                  failed=sum(1 for r in env.recipients if r.state == FAILED))
            return None
        delay = self._retry_delay(env.attempts)
        env.next_attempt = now + delay
        if still:
            env.next_attempt = max(now + MIN_RETRY_DELAY,
                                   min(env.next_attempt, env.created + self.qs.lifetime))
        errors = [r.last_error for r in still if r.last_error]
        env.last_error = errors[-1] if errors else env.last_error
        try:
            await asyncio.to_thread(self.queue.save, env)
        except MessageGone:
            event("queue.deleted", id=qid, note="deleted while in flight")
            self._forget(qid)
            return None
        return env.next_attempt, env.attempts

    def _apply(self, env: Envelope, rcpts: Sequence[Recipient],
               outcomes: Sequence[Outcome]) -> None:
        messages = self.ctx.metrics.messages
        for r, o in zip(rcpts, outcomes, strict=True):
            r.attempts += 1
            r.remote_mta = o.remote
            r.status = o.status
            r.diagnostic_type = "smtp" if o.server else LOCAL_DIAGNOSTIC
            if o.result == DONE_R:
                r.state = DONE
                r.last_error = None
                messages.labels(event="delivered").inc()
                event("delivery.ok", id=env.id, rcpt=r.addr, relay=o.remote,
                      reply=o.diagnostic)
            elif o.result == PERM:
                r.state = FAILED
                r.last_error = o.diagnostic
                messages.labels(event="bounced").inc()
                event("delivery.failed", level=logging.WARNING, id=env.id, rcpt=r.addr,
                      relay=o.remote, reply=o.diagnostic)
            else:
                r.last_error = o.diagnostic
                messages.labels(event="deferred").inc()
                event("delivery.deferred", id=env.id, rcpt=r.addr, relay=o.remote,
                      reply=o.diagnostic)

    async def _deliver_domain(self, env: Envelope, domain: str, rcpts: Sequence[Recipient],
                              data: bytes) -> list[Outcome]:
        addrs = [r.addr for r in rcpts]
        try:
            if self.ctx.directory is not None and self.rcpthosts.is_local(domain):
                return await self._deliver_local(env, addrs, data)
            route = self.routes.lookup(domain)
            key = f"relay:{route.relay}" if route is not None and route.relay else domain
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot(asyncio.Semaphore(self.qs.per_destination))
            slot.users += 1
            try:
                async with slot.sem, self._global:
                    targets = await resolve_targets(domain, route, self.resolver,
                                                    local_names=(self.settings.hostname,),
                                                    port=self.mx_port)
                    return await self.client.deliver(key, targets, env.sender, addrs, data)
            finally:
                slot.users -= 1
                if not slot.users:
                    self._slots.pop(key, None)
        except RoutingError as exc:
            o = local_outcome(exc.code, exc.status, exc.text)
            return [o] * len(addrs)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("queue: delivery of %s to %s failed unexpectedly", env.id, domain)
            return [local_outcome(451, "4.3.0", "internal error; will retry")] * len(addrs)

    async def _find_account(self, address: str) -> Account | None:
        directory = self.ctx.directory
        if directory is None:
            return None
        return await asyncio.to_thread(directory.find_recipient, canonical_address(address))

    async def _deliver_local(self, env: Envelope, addrs: Sequence[str],
                             data: bytes) -> list[Outcome]:
        out: list[Outcome] = []
        me = self.settings.hostname
        for addr in addrs:
            account = await self._find_account(addr)
            if account is None:
                out.append(local_outcome(550, "5.1.1", f"no mailbox here by that name: {addr}", me))
                continue
            if not account.enabled:
                out.append(local_outcome(550, "5.2.1", "mailbox disabled", me))
                continue
            # RFC 5321 section 4.4: the final delivery adds Return-Path.
            copy = b"Return-Path: <" + env.sender.encode("utf-8") + b">\r\n" + data
            try:
                await asyncio.to_thread(maildir.deliver, account.maildir, copy)
            except OSError as exc:
                log.error("queue: local delivery of %s to %s failed: %s", env.id, addr, exc)
                out.append(local_outcome(451, "4.3.0", "local delivery failed; will retry", me))
                continue
            out.append(local_outcome(250, "2.0.0", "delivered to Maildir", me))
        return out

    # -- bounces -------------------------------------------------------------------

    def _postmaster(self) -> str:
        pm = self.qs.postmaster
        if "@" in pm:
            return pm
        # The SMTP server's <Postmaster> is at the same first local domain.
        return f"{pm}@{self.rcpthosts.primary or self.settings.hostname}"

    async def _notify(self, env: Envelope, rcpts: Sequence[Recipient], data: bytes,
                      now: float, *, action: str) -> None:
        """Write the DSN for ``rcpts`` durably (Maildir, queue or quarantine); raise if not."""
        until = env.created + self.qs.lifetime if action == "delayed" else None
        age = duration(now - env.created)
        drs = [DsnRecipient(address=r.addr, action=action,
                            status=_dsn_status(r.status, action), diagnostic=r.last_error,
                            diagnostic_type=r.diagnostic_type, remote_mta=r.remote_mta,
                            last_attempt=now, will_retry_until=until,
                            note=(f"gave up after {age} in the queue"
                                  if r.status == EXPIRED_STATUS else None))
               for r in rcpts]
        host = self.settings.hostname
        if not env.sender:
            if action != "failed":
                return
            # RFC 5321 section 6.1: never bounce a bounce; tell the postmaster instead.
            pm = self._postmaster()
            dsn = build_dsn(reporting_mta=host, to=pm, recipients=drs, original=data,
                            arrival=env.created, now=now, queue_id=env.id,
                            original_sender="", return_message=True, postmaster_copy=True)
            account = await self._find_account(pm)
            if account is not None:
                await asyncio.to_thread(maildir.deliver, account.maildir,
                                        b"Return-Path: <>\r\n" + dsn)
                event("delivery.double_bounce", level=logging.WARNING, id=env.id, to=pm,
                      via="maildir")
            else:
                path = await asyncio.to_thread(self.queue.keep_for_postmaster, dsn, env.id)
                event("delivery.double_bounce", level=logging.WARNING, id=env.id, to=pm,
                      via="quarantine", path=str(path))
            return
        dsn = build_dsn(reporting_mta=host, to=env.sender, recipients=drs, original=data,
                        arrival=env.created, now=now, queue_id=env.id)
        account = None
        if self.rcpthosts.is_local(domain_of(env.sender)):
            account = await self._find_account(env.sender)
        if account is not None:
            await asyncio.to_thread(maildir.deliver, account.maildir,
                                    b"Return-Path: <>\r\n" + dsn)
            event("delivery.dsn", id=env.id, to=env.sender, action=action, via="maildir",
                  recipients=len(drs))
        else:
            new_id = await asyncio.to_thread(self.queue.enqueue, "", [env.sender], dsn)
            event("delivery.dsn", id=env.id, to=env.sender, action=action, via="queue",
                  dsn_id=new_id, recipients=len(drs))


def _dsn_status(status: str | None, action: str) -> str:
    if action == "delayed":
        return status if status and status.startswith("4.") else "4.0.0"
    if status and status.startswith("5."):
        return status
    return "5.0.0"


def make_worker(ctx: Context, *, resolver: Resolver | None = None) -> DeliveryWorker:
    """The delivery worker service for ``ctx`` (name "queue", no listeners).

    smtproutes are parsed here, so a bad line stops start-up with a ConfigError.
    ``ctx.queue`` is created (``settings.data_dir / "queue"``) when missing.
    ``resolver`` replaces DNS (tests); default: dnspython with the system's resolv.conf.
    """
    routes = Routes.from_settings(ctx.settings)
    if ctx.queue is None:
        ctx.queue = Queue(ctx.settings.data_dir / "queue")
    return DeliveryWorker(ctx, queue=ctx.queue, routes=routes, resolver=resolver)
