"""The SMTP client of the delivery worker: one transaction to the next hop, connection cache.

Theory of operation
-------------------
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
import logging
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiosmtplib

from relaygate.mail.delivery.dsn import enhanced_status, one_line
from relaygate.mail.delivery.routes import (
    Target,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger("relaygate.delivery")

#: an idle cached connection is closed after this many seconds (Postfix: 2 s)
CACHE_IDLE = 2.0
#: a cached connection carries at most this many transactions, then is closed
CACHE_MAX_USES = 100
#: seconds given to QUIT when closing a connection: politeness, not correctness
QUIT_TIMEOUT = 5.0
#: RFC 5321 section 4.5.3.1.3: a path (with its angle brackets) is at most 256 octets
MAX_PATH_OCTETS = 256
#: RFC 5321 section 4.5.3.1.1: a local part is at most 64 octets
MAX_LOCAL_OCTETS = 64
#: RFC 5321 section 4.5.3.1.2: a domain is at most 255 octets
MAX_DOMAIN_OCTETS = 255

DONE_R, TEMP, PERM = "done", "temp", "perm"
#: DSN diagnostic type of our own texts (Postfix says X-Postfix); server replies are "smtp"
LOCAL_DIAGNOSTIC = "x-relaygate"
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


def local_outcome(code: int, status: str, text: str, remote: str | None = None) -> Outcome:
    return _outcome(code, f"{status} {text}", remote, server=False)


def address_problem(addr: str, *, sender: bool = False) -> Outcome | None:
    """A reason ``addr`` cannot be sent anywhere (RFC 5321 section 4.5.3.1), else None."""
    status = "5.1.7" if sender else "5.1.3"
    who = "sender" if sender else "recipient"
    try:
        raw = addr.encode("utf-8")
    except UnicodeEncodeError:
        return local_outcome(553, status, f"{who} address is not valid UTF-8")
    if len(raw) + 2 > MAX_PATH_OCTETS:
        return local_outcome(553, status, f"{who} address is longer than {MAX_PATH_OCTETS} octets")
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        return local_outcome(553, status, f"{who} address has no domain")
    if len(local.encode("utf-8")) > MAX_LOCAL_OCTETS:
        return local_outcome(553, status, f"local part longer than {MAX_LOCAL_OCTETS} octets")
    if len(domain.encode("utf-8")) > MAX_DOMAIN_OCTETS:
        return local_outcome(553, status, f"domain longer than {MAX_DOMAIN_OCTETS} octets")
    if _FORBIDDEN.search(addr) or (" " in addr and not local.startswith('"')):
        return local_outcome(553, status, f"{who} address contains forbidden characters")
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
        last = local_outcome(451, "4.4.1", "no host to deliver to")
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
            raise _ConnectFailed(local_outcome(451, "4.4.1", f"host {where} refused to talk to me: "
                                        f"{exc.code} {one_line(exc.message)}",
                                        target.host)) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else _errno_text(exc)
            raise _ConnectFailed(local_outcome(451, "4.4.1", f"connect to {where}: {why}",
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
            raise _ConnectFailed(local_outcome(451, "4.4.1", f"host {where} refused EHLO/HELO: "
                                        f"{exc.code} {one_line(exc.message)}",
                                        target.host)) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
            smtp.close()
            raise _ConnectFailed(local_outcome(451, "4.4.2", f"lost connection with {where} during "
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
            return [local_outcome(553, "5.6.7", f"sender address needs SMTPUTF8 and {remote} "
                           "does not support it", remote)] * len(rcpts)
        wire: list[tuple[int, str]] = []
        for i, r in enumerate(rcpts):
            if r.isascii() or utf8_ok:
                wire.append((i, r))
                continue
            alt = _ascii_form(r)
            if alt is None:
                out[i] = local_outcome(553, "5.6.7", f"recipient address needs SMTPUTF8 and "
                                       f"{remote} does not support it", remote)
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
                return [o or local_outcome(552, "5.3.4", f"message size {len(data)} exceeds "
                                           f"the size limit {limit} of {remote}", remote)
                        for o in out]
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
                    out[i] = local_outcome(553, "5.1.3", "recipient address contains forbidden "
                                    "characters", remote)
                    continue
                if resp.code in (250, 251):
                    accepted.append(i)
                else:
                    out[i] = _outcome(resp.code, resp.message, remote)
            if not accepted:
                await self._reset(key, conn)
                return _fill(out, local_outcome(451, "4.3.0", "no recipient accepted", remote))
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
            return _fill(out, local_outcome(553, "5.1.7", "sender address contains forbidden "
                                     "characters", remote))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            what = "timeout" if isinstance(exc, TimeoutError) else "lost connection"
            return _fill(out, local_outcome(451, "4.4.2", f"{what} with {remote} while sending "
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
