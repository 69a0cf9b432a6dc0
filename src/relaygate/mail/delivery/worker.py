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

SMTP client (aiosmtplib, :class:`SmtpClient`): EHLO with ``settings.hostname``
(HELO if EHLO is refused); STARTTLS whenever offered, *opportunistic*: the
certificate is not verified (RFC 7435: encryption against passive
eavesdropping is better than plaintext; a failed handshake retries the same
host in plaintext rather than deferring the mail). SIZE, 8BITMIME and
SMTPUTF8 (RFC 6531) are used when offered. A non-ASCII address needs
SMTPUTF8 at the next hop; without it, a non-ASCII domain with an ASCII local
part is sent in its A-label form (the same address), anything else fails with
553 5.6.7 (RFC 6533). Addresses longer than RFC 5321 section 4.5.3.1 allows
(64-octet local part, 256-octet path) fail with 553 5.1.3 before connecting.
Candidate hosts (see :mod:`relaygate.mail.delivery.routes`) are tried in order until
one completes a greeting and EHLO. Connections are cached for
``CACHE_IDLE`` seconds after a transaction and reused for the next message to
the same destination (as Postfix's connection cache does), with RSET between
failed transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiosmtplib

from relaygate.log import event
from relaygate.mail import maildir
from relaygate.mail.delivery.dsn import DsnRecipient, build_dsn, enhanced_status, one_line
from relaygate.mail.delivery.routes import (
    SMTP_PORT,
    DnsPythonResolver,
    Resolver,
    Routes,
    RoutingError,
    Target,
    resolve_targets,
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
    from relaygate.mail.directory import Account
    from relaygate.servers.base import Context

log = logging.getLogger("relaygate.delivery")

#: seconds between directory scans: picks up mail queued by other processes
RESCAN_INTERVAL = 60.0
#: seconds between checks for the ``flush`` trigger file (a stat; costs nothing)
FLUSH_POLL = 1.0
#: messages worked on at once; the rest wait in the schedule (bounds tasks and memory)
MAX_ACTIVE_MESSAGES = 1000
#: an idle cached connection is closed after this many seconds (Postfix: 2 s)
CACHE_IDLE = 2.0
#: a cached connection carries at most this many transactions, then is closed
CACHE_MAX_USES = 100
#: a zero or negative retry_schedule entry must not make the worker spin
MIN_RETRY_DELAY = 0.1
#: seconds given to QUIT when closing a connection: politeness, not correctness
QUIT_TIMEOUT = 5.0
#: stale schedule entries tolerated before the heap is rebuilt (bounds its memory)
HEAP_SLACK = 1000
#: seconds between updates of the queue-size gauges (counting is O(queue size))
GAUGE_INTERVAL = 0.5
#: RFC 5321 section 4.5.3.1.3: a path (with its angle brackets) is at most 256 octets
MAX_PATH_OCTETS = 256
#: RFC 5321 section 4.5.3.1.1: a local part is at most 64 octets
MAX_LOCAL_OCTETS = 64
#: RFC 5321 section 4.5.3.1.2: a domain is at most 255 octets
MAX_DOMAIN_OCTETS = 255

DONE_R, TEMP, PERM = "done", "temp", "perm"
#: DSN diagnostic type of our own texts (Postfix says X-Postfix); server replies are "smtp"
LOCAL_DIAGNOSTIC = "x-relaygate"
#: RFC 3463 X.4.7 "delivery time expired"
EXPIRED_STATUS = "5.4.7"
#: control characters never belong in an address (and would be command injection)
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient in one attempt."""

    result: str
    code: int
    #: reply text, starting with the enhanced status when there is one
    text: str
    status: str
    remote: str | None = None
    #: the text is the next hop's reply (not our own diagnostic)
    server: bool = True

    @property
    def diagnostic(self) -> str:
        return f"{self.code} {self.text}"


def _outcome(code: int, text: str, remote: str | None = None, *,
             server: bool = True) -> Outcome:
    text = one_line(text)
    status = enhanced_status(code, text)
    if 200 <= code < 300:
        result = DONE_R
    elif 500 <= code < 600:
        result = PERM
    else:
        # 4xx, and any reply outside the protocol, is worth another try.
        result = TEMP
    return Outcome(result, code, text, status, remote, server)


def _local(code: int, status: str, text: str, remote: str | None = None) -> Outcome:
    return _outcome(code, f"{status} {text}", remote, server=False)


def address_problem(addr: str, *, sender: bool = False) -> Outcome | None:
    """A reason ``addr`` cannot be sent anywhere (RFC 5321 section 4.5.3.1), else None."""
    status = "5.1.7" if sender else "5.1.3"
    who = "sender" if sender else "recipient"
    try:
        raw = addr.encode("utf-8")
    except UnicodeEncodeError:
        return _local(553, status, f"{who} address is not valid UTF-8")
    if len(raw) + 2 > MAX_PATH_OCTETS:
        return _local(553, status, f"{who} address is longer than {MAX_PATH_OCTETS} octets")
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        return _local(553, status, f"{who} address has no domain")
    if len(local.encode("utf-8")) > MAX_LOCAL_OCTETS:
        return _local(553, status, f"local part longer than {MAX_LOCAL_OCTETS} octets")
    if len(domain.encode("utf-8")) > MAX_DOMAIN_OCTETS:
        return _local(553, status, f"domain longer than {MAX_DOMAIN_OCTETS} octets")
    if _FORBIDDEN.search(addr) or (" " in addr and not local.startswith('"')):
        return _local(553, status, f"{who} address contains forbidden characters")
    return None


def domain_of(addr: str) -> str:
    return addr.rpartition("@")[2].lower().rstrip(".")


def _ascii_form(addr: str) -> str | None:
    """``local@IDN`` with an ASCII local part as ``local@xn--...``; None if impossible."""
    local, _, domain = addr.rpartition("@")
    if not local.isascii():
        return None
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return None


def _has_8bit(data: bytes) -> bool:
    return not data.isascii()


def _opportunistic_tls() -> ssl.SSLContext:
    # RFC 7435 opportunistic security: encrypt if we can, authenticate nobody.
    # (A bare context: loading the system's CA bundle would be wasted work.)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class _ConnectFailed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        super().__init__(outcome.diagnostic)


class _TlsFailed(Exception):
    pass


class _Stale(Exception):
    """A cached connection was closed by the server while idle."""


@dataclass
class _Conn:
    smtp: aiosmtplib.SMTP
    target: Target
    uses: int = 0
    idle_since: float = 0.0


class SmtpClient:
    """Sends one message to one destination; keeps a small connection cache."""

    def __init__(self, *, helo: str, connect_timeout: float, command_timeout: float,
                 cache_size: int, use_tls: bool = True) -> None:
        self.helo = helo or "localhost"
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.cache_size = cache_size
        self.use_tls = use_tls
        self._tls = _opportunistic_tls() if use_tls else None
        self._cache: dict[str, list[_Conn]] = {}
        self.closing = False

    async def deliver(self, key: str, targets: Sequence[Target], sender: str,
                      rcpts: Sequence[str], data: bytes) -> list[Outcome]:
        """One outcome per recipient, in order. Never raises for network trouble."""
        conn = self._take(key)
        if conn is not None:
            try:
                return await self._transaction(key, conn, sender, rcpts, data, reused=True)
            except _Stale:
                conn.smtp.close()
        last = _local(451, "4.4.1", "no host to deliver to")
        for target in targets:
            try:
                conn = await self._open(target)
            except _ConnectFailed as exc:
                last = exc.outcome
                log.info("delivery: %s", exc.outcome.diagnostic)
                continue
            return await self._transaction(key, conn, sender, rcpts, data, reused=False)
        return [last] * len(rcpts)

    async def _open(self, target: Target) -> _Conn:
        if self._tls is not None:
            try:
                return await self._connect(target, tls=True)
            except _TlsFailed:
                log.info("delivery: STARTTLS with %s[%s] failed; retrying without TLS",
                         target.host, target.address)
        return await self._connect(target, tls=False)

    async def _connect(self, target: Target, *, tls: bool) -> _Conn:
        where = f"{target.host}[{target.address}]:{target.port}"
        smtp = aiosmtplib.SMTP(hostname=target.address, port=target.port,
                               local_hostname=self.helo, timeout=self.command_timeout,
                               start_tls=False, validate_certs=False)
        try:
            await smtp.connect(timeout=self.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise _ConnectFailed(_local(451, "4.4.1", f"host {where} refused to talk to me: "
                                        f"{exc.code} {one_line(exc.message)}",
                                        target.host)) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else _errno_text(exc)
            raise _ConnectFailed(_local(451, "4.4.1", f"connect to {where}: {why}",
                                        target.host)) from None
        try:
            await self._hello(smtp)
            if tls and smtp.supports_extension("starttls"):
                try:
                    sni = None if _is_ip(target.host) else target.host
                    await smtp.starttls(server_hostname=sni, tls_context=self._tls)
                    await self._hello(smtp)
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TimeoutError,
                        ValueError):
                    smtp.close()
                    raise _TlsFailed() from None
        except _TlsFailed:
            raise
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise _ConnectFailed(_local(451, "4.4.1", f"host {where} refused EHLO/HELO: "
                                        f"{exc.code} {one_line(exc.message)}",
                                        target.host)) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
            smtp.close()
            raise _ConnectFailed(_local(451, "4.4.2", f"lost connection with {where} during "
                                        f"EHLO ({type(exc).__name__})", target.host)) from None
        return _Conn(smtp, target)

    async def _hello(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            if not smtp.is_connected:
                raise
            await smtp.helo()

    async def _transaction(self, key: str, conn: _Conn, sender: str, rcpts: Sequence[str],
                           data: bytes, *, reused: bool) -> list[Outcome]:
        smtp = conn.smtp
        remote = conn.target.host
        out: list[Outcome | None] = [None] * len(rcpts)
        utf8_ok = smtp.supports_extension("smtputf8")
        if not sender.isascii() and not utf8_ok:
            await self._release(key, conn)
            return [_local(553, "5.6.7", f"sender address needs SMTPUTF8 and {remote} "
                           "does not support it", remote)] * len(rcpts)
        wire: list[tuple[int, str]] = []
        for i, r in enumerate(rcpts):
            if r.isascii() or utf8_ok:
                wire.append((i, r))
                continue
            alt = _ascii_form(r)
            if alt is None:
                out[i] = _local(553, "5.6.7", f"recipient address needs SMTPUTF8 and {remote} "
                                "does not support it", remote)
            else:
                wire.append((i, alt))
        if not wire:
            await self._release(key, conn)
            return [o for o in out if o is not None]
        need_utf8 = utf8_ok and (not sender.isascii() or not all(w.isascii() for _, w in wire))
        options: list[bytes] = []
        if smtp.supports_extension("size"):
            limit = _int(smtp.esmtp_extensions.get("size", ""))
            if limit and len(data) > limit:
                await self._release(key, conn)
                return [o or _local(552, "5.3.4", f"message size {len(data)} exceeds the size "
                                    f"limit {limit} of {remote}", remote) for o in out]
            options.append(b"SIZE=%d" % len(data))
        if _has_8bit(data) and smtp.supports_extension("8bitmime"):
            options.append(b"BODY=8BITMIME")
        if need_utf8:
            options.append(b"SMTPUTF8")
        enc = "utf-8" if need_utf8 else "ascii"
        stage = "MAIL FROM"
        accepted: list[int] = []
        try:
            try:
                resp = await smtp.execute_command(b"MAIL", b"FROM:<" + sender.encode(enc) + b">",
                                                  *options)
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                if reused:
                    raise _Stale() from None
                raise
            if reused and resp.code == 421:
                # The server's idle timeout ("421 ... closing") was waiting in the buffer.
                raise _Stale()
            if resp.code != 250:
                o = _outcome(resp.code, resp.message, remote)
                for i, _ in wire:
                    out[i] = o
                await self._reset(key, conn)
                return _fill(out, o)
            stage = "RCPT TO"
            for i, w in wire:
                try:
                    resp = await smtp.execute_command(b"RCPT", b"TO:<" + w.encode(enc) + b">")
                except ValueError:
                    out[i] = _local(553, "5.1.3", "recipient address contains forbidden "
                                    "characters", remote)
                    continue
                if resp.code in (250, 251):
                    accepted.append(i)
                else:
                    out[i] = _outcome(resp.code, resp.message, remote)
            if not accepted:
                await self._reset(key, conn)
                return _fill(out, _local(451, "4.3.0", "no recipient accepted", remote))
            stage = "DATA"
            resp = await smtp.data(data)
            done = _outcome(resp.code, resp.message, remote)
            for i in accepted:
                out[i] = done
            await self._release(key, conn)
            return _fill(out, done)
        except _Stale:
            raise
        except aiosmtplib.SMTPDataError as exc:
            o = _outcome(exc.code, exc.message, remote)
            for i in accepted:
                out[i] = o
            await self._reset(key, conn)
            return _fill(out, o)
        except ValueError:
            # Control characters or an encoding error in the sender address.
            smtp.close()
            return _fill(out, _local(553, "5.1.7", "sender address contains forbidden "
                                     "characters", remote))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            what = "timeout" if isinstance(exc, TimeoutError) else "lost connection"
            return _fill(out, _local(451, "4.4.2", f"{what} with {remote} while sending "
                                     f"{stage}", remote))

    async def _reset(self, key: str, conn: _Conn) -> None:
        try:
            await conn.smtp.rset()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            conn.smtp.close()
            return
        await self._release(key, conn)

    async def _release(self, key: str, conn: _Conn) -> None:
        conn.uses += 1
        cached = self._cache.setdefault(key, [])
        if (conn.smtp.is_connected and not self.closing and conn.uses < CACHE_MAX_USES
                and len(cached) < self.cache_size):
            conn.idle_since = time.monotonic()
            cached.append(conn)
            return
        if not cached:
            self._cache.pop(key, None)
        await self._quit(conn)

    def _take(self, key: str) -> _Conn | None:
        cached = self._cache.get(key)
        now = time.monotonic()
        while cached:
            conn = cached.pop()
            if conn.smtp.is_connected and now - conn.idle_since < CACHE_IDLE:
                return conn
            conn.smtp.close()
        self._cache.pop(key, None)
        return None

    async def _quit(self, conn: _Conn) -> None:
        if not conn.smtp.is_connected:
            return
        try:
            await conn.smtp.quit(timeout=QUIT_TIMEOUT)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            conn.smtp.close()

    async def reap(self) -> None:
        """QUIT cached connections idle for longer than CACHE_IDLE."""
        now = time.monotonic()
        doomed: list[_Conn] = []
        for key in list(self._cache):
            keep = []
            for conn in self._cache[key]:
                if now - conn.idle_since >= CACHE_IDLE or not conn.smtp.is_connected:
                    doomed.append(conn)
                else:
                    keep.append(conn)
            if keep:
                self._cache[key] = keep
            else:
                del self._cache[key]
        if doomed:
            await asyncio.gather(*(self._quit(c) for c in doomed))

    async def close(self) -> None:
        self.closing = True
        conns = [c for lst in self._cache.values() for c in lst]
        self._cache.clear()
        if conns:
            await asyncio.gather(*(self._quit(c) for c in conns))


def _fill(out: list[Outcome | None], default: Outcome) -> list[Outcome]:
    return [o if o is not None else default for o in out]


def _int(s: str) -> int:
    s = s.strip()
    return int(s) if s.isdigit() else 0


def _is_ip(s: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


def _errno_text(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return type(exc).__name__


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
            o = _local(exc.code, exc.status, exc.text)
            return [o] * len(addrs)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("queue: delivery of %s to %s failed unexpectedly", env.id, domain)
            return [_local(451, "4.3.0", "internal error; will retry")] * len(addrs)

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
                out.append(_local(550, "5.1.1", f"no mailbox here by that name: {addr}", me))
                continue
            if not account.enabled:
                out.append(_local(550, "5.2.1", "mailbox disabled", me))
                continue
            # RFC 5321 section 4.4: the final delivery adds Return-Path.
            copy = b"Return-Path: <" + env.sender.encode("utf-8") + b">\r\n" + data
            try:
                await asyncio.to_thread(maildir.deliver, account.maildir, copy)
            except OSError as exc:
                log.error("queue: local delivery of %s to %s failed: %s", env.id, addr, exc)
                out.append(_local(451, "4.3.0", "local delivery failed; will retry", me))
                continue
            out.append(_local(250, "2.0.0", "delivered to Maildir", me))
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
        age = _age(now - env.created)
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


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"
