"""Relay control as an aiosmtpd handler: who may send where, delivery, attribution.

Theory of operation
-------------------
The protocol is aiosmtpd's (RFC 5321); this module only answers its hooks.
Per ``RCPT`` (RFC 5321 section 4.1.1.3), with the path parsed strictly by
:mod:`relaygate.protocols.smtp_address`:

1. control characters in an address: ``553 5.7.1``, whoever asks;
2. an address trick (percent hack, bang path, source route, quoted local part
   holding ``@ % !``, a second ``@``) from a client that may not relay:
   ``553 5.7.1``. A client that may relay gets the address taken literally
   (the route of a source route is ignored, RFC 5321 section 4.1.1.3);
3. a domain in rcpthosts is local: accepted from anyone when the directory
   has that mailbox, else ``550 5.1.1``; ``<Postmaster>`` and
   ``postmaster@`` any local domain reach the postmaster mailbox
   (RFC 5321 section 4.5.1);
4. any other domain relays when the session is SMTP-authenticated (RFC 4954)
   or the relay decision for the client address is ALLOW (static rule, open
   POP/IMAP window, or ``$RELAYCLIENT`` in ``--stdio`` mode); the RELAYCLIENT
   value is appended to the recipient (qmail's fixup). DENY gives
   ``553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts``,
   TEMPFAIL (store unreachable) ``451 4.3.0``: relaying fails closed.

The decision is taken at the first RCPT that needs relaying (never for local
mail) and cached for the session when it is ALLOW; DENY and TEMPFAIL are
asked again at the next relay RCPT, so a window opened by a POP login during
the session counts at once.

Sender binding (``sender_binding = true``): a relayed recipient is accepted
only when MAIL FROM is an address of the account that authorised the relay
(its SMTP AUTH login, or the login that opened the window). A window without
a user cannot be bound and refuses to relay; static rules are not bound.

At DATA (RFC 5321 section 4.1.1.4), before ``354``: the message's files are
opened, the queue's for relayed recipients and one Maildir ``tmp/`` file per
local mailbox, each starting with a ``Received:`` line (section 4.4, protocol
names from RFC 3848) naming the client, its HELO, the protocol and, when
relaying, whose login or AUTH allowed it; a mailbox's file starts with
``Return-Path:`` too. The server writes the data into them as it arrives
(:mod:`relaygate.servers.smtp.data`). At the end of data: a line too long
(``500``), a message too big (``552 5.3.4``) or data holding a bare CR or LF
(``550 5.6.0``; SMTP smuggling, section 2.3.8) is refused and its files
removed; otherwise the queue's file is committed (fsync, then the envelope),
then every mailbox's (fsync, rename to ``new/``), and only then does the
client get ``250``. Any failure there is logged and answered ``451 4.3.0``
without detail.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aiosmtpd.smtp import MISSING, AuthResult, Envelope, Session

from relaygate.decision import Decision, Verdict
from relaygate.log import event
from relaygate.mail.maildir import MaildirWriter
from relaygate.mail.rcpthosts import RcptHosts
from relaygate.protocols.smtp_address import (
    TRICK_AT,
    AddressError,
    Mailbox,
    canonical_address,
    parse_mailbox,
)
from relaygate.relaylog import Envelope as LoggedEnvelope
from relaygate.relaylog import relayed
from relaygate.servers.smtp.data import DataBudget, IncomingMessage, MessageFile, open_files

if TYPE_CHECKING:
    from relaygate.context import Context
    from relaygate.interfaces import Account
    from relaygate.protocols.smtp_data import DataDecoder

log = logging.getLogger("relaygate.smtp")

T = TypeVar("T")

#: threads doing durable deliveries (Maildir, queue): they wait on fsync, not the CPU
DELIVERY_THREADS = 32
#: RFC 5321 4.5.1: mail to this local part must reach a person.
POSTMASTER = "postmaster"
#: HELO text shown in a Received: line is cut to this length.
MAX_HELO_SHOWN = 128
#: characters shown as-is in Received: comments; anything else becomes "?"
_SAFE_COMMENT = re.compile(r"[^A-Za-z0-9.\-_@+:\[\]=/]")

REPLY_TEMPFAIL = "451 4.3.0 Temporary failure, please try again later"
REPLY_RELAY_DENIED = "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts"
REPLY_TRICK = "553 5.7.1 sorry, that address form isn't accepted here"
REPLY_CONTROL = "553 5.7.1 sorry, control characters are not allowed in addresses"
REPLY_NO_MAILBOX = "550 5.1.1 sorry, no mailbox here by that name"
REPLY_BINDING = "553 5.7.1 sorry, that sender address isn't yours to relay from"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_BARE_LF = "550 5.6.0 bare CR or LF in message data refused (RFC 5321 2.3.8)"
REPLY_TOO_BIG = "552 5.3.4 Message too big for system"
REPLY_LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
REPLY_AUTH_THROTTLED = "454 4.7.0 Temporary authentication failure, try again later"
REPLY_AUTH_SYNTAX = "501 5.5.2 Cannot decode authentication data"


@dataclass
class ClientState:
    """What the server knows about one connection; kept across STARTTLS.

    ``fixed`` is a decision given from outside (``--stdio``: ``$RELAYCLIENT``)
    that replaces asking RelayControl.
    """

    ip: str | None
    service: str
    plaintext_auth: bool
    tls: bool = False
    fixed: Decision | None = None
    decision: Decision | None = None
    account: Account | None = None
    #: set by a hook whose 5xx reply is a policy refusal, not a client error
    policy_reply: bool = False
    refused_recipients: int = 0

    @property
    def shown_ip(self) -> str:
        return self.ip or "unix"


@dataclass(frozen=True)
class Authority:
    """Why a relayed recipient is allowed: SMTP AUTH or a relay decision."""

    kind: str
    reason: str
    relayclient: str
    user: str | None
    source: str | None
    account: Account | None = None


class RelaySession(Session):
    """aiosmtpd's Session without the deprecation warning logged on every AUTH."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class RelayEnvelope(Envelope):
    """One mail transaction: the parsed sender and where each recipient goes."""

    def __init__(self) -> None:
        super().__init__()
        self.sender: Mailbox | None = None
        #: maildir -> (account, addresses given for it)
        self.local: dict[Path, tuple[Account, list[str]]] = {}
        self.relayed: list[str] = []
        self.authority: Authority | None = None
        #: set by begin_data: the message id and the octets of the Received: header
        self.msgid = ""
        self.header_size = 0


def _state(server: Any) -> ClientState:
    state = server.client
    assert isinstance(state, ClientState)
    return state


class RelayHandler:
    """The aiosmtpd handler shared by every SMTP connection of one process."""

    def __dir__(self) -> list[str]:
        # aiosmtpd scans the handler with dir()/inspect.getmembers() on every
        # connection for handle_*/auth_* hooks: list only those.
        return _HANDLER_NAMES

    def __init__(self, ctx: Context, rcpthosts: RcptHosts, *,
                 hostname: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.rcpthosts = rcpthosts
        self.hostname = hostname or ctx.settings.hostname or "localhost"
        self.clock = clock
        self._executor = self._new_executor()
        self._closed = False
        self._users = 0
        messages = ctx.metrics.messages
        self._accepted = messages.labels("accepted")
        self._relayed = messages.labels("relayed")
        self._delivered = messages.labels("delivered")
        #: bytes of message data in memory, all SMTP services of the process together
        self.budget = DataBudget(ctx.settings.smtp.data_memory_limit)

    async def _disk(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking, fsyncing call on the delivery threads.

        fsync waits for the disk, not the CPU: many in flight at once let the
        file system commit them together (ext4/xfs group commit), so the pool
        is larger than asyncio's default (which is sized for CPU work).
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def retain(self) -> None:
        """A service starts using this handler."""
        if self._users <= 0 and self._closed:
            self._executor = self._new_executor()
            self._closed = False
        self._users += 1

    def release(self) -> None:
        """A service stopped; the last one shuts the delivery threads down."""
        self._users -= 1
        if self._users <= 0 and not self._closed:
            self._closed = True
            self._executor.shutdown(wait=False)

    @staticmethod
    def _new_executor() -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=DELIVERY_THREADS,
                                  thread_name_prefix="relaygate-delivery")

    def reload(self) -> None:
        """Re-read the local domains (SIGHUP); a bad file raises and the old list stays."""
        self.rcpthosts = RcptHosts.from_settings(self.settings)

    # -- greeting ----------------------------------------------------------

    async def handle_HELO(self, server: Any, session: Any, envelope: Any,
                          hostname: str) -> str:
        session.host_name = hostname
        return f"250 {self.hostname}"

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.ctx.directory is None:
            responses = [r for r in responses if not r[4:].startswith("AUTH")]
        # RFC 2920: the server answers pipelined commands in order, writing
        # the replies together (RelaySMTP.push).
        responses.insert(-1, "250-PIPELINING")
        # One write for the whole multi-line reply: aiosmtpd writes each line
        # on its own, and clients that read one segment per reply (nmap's
        # smtp library, for one) then fall a reply behind for the session.
        return ["\r\n".join(responses)]

    # -- envelope ----------------------------------------------------------

    async def handle_MAIL(self, server: Any, session: Any, envelope: RelayEnvelope,
                          address: str, mail_options: list[str]) -> str:
        try:
            sender = parse_mailbox("" if address == "<>" else address)
        except AddressError as exc:
            if exc.reason == "control":
                return REPLY_CONTROL
            return "501 5.1.7 Bad sender address syntax"
        envelope.sender = sender
        envelope.mail_from = "<>" if sender.null else sender.address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: RelayEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        state = _state(server)
        if len(envelope.rcpt_tos) >= self.settings.smtp.max_recipients:
            return REPLY_TOO_MANY_RCPTS
        reply = await self._recipient(server, state, envelope, address)
        if reply.startswith("5"):
            state.policy_reply = True
            state.refused_recipients += 1
        else:
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def _recipient(self, server: Any, state: ClientState, envelope: RelayEnvelope,
                         address: str) -> str:
        try:
            rcpt = parse_mailbox("" if address == "<>" else address)
        except AddressError as exc:
            if exc.reason == "control":
                return REPLY_CONTROL
            if exc.reason == "domain":
                return "553 5.1.2 Bad destination domain"
            return "501 5.1.3 Bad recipient address syntax"
        if rcpt.null:
            return "501 5.1.3 Bad recipient address syntax"
        if rcpt.tricks:
            authority = await self._authority(state)
            if authority is None or isinstance(authority, Decision):
                return REPLY_TRICK
            if TRICK_AT in rcpt.tricks:
                return "501 5.1.3 Bad recipient address syntax"
        if rcpt.domain is None:
            if rcpt.local_part.lower() == POSTMASTER and not rcpt.tricks:
                return self._local(envelope, rcpt, POSTMASTER, self.rcpthosts.primary)
            return "553 5.1.3 Fully qualified address required"
        if rcpt.domain in self.rcpthosts:
            return self._local(envelope, rcpt, rcpt.local_part, rcpt.domain)
        authority = await self._authority(state)
        if authority is None:
            return REPLY_RELAY_DENIED
        if isinstance(authority, Decision):
            return REPLY_TEMPFAIL if authority.verdict is Verdict.TEMPFAIL else REPLY_RELAY_DENIED
        if self.settings.sender_binding and not self._sender_bound(authority, envelope):
            event("relay.refused", ip=state.shown_ip, reason="sender binding",
                  user=authority.user, sender=envelope.mail_from, rcpt=rcpt.address)
            return REPLY_BINDING
        if self.ctx.queue is None:
            log.error("relaying allowed for %s but no queue is configured", state.shown_ip)
            return REPLY_TEMPFAIL
        final = rcpt.address + authority.relayclient
        envelope.relayed.append(final)
        envelope.rcpt_tos.append(final)
        if envelope.authority is None:
            envelope.authority = authority
        return "250 2.1.5 OK"

    def _local(self, envelope: RelayEnvelope, rcpt: Mailbox, local: str,
               domain: str | None) -> str:
        directory = self.ctx.directory
        if directory is None or domain is None:
            return REPLY_NO_MAILBOX
        address = f"{local}@{domain}"
        account = directory.find_recipient(address)
        if account is None and local.lower() == POSTMASTER:
            account = self._postmaster()
        if account is None:
            # A disabled account cannot log in, but it is still a mailbox: its
            # mail is kept, not bounced.
            return REPLY_NO_MAILBOX
        slot = envelope.local.setdefault(account.maildir, (account, []))
        slot[1].append(address)
        envelope.rcpt_tos.append(rcpt.address if rcpt.domain else address)
        return "250 2.1.5 OK"

    def _postmaster(self) -> Account | None:
        directory = self.ctx.directory
        assert directory is not None
        if self.rcpthosts.primary is not None:
            account = directory.find_recipient(f"{POSTMASTER}@{self.rcpthosts.primary}")
            if account is not None:
                return account
        name = self.settings.queue.postmaster
        account = _find_account(directory, name)
        if account is None:
            log.warning("no postmaster mailbox: add an address postmaster@%s to an account",
                        self.rcpthosts.primary)
        return account

    async def _authority(self, state: ClientState) -> Authority | Decision | None:
        """Who allows this session to relay; a Decision when it may not (DENY/TEMPFAIL)."""
        if state.account is not None:
            return Authority("auth", f"SMTP AUTH as {state.account.login}", "",
                             state.account.login, "smtp-auth", state.account)
        decision = state.fixed or state.decision
        if decision is None or not decision.allowed:
            decision = await self._decide(state)
        if not decision.allowed:
            return decision if decision.verdict is Verdict.TEMPFAIL else None
        return Authority(decision.kind, decision.reason, decision.relayclient or "",
                         decision.user, decision.source)

    async def _decide(self, state: ClientState) -> Decision:
        if state.fixed is not None:
            decision = state.fixed
        elif state.ip is None:
            decision = Decision(Verdict.DENY, "client has no IP address (UNIX socket)", "none")
        else:
            # state.ip is canonical (parsed once, when the connection was accepted)
            decision = await asyncio.to_thread(self.ctx.control.decide_canonical, state.ip)
        before = state.decision
        if before is None or (before.verdict, before.kind, before.user) != (
                decision.verdict, decision.kind, decision.user):
            # Logged and counted once per session and outcome, not per RCPT.
            self.ctx.metrics.decisions.labels(decision.verdict.value, decision.kind).inc()
            event("relay.decision", ip=state.shown_ip, verdict=decision.verdict.value,
                  basis=decision.kind, user=decision.user, reason=decision.reason)
        state.decision = decision
        return decision

    def _sender_bound(self, authority: Authority, envelope: RelayEnvelope) -> bool:
        sender = envelope.sender
        if sender is None or sender.null or sender.domain is None:
            return False
        account = authority.account
        if account is None:
            if authority.user is None:
                # A static rule names no user: nothing to bind to. A window
                # without a user cannot be bound: fail closed.
                return authority.kind not in ("grant", "env")
            directory = self.ctx.directory
            account = _find_account(directory, authority.user) if directory else None
            if account is None:
                return False
        wanted = f"{sender.local_part}@{sender.domain}".lower()
        owned = {account.primary_address, *account.addresses}
        return any(canonical_address(a).lower() == wanted for a in owned)

    # -- message -----------------------------------------------------------

    async def begin_data(self, server: Any, session: Any,
                         envelope: RelayEnvelope) -> IncomingMessage | str:
        """Open the message's files before ``354``: the queue's, one per local mailbox.

        Each file starts with its headers (``Received:``, and ``Return-Path:``
        for a mailbox), so the body is only ever appended. A reply string when
        the files cannot be made (``451``).
        """
        state = _state(server)
        msgid = secrets.token_hex(8)
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        received = self.received_header(server, session, envelope, msgid)
        openers: list[Callable[[], MessageFile]] = []
        if envelope.relayed:
            openers.append(functools.partial(_open_queued, self.ctx.queue, sender,
                                             list(envelope.relayed), received))
        if envelope.local:
            local_head = f"Return-Path: <{sender}>\r\n".encode("ascii", "replace") + received
            openers.extend(functools.partial(MaildirWriter, maildir, local_head)
                           for maildir in envelope.local)
        try:
            files = await self._disk(open_files, openers)
        except Exception as exc:
            self._store_failed(exc, msgid, state, None)
            return REPLY_TEMPFAIL
        envelope.msgid = msgid
        envelope.header_size = len(received)
        return IncomingMessage(files, executor=self._executor, budget=self.budget)

    async def end_data(self, server: Any, session: Any, envelope: RelayEnvelope,
                       incoming: IncomingMessage, data: DataDecoder) -> str:
        """The reply to the end of data; a ``250`` only once every file is durable."""
        state = _state(server)
        limit = server.data_size_limit
        if data.too_long:
            return REPLY_LINE_TOO_LONG
        if limit and data.size > limit:
            event("message.refused", level=logging.INFO, ip=state.shown_ip,
                  reason="too big", size=data.size)
            return REPLY_TOO_BIG
        if data.bare:
            event("message.refused", level=logging.WARNING, ip=state.shown_ip,
                  reason="bare CR or LF in DATA", size=data.size)
            return REPLY_BARE_LF
        msgid = envelope.msgid
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        queue_id: str | None = None
        names: list[str] = []
        try:
            paths = await incoming.commit()  # the queue's file first (begin_data)
            if envelope.relayed:
                queue_id = str(paths.pop(0))
            names = [Path(p).name for p in paths]
        except Exception as exc:
            self._store_failed(exc, msgid, state, queue_id)
            return REPLY_TEMPFAIL
        size = envelope.header_size + data.size
        authority = envelope.authority
        event("message.accepted", id=msgid, ip=state.shown_ip,
              helo=session.host_name, reason=authority.reason if authority else "local",
              user=authority.user if authority else None, sender=sender or "<>",
              size=size, recipients=len(envelope.rcpt_tos),
              rcpts=",".join(envelope.rcpt_tos), queue_id=queue_id,
              maildir=",".join(names) or None)
        self._accepted.inc()
        if envelope.relayed:
            self._relayed.inc()
            if authority is not None:
                relayed(self.ctx, service="smtp", basis=authority.kind, user=authority.user,
                        ip=state.shown_ip, client_ip=state.ip, reason=authority.reason,
                        envelope=lambda: LoggedEnvelope(
                            sender, list(envelope.relayed), session.host_name, queue_id))
        if names:
            self._delivered.inc(len(names))
        return f"250 2.0.0 OK id={msgid}" + (f" queued as {queue_id}" if queue_id else "")

    def _store_failed(self, exc: Exception, msgid: str, state: ClientState,
                      queue_id: str | None) -> None:
        if isinstance(exc, OSError):
            # The disk (full, read-only, gone): the administrator's problem, not a bug.
            log.error("cannot store message %s from %s: %s", msgid, state.shown_ip, exc)
        else:
            log.exception("delivery failed for message %s from %s", msgid, state.shown_ip)
        event("message.deferred", level=logging.WARNING, id=msgid, ip=state.shown_ip,
              queue_id=queue_id, reason="delivery failed")

    def received_header(self, server: Any, session: Any, envelope: RelayEnvelope,
                        msgid: str) -> bytes:
        """The RFC 5321 4.4 trace line, with the RFC 3848 protocol and the relay authority."""
        state = _state(server)
        helo = _comment_safe(str(session.host_name or "unknown")[:MAX_HELO_SHOWN])
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if session.extended_smtp:
            if state.tls:
                proto += "S"
            if state.account is not None:
                proto += "A"
        elif state.tls:
            proto = "SMTPS"
        ip = state.ip
        if ip is None:
            tcp_info = "(UNIX socket)"
        else:
            tcp_info = f"([IPv6:{ip}])" if ":" in ip else f"([{ip}])"
        lines = [
            f"Received: from {helo} {tcp_info}",
            f"\tby {self.hostname} (relaygate) with {proto} id {msgid}",
        ]
        authority = envelope.authority
        if envelope.relayed and authority is not None:
            lines.append(f"\t(relay allowed: {_describe(authority)})")
        lines[-1] += ";"
        lines.append(f"\t{formatdate(self.clock(), localtime=True)}")
        return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")

    # -- SMTP AUTH (RFC 4954) ------------------------------------------------

    async def auth_PLAIN(self, server: Any, args: list[str]) -> AuthResult:
        """RFC 4616: ``authzid NUL authcid NUL passwd``; an authzid must equal the login."""
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            blob = _b64(args[1])
            if blob is None:
                await server.push(REPLY_AUTH_SYNTAX)
                return AuthResult(success=False, handled=True)
        parts = bytes(blob).split(b"\0")
        if len(parts) != 3:
            await server.push(REPLY_AUTH_SYNTAX)
            return AuthResult(success=False, handled=True)
        authz, login, password = parts
        if authz and authz != login:
            return await self._fail(server, login, "authorization identity not supported")
        return await self._login(server, login, password)

    async def auth_LOGIN(self, server: Any, args: list[str]) -> AuthResult:
        """The de-facto LOGIN mechanism: user name, then password, base64 each."""
        if len(args) == 1:
            login = await server.challenge_auth("Username:")
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            login = _b64(args[1])
            if login is None:
                await server.push(REPLY_AUTH_SYNTAX)
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._login(server, bytes(login), bytes(password))

    async def _login(self, server: Any, login_b: bytes, password_b: bytes) -> AuthResult:
        state = _state(server)
        directory = self.ctx.directory
        try:
            login = login_b.decode("utf-8")
            password = password_b.decode("utf-8")
        except UnicodeDecodeError:
            return await self._fail(server, login_b, "credentials are not UTF-8")
        if directory is None or not login or len(login) > 255:
            return await self._fail(server, login_b, "no such user")
        result = await directory.authenticate(login, password, state.ip or "127.0.0.1")
        if result.throttled:
            self.ctx.metrics.logins.labels("smtp", "throttled").inc()
            event("login.failed", level=logging.INFO, protocol="smtp", ip=state.shown_ip,
                  user=login, reason="throttled")
            state.policy_reply = True
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_THROTTLED)
        if not result.ok or result.account is None:
            return await self._fail(server, login_b, "bad credentials")
        state.account = result.account
        self.ctx.metrics.logins.labels("smtp", "ok").inc()
        event("login.ok", protocol="smtp", ip=state.shown_ip, user=result.account.login,
              tls=state.tls)
        return AuthResult(success=True, auth_data=result.account.login)

    async def _fail(self, server: Any, login: bytes, why: str) -> AuthResult:
        state = _state(server)
        self.ctx.metrics.logins.labels("smtp", "failed").inc()
        event("login.failed", level=logging.INFO, protocol="smtp", ip=state.shown_ip,
              user=login.decode("utf-8", "replace")[:64], reason=why)
        return AuthResult(success=False, handled=False)

    # -- errors --------------------------------------------------------------

    async def handle_exception(self, error: Exception) -> str:
        """Log the error; the client learns nothing but "try again later"."""
        log.error("SMTP session error: %s", type(error).__name__,
                  exc_info=(type(error), error, error.__traceback__))
        return REPLY_TEMPFAIL


def _open_queued(queue: Any, sender: str, recipients: list[str], head: bytes) -> MessageFile:
    """The queue's file for the relayed recipients, its ``Received:`` header written."""
    writer: MessageFile = queue.open_message(sender, recipients)
    try:
        writer.write(head)
    except BaseException:
        writer.discard()
        raise
    return writer


#: the hook names aiosmtpd looks up on the handler (see RelayHandler.__dir__)
_HANDLER_NAMES = sorted(n for n in dir(RelayHandler) if n.startswith(("handle_", "auth_")))


def _b64(text: str) -> bytes | None:
    if text == "=":
        return b""  # RFC 4954 4: "=" is an empty initial response
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


def _find_account(directory: Any, login: str) -> Account | None:
    finder = getattr(directory, "find_account", None)
    if callable(finder):
        found: Account | None = finder(login)
        return found
    if "@" in login:
        by_address: Account | None = directory.find_recipient(login)
        return by_address
    return None


def _describe(authority: Authority) -> str:
    if authority.kind == "auth":
        return f"SMTP AUTH as {_comment_safe(authority.user or '?')}"
    if authority.kind == "grant":
        src = _comment_safe(authority.source or "login")
        return f"{src} window of {_comment_safe(authority.user or 'unknown user')}"
    if authority.kind == "env":
        who = f" of {_comment_safe(authority.user)}" if authority.user else ""
        return f"RELAYCLIENT{who}"
    return "static rule"


def _comment_safe(text: str) -> str:
    return _SAFE_COMMENT.sub("?", text)
