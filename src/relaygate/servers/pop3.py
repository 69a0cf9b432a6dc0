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

Maildir semantics: RETR, once the whole message is sent, moves it from new/
to cur/ with the ``S`` flag (TOP does not: it is a peek). DELE only marks;
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
from typing import TYPE_CHECKING, Any

from relaygate.addresses import client_group, is_loopback
from relaygate.control import WindowRefused
from relaygate.errors import ConfigError
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
)
from relaygate.servers.accept import (
    Listener,
    Peer,
    ProxyPolicy,
    listen_tcp_or_unix,
    stream_factory,
)
from relaygate.servers.base import Listen, parse_listen

if TYPE_CHECKING:
    from relaygate.mail.directory import Account, Directory, LoginResult
    from relaygate.servers.base import Context

log = logging.getLogger("relaygate.pop3")

#: bytes asked of the socket per read; the core keeps at most one line of it
READ_SIZE = 4096
#: bytes read from a message file per thread hop while sending it
SEND_CHUNK = 256 * 1024
#: seconds a TLS handshake (implicit or STLS) may take
TLS_HANDSHAKE_TIMEOUT = 30.0
#: asyncio.start_server's default line limit of the stream reader
STREAM_LIMIT = 2**16


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


class Pop3Service:
    """POP3 listeners of one relaygate (``make_service(ctx)``)."""

    name = "pop3"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        directory = ctx.directory
        if directory is None:
            from relaygate.mail.users import open_directory

            directory = ctx.directory = open_directory(ctx.settings)
        self.directory: Directory = directory
        self._own_context = False
        self.ssl_context = self._ssl_context()
        self.sizes = SizeCache()
        self.proxies = ProxyPolicy.from_settings(ctx.settings)
        self._servers: list[tuple[str, Listen, Listener]] = []
        self._sessions: set[_Session] = set()
        self._per_ip: dict[str, int] = {}
        self._stopping = False

    def _ssl_context(self) -> ssl.SSLContext | None:
        shared = self.ctx.extra.get("ssl_context")
        if isinstance(shared, ssl.SSLContext):
            return shared  # ``serve`` shares one context and reloads it on SIGHUP
        tls = self.settings.tls
        if tls.cert is None or tls.key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate: {exc}",
                              source=str(tls.cert)) from None
        self._own_context = True
        return context

    def reload(self) -> None:
        """SIGHUP (``pop3d``): re-read the certificate; keep the old one on error.

        Under ``serve`` the context is shared and serve reloads it: nothing to do.
        """
        tls = self.settings.tls
        if not self._own_context or self.ssl_context is None or tls.cert is None \
                or tls.key is None:
            return
        try:
            self.ssl_context.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            log.error("POP3: keeping the old TLS certificate: cannot load %s: %s",
                      tls.cert, exc)

    # -- Service ---------------------------------------------------------------

    def listeners(self) -> list[str]:
        if self._servers:
            return [f"{kind} {self._bound(listen, server)}"
                    for kind, listen, server in self._servers]
        out = [f"pop3 {spec}" for spec in self.settings.pop3.listen]
        if self.ssl_context is not None:
            out += [f"pop3s {spec}" for spec in self.settings.pop3.listen_tls]
        return out

    def addresses(self) -> list[tuple[str, str, int]]:
        """(kind, host, port) actually bound, for tests and ``status``."""
        out = []
        for kind, listen, server in self._servers:
            for sock in server.sockets:
                if listen.path is None:
                    host, port = sock.getsockname()[:2]
                    out.append((kind, str(host), int(port)))
        return out

    @staticmethod
    def _bound(listen: Listen, server: Listener) -> str:
        if listen.path is not None or not server.sockets:
            return str(listen)
        port = server.sockets[0].getsockname()[1]
        return str(Listen(listen.host, int(port)))

    async def start(self) -> None:
        plans: list[tuple[str, str, bool]] = [
            ("pop3", spec, False) for spec in self.settings.pop3.listen]
        if self.ssl_context is not None:
            plans += [("pop3s", spec, True) for spec in self.settings.pop3.listen_tls]
        try:
            for kind, spec, implicit in plans:
                origin = "pop3.listen_tls" if implicit else "pop3.listen"
                listen = parse_listen(spec, origin=origin)
                server = await self._listen(listen, implicit)
                self._servers.append((kind, listen, server))
                log.debug("listening: %s %s", kind, self._bound(listen, server))
        except BaseException:
            await self.stop(0)
            raise

    async def _listen(self, listen: Listen, implicit: bool) -> Listener:
        def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    peer: Peer) -> None:
            self._accept(reader, writer, listen, implicit, peer)

        return await listen_tcp_or_unix(
            listen.host, listen.port, listen.path, stream_factory(handler, limit=STREAM_LIMIT),
            service="pop3s" if implicit else "pop3", proxies=self.proxies,
            ssl_context=self.ssl_context if implicit else None,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; cut idle sessions now, let busy ones finish up to ``grace``."""
        self._stopping = True
        for _, _, server in self._servers:
            server.close()
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
        for _, _, server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    # -- connections -----------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                listen: Listen, implicit: bool, peer: Peer) -> None:
        ip = peer.ip
        key = self._limit_key(ip)
        if self._stopping:
            writer.close()
            return
        if self._per_ip.get(key, 0) >= self.settings.pop3.max_connections_per_ip:
            writer.write(b"-ERR [SYS/TEMP] Too many connections from your address\r\n")
            writer.close()
            event("pop3.refused", ip=ip, reason="too many connections")
            return
        self._per_ip[key] = self._per_ip.get(key, 0) + 1
        session = _Session(ip, proxied=peer.proxy is not None)
        self._sessions.add(session)
        self.ctx.metrics.connections.labels("pop3").inc()
        session.task = asyncio.get_running_loop().create_task(
            self._run(session, reader, writer, listen, implicit))

    def _limit_key(self, ip: str | None) -> str:
        """What ``pop3.max_connections_per_ip`` counts under: the address, IPv6 by network."""
        return client_group(ip or "unix", self.settings.ipv6_prefix)

    async def _run(self, session: _Session, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, listen: Listen, implicit: bool) -> None:
        key = self._limit_key(session.ip)
        try:
            await self._session(session, reader, writer, listen, implicit)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, TimeoutError, ssl.SSLError) as exc:
            # The client went away or stopped reading: nothing to tell anyone.
            log.debug("pop3 session from %s ended: %r", session.ip, exc)
        except Exception:
            # Never show the client why; log it for the admin.
            log.exception("pop3 session from %s failed", session.ip)
        finally:
            if session.lock is not None:
                lock, session.lock = session.lock, None
                await asyncio.shield(asyncio.to_thread(lock.release))
            writer.close()
            self._sessions.discard(session)
            n = self._per_ip.get(key, 1) - 1
            if n > 0:
                self._per_ip[key] = n
            else:
                self._per_ip.pop(key, None)
            self.ctx.metrics.connections.labels("pop3").dec()

    def _config(self, listen: Listen, ip: str | None, implicit: bool,
                proxied: bool = False) -> Pop3Config:
        s = self.settings
        # A forwarded connection says nothing about the listener: the client's address does.
        loopback = (listen.loopback and not proxied) or (ip is not None and is_loopback(ip))
        apop = None
        if callable(getattr(self.directory, "authenticate_apop", None)):
            host = (s.hostname or socket.gethostname() or "localhost").replace(">", "")
            apop = f"<{os.getpid()}.{secrets.token_hex(8)}@{host}>"
        return Pop3Config(
            tls_available=self.ssl_context is not None,
            tls_active=implicit,
            plaintext_without_tls=loopback or s.auth.allow_plaintext,
            apop_timestamp=apop,
            max_commands=s.pop3.max_commands,
            bad_command_limit=s.pop3.bad_command_limit,
        )

    async def _session(self, session: _Session, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, listen: Listen, implicit: bool) -> None:
        timeout = self.settings.pop3.idle_timeout
        conn = Pop3Connection(self._config(listen, session.ip, implicit, session.proxied))

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
        from relaygate.mail.users import UserDB

        ip = session.ip or "unix"
        d: Any = self.directory
        if isinstance(ev, ApopLogin):
            result: LoginResult = await d.authenticate_apop(ev.user, ev.timestamp, ev.digest,
                                                            ip, service="pop3")
            return result
        if isinstance(d, UserDB):
            return await d.authenticate(ev.user, ev.password, ip, service="pop3")
        return await self.directory.authenticate(ev.user, ev.password, ip)

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
        await self._open_window(session, account)
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

    async def _open_window(self, session: _Session, account: Account) -> None:
        if session.ip is None:
            return  # a UNIX-socket client has no address to open
        try:
            grant = await asyncio.to_thread(
                self.ctx.control.open_window, session.ip, user=account.login,
                domain=account.domain, source="pop3")
        except WindowRefused:
            event("window.refused", ip=session.ip, user=account.login, source="pop3",
                  reason="trusted proxy")
            return
        except Exception as exc:  # StoreError, or a store bug: never fail the login
            log.warning("pop3: could not open the relay window of %s for %s: %s",
                        session.ip, account.login, exc)
            self.ctx.metrics.windows.labels("failed").inc()
            event("window.failed", ip=session.ip, user=account.login, source="pop3",
                  level=logging.WARNING)
            return
        self.ctx.metrics.windows.labels("opened").inc()
        event("window.opened", ip=grant.ip, user=account.login, domain=account.domain,
              source="pop3", expires=int(grant.expires_at - grant.opened_at))

    async def _retrieve(self, session: _Session, conn: Pop3Connection, ev: Retrieve,
                        writer: asyncio.StreamWriter, timeout: float) -> None:
        assert session.mailbox is not None
        mailbox = session.mailbox
        msg = session.messages[ev.index]
        try:
            f = await asyncio.to_thread(mailbox.open, msg)
        except MailboxError as exc:
            log.warning("pop3: %s", exc)
            conn.retrieve_failed()
            return
        try:
            conn.retrieve_started()
            writer.write(conn.data_to_send())
            encoder = MessageEncoder(ev.top)
            while not encoder.done:
                chunk = await asyncio.to_thread(f.read, SEND_CHUNK)
                if not chunk:
                    break
                out = encoder.feed(chunk)
                if out:
                    writer.write(out)
                    await asyncio.wait_for(writer.drain(), timeout)
            writer.write(encoder.finish())
            await asyncio.wait_for(writer.drain(), timeout)
        finally:
            await asyncio.to_thread(f.close)
        if ev.top is None:
            await asyncio.to_thread(mailbox.mark_seen, msg)

    async def _update(self, session: _Session, ev: Update) -> int:
        """RFC 1939 section 6: remove the messages marked deleted; return the failures."""
        mailbox = session.mailbox
        if mailbox is None or not ev.deleted:
            return 0
        doomed = [session.messages[i] for i in ev.deleted]

        def remove() -> int:
            return sum(0 if mailbox.delete(m) else 1 for m in doomed)

        failed = await asyncio.shield(asyncio.to_thread(remove))
        event("pop3.update", user=session.user, deleted=len(doomed),
              failed=failed or None)
        return failed


def make_service(ctx: Context) -> Pop3Service:
    """The POP3 service of ``relaygate serve`` / ``relaygate pop3d``."""
    return Pop3Service(ctx)
