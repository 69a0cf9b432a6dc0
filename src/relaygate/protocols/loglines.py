"""Login lines of POP3/IMAP servers: syslog, Dovecot's own log, journald export.

Theory of operation
-------------------
``relaygate watch-log`` opens a relay window when a POP3/IMAP server logs a
successful login. A log is full of text that clients choose (a MAIL FROM, a
HELO name, a failed user name), so a line only counts when *both* the daemon
tag and the whole message have exactly the shape that daemon writes:

1. the line is split into a :class:`LogRecord` (tag, pid, message) by a header
   parser anchored at the start of the line: RFC 3164 syslog as written to
   files (``Mmm dd hh:mm:ss host tag[pid]: message``; also the RFC 3339
   timestamps of rsyslog's file format), Dovecot's own ``log_path`` file
   (``Mmm dd hh:mm:ss pop3-login: Info: message``), or one entry of
   journald's export format (``SYSLOG_IDENTIFIER``, ``SYSLOG_PID``, ``MESSAGE``;
   https://systemd.io/JOURNAL_EXPORT_FORMATS/);
2. a pattern applies only to its own daemon tags (full match), and its message
   regex must match the *whole* message (``re.fullmatch``); fields a client
   could influence (user names, reverse-DNS names) exclude the characters that
   would let them imitate the fields after them, and lines where a key such as
   ``rip=`` appears twice are ignored as ambiguous.

So ``postfix/smtpd[1]: ... from=<dovecot: imap-login: Login: user=<x>, ...>``
never matches: its tag is ``postfix/smtpd``. Syslog daemons escape control
characters, so a client cannot start a new line.

Custom patterns (``NAME=REGEX``) are full-matched against ``TAG[PID]: MESSAGE``
(``TAG: MESSAGE`` when there is no pid): the part of a syslog line after the
timestamp and host. They must have a named group ``ip`` and may have ``user``.

Everything here works on bytes and never touches a file: the watcher in
``relaygate.integrations.logwatch`` feeds it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from relaygate.addresses import parse_ip
from relaygate.errors import ConfigError, InvalidAddress

#: Longest log line looked at. syslog's classic limit is 1024 bytes and
#: rsyslog's default 8 KiB; longer lines are dropped, not truncated (a cut
#: line could end where a forged one would).
MAX_LINE_LENGTH = 8192

#: journald export: largest field accepted (journald's own default line max is 48 KiB).
MAX_JOURNAL_FIELD = 64 * 1024
#: journald export: most fields in one entry (journald entries carry ~30).
MAX_JOURNAL_FIELDS = 256

_TS_BSD = rb"[A-Z][a-z]{2} [ 0-9]?[0-9] [0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
_TS_ISO = (rb"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:[.,][0-9]{1,9})?"
           rb"(?:Z|[+-][0-9]{2}:?[0-9]{2})?")
_TS = rb"(?:" + _TS_BSD + rb"|" + _TS_ISO + rb")"
_TAG = rb"(?P<tag>[A-Za-z0-9_./-]{1,64})(?:\[(?P<pid>[0-9]{1,10})\])?"

#: ``TIMESTAMP HOST TAG[PID]: MESSAGE``; a host never ends in ":" (that is Dovecot's
#: ``pop3-login:`` in its own log file, which has no host field).
_SYSLOG = re.compile(_TS + rb" (?P<host>[^ \t]{0,254}[^ \t:]) " + _TAG + rb": (?P<msg>.*)")
#: Dovecot's ``log_path`` file: ``TIMESTAMP SERVICE: LEVEL: MESSAGE`` (no host).
_DOVECOT_LOG = re.compile(_TS + rb" (?P<tag>[a-z0-9-]{1,32}): (?P<msg>.*)")

FORMATS = ("auto", "syslog", "dovecot-log", "journal-export")


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One log message: the daemon tag, its pid (if any) and the message text."""

    tag: bytes
    pid: bytes | None
    message: bytes

    def tagged(self) -> bytes:
        """``TAG[PID]: MESSAGE`` (what custom patterns see)."""
        if self.pid is not None:
            return self.tag + b"[" + self.pid + b"]: " + self.message
        return self.tag + b": " + self.message


@dataclass(frozen=True, slots=True)
class LoginEvent:
    """A successful login seen in a log: who, from where, found by which pattern."""

    ip: str
    user: str | None
    domain: str | None
    service: str
    pattern: str


def parse_syslog(line: bytes) -> LogRecord | None:
    """A syslog file line (RFC 3164 header, or RFC 3339 timestamp), or None."""
    m = _SYSLOG.fullmatch(line)
    if m is None:
        return None
    return LogRecord(m["tag"], m["pid"], m["msg"])


def parse_dovecot_log(line: bytes) -> LogRecord | None:
    """A line of Dovecot's own log file (``log_path``), or None."""
    m = _DOVECOT_LOG.fullmatch(line)
    if m is None:
        return None
    return LogRecord(m["tag"], None, m["msg"])


def record_from_journal(entry: dict[bytes, bytes]) -> LogRecord | None:
    """The record of a journald entry (SYSLOG_IDENTIFIER, SYSLOG_PID or _PID, MESSAGE)."""
    tag = entry.get(b"SYSLOG_IDENTIFIER")
    msg = entry.get(b"MESSAGE")
    if not tag or msg is None or re.fullmatch(rb"[A-Za-z0-9_./-]{1,64}", tag) is None:
        return None
    pid = entry.get(b"SYSLOG_PID") or entry.get(b"_PID")
    if pid is not None and re.fullmatch(rb"[0-9]{1,10}", pid) is None:
        pid = None
    return LogRecord(tag, pid, msg)


# -- patterns ------------------------------------------------------------------

#: An address as servers print it: digits, hex, colons, dots (validated by parse_ip after).
_IP = rb"(?P<ip>[0-9A-Fa-f:.]{2,45})"
#: A reverse-DNS name as servers print it: no space or bracket, so it cannot imitate "[ip]".
_HOST = rb"[^\s\[\]()]{1,255}"


@dataclass(frozen=True)
class Pattern:
    """A login-line shape: daemon tags (full match) and the whole message (full match).

    ``unique`` lists byte strings that must occur exactly once in the message
    (a second ``rip=`` means someone tried to smuggle one in).
    """

    name: str
    tag: re.Pattern[bytes]
    message: re.Pattern[bytes]
    unique: tuple[bytes, ...] = ()
    #: match against ``TAG[PID]: MESSAGE`` instead (custom patterns)
    tagged: bool = False

    def match(self, record: LogRecord) -> re.Match[bytes] | None:
        if self.tagged:
            return self.message.fullmatch(record.tagged())
        if self.tag.fullmatch(record.tag) is None:
            return None
        m = self.message.fullmatch(record.message)
        if m is None:
            return None
        for key in self.unique:
            if record.message.count(key) != 1:
                return None
        return m


def _p(name: str, tag: bytes, message: bytes, unique: tuple[bytes, ...] = ()) -> Pattern:
    return Pattern(name, re.compile(tag), re.compile(message), unique)


_DOVECOT_FIELDS = (
    rb"Login: user=<(?P<user>[^<>\x00-\x1f]{0,255})>, method=[A-Za-z0-9_-]{1,32}, "
    rb"rip=" + _IP + rb", lip=[0-9A-Fa-f:.]{2,45}(?:, [^\x00-\x1f]*)?"
)

#: Built-in patterns, by name.
BUILTIN: dict[str, Pattern] = {
    # Dovecot 1.x-2.3 via syslog/journald: "dovecot: imap-login: Login: user=<..>, method=..,
    # rip=.., lip=.., mpid=.., TLS, session=<..>" (login_log_format_elements, default order).
    "dovecot": _p(
        "dovecot",
        rb"dovecot",
        rb"(?P<service>pop3|imap)-login: (?:Info: )?" + _DOVECOT_FIELDS,
        (b"rip=", b"user=<"),
    ),
    # Dovecot 2.x's own log_path file: "pop3-login: Info: Login: user=<alice>, ...".
    "dovecot-log": _p(
        "dovecot-log",
        rb"(?:pop3|imap)-login",
        rb"Info: " + _DOVECOT_FIELDS,
        (b"rip=", b"user=<"),
    ),
    # Courier: "pop3d: LOGIN, user=alice, ip=[::ffff:192.0.2.1], port=[4321]" (also imapd,
    # pop3d-ssl, imapd-ssl, courierpop3login ...).
    "courier": _p(
        "courier",
        rb"(?:courier)?(?:pop3|imap)(?:login|d|d-ssl)",
        rb"LOGIN, user=(?P<user>[^,\s]{1,255}), ip=\[" + _IP + rb"\](?:, [^\x00-\x1f]*)?",
        (b"ip=[",),
    ),
    # UW imapd/ipop3d: "Login user=alice host=name [192.0.2.1]" (+ " nmsgs=0/0" for ipop3d),
    # "Authenticated user=..", "Auth user=..", "APOP user=..".
    "uw": _p(
        "uw",
        rb"(?:ipop3s?d|imaps?d)",
        rb"(?:Login|Authenticated|Auth|APOP|Preauthenticated) user=(?P<user>[^\s\[\]]{1,255}) "
        rb"host=(?:" + _HOST + rb" )?\[" + _IP + rb"\]"
        rb"(?: (?:nmsgs=[0-9]{1,10}/[0-9]{1,10}|mech=[A-Za-z0-9_-]{1,32}))*",
        (b"host=",),
    ),
    # Qpopper: "(v4.0.9) POP login by user "alice" at (host.example.org) 192.0.2.1".
    "qpopper": _p(
        "qpopper",
        rb"(?:in\.)?q?popper",
        rb"\(v[^()\s]{1,32}\) POP login by user \"(?P<user>[^\"\s]{1,255})\" at \((?:"
        + _HOST + rb")?\) " + _IP + rb"(?: \[[^\]\x00-\x1f]{0,255}\])?",
        (b"POP login by user",),
    ),
    # Cyrus imapd/pop3d: "login: host.example.org [192.0.2.1] alice plaintext User logged in
    # SESSIONID=<...>".
    "cyrus": _p(
        "cyrus",
        rb"(?:cyrus/)?(?:imap|pop3)(?:d|s)?",
        rb"login: (?:" + _HOST + rb" )?\[" + _IP + rb"\] (?P<user>[^\s\[\]]{1,255}) "
        rb"[^\s\[\]]{1,64} User logged in(?: [^\x00-\x1f]*)?",
        (b"User logged in",),
    ),
}


def compile_custom(spec: str) -> Pattern:
    """``NAME=REGEX`` -> a custom pattern, full-matched against ``TAG[PID]: MESSAGE``."""
    name, eq, regex = spec.partition("=")
    name = name.strip()
    if not eq or not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name):
        raise ConfigError("custom pattern must be NAME=REGEX", source="logwatch.patterns",
                          value=spec)
    try:
        compiled = re.compile(regex.encode("utf-8"))
    except re.error as exc:
        raise ConfigError(f"custom pattern {name}: bad regex ({exc})",
                          source="logwatch.patterns", value=regex) from None
    if "ip" not in compiled.groupindex:
        raise ConfigError(f"custom pattern {name}: needs a named group (?P<ip>...)",
                          source="logwatch.patterns", value=regex)
    return Pattern(name, re.compile(rb".*"), compiled, tagged=True)


class LoginMatcher:
    """Finds successful logins in log records with the chosen patterns."""

    def __init__(self, builtins: Iterable[str] = tuple(BUILTIN),
                 custom: Iterable[str] = ()) -> None:
        patterns: list[Pattern] = []
        for name in builtins:
            if name not in BUILTIN:
                raise ConfigError(f"unknown built-in pattern {name!r} (known: "
                                  f"{', '.join(BUILTIN)})", source="logwatch.builtins")
            patterns.append(BUILTIN[name])
        patterns.extend(compile_custom(spec) for spec in custom)
        self.patterns = tuple(patterns)

    def match_record(self, record: LogRecord) -> LoginEvent | None:
        for pattern in self.patterns:
            m = pattern.match(record)
            if m is None:
                continue
            event = _event(pattern.name, record, m)
            if event is not None:
                return event
        return None

    def match_line(self, line: bytes, fmt: str = "auto") -> LoginEvent | None:
        """Match one text line (``fmt``: auto, syslog or dovecot-log)."""
        for record in records_of_line(line, fmt):
            event = self.match_record(record)
            if event is not None:
                return event
        return None


def records_of_line(line: bytes, fmt: str = "auto") -> Iterator[LogRecord]:
    """The records a text line can be read as (auto: syslog, then Dovecot's log file)."""
    if len(line) > MAX_LINE_LENGTH:
        return
    if line.endswith(b"\r"):
        line = line[:-1]
    if fmt in ("auto", "syslog"):
        rec = parse_syslog(line)
        if rec is not None:
            yield rec
            return
    if fmt in ("auto", "dovecot-log"):
        rec = parse_dovecot_log(line)
        if rec is not None:
            yield rec


def _event(name: str, record: LogRecord, m: re.Match[bytes]) -> LoginEvent | None:
    groups = m.groupdict()
    raw_ip = groups.get("ip")
    if not raw_ip:
        return None
    try:
        ip = parse_ip(raw_ip)
    except InvalidAddress:
        return None
    raw_user = groups.get("user")
    user = raw_user.decode("utf-8", "replace") if raw_user else None
    domain = None
    if user and "@" in user:
        domain = user.rpartition("@")[2].lower() or None
    service = (groups.get("service") or record.tag).decode("ascii", "replace")
    if "pop" in service:
        service = "pop3"
    elif "imap" in service:
        service = "imap"
    return LoginEvent(ip, user, domain, service, name)


# -- line and journald framing -------------------------------------------------


class LineSplitter:
    """Splits a byte stream into lines; over-long lines are dropped whole."""

    def __init__(self, max_line: int = MAX_LINE_LENGTH) -> None:
        self._buf = bytearray()
        self._max = max_line
        self._discarding = False
        #: lines dropped for being too long
        self.dropped = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines: list[bytes] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self._max:
                    if not self._discarding:
                        self.dropped += 1
                    self._discarding = True
                    self._buf.clear()
                return lines
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if self._discarding:
                self._discarding = False
                continue
            if len(line) > self._max:
                self.dropped += 1
                continue
            lines.append(line)

    def reset(self) -> None:
        """Forget a partial line (the file was rotated or truncated)."""
        self._buf.clear()
        self._discarding = False


_JOURNAL_NAME = re.compile(rb"[A-Z0-9_]{1,64}")


class JournalExportReader:
    """Splits journald's export format into entries (dicts of field name -> value).

    Text fields are ``NAME=value\\n``; binary-safe ones are ``NAME\\n``, a 64-bit
    little-endian length, the data and ``\\n``; an empty line ends an entry.
    A malformed entry is skipped up to the next empty line and counted in
    ``malformed``.
    """

    def __init__(self, *, max_field: int = MAX_JOURNAL_FIELD,
                 max_fields: int = MAX_JOURNAL_FIELDS) -> None:
        self._buf = bytearray()
        self._entry: dict[bytes, bytes] = {}
        self._skipping = False
        self._max_field = max_field
        self._max_fields = max_fields
        self.malformed = 0

    def reset(self) -> None:
        self._buf.clear()
        self._entry = {}
        self._skipping = False

    def feed(self, data: bytes) -> list[dict[bytes, bytes]]:
        self._buf += data
        out: list[dict[bytes, bytes]] = []
        while True:
            got = self._step()
            if got is None:
                break
            if got:
                out.append(got)
        if len(self._buf) > self._max_field + 80:
            # No field may be this long: drop it and resynchronise at the next entry.
            self._bad()
            self._buf.clear()
        return out

    def _bad(self) -> None:
        if not self._skipping:
            self.malformed += 1
        self._skipping = True
        self._entry = {}

    def _step(self) -> dict[bytes, bytes] | None:
        """One field or entry end; None = need more data; {} = consumed without an entry."""
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            return None
        if nl == 0:
            del buf[:1]
            entry, self._entry = self._entry, {}
            skipped, self._skipping = self._skipping, False
            return {} if skipped or not entry else entry
        if self._skipping:
            del buf[: nl + 1]
            return {}
        line = bytes(buf[:nl])
        name, eq, value = line.partition(b"=")
        if _JOURNAL_NAME.fullmatch(name) is None or len(line) > self._max_field:
            del buf[: nl + 1]
            self._bad()
            return {}
        if eq:
            del buf[: nl + 1]
            return self._add(name, value)
        # binary field: NAME\n <u64 le size> <data> \n
        if len(buf) < nl + 1 + 8:
            return None
        size = int.from_bytes(buf[nl + 1 : nl + 9], "little")
        if size > self._max_field:
            del buf[: nl + 1]
            self._bad()
            return {}
        end = nl + 9 + size
        if len(buf) < end + 1:
            return None
        if buf[end] != 0x0A:
            del buf[: nl + 1]
            self._bad()
            return {}
        data = bytes(buf[nl + 9 : end])
        del buf[: end + 1]
        return self._add(name, data)

    def _add(self, name: bytes, value: bytes) -> dict[bytes, bytes]:
        if len(self._entry) >= self._max_fields:
            self._bad()
            return {}
        self._entry[name] = value
        return {}


def looks_like_journal_export(head: bytes) -> bool:
    """True when a stream starts like journald export (``__CURSOR=`` or ``NAME=`` fields)."""
    first = head.split(b"\n", 1)[0]
    name = first.partition(b"=")[0]
    return bool(first) and _JOURNAL_NAME.fullmatch(name) is not None and name.isupper()
