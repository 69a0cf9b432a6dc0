"""Socketmap protocol (Sendmail 8.13+, Postfix ``socketmap:`` tables): sans-I/O.

Theory of operation
-------------------
Sendmail's ``K name socket`` maps (cf/README, "socket map") and Postfix's
socketmap_table(5) send each lookup as one netstring
(https://cr.yp.to/proto/netstrings.txt): ``LEN:NAME KEY,`` where LEN is the
decimal length of ``NAME KEY``. The server answers with one netstring:

- ``OK VALUE``: found;
- ``NOTFOUND `` (with the space): not found;
- ``TEMP REASON``, ``TIMEOUT REASON``, ``PERM REASON``: the lookup failed.

Both clients keep the connection open and send the next request after the
answer, so a connection carries many requests. There is no way to report a
broken request in-band: a malformed netstring (a length that is not digits,
too long, no ``:`` or no ``,`` where they belong, no space between name and
key) raises :class:`SocketmapProtocolError` and the server closes the
connection; the client sees its lookup fail and reconnects.

relaygate answers one question: may this client address relay? The key is
the address as the MTA writes it: Sendmail's ``$&{client_addr}`` is
``192.0.2.1`` or ``IPv6:2001:db8::1``; rulesets that tag their keys (the
classic popauth.m4 hack looks up ``POP:192.0.2.1``) add a word and a colon
in front. :func:`client_address` strips those and returns the canonical
address. A key that is no address is simply not in the map (``NOTFOUND``).

:class:`SocketmapReader` is fed bytes and hands out :class:`SocketmapRequest`
values; :func:`answer_for` maps a :class:`~relaygate.decision.Decision` to
the reply netstring. Nothing here touches a socket.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from relaygate.addresses import parse_ip
from relaygate.decision import Decision, Verdict
from relaygate.errors import InvalidAddress, RelaygateError

#: Largest request (``NAME KEY``). A map name and a client address take a few dozen
#: bytes; Sendmail's keys are at most MAXNAME (256) bytes, Postfix's a line of an SMTP
#: command (2048 bytes). Anything longer is not a lookup we can answer.
MAX_REQUEST_SIZE = 4096

#: Most digits in a netstring length: enough for :data:`MAX_REQUEST_SIZE`.
_MAX_LENGTH_DIGITS = len(str(MAX_REQUEST_SIZE))

#: Longest value or reason in an answer we send. Postfix refuses replies over 100000
#: bytes; Sendmail's socket map reads at most its buffer (MAXLINE, 2048 bytes).
MAX_ANSWER_TEXT = 1024

#: A map name: what Sendmail's K line and Postfix's table name allow (no space, no
#: control characters).
_NAME = re.compile(rb"[!-~]{1,255}")

#: A netstring's length and colon, at the start of a request.
_HEAD = re.compile(rb"([0-9]{1,%d}):" % len(str(MAX_REQUEST_SIZE)))

#: A tag some rulesets put before the address (``POP:``), as Sendmail map keys allow.
_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,31}:")

NOTFOUND = b"9:NOTFOUND ,"


class SocketmapProtocolError(RelaygateError):
    """A client sent something that is not a socketmap request: close the connection."""


class SocketmapRequest(NamedTuple):
    """One lookup: the map name and the key, both still bytes."""

    name: bytes
    key: bytes


def netstring(payload: bytes) -> bytes:
    """``payload`` as a netstring."""
    return b"%d:%s," % (len(payload), payload)


class SocketmapReader:
    """Netstrings in, :class:`SocketmapRequest` values out.

    ``receive_data(b"")`` marks the end of the stream; a request cut short by it is
    a protocol error.
    """

    def __init__(self, max_request_size: int = MAX_REQUEST_SIZE) -> None:
        self.max_request_size = max_request_size
        self._buf = bytearray()
        self._pos = 0
        self.closed = False
        #: map names seen valid on this connection
        self._names: set[bytes] = set()

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes | memoryview) -> None:
        if self.closed and data:
            raise SocketmapProtocolError("data after end of stream")
        if not data:
            self.closed = True
            return
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_request(self) -> SocketmapRequest | None:
        """The next complete request, or None if more bytes are needed."""
        buf, pos = self._buf, self._pos
        end = len(buf)
        if pos == end:
            return None
        m = _HEAD.match(buf, pos)
        if m is None:
            # no "LEN:" yet: fine while what has arrived can still become one
            if end - pos > _MAX_LENGTH_DIGITS or not buf[pos:end].isdigit():
                raise SocketmapProtocolError("netstring length is not a number "
                                             f"of at most {_MAX_LENGTH_DIGITS} digits")
            self._check_open()
            return None
        length = int(m.group(1))
        if length > self.max_request_size:
            raise SocketmapProtocolError(
                f"request of {length} bytes (limit {self.max_request_size})")
        start = m.end()
        stop = start + length
        if stop >= end:
            self._check_open()
            return None
        if buf[stop] != 0x2C:  # ","
            raise SocketmapProtocolError("netstring does not end with a comma")
        name, sep, key = bytes(buf[start:stop]).partition(b" ")
        self._pos = stop + 1
        if not sep:
            raise SocketmapProtocolError("request is not NAME KEY")
        if name not in self._names:
            # a client asks one or two maps: each name is checked once (up to a few)
            if _NAME.fullmatch(name) is None:
                raise SocketmapProtocolError("request is not NAME KEY")
            if len(self._names) < 8:
                self._names.add(name)
        return SocketmapRequest(name, key)

    def _check_open(self) -> None:
        """More bytes are needed: an error if none can come."""
        if self.closed:
            raise SocketmapProtocolError("end of stream inside a request")


def client_address(key: bytes) -> str | None:
    """The canonical client address in a lookup key, or None when there is none.

    Accepts what Sendmail and Postfix send (``192.0.2.1``, ``2001:db8::1``,
    ``IPv6:2001:db8::1``, ``[192.0.2.1]``) and one tag before it (``POP:192.0.2.1``,
    ``POP:IPv6:2001:db8::1``). An IPv6 address may itself start like a tag
    (``fe80::1``, ``abcd:...``), so the key is tried whole first.
    """
    try:
        text = key.decode("ascii")
    except UnicodeDecodeError:
        return None
    if text[:5] in ("IPv6:", "ipv6:", "IPV6:"):  # Sendmail's form: no need to try it whole
        text = text[5:]
    for _ in range(2):
        try:
            return parse_ip(text)
        except InvalidAddress:
            pass
        if text[:5].lower() == "ipv6:":
            try:
                return parse_ip(text[5:])
            except InvalidAddress:
                return None
        m = _TAG.match(text)
        if m is None:
            return None
        text = text[m.end():]
    return None


def _text(reason: str) -> bytes:
    """Printable ASCII for an answer (no control characters, bounded)."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in reason)
    return cleaned[:MAX_ANSWER_TEXT].encode("ascii")


def found(value: str) -> bytes:
    """``OK VALUE``."""
    return netstring(b"OK " + _text(value))


def temporary(reason: str) -> bytes:
    """``TEMP REASON``: the MTA defers (Sendmail: the map lookup fails temporarily)."""
    return netstring(b"TEMP " + _text(reason))


STORE_DOWN = temporary("relaygate: grant store unreachable")


def answer_for(decision: Decision, ok: bytes) -> bytes:
    """The reply to a relay decision: ``ok`` (``found(value)``, made once by the
    caller), NOTFOUND, or TEMP (fail closed).

    A denial (no window, a deny rule, a key that is no address) is NOTFOUND: the
    MTA's own relay check then decides. A store that cannot be asked is TEMP, never
    OK; its reason names the kind of failure, not the store's error text.
    """
    verdict = decision.verdict
    if verdict is Verdict.ALLOW:
        return ok
    if verdict is Verdict.DENY:
        return NOTFOUND
    if decision.kind == "store":
        return STORE_DOWN
    return temporary("relaygate: " + decision.kind)
