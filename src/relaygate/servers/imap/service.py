"""The IMAP server: pymap 0.36.7 embedded behind a thin relaygate adapter.

Theory of operation
-------------------
IMAP4rev1 (RFC 3501) is large, so relaygate does not implement it: it embeds
pymap (pinned exactly; this package is the ONLY one that imports pymap, pysasl
or proxyprotocol) and wraps it where relaygate needs something pymap does not do,
or does wrong. pymap parses commands, keeps the selected-mailbox state, and
implements SELECT/EXAMINE, LIST/LSUB, STATUS, FETCH (ENVELOPE, BODYSTRUCTURE,
BODY[...]/BODY.PEEK, RFC822.SIZE, INTERNALDATE), STORE, SEARCH, COPY/MOVE,
the UID variants, EXPUNGE, CLOSE, APPEND (RFC 3502 MULTIAPPEND), CREATE,
DELETE, RENAME, IDLE (RFC 2177), UIDPLUS (RFC 4315) and LITERAL+ (RFC 7888)
on its maildir backend. The adapter supplies:

* **Login** (RFC 3501 6.2.2 LOGIN, 6.2.3 AUTHENTICATE; RFC 4616 PLAIN): the
  credentials go to relaygate's :class:`~relaygate.mail.directory.Directory`
  (argon2id and throttling live there). A success opens the relay window for
  the client address (POP/IMAP-before-SMTP) and, while the connection lives, a
  background task refreshes it every ``expiry / 3`` seconds, so a client that
  keeps IMAP open (IDLE) can always send. A throttled login never opens one.
* **The account's own Maildir**: INBOX is the Maildir root (``new``/``cur``),
  the one POP3 reads and SMTP delivers to; other folders are Maildir++
  subfolders (``.Sent``, ``.Lists.Work`` for ``Lists/Work``; the IMAP
  hierarchy delimiter is ``/``). pymap keeps UIDs in ``dovecot-uidlist``.
* **Defect fixes in pymap's maildir backend**: FETCH re-serialised every
  message through :mod:`email` (bare LF, wrong RFC822.SIZE): the adapter
  serves the file's bytes, bare LF turned into CRLF (RFC 3501 2.3.4 sizes and
  5.1 literals are in CRLF octets); APPEND stored an ``email``-re-serialised,
  unsynced copy: the adapter stores the literal as sent, fsynced
  (:func:`relaygate.mail.maildir.deliver`); COPY wrote an EMPTY message (it
  copied a metadata-only object): the adapter copies the bytes; its small
  metadata files (uidlist, keywords, subscriptions) were written through a
  temporary file in ``/tmp`` and renamed into the Maildir, which fails across
  file systems and was never fsynced: the adapter writes them next to the
  target and fsyncs.
* **Limits pymap lacks** (RFC 3501 section 5.4, RFC 7888 section 4, RFC 7889):
  a line longer than :data:`MAX_LINE` ends the session; a literal larger than
  ``imap.max_literal_unauth`` before login or ``imap.max_literal`` after is
  refused before it is read (a synchronizing literal gets ``NO [TOOBIG]``, a
  LITERAL+ one ``BYE [TOOBIG]`` since its bytes are already on the way), and so
  is a command whose literals add up past that; pymap read LITERAL+ literals of
  any size before login. Idle timeout ``imap.idle_timeout`` (30 minutes, RFC
  3501 5.4) once logged in, :data:`PREAUTH_TIMEOUT` before; a client that does
  not read its replies is dropped after the same time; at most
  :data:`MAX_PREAUTH_COMMANDS` commands and :data:`MAX_AUTH_FAILURES` failed
  logins per connection, :data:`MAX_BAD_COMMANDS` BAD replies per session
  (pymap itself drops after 5 in a row) and :data:`MAX_SESSION_COMMANDS`
  commands per session.
* **Plaintext passwords** (RFC 3501 6.2.3, RFC 2595 3.2): LOGIN and
  AUTHENTICATE are refused and ``LOGINDISABLED`` advertised until STARTTLS,
  unless the listener is loopback, implicit TLS, or ``auth.allow_plaintext``.
  Pipelined commands after STARTTLS end the session (no plaintext injection
  into the TLS session).
* **Errors never reach the client**: anything unexpected is logged and the
  client gets pymap's generic ``BYE [SERVERBUG]`` or a ``NO [UNAVAILABLE]``.

The package: ``service`` (this module: listeners, logins, windows, pymap's
configuration), ``connection`` (the per-connection loop, limits and login
rules), ``backend`` (folders over Maildir), ``rawfetch`` (FETCH of message
bytes and headers without a MIME parse, rendered in a worker thread),
``notify`` (IDLE woken by inotify, one watch per folder), ``pymap_fixes`` (the
defects that cannot be fixed by subclassing, installed by
:func:`pymap_fixes.apply` when the service is built: importing relaygate
changes nothing in pymap).

pymap runs with its asyncio "subsystem": commands run on the event loop
beside SMTP and POP3 (its thread subsystem would tie a worker thread to every
IDLE session). Folder listings, FETCH reads and APPEND/COPY writes run in threads
(see ``backend`` and ``rawfetch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import uuid
from argparse import Namespace
from contextlib import AsyncExitStack
from functools import partial

from proxyprotocol.noop import ProxyProtocolNoop
from proxyprotocol.sock import SocketInfo
from pymap.backend.maildir import Config as MaildirConfig
from pymap.concurrent import Subsystem
from pymap.context import connection_exit
from pymap.parsing import Params
from pymap.token import AllTokens
from pysasl import SASLAuth

from relaygate.addresses import is_loopback
from relaygate.context import Context
from relaygate.errors import ConfigError
from relaygate.interfaces import Account, LoginResult
from relaygate.log import event
from relaygate.servers.accept import Peer
from relaygate.servers.imap import notify, pymap_fixes
from relaygate.servers.imap.connection import (
    CONSECUTIVE_BAD_LIMIT,
    MAX_LINE,
    Connection,
    ConnInfo,
    Disconnect,
    Login,
    SessionState,
    Unavailable,
)
from relaygate.servers.listeners import (
    AddressLimiter,
    Listen,
    Listener,
    open_window_after_login,
    parse_listen,
    proxy_policy,
    tls_context_of,
)

log = logging.getLogger("relaygate.imap")

#: the window is refreshed this many times per expiry while a session lives, so
#: one lost refresh (store briefly down) still leaves the window open
REFRESH_PER_EXPIRY = 3


# -- configuration and service -------------------------------------------------


class ImapConfig(MaildirConfig):
    """pymap's configuration, built from relaygate Settings (pymap's CLI is not used)."""

    def __init__(self, service: ImapService, ssl_context: ssl.SSLContext | None) -> None:
        settings = service.settings
        asyncio_subsystem = Subsystem.for_asyncio()
        super().__init__(
            Namespace(passlib_cfg=None, proxy_protocol=None, debug=False),
            host=None, port=0, base_dir=str(settings.data_dir), layout="++", colon=None,
            subsystem=asyncio_subsystem, cpu_subsystem=asyncio_subsystem,
            # pymap builds a context from $CERT_FILE when given none: give it an unused
            # one (tls_enabled is False; servers.listeners builds the real ones)
            ssl_context=ssl_context or ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
            tls_enabled=ssl_context is not None,
            proxy_protocol=ProxyProtocolNoop(), reject_dnsbl=False,
            max_append_len=settings.imap.max_literal,
            bad_command_limit=CONSECUTIVE_BAD_LIMIT,
            invalid_user_sleep=0.0,
        )
        self._hostname = settings.hostname or "localhost"
        # Built once: SASLAuth.named() scans the installed entry points (45 ms, 26-84 ms
        # in seven calls on the loaded 2-core test machine, December 2026).
        # Plaintext mechanisms only: passwords are checked against argon2id
        # hashes, so CRAM-MD5 style mechanisms cannot work.
        self._plain_auth = SASLAuth.named([b"PLAIN", b"LOGIN"])
        self._no_auth = SASLAuth([])

    @property
    def greeting(self) -> bytes:
        # pymap's reads $FQDN; relaygate's hostname setting is the source here
        name = self._hostname.encode("ascii", "replace")
        return b"relaygate IMAP4rev1 ready on " + name

    @property
    def parsing_params(self) -> Params:
        # No APPEND limit inside pymap's parser: the adapter checks literal
        # sizes itself (before and after login) and answers NO [TOOBIG].
        return Params()

    @property
    def initial_auth(self) -> SASLAuth:
        return self._no_auth

    @property
    def tls_auth(self) -> SASLAuth:
        return self._plain_auth


class ImapService:
    """The ``imap`` service: listeners, connections, windows."""

    name = "imap"

    def __init__(self, ctx: Context) -> None:
        if ctx.directory is None:
            raise ConfigError("the IMAP server needs a user directory")
        pymap_fixes.apply()
        self.ctx = ctx
        self.settings = ctx.settings
        self.directory = ctx.directory
        s = ctx.settings
        self.plain = [parse_listen(x, origin="imap.listen") for x in s.imap.listen]
        self.implicit = ([parse_listen(x, origin="imap.listen_tls") for x in s.imap.listen_tls]
                         if s.tls.cert is not None else [])
        self.ssl_context = tls_context_of(ctx)
        self.config = ImapConfig(self, self.ssl_context)
        self.tokens = AllTokens(self.config)
        self.commands = self.config.commands
        self._listeners: list[Listener] = []
        #: live connections: their task and their stream (to abort at stop)
        self._tasks: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._refreshers: set[asyncio.Task[None]] = set()
        #: open connections per client address, all IMAP listeners together
        self.limiter = AddressLimiter(s.imap.max_connections_per_ip, s.ipv6_prefix,
                                      unix_key="unix")
        #: wakes IDLE sessions when their folder changes (inotify)
        self.notifier = notify.Notifier()

    def listeners(self) -> list[str]:
        if self._listeners:
            return [f"{lst.kind} {addr}" for lst in self._listeners for addr in lst.addresses]
        return ([f"imap {x}" for x in self.plain] + [f"imaps {x}" for x in self.implicit])

    # lifecycle

    async def start(self) -> None:
        if not self.plain and not self.implicit:
            return
        try:
            for listen in self.plain:
                await self._listen(listen, implicit_tls=False)
            for listen in self.implicit:
                await self._listen(listen, implicit_tls=True)
        except BaseException:
            await self.stop(0)
            raise
        if self.ssl_context is None and not self.settings.auth.allow_plaintext:
            for listener in self._listeners:
                if not listener.loopback:
                    log.warning("IMAP listener %s has no TLS and is not loopback: logins are "
                                "refused there (LOGINDISABLED)", listener)

    async def _listen(self, listen: Listen, *, implicit_tls: bool) -> None:
        listener = Listener("imaps" if implicit_tls else "imap", listen)
        self._listeners.append(listener)
        await listener.bind_streams(partial(self._accept, listener, implicit_tls),
                                    tls=self.ssl_context if implicit_tls else None,
                                    limit=MAX_LINE, proxies=proxy_policy(self.settings))

    def bound_ports(self) -> list[int]:
        """TCP ports actually bound (useful with port 0), in listener order."""
        return [port for listener in self._listeners for port in listener.ports()]

    def reload(self) -> None:
        """SIGHUP: nothing of its own (the runner reloads the users and the certificate)."""

    async def stop(self, grace: float = 30.0) -> None:
        for listener in self._listeners:
            listener.close()
        # IMAP sessions live for hours: tell them BYE now (pymap answers a
        # cancelled read with "BYE [UNAVAILABLE]") and wait for them to go.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(grace, 0.1))
            for task in pending:  # e.g. a client that does not read its BYE
                writer = self._tasks.get(task)
                if writer is not None:
                    writer.transport.abort()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for task in list(self._refreshers):
            task.cancel()
        for listener in self._listeners:
            await listener.wait_closed(1.0)
        self._listeners.clear()
        self.notifier.close()

    # connections

    async def _accept(self, listener: Listener, implicit_tls: bool,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      peer: Peer) -> None:
        ip = peer.ip
        if not self.limiter.acquire(ip):
            # RFC 3501 7.1.5: BYE may be the greeting; RFC 5530: UNAVAILABLE.
            event("imap.refused", ip=ip, reason="too many connections")
            writer.write(b"* BYE [UNAVAILABLE] Too many connections from your address\r\n")
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks[task] = writer
        notify.current.set(self.notifier)  # this connection's task and its children
        gauge = self.ctx.metrics.connections.labels("imap")
        gauge.inc()
        # A listener on loopback is trusted for plaintext logins, unless a proxy
        # forwarded the connection from elsewhere: then the client's address counts.
        local = (ip is None or is_loopback(ip)) if peer.proxy else listener.loopback
        conn = ConnInfo(
            ip=ip, peer=ip or "local", listener=listener, tls=implicit_tls,
            plaintext_ok=(implicit_tls or local or self.settings.auth.allow_plaintext))
        try:
            sock_info = SocketInfo.get(writer, None, unique_id=uuid.uuid4().bytes)
            connection = Connection(self.commands, self.config, reader, writer, sock_info,
                                     conn, self)
            state = SessionState(Login(self, conn), self.config, conn, self)
            async with AsyncExitStack() as stack:
                connection_exit.set(stack)
                stack.push_async_callback(self._stop_refresh, conn)
                await connection.run(state)
        except (Disconnect, ConnectionError, EOFError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("IMAP session with %s ended by an unexpected error", conn.peer)
        finally:
            gauge.dec()
            self.limiter.release(ip)
            self._tasks.pop(task, None)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5.0)
            except (Exception, asyncio.CancelledError):
                writer.transport.abort()

    # login and windows

    async def check_password(self, login: str, password: str, conn: ConnInfo) -> LoginResult:
        """Ask the directory; count and log the outcome (never raises for bad input)."""
        logins = self.ctx.metrics.logins
        try:
            result = await self.directory.authenticate(login, password, conn.ip or "",
                                                       service="imap")
        except Exception:
            log.exception("user directory failed during an IMAP login from %s", conn.peer)
            logins.labels("imap", "error").inc()
            raise Unavailable(b"Login temporarily unavailable.") from None
        if result.throttled:
            logins.labels("imap", "throttled").inc()
        elif not result.ok:
            logins.labels("imap", "failed").inc()
        return result

    async def logged_in(self, account: Account, conn: ConnInfo) -> None:
        """A login succeeded: open the window and keep it open while connected."""
        conn.authenticated = True
        conn.account = account
        conn.commands = 0
        self.ctx.metrics.logins.labels("imap", "ok").inc()
        event("login.ok", service="imap", user=account.login, ip=conn.peer,
              tls="yes" if conn.tls else "no")
        if conn.ip is None:
            return  # a UNIX-socket client has no address to open a window for
        await open_window_after_login(self.ctx, conn.ip, account, "imap")
        interval = self.ctx.control.expiry / REFRESH_PER_EXPIRY
        task = asyncio.create_task(self._refresh(account, conn.ip, interval))
        conn.refresher = task
        self._refreshers.add(task)
        task.add_done_callback(self._refreshers.discard)

    async def _refresh(self, account: Account, ip: str, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await open_window_after_login(self.ctx, ip, account, "imap", refresh=True)

    async def _stop_refresh(self, conn: ConnInfo) -> None:
        task = conn.refresher
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def make_service(ctx: Context) -> ImapService:
    """The IMAP service for ``relaygate serve`` / ``relaygate imapd``."""
    return ImapService(ctx)


#: re-exported for tests and docs: when the adapter last changed behaviour of
#: pymap, in one place (pymap is pinned to this version in pyproject.toml)
PYMAP_VERSION = "0.36.7"

__all__ = ["PYMAP_VERSION", "ImapService", "make_service"]
