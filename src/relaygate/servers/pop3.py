"""The POP3 service: asyncio glue around the sans-I/O core, over Maildir.

Theory of operation
-------------------
Each connection is a :class:`_Channel` (an ``asyncio.Protocol``) and a session
coroutine, :meth:`Pop3Service._session`: the bytes it reads go into
:class:`relaygate.protocols.pop3.Pop3Connection` and the events the core returns
are carried out (RFC 1939, RFC 2449, RFC 2595, RFC 5034; see that module). What
needs no waiting is answered where the bytes arrive (:meth:`Pop3Service._serve`,
called from ``data_received``): DELE, LIST, UIDL, STAT and the like, and a RETR of
a message already read ahead, cost no task switch, no future and no timer. The
coroutine wakes for the rest: logins, STLS, QUIT, a RETR or TOP to read from
disk. Replies go straight to the transport; the session stops answering while
the transport is above its high-water mark (the client does not read), and the
channel stops reading while more than :data:`PENDING_LIMIT` octets of pipelined
commands wait. One lazy timer per connection bounds both waits by
``pop3.idle_timeout``.

Everything that blocks runs off the event loop, through
:meth:`Pop3Service._hop` (the loop's default thread pool; password checks on the
user database's own pool): store writes, mailbox scans, message reads,
seen-flag renames and deletions.

A successful login (USER/PASS, APOP or AUTH PLAIN) from a TCP client opens
the relay window of the client's address (``RelayControl.open_window``,
source ``pop3``); a store error is logged and the login still succeeds, so a
broken store never costs mail access (and relaying fails closed elsewhere).
The window opens on correct credentials even when the mailbox then turns out
to be in use: the person proved who they are.

Maildir semantics: RETR, once the whole message is sent, marks it to move
from new/ to cur/ with the ``S`` flag (TOP does not: it is a peek); the moves
are made together, in one thread hop, at QUIT or when the session ends
otherwise (a dropped connection too). A message up to 1 MiB is opened, read,
closed and encoded for the wire (:func:`relaygate.protocols.pop3.encode_message`)
in one thread hop, together with the messages after it up to :data:`READ_AHEAD`
octets (clients retrieve in order: the next RETRs are then answered at once;
a message read ahead is the session's even if another reader removes it
before its RETR); a larger one streams in 256 KiB reads. ``sendfile`` does not
fit: the wire form differs from the file (CRLF, dot-stuffing), and TLS sessions
could not use it anyway. DELE only marks; the files go in the UPDATE state
after QUIT (RFC 1939 section 6), and their entries leave the IMAP
``dovecot-uidlist``; a dropped connection, a timeout or a server stop deletes
nothing. One session per mailbox (``-ERR [IN-USE]``, RFC 2449 section 8.1.2):
see :func:`relaygate.mail.mailbox.lock_mailbox`.

Listeners: ``pop3.listen`` (STLS offered when a certificate is configured)
and ``pop3.listen_tls`` (implicit TLS, started only with a certificate).
Plaintext passwords are accepted without TLS only on a loopback listener or
from a loopback client, or with ``auth.allow_plaintext``.

Limits: ``pop3.idle_timeout`` between commands (RFC 1939 section 3: at least
10 minutes) and for a client that stops reading; ``pop3.max_connections_per_ip``;
the core's line, bad-command and command-count limits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from relaygate.addresses import is_loopback
from relaygate.log import event
from relaygate.mail.mailbox import (
    MailboxError,
    MailboxInUse,
    MailboxLock,
    MaildirMailbox,
    Message,
    SizeCache,
    lock_mailbox,
)
from relaygate.mail.uidlist import forget_deleted
from relaygate.protocols.pop3 import (
    ApopLogin,
    Close,
    Event,
    Login,
    LoginFailure,
    MessageEncoder,
    NeedData,
    Pop3Config,
    Pop3Connection,
    Retrieve,
    StartTls,
    Update,
    encode_message,
)
from relaygate.servers.accept import Peer
from relaygate.servers.listeners import (
    TLS_HANDSHAKE_TIMEOUT,
    AddressLimiter,
    Listener,
    open_window_after_login,
    parse_listen,
    proxy_policy,
    tls_context_of,
)

if TYPE_CHECKING:
    from relaygate.context import Context
    from relaygate.interfaces import Directory, LoginResult

log = logging.getLogger("relaygate.pop3")
_T = TypeVar("_T")

#: bytes a client may send ahead (pipelined commands) before the server stops reading
PENDING_LIMIT = 64 * 1024
#: octets of replies the core queues before the server sends them and sees whether the
#: client reads (commands with large answers, such as UIDL, pipelined)
REPLY_BATCH = 64 * 1024
#: a message up to this size is read whole in one thread hop and sent at once
READ_WHOLE = 1024 * 1024
#: octets of messages a session reads ahead of their RETR (see Pop3Service._plan_ahead)
READ_AHEAD = 256 * 1024
#: and at most this many messages
READ_AHEAD_MESSAGES = 64
#: bytes read per thread hop from a larger message while sending it
SEND_CHUNK = 256 * 1024


@dataclass(eq=False)
class _Session:
    ip: str | None
    #: forwarded by a trusted proxy (the listener's own address then says nothing)
    proxied: bool = False
    task: asyncio.Task[None] | None = None
    user: str | None = None
    #: waiting for the client's next command (safe to cut at shutdown)
    idle: bool = True
    lock: MailboxLock | None = None
    mailbox: MaildirMailbox | None = None
    messages: list[Message] = field(default_factory=list)
    #: retrieved messages not yet moved new/ -> cur/ (by name)
    seen: dict[str, Message] = field(default_factory=dict)
    #: messages read ahead of their RETR, in wire form (by name; about READ_AHEAD octets)
    ahead: dict[str, bytes] = field(default_factory=dict)


def _read_message(mailbox: MaildirMailbox, msg: Message, encode: bool,
                  ahead: Sequence[Message] = ()) -> tuple[bytes, BinaryIO | None, dict[str, bytes]]:
    """In a worker thread: read ``msg`` (whole up to READ_WHOLE, else its first part and
    the open file); with ``encode``, a whole message comes back in its RETR wire form,
    and so do the messages of ``ahead`` that can be read now (by name; read-ahead stops
    at the first that cannot)."""
    data, f = mailbox.read(msg, READ_WHOLE)
    if not encode or f is not None:
        return data, f, {}
    more: dict[str, bytes] = {}
    for m in ahead:
        try:
            got, g = mailbox.read(m, READ_WHOLE)
        except MailboxError:
            break
        if g is not None:
            g.close()
            break
        more[m.name] = encode_message(got)
    return encode_message(data), None, more


class _Drain:
    """:meth:`Pop3Service._serve`'s answer when the client must read before more is done."""


DRAIN = _Drain()
#: what :meth:`Pop3Service._serve` hands the session coroutine: an event it must wait
#: for, DRAIN, or None (the core needs more bytes)
Served = Event | _Drain | None


class _Channel(asyncio.Protocol):
    """One POP3 connection's transport side, for its session coroutine.

    The session coroutine awaits only when it must: :meth:`readable` when the core
    asks for bytes, :meth:`drain` when the transport is above its high-water mark
    (``pause_writing``), and the thread hops of its commands. While it waits for
    bytes, what arrives is served right here, in ``data_received``, by
    :meth:`Pop3Service._serve`: a command that needs no waiting (DELE, LIST, UIDL,
    STAT, NOOP, RSET, CAPA, a RETR of a message read ahead) costs no task switch,
    no future and no timer; the coroutine wakes only for one that does (a login,
    QUIT, a RETR to read from disk, STLS). Bytes that arrive while the coroutine
    is busy (a client pipelining commands) wait here and go to the core in order
    when it next asks; past :data:`PENDING_LIMIT` the channel stops reading from
    the socket until then. Both waits end after the idle timeout (``TimeoutError``);
    one lazy timer per connection serves them, re-armed by assignment.
    """

    def __init__(self, service: Pop3Service, peer: Peer, conn: Pop3Connection,
                 timeout: float) -> None:
        self.service = service
        self.peer = peer
        self.conn = conn
        self.timeout = timeout
        self.session: _Session | None = None
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        #: the transport is above its high-water mark: wait in drain() before more
        self.paused = False
        self._pending = bytearray()
        self._eof = False
        self._lost = False
        #: the connection failed (a reset): what it sent last is not acted on
        self._error: Exception | None = None
        self._reading = True
        #: the coroutine waits in readable(): data_received serves what comes
        self._serving = False
        #: the coroutine waits in drain()
        self._draining = False
        self._waiter: asyncio.Future[Served] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: closed with replies unsent: drop them after the idle timeout (see close)
        self._abort: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.service._connected(self)

    def data_received(self, data: bytes) -> None:
        if not self._serving or self._pending:
            self._pending += data
            if (len(self._pending) > PENDING_LIMIT and self._reading
                    and self.transport is not None):
                self._reading = False
                self.transport.pause_reading()
            if self._serving:
                self._wake(None)
            return
        session = self.session
        assert session is not None
        self.conn.receive_data(data)
        try:
            served = self.service._serve(session, self)
        except Exception as exc:  # the coroutine's to handle, as if it had called _serve
            self._serving = False
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(exc)
            return
        if served is None and not self.service._stopping:
            self._deadline = self.loop.time() + self.timeout  # idle again: re-arm
            return
        if isinstance(served, StartTls):
            self.stop_reading()  # not a byte more in clear: see Pop3Service._start_tls
        session.idle = False
        self._wake(served)

    def eof_received(self) -> bool:
        self._eof = True
        if self._serving:
            self._wake(None)
        # Stay open to answer what came before the EOF (not possible under TLS).
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._eof = True
        if exc is not None:
            self._error = exc
            self._pending.clear()
        self.paused = False
        self._wake(None)
        self._stop_timer()
        if self._abort is not None:
            self._abort.cancel()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._draining:
            self._wake(None)

    # -- for the session ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue ``data`` on the transport; ConnectionResetError once the client is gone."""
        transport = self.transport
        if self._lost or transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport takes more (TimeoutError after the idle timeout)."""
        while self.paused:
            self._draining = True
            try:
                await self._wait()
            finally:
                self._draining = False
        if self._lost:
            raise ConnectionResetError("connection lost")

    async def readable(self) -> Served:
        """Wait for the client (TimeoutError after the idle timeout). Returns what
        ``data_received`` served up for the coroutine, or None after the core has been
        fed what came meanwhile (bytes, or EOF: a lost connection reads as EOF)."""
        if not self._pending and not self._eof:
            if not self._reading and self.transport is not None:
                self._reading = True
                self.transport.resume_reading()
            self._serving = True
            try:
                served = await self._wait()
            finally:
                self._serving = False
            if served is not None:
                return served
        if self._error is not None:
            raise ConnectionResetError(f"connection lost: {self._error}")
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            self.conn.receive_data(data)
        if self._eof:
            self.conn.receive_eof()
        elif not self._reading and self.transport is not None:
            self._reading = True
            self.transport.resume_reading()
        return None

    def stop_reading(self) -> None:
        """STLS: read nothing more in clear, and forget what came unread."""
        self._pending.clear()
        if self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        assert self.transport is not None
        tls = await self.loop.start_tls(self.transport, self, context, server_side=True,
                                        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        if tls is None:
            raise ConnectionResetError("connection lost during the TLS handshake")
        self.transport = tls
        self._reading = True  # the TLS transport reads (and resumes the socket's reading)

    def close(self) -> None:
        """Close after what is queued has been sent, waiting for that at most the idle
        timeout: a transport's close waits for ever for a client that does not read."""
        self._stop_timer()
        transport = self.transport
        if transport is not None:
            transport.close()
            if transport.get_write_buffer_size() and not self._lost:
                self._abort = self.loop.call_later(self.timeout, transport.abort)

    # -- waiting ------------------------------------------------------------------

    async def _wait(self) -> Served:
        self._deadline = self.loop.time() + self.timeout
        if self._timer is None:
            self._timer = self.loop.call_at(self._deadline, self._expire)
        self._waiter = self.loop.create_future()
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def _wake(self, served: Served) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(served)

    def _expire(self) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return  # not waiting: the next wait arms the timer again
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._expire)
            return
        self._waiter.set_exception(TimeoutError())

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Pop3Service:
    """POP3 listeners of one relaygate (``make_service(ctx)``)."""

    name = "pop3"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        directory = ctx.directory
        if directory is None:
            from relaygate.mail.accounts.db import open_directory

            directory = ctx.directory = open_directory(ctx.settings)
        self.directory: Directory = directory
        self.ssl_context = tls_context_of(ctx)
        self.proxies = proxy_policy(ctx.settings)
        self.sizes = SizeCache()
        self._listeners: list[Listener] = []
        self._sessions: set[_Session] = set()
        self.limiter = AddressLimiter(self.settings.pop3.max_connections_per_ip,
                                      self.settings.ipv6_prefix, unix_key="unix")
        self._stopping = False

    # -- Service ---------------------------------------------------------------

    def listeners(self) -> list[str]:
        if self._listeners:
            return [f"{lst.kind} {addr}" for lst in self._listeners for addr in lst.addresses]
        out = [f"pop3 {spec}" for spec in self.settings.pop3.listen]
        if self.ssl_context is not None:
            out += [f"pop3s {spec}" for spec in self.settings.pop3.listen_tls]
        return out

    def addresses(self) -> list[tuple[str, str, int]]:
        """(kind, host, port) actually bound, for tests and ``status``."""
        out = []
        for lst in self._listeners:
            if lst.server is None or lst.listen.path is not None:
                continue
            for sock in lst.server.sockets:
                host, port = sock.getsockname()[:2]
                out.append((lst.kind, str(host), int(port)))
        return out

    async def start(self) -> None:
        plans: list[tuple[str, str, bool]] = [
            ("pop3", spec, False) for spec in self.settings.pop3.listen]
        if self.ssl_context is not None:
            plans += [("pop3s", spec, True) for spec in self.settings.pop3.listen_tls]
        try:
            for kind, spec, implicit in plans:
                origin = "pop3.listen_tls" if implicit else "pop3.listen"
                listener = Listener(kind, parse_listen(spec, origin=origin))
                self._listeners.append(listener)
                await listener.bind(
                    partial(self._channel, listener=listener, implicit=implicit),
                    tls=self.ssl_context if implicit else None, proxies=self.proxies)
                log.debug("listening: %s %s", kind, listener)
        except BaseException:
            await self.stop(0)
            raise

    def reload(self) -> None:
        """SIGHUP: nothing of its own (the runner reloads the users and the certificate)."""

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; cut idle sessions now, let busy ones finish up to ``grace``."""
        self._stopping = True
        for listener in self._listeners:
            listener.close()
        for s in list(self._sessions):
            if s.idle and s.task is not None:
                s.task.cancel()
        tasks = [s.task for s in self._sessions if s.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(grace, 0.0))
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for listener in self._listeners:
            await listener.wait_closed(timeout=5.0)
        self._listeners.clear()

    # -- connections -----------------------------------------------------------

    def _channel(self, peer: Peer, *, listener: Listener, implicit: bool) -> _Channel:
        """The protocol of one connection (``Listener.bind``'s factory)."""
        conn = Pop3Connection(self._config(listener, peer.ip, implicit, peer.proxy is not None))
        return _Channel(self, peer, conn, self.settings.pop3.idle_timeout)

    def _connected(self, ch: _Channel) -> None:
        """``connection_made``: refuse or start the session."""
        ip = ch.peer.ip
        if self._stopping:
            ch.close()
            return
        if not self.limiter.acquire(ip):
            ch.write(b"-ERR [SYS/TEMP] Too many connections from your address\r\n")
            ch.close()
            event("pop3.refused", ip=ip, reason="too many connections")
            return
        session = _Session(ip, proxied=ch.peer.proxy is not None)
        ch.session = session
        self._sessions.add(session)
        self.ctx.metrics.connections.labels("pop3").inc()
        session.task = asyncio.get_running_loop().create_task(self._run(session, ch))

    async def _run(self, session: _Session, ch: _Channel) -> None:
        try:
            await self._session(session, ch)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, TimeoutError, ssl.SSLError) as exc:
            # The client went away or stopped reading: nothing to tell anyone.
            log.debug("pop3 session from %s ended: %r", session.ip, exc)
        except Exception:
            # Never show the client why; log it for the admin.
            log.exception("pop3 session from %s failed", session.ip)
        finally:
            if session.seen:
                try:
                    await self._flush(session, [])
                except Exception:
                    log.exception("pop3: cannot mark the messages of %s seen", session.user)
            if session.lock is not None:
                lock, session.lock = session.lock, None
                await asyncio.shield(self._hop(lock.release))
            ch.close()
            self._sessions.discard(session)
            self.limiter.release(session.ip)
            self.ctx.metrics.connections.labels("pop3").dec()

    def _config(self, listener: Listener, ip: str | None, implicit: bool,
                proxied: bool = False) -> Pop3Config:
        s = self.settings
        # A forwarded connection says nothing about the listener: the client's address does.
        loopback = (listener.loopback and not proxied) or (ip is not None and is_loopback(ip))
        host = (s.hostname or socket.gethostname() or "localhost").replace(">", "")
        return Pop3Config(
            tls_available=self.ssl_context is not None,
            tls_active=implicit,
            plaintext_without_tls=loopback or s.auth.allow_plaintext,
            apop_timestamp=f"<{os.getpid()}.{secrets.token_hex(8)}@{host}>",
            max_commands=s.pop3.max_commands,
            bad_command_limit=s.pop3.bad_command_limit,
        )

    def _hop(self, func: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run a blocking call on the loop's default thread pool: every thread hop of
        the service goes through here (one per RETR, one per QUIT, ...)."""
        return asyncio.get_running_loop().run_in_executor(None, func, *args)

    async def _session(self, session: _Session, ch: _Channel) -> None:
        conn = ch.conn
        ch.write(conn.greeting())
        served: Served = None
        while True:
            if served is None:
                served = self._serve(session, ch)
            if ch.paused:
                await ch.drain()
            if served is DRAIN:
                served = None
                continue
            ev, served = served, None
            if ev is None:
                if self._stopping:
                    ch.write(b"-ERR [SYS/TEMP] Server shutting down\r\n")
                    return
                session.idle = True
                try:
                    served = await ch.readable()
                except TimeoutError:
                    ch.write(b"-ERR Autologout: idle timeout\r\n")
                    event("pop3.timeout", ip=session.ip, user=conn.user)
                    return
                finally:
                    session.idle = False
            elif isinstance(ev, StartTls):
                # Its "+OK" must go out just before TLS starts: see _start_tls.
                if not await self._start_tls(ch, conn.data_to_send()):
                    return
                conn.tls_started()
            elif isinstance(ev, Retrieve):
                await self._retrieve(session, conn, ev, ch)
            elif isinstance(ev, (Login, ApopLogin)):
                await self._login(session, conn, ev)
            elif isinstance(ev, Update):
                failed = await self._update(session, ev)
                # Free the mailbox before the client hears "+OK": a client that
                # logs in again at once must not meet its own old session.
                if session.lock is not None:
                    lock, session.lock = session.lock, None
                    await asyncio.shield(self._hop(lock.release))
                conn.update_done(failed)
            elif isinstance(ev, Close):
                return

    def _serve(self, session: _Session, ch: _Channel) -> Served:
        """Run the core on the bytes it has, answering at once what needs no waiting.

        Sends the replies the core makes itself, and a RETR of a message read ahead
        (see :meth:`_plan_ahead`). Returns the first event that needs the session
        coroutine (a login, STLS, QUIT, a RETR or TOP to read from disk, the end),
        DRAIN when the client must read what was sent before more is done, or None
        when the core needs more bytes. Runs in the coroutine and in
        :meth:`_Channel.data_received` (then without a task switch).
        """
        conn = ch.conn
        while True:
            if ch.paused:
                return DRAIN
            ev = conn.next_event(REPLY_BATCH)
            if isinstance(ev, StartTls):
                return ev  # its "+OK" is sent by _start_tls
            out = conn.data_to_send()
            if out:
                ch.write(out)
            if isinstance(ev, NeedData):
                if ch.paused:
                    return DRAIN
                if out and conn.buffered:
                    continue  # the core stopped at REPLY_BATCH: more lines may wait
                return None
            if isinstance(ev, Retrieve) and ev.top is None:
                msg = session.messages[ev.index]
                wire = session.ahead.pop(msg.name, None)
                if wire is not None:
                    conn.retrieve_started()
                    ch.write(conn.data_to_send() + wire)
                    session.seen[msg.name] = msg
                    continue
            return ev

    async def _start_tls(self, ch: _Channel, ok: bytes) -> bool:
        """Send STLS's ``+OK`` and switch to TLS.

        Bytes the client sent behind STLS came in clear before it saw ``+OK``:
        the core dropped those it had, the channel drops those it holds, and it
        stops reading before ``+OK`` goes out (CVE-2011-0411 style injection).
        The next bytes read from the socket, the client's ClientHello, go to the
        TLS layer.
        """
        assert self.ssl_context is not None
        ch.stop_reading()
        ch.write(ok)
        try:
            await ch.start_tls(self.ssl_context)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.info("STLS handshake failed: %r", exc)
            return False
        return True

    # -- events ----------------------------------------------------------------

    async def _authenticate(self, session: _Session, ev: Login | ApopLogin) -> LoginResult:
        ip = session.ip or "unix"
        if isinstance(ev, ApopLogin):
            return await self.directory.authenticate_apop(ev.user, ev.timestamp, ev.digest, ip,
                                                          service="pop3")
        return await self.directory.authenticate(ev.user, ev.password, ip, service="pop3")

    async def _login(self, session: _Session, conn: Pop3Connection,
                     ev: Login | ApopLogin) -> None:
        mechanism = "APOP" if isinstance(ev, ApopLogin) else ev.mechanism
        logins = self.ctx.metrics.logins
        try:
            result = await self._authenticate(session, ev)
        except Exception as exc:
            log.error("pop3: user database failure: %s", exc)
            conn.login_failed(LoginFailure.TEMPORARY)
            return
        account = result.account
        if result.throttled:
            logins.labels("pop3", "throttled").inc()
            conn.login_failed(LoginFailure.THROTTLED)
            return
        if account is None or not result.ok:
            logins.labels("pop3", "failed").inc()
            conn.login_failed(LoginFailure.AUTH)
            return
        logins.labels("pop3", "ok").inc()
        event("login.ok", user=account.login, domain=account.domain, ip=session.ip,
              service="pop3", mechanism=mechanism, tls=conn.tls_active)
        await open_window_after_login(self.ctx, session.ip, account, "pop3")
        mailbox = MaildirMailbox(account.maildir, sizes=self.sizes)
        try:
            session.lock = await self._hop(lock_mailbox, account.maildir)
        except MailboxInUse:
            event("pop3.in_use", user=account.login, ip=session.ip)
            conn.login_failed(LoginFailure.IN_USE)
            return
        except MailboxError as exc:
            log.error("pop3: cannot lock the mailbox of %s: %s", account.login, exc)
            conn.login_failed(LoginFailure.TEMPORARY)
            return
        try:
            messages = await self._hop(mailbox.scan)
        except MailboxError as exc:
            log.error("pop3: cannot read the mailbox of %s: %s", account.login, exc)
            lock, session.lock = session.lock, None
            await self._hop(lock.release)
            conn.login_failed(LoginFailure.TEMPORARY)
            return
        session.mailbox = mailbox
        session.messages = messages
        session.user = account.login
        conn.login_ok(account.login, [(m.size, m.uid) for m in messages])

    async def _retrieve(self, session: _Session, conn: Pop3Connection, ev: Retrieve,
                        ch: _Channel) -> None:
        assert session.mailbox is not None
        msg = session.messages[ev.index]
        try:
            # One thread hop: open, read (all of it up to READ_WHOLE), close, and for a
            # RETR of a whole message also the wire encoding (CRLF, dot-stuffing) and
            # the read-ahead of the next messages (see _plan_ahead).
            ahead = self._plan_ahead(session, conn, ev.index) if ev.top is None else []
            data, f, more = await self._hop(_read_message, session.mailbox, msg,
                                            ev.top is None, ahead)
        except MailboxError as exc:
            log.warning("pop3: %s", exc)
            conn.retrieve_failed()
            return
        session.ahead.update(more)
        try:
            conn.retrieve_started()
            head = conn.data_to_send()
            if f is None and ev.top is None:
                ch.write(head + data)
            else:
                ch.write(head)
                encoder = MessageEncoder(ev.top)
                out = encoder.feed(data)
                while True:
                    if out:
                        ch.write(out)
                        await ch.drain()
                    if f is None or encoder.done:
                        break
                    chunk = await self._hop(f.read, SEND_CHUNK)
                    if not chunk:
                        break
                    out = encoder.feed(chunk)
                ch.write(encoder.finish())
            if ch.paused:
                await ch.drain()
        finally:
            if f is not None:
                await self._hop(f.close)
        if ev.top is None:
            # new/ -> cur/ waits for the UPDATE state or the session's end: one
            # thread hop for all of them (see _flush).
            session.seen[msg.name] = msg

    def _plan_ahead(self, session: _Session, conn: Pop3Connection, index: int) -> list[Message]:
        """The messages after ``index`` to read with it: clients retrieve in order
        (fetchmail, mail clients: RETR 1, 2, 3...), so the next ones are read in the
        same thread hop, up to READ_AHEAD octets of the session held at once."""
        budget = READ_AHEAD - sum(len(v) for v in session.ahead.values())
        out: list[Message] = []
        for i in range(index + 1, len(session.messages)):
            msg = session.messages[i]
            if msg.name in session.ahead or msg.name in session.seen or conn.is_deleted(i):
                continue
            # the wire form is a little larger than the size (dot-stuffing): keep room
            budget -= msg.size + msg.size // 64 + 3
            if budget < 0 or len(out) >= READ_AHEAD_MESSAGES:
                break
            out.append(msg)
        return out

    async def _flush(self, session: _Session, deleted: list[Message]) -> int:
        """Mark the retrieved messages seen and remove ``deleted``, in one thread hop.

        Runs at QUIT (RFC 1939 section 6, the UPDATE state) and when a session
        ends without it (a dropped connection deletes nothing but keeps what it
        read seen). Returns the deletions that failed.
        """
        mailbox = session.mailbox
        gone = {m.name for m in deleted}
        seen = [m for m in session.seen.values() if m.name not in gone]
        session.seen.clear()
        if mailbox is None or not (seen or deleted):
            return 0

        def apply() -> int:
            mailbox.mark_seen_all(seen)
            removed = [m for m in deleted if mailbox.delete(m)]
            forget_deleted(str(mailbox.path), [m.name for m in removed])  # and their IMAP UIDs
            return len(deleted) - len(removed)

        return await asyncio.shield(self._hop(apply))

    async def _update(self, session: _Session, ev: Update) -> int:
        """RFC 1939 section 6: remove the messages marked deleted; return the failures."""
        doomed = [session.messages[i] for i in ev.deleted] if session.mailbox else []
        failed = await self._flush(session, doomed)
        if doomed:
            event("pop3.update", user=session.user, deleted=len(doomed),
                  failed=failed or None)
        return failed


def make_service(ctx: Context) -> Pop3Service:
    """The POP3 service of ``relaygate serve`` / ``relaygate pop3d``."""
    return Pop3Service(ctx)
