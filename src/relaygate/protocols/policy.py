"""Postfix policy delegation protocol: sans-I/O reader, triage and reply writer.

Theory of operation
-------------------
Postfix's SMTPD_POLICY_README ("Protocol description") defines the wire
format: a request is a series of ``name=value`` lines, each ended by a
newline, and the request ends with an empty line. The server answers with
``action=WHAT`` and an empty line, where WHAT is anything allowed in an
access(5) table. Postfix keeps the connection open and sends the next request
only after the answer (no pipelining), so a connection carries many requests.
"In case of trouble the policy server must not send a reply. Instead the
server must log a warning and disconnect": a malformed request, an over-long
line, too many attributes or a repeated attribute that a decision reads
(``request``, ``client_address``, ``sasl_username``) raise
:class:`PolicyProtocolError` and the server closes without answering.

relaygate is placed *before* ``reject_unauth_destination``, so it only ever
answers ``OK`` (this address may relay: a static rule or an open window) or
``DUNNO`` (no opinion: the rest of Postfix's restrictions decide). A store
failure is ``DUNNO`` too, so Postfix's own ``reject_unauth_destination``
refuses the relay: fail closed.

:class:`PolicyReader` is fed bytes and hands out :class:`PolicyRequest`
values; :func:`triage` says whether a request needs a relay decision
(:class:`Ask`) or can be answered at once (:class:`Answer`);
:func:`answer_for` maps a :class:`~relaygate.decision.Decision` to the reply
and :func:`format_answer` writes it. Nothing here touches a socket.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from relaygate.addresses import parse_ip
from relaygate.decision import Decision, Verdict
from relaygate.errors import InvalidAddress, RelaygateError

#: Longest attribute line. Postfix's SMTP server reads command lines of at most
#: ``line_length_limit`` (2048) bytes, so no sender, recipient or HELO name it
#: forwards is longer; twice that leaves room for the name and TLS fields.
MAX_LINE_LENGTH = 4096

#: Most attributes in one request. Postfix 3.7 sends about 35; a client that
#: sends hundreds is not Postfix.
MAX_ATTRIBUTES = 128

#: Largest request (all lines). A real request is 1-3 KiB; this bounds the
#: memory one connection can make the server hold.
MAX_REQUEST_SIZE = 32 * 1024

#: Attribute names as Postfix writes them (lower case, digits, underscores).
_NAME = re.compile(rb"[a-z][a-z0-9_]{0,63}")
#: One attribute line, anchored at a line start: ``name=value\n``.
_LINE = re.compile(rb"^([a-z][a-z0-9_]{0,63})=([^\n]*)\n", re.MULTILINE)

#: The only request type Postfix defines today (SMTPD_POLICY_README).
ACCESS_POLICY = "smtpd_access_policy"
_ACCESS_POLICY_BYTES = ACCESS_POLICY.encode()

#: The attributes a decision reads. They are taken out of the block while it is
#: parsed, and a request that repeats one of them is refused (two parsers could
#: disagree on which value counts); every other attribute stays in the block
#: until someone asks for it.
READ_ATTRIBUTES = (b"request", b"client_address", b"sasl_username")
#: Their lines, found after a newline (the block is searched with one prepended).
_READ = re.compile(rb"\n(request|client_address|sasl_username)=([^\n]*+)")


@functools.lru_cache(maxsize=8)
def _block_pattern(max_attributes: int) -> re.Pattern[bytes]:
    """A whole well-formed request: at most ``max_attributes`` lines, each
    ``name=value``. Possessive quantifiers: a line that does not fit fails at once
    instead of backtracking through the block. (NUL bytes are looked for apart:
    ``[^\\n\\0]`` is a character set, tested byte by byte, and costs twice as much
    as ``[^\\n]`` plus a search for NUL.)"""
    return re.compile(rb"(?:[a-z][a-z0-9_]{0,63}+=[^\n]*+\n){0,%d}+" % max_attributes)

OK = "OK"
DUNNO = "DUNNO"


class PolicyProtocolError(RelaygateError):
    """The peer broke the protocol: log it and close without an answer."""


class PolicyRequest:
    """One request: raw attribute name -> raw value (bytes, not yet trusted).

    ``read`` holds the attributes of :data:`READ_ATTRIBUTES` that are present;
    the others are split out of the request's text only when :attr:`fields`
    is first asked for (a decision never asks).
    """

    __slots__ = ("_block", "_fields", "read")

    def __init__(self, fields: dict[bytes, bytes] | None = None, *,
                 block: bytes = b"", read: dict[bytes, bytes] | None = None) -> None:
        self._block = block
        self._fields = fields
        if read is None:
            got = fields or {}
            read = {n: got[n] for n in READ_ATTRIBUTES if n in got}
        self.read = read

    @classmethod
    def of(cls, attributes: dict[str, bytes]) -> PolicyRequest:
        """Build a request from text names (tests, probes)."""
        return cls({k.encode("ascii"): v for k, v in attributes.items()})

    @property
    def fields(self) -> dict[bytes, bytes]:
        """Every attribute: name -> value."""
        if self._fields is None:
            self._fields = dict(_LINE.findall(self._block))
        return self._fields

    @property
    def attributes(self) -> dict[str, bytes]:
        """Names decoded (they are ASCII by construction)."""
        return {k.decode("ascii"): v for k, v in self.fields.items()}

    def get(self, name: str) -> bytes | None:
        key = name.encode("ascii")
        if key in READ_ATTRIBUTES:
            return self.read.get(key)
        return self.fields.get(key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PolicyRequest):
            return NotImplemented
        return self.fields == other.fields

    __hash__ = None  # type: ignore[assignment]  # mutable cache inside

    def __repr__(self) -> str:
        return f"PolicyRequest({self.fields!r})"

    def text(self, name: str) -> str | None:
        """The value decoded for logging (invalid UTF-8 replaced), or None."""
        raw = self.get(name)
        return None if raw is None else raw.decode("utf-8", "replace")

    @property
    def request_type(self) -> str | None:
        return self.text("request")


class PolicyReader:
    """Splits a byte stream into policy requests (h11 style: no I/O).

    ``receive_data(b"")`` signals end of input. ``next_request()`` returns the
    next complete request, or None when more data is needed; it raises
    :class:`PolicyProtocolError` for anything Postfix would never send.
    """

    def __init__(
        self,
        *,
        max_line: int = MAX_LINE_LENGTH,
        max_attributes: int = MAX_ATTRIBUTES,
        max_request: int = MAX_REQUEST_SIZE,
    ) -> None:
        self._buf = bytearray()
        self._eof = False
        self._max_line = max_line
        self._max_attributes = max_attributes
        self._shape = _block_pattern(max_attributes)
        self._max_request = max_request
        #: where the search for the end of the request resumes (bytes already scanned)
        self._scanned = 0

    @property
    def closed(self) -> bool:
        """True once end of input was seen and every complete request was taken."""
        return self._eof and not self._buf

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes from the peer (copied: ``data`` may be reused at once)."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise PolicyProtocolError("data after end of input")
        self._buf += data

    def next_request(self) -> PolicyRequest | None:
        buf = self._buf
        if not buf:
            return None
        if buf[0] == 0x0A:
            raise PolicyProtocolError("empty request")
        # The request ends at the first blank line: "\n\n" (a request never starts with "\n").
        start = max(self._scanned - 1, 0)
        end = buf.find(b"\n\n", start)
        if end < 0:
            self._check_incomplete()
            return None
        block = bytes(buf[: end + 1])
        del buf[: end + 2]
        self._scanned = 0
        if len(block) > self._max_request:
            raise PolicyProtocolError(f"request longer than {self._max_request} bytes")
        return self._parse(block)

    def _check_incomplete(self) -> None:
        buf = self._buf
        self._scanned = len(buf)
        if len(buf) > self._max_request:
            raise PolicyProtocolError(f"request longer than {self._max_request} bytes")
        last_nl = buf.rfind(b"\n")
        if len(buf) - last_nl - 1 > self._max_line:
            raise PolicyProtocolError(f"line longer than {self._max_line} bytes")
        if buf.count(b"\n") > self._max_attributes:
            raise PolicyProtocolError(f"more than {self._max_attributes} attributes")
        if buf.startswith(b"\r\n") or b"\n\r\n" in buf:
            # CRLF line endings: the request would never end (Postfix sends bare LF)
            raise PolicyProtocolError("request ends with CRLF, not an empty line")
        if self._eof and buf:
            raise PolicyProtocolError("connection closed in the middle of a request")

    def _parse(self, block: bytes) -> PolicyRequest:
        # A well-formed request passes one regex in C (_block_pattern: shape and
        # number of lines) and a search for NUL; only a refused one is looked at
        # again, for the message. The attributes a decision reads are taken out with
        # a second regex; the others are split out only if someone asks
        # (PolicyRequest.fields).
        if b"\0" in block or self._shape.fullmatch(block) is None:
            raise PolicyProtocolError(self._why_refused(block))
        if len(block) > self._max_line and any(
                len(line) > self._max_line for line in block.split(b"\n")):
            raise PolicyProtocolError(f"line longer than {self._max_line} bytes")
        pairs = _READ.findall(b"\n" + block)
        read = dict(pairs)
        if len(read) != len(pairs):
            # Postfix never repeats a name; a second client_address is an attempt to
            # make two parsers disagree.
            name = next(n for n, _ in pairs if sum(m == n for m, _ in pairs) > 1)
            raise PolicyProtocolError(f"attribute {name.decode()} repeated")
        if b"request" not in read:
            raise PolicyProtocolError("request without a 'request' attribute")
        return PolicyRequest(block=block, read=read)

    def _why_refused(self, block: bytes) -> str:
        if b"\0" in block:
            return "NUL byte in a request"
        if block.count(b"\n") > self._max_attributes:
            return f"more than {self._max_attributes} attributes"
        return "line is not name=value"


@dataclass(frozen=True, slots=True)
class Ask:
    """The request needs a relay decision for this (canonical) client address."""

    ip: str


@dataclass(frozen=True, slots=True)
class Answer:
    """The reply to send (``OK`` or ``DUNNO``) and why, for the log."""

    action: str
    reason: str
    kind: str


def triage(request: PolicyRequest) -> Ask | Answer:
    """Decide what a request needs before any store is asked."""
    fields = request.read
    if fields.get(b"request") != _ACCESS_POLICY_BYTES:
        return _OTHER_REQUEST
    if fields.get(b"sasl_username"):
        # Postfix already authenticated this client (permit_sasl_authenticated decides).
        return _SASL
    raw = fields.get(b"client_address")
    if raw is None:
        return Answer(DUNNO, "request without client_address", "invalid")
    ask = _ASKS.get(raw)
    if ask is None:
        try:
            ask = Ask(parse_ip(raw))
        except InvalidAddress as exc:
            return Answer(DUNNO, f"invalid client_address: {exc.why}", "invalid")
        if len(_ASKS) >= _ASKS_MAX:
            _ASKS.clear()
        _ASKS[raw] = ask
    return ask


#: Recently seen ``client_address`` values and their canonical form (an smtpd asks
#: for each recipient of a session from the same address). Only the parsing is
#: remembered, a pure function of the bytes: every request still asks the store.
_ASKS: dict[bytes, Ask] = {}
_ASKS_MAX = 4096


_OTHER_REQUEST = Answer(DUNNO, "not an smtpd_access_policy request", "other-request")
_SASL = Answer(DUNNO, "client authenticated with SASL", "sasl")


def action_for(decision: Decision) -> str:
    """ALLOW is OK; DENY and TEMPFAIL (store unreachable) are DUNNO, never a rejection."""
    return OK if decision.verdict is Verdict.ALLOW else DUNNO


def answer_for(decision: Decision) -> Answer:
    """The reply for a decision (see :func:`action_for`), with its reason for the log."""
    return Answer(action_for(decision), decision.reason, decision.kind)


_ANSWERS = {OK: b"action=OK\n\n", DUNNO: b"action=DUNNO\n\n"}


def format_answer(action: str) -> bytes:
    """The reply bytes for ``OK`` or ``DUNNO``."""
    try:
        return _ANSWERS[action]
    except KeyError:
        raise ValueError(f"relaygate only answers OK or DUNNO, not {action!r}") from None


def format_request(attributes: dict[str, str | bytes]) -> bytes:
    """A request as Postfix writes it (for tests, ``doctor --probe`` and benchmarks)."""
    out = bytearray()
    for name, value in attributes.items():
        raw = value.encode() if isinstance(value, str) else value
        if _NAME.fullmatch(name.encode()) is None or b"\n" in raw:
            raise ValueError(f"cannot write attribute {name!r}")
        out += name.encode() + b"=" + raw + b"\n"
    return bytes(out + b"\n")
