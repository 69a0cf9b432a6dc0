"""The POP3 service: asyncio glue around the sans-I/O core, over Maildir.

Theory of operation
-------------------
Each connection runs :func:`Pop3Service._session`: it feeds the bytes it
reads into :class:`relaygate.protocols.pop3.Pop3Connection` and carries out
the events the core returns (RFC 1939, RFC 2449, RFC 2595, RFC 5034; see
that module). Everything that blocks runs off the event loop: password checks
on the user database's own pool, store writes, mailbox scans, message reads,
seen-flag renames and deletions through ``asyncio.to_thread``.

A successful login (USER/PASS, APOP or AUTH PLAIN) from a TCP client opens
the relay window of the client's address (``RelayControl.open_window``,
source ``pop3``); a store error is logged and the login still succeeds, so a
broken store never costs mail access (and relaying fails closed elsewhere).
The window opens on correct credentials even when the mailbox then turns out
to be in use: the person proved who they are.

Maildir semantics: RETR, once the whole message is sent, marks it to move
from new/ to cur/ with the ``S`` flag (TOP does not: it is a peek); the moves
are made together, in one thread hop, at QUIT or when the session ends
otherwise (a dropped connection too). A message up to 1 MiB is opened, read
and closed in one thread hop and encoded with C-level byte replaces
(:func:`relaygate.protocols.pop3.encode_message`); a larger one streams in
256 KiB reads. ``sendfile`` does not fit: the wire form differs from the file
(CRLF, dot-stuffing), and TLS sessions could not use it anyway. DELE only marks;
the files go in the UPDATE state after QUIT (RFC 1939 section 6); a dropped
connection, a timeout or a server stop deletes nothing. One session per
mailbox (``-ERR [IN-USE]``, RFC 2449 section 8.1.2): see
:func:`relaygate.mail.mailbox.lock_mailbox`.

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
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

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

#: bytes asked of the socket per read; the core keeps at most one line of it
READ_SIZE = 4096
#: a message up to this size is read whole in one thread hop and sent at once
READ_WHOLE = 1024 * 1024
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
                await listener.bind_streams(
                    partial(self._accept, listener=listener, implicit=implicit),
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

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer,
                *, listener: Listener, implicit: bool) -> None:
        ip = peer.ip
        if self._stopping:
            writer.close()
            return
        if not self.limiter.acquire(ip):
            writer.write(b"-ERR [SYS/TEMP] Too many connections from your address\r\n")
            writer.close()
            event("pop3.refused", ip=ip, reason="too many connections")
            return
        session = _Session(ip, proxied=peer.proxy is not None)
        self._sessions.add(session)
        self.ctx.metrics.connections.labels("pop3").inc()
        session.task = asyncio.get_running_loop().create_task(
            self._run(session, reader, writer, listener, implicit))

    async def _run(self, session: _Session, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, listener: Listener, implicit: bool) -> None:
        try:
            await self._session(session, reader, writer, listener, implicit)
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
                await asyncio.shield(asyncio.to_thread(lock.release))
            writer.close()
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

    async def _session(self, session: _Session, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, listener: Listener, implicit: bool) -> None:
        timeout = self.settings.pop3.idle_timeout
        conn = Pop3Connection(self._config(listener, session.ip, implicit, session.proxied))

        async def send(data: bytes) -> None:
            if data:
                writer.write(data)
                await asyncio.wait_for(writer.drain(), timeout)

        await send(conn.greeting())
        while True:
            ev = conn.next_event()
            if isinstance(ev, StartTls):
                # Its "+OK" must not go through send(): see _start_tls.
                if not await self._start_tls(reader, writer, conn.data_to_send()):
                    return
                conn.tls_started()
                continue
            await send(conn.data_to_send())
            if isinstance(ev, NeedData):
                if self._stopping:
                    await send(b"-ERR [SYS/TEMP] Server shutting down\r\n")
                    return
                session.idle = True
                try:
                    data = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
                except TimeoutError:
                    await send(b"-ERR Autologout: idle timeout\r\n")
                    event("pop3.timeout", ip=session.ip, user=conn.user)
                    return
                except (ConnectionError, ssl.SSLError):
                    return
                finally:
                    session.idle = False
                if data:
                    conn.receive_data(data)
                else:
                    conn.receive_eof()
            elif isinstance(ev, (Login, ApopLogin)):
                await self._login(session, conn, ev)
            elif isinstance(ev, Retrieve):
                await self._retrieve(session, conn, ev, writer, timeout)
            elif isinstance(ev, Update):
                failed = await self._update(session, ev)
                # Free the mailbox before the client hears "+OK": a client that
                # logs in again at once must not meet its own old session.
                if session.lock is not None:
                    lock, session.lock = session.lock, None
                    await asyncio.shield(asyncio.to_thread(lock.release))
                conn.update_done(failed)
            elif isinstance(ev, Close):
                return

    async def _start_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         ok: bytes) -> bool:
        """Send STLS's ``+OK`` and switch to TLS without yielding in between.

        Bytes still in the stream's buffer were sent in clear before the client
        saw ``+OK``: asyncio would hand them to us as if they came under TLS
        (CVE-2011-0411 style injection), so they are dropped. Nothing may yield
        to the event loop between writing ``+OK`` and ``start_tls`` (which stops
        reading before its first await): the client's TLS ClientHello must not
        be read into that buffer, it belongs to the TLS layer.
        """
        assert self.ssl_context is not None
        pending = getattr(reader, "_buffer", None)
        if isinstance(pending, bytearray):
            pending.clear()
        writer.write(ok)
        try:
            await writer.start_tls(self.ssl_context,
                                   ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
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
            session.lock = await asyncio.to_thread(lock_mailbox, account.maildir)
        except MailboxInUse:
            event("pop3.in_use", user=account.login, ip=session.ip)
            conn.login_failed(LoginFailure.IN_USE)
            return
        except MailboxError as exc:
            log.error("pop3: cannot lock the mailbox of %s: %s", account.login, exc)
            conn.login_failed(LoginFailure.TEMPORARY)
            return
        try:
            messages = await asyncio.to_thread(mailbox.scan)
        except MailboxError as exc:
            log.error("pop3: cannot read the mailbox of %s: %s", account.login, exc)
            lock, session.lock = session.lock, None
            await asyncio.to_thread(lock.release)
            conn.login_failed(LoginFailure.TEMPORARY)
            return
        session.mailbox = mailbox
        session.messages = messages
        session.user = account.login
        conn.login_ok(account.login, [(m.size, m.uid) for m in messages])

    async def _retrieve(self, session: _Session, conn: Pop3Connection, ev: Retrieve,
                        writer: asyncio.StreamWriter, timeout: float) -> None:
        assert session.mailbox is not None
        mailbox = session.mailbox
        msg = session.messages[ev.index]
        try:
            # One thread hop: open, read (all of it up to READ_WHOLE), close.
            data, f = await asyncio.to_thread(mailbox.read, msg, READ_WHOLE)
        except MailboxError as exc:
            log.warning("pop3: %s", exc)
            conn.retrieve_failed()
            return
        try:
            conn.retrieve_started()
            head = conn.data_to_send()
            if f is None and ev.top is None:
                writer.write(head + encode_message(data))
            else:
                writer.write(head)
                encoder = MessageEncoder(ev.top)
                out = encoder.feed(data)
                while True:
                    if out:
                        writer.write(out)
                        async with asyncio.timeout(timeout):
                            await writer.drain()
                    if f is None or encoder.done:
                        break
                    chunk = await asyncio.to_thread(f.read, SEND_CHUNK)
                    if not chunk:
                        break
                    out = encoder.feed(chunk)
                writer.write(encoder.finish())
            async with asyncio.timeout(timeout):
                await writer.drain()
        finally:
            if f is not None:
                await asyncio.to_thread(f.close)
        if ev.top is None:
            # new/ -> cur/ waits for the UPDATE state or the session's end: one
            # thread hop for all of them (see _flush).
            session.seen[msg.name] = msg

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

        return await asyncio.shield(asyncio.to_thread(apply))

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
