"""The pattern tester: why a log line does or does not open a relay window.

Theory of operation
-------------------
``relaygate watch-log --test FILE`` runs each line through the same header
parser, patterns and :class:`~relaygate.protocols.logsessions.LoginTracker`
as the watcher, and says what happened: which pattern matched, the address
and user it took, and whether a window would open. When nothing matched it
looks for *near misses*, so an admin can check a custom ``--pattern`` (or a
server whose log format changed) against a real log before trusting it:

- a pattern whose tag fits but whose message shape does not: where the
  message departs from the shape (the longest prefix that can still start a
  match, found with the ``regex`` module's partial matching);
- a message with a pattern's shape under another daemon's tag (a forged line,
  or a daemon renamed by its packager: use ``--pattern``);
- a key that must appear once appearing twice, an address that is not one,
  a two-line success without a pid;
- a custom pattern that matches only part of ``TAG[PID]: MESSAGE``.

No I/O: :func:`explain` returns a :class:`Report`; the command prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import regex

from relaygate.addresses import parse_ip
from relaygate.errors import InvalidAddress
from relaygate.protocols.loglines import (
    MAX_LINE_LENGTH,
    LogEvent,
    LoginEvent,
    LoginMatcher,
    LogRecord,
    Pattern,
    record_of_line,
)
from relaygate.protocols.logsessions import LoginTracker

#: a near miss is only worth showing when this much of the message fitted the shape
MIN_FIT = 5


@dataclass
class Report:
    """What one line did: the record it was read as, the event, the window, near misses."""

    line: bytes
    record: LogRecord | None = None
    event: LogEvent | None = None
    window: LoginEvent | None = None
    note: str = ""
    near_misses: list[str] = field(default_factory=list)

    def render(self, number: int) -> str:
        out = [f"{number}: {self.note}"]
        out += [f"    near miss: {m}" for m in self.near_misses]
        return "\n".join(out) + "\n"


def _show(data: bytes, limit: int = 60) -> str:
    text = data.decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _who(ev: LogEvent | LoginEvent) -> str:
    return f"ip={ev.ip} user={ev.user or '-'} service={ev.service}"


def _daemon(rec: LogRecord) -> str:
    tag = rec.tag.decode("utf-8", "replace")
    return f"{tag}[{rec.pid.decode()}]" if rec.pid is not None else tag


_PARTIAL: dict[int, regex.Pattern[bytes] | None] = {}


def _partial(pattern: Pattern) -> regex.Pattern[bytes] | None:
    key = id(pattern.message)
    if key not in _PARTIAL:
        try:
            _PARTIAL[key] = regex.compile(pattern.message.pattern)
        except (regex.error, TypeError, ValueError):
            _PARTIAL[key] = None
    return _PARTIAL[key]


def fits_up_to(pattern: Pattern, text: bytes) -> int | None:
    """How many leading bytes of ``text`` can still start a full match (None: unknown)."""
    rx = _partial(pattern)
    if rx is None:
        return None
    lo, hi = 0, len(text)  # the prefix of length lo fits; find the longest
    if rx.fullmatch(text[:hi], partial=True) is not None:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rx.fullmatch(text[:mid], partial=True) is not None:
            lo = mid
        else:
            hi = mid
    return lo


def explain(matcher: LoginMatcher, line: bytes, tracker: LoginTracker, *, now: float,
            fmt: str = "auto") -> Report:
    """Run one line through the watcher's logic and say what happened and why."""
    rep = Report(line)
    if len(line) > MAX_LINE_LENGTH:
        rep.note = f"dropped: longer than {MAX_LINE_LENGTH} bytes (never cut, never matched)"
        return rep
    rec = record_of_line(line, fmt)
    if rec is None:
        rep.note = (f"no log header ({fmt}): not read as a log line "
                    f"(timestamp, [host,] tag[pid]: message)")
        return rep
    rep.record = rec
    ev = matcher.classify(rec)
    if ev is not None:
        rep.event = ev
        rep.window = tracker.feed(ev, now)
        rep.note = _describe(rec, ev, rep.window, tracker)
        return rep
    rep.near_misses = _near_misses(matcher, rec)
    rep.note = f"no match ({_daemon(rec)})"
    return rep


def _describe(rec: LogRecord, ev: LogEvent, window: LoginEvent | None,
              tracker: LoginTracker) -> str:
    head = f"{ev.kind} [{ev.pattern}]"
    if ev.kind == "login":
        assert window is not None
        return f"{head} {_who(ev)} -> window for {window.ip}"
    if ev.kind == "connect":
        return (f"{head} {_daemon(rec)} from {ev.ip}: remembered until a success line of the "
                f"same pid (at most {tracker.pending_ttl:.0f} s)")
    if ev.kind == "auth":
        if window is not None:
            return f"{head} {_daemon(rec)} user={ev.user or '-'} -> window for {window.ip}"
        return (f"{head} {_daemon(rec)} user={ev.user or '-'}: no connect line of this "
                f"daemon and pid before it (or too old): opens nothing")
    return f"{head} {_daemon(rec)} user={ev.user or '-'}: ends a session"


def _unique_problem(pattern: Pattern, rec: LogRecord) -> str | None:
    for key in pattern.unique:
        n = rec.message.count(key)
        if n != 1:
            return (f"{pattern.name}: {key.decode()!r} appears {n} times (must be once: "
                    f"ambiguous lines are ignored)")
    return None


def _event_problem(pattern: Pattern, rec: LogRecord, text: bytes) -> str | None:
    m = pattern.message.fullmatch(text)
    if m is None:
        return None
    groups = m.groupdict()
    raw_ip = groups.get("ip") or groups.get("ip2")
    if raw_ip:
        try:
            parse_ip(raw_ip)
        except InvalidAddress:
            return f"{pattern.name}: {raw_ip.decode('ascii', 'replace')!r} is not an IP address"
    if pattern.kind in ("connect", "auth") and rec.pid is None:
        return f"{pattern.name}: no pid in the tag (a two-line login is tied by the pid)"
    return None


def _near_misses(matcher: LoginMatcher, rec: LogRecord) -> list[str]:
    out: list[str] = []
    closest: tuple[int, Pattern] | None = None
    for pattern in matcher.builtin:
        tag_ok = pattern.tag.fullmatch(rec.tag) is not None
        shape_ok = pattern.message.fullmatch(rec.message) is not None
        if tag_ok and shape_ok:
            problem = _unique_problem(pattern, rec) or _event_problem(pattern, rec, rec.message)
            if problem:
                out.append(problem)
        elif shape_ok:
            if _unique_problem(pattern, rec) is None:
                out.append(f"{pattern.name}: the message has its shape, but the tag "
                           f"{rec.tag.decode('utf-8', 'replace')!r} is not one of its daemons' "
                           f"(/{pattern.tag.pattern.decode()}/): another program's line, or a "
                           f"renamed daemon (then use --pattern)")
        elif tag_ok:
            fit = fits_up_to(pattern, rec.message)
            if fit is not None and fit >= MIN_FIT and (closest is None or fit > closest[0]):
                closest = (fit, pattern)
    if closest is not None and not out:
        fit, pattern = closest
        out.append(f"{pattern.name} ({pattern.kind}): the message departs from its shape at "
                   f"byte {fit}: {_show(rec.message[fit:])}")
    tagged = rec.tagged()
    for pattern in matcher.custom:
        if pattern.message.fullmatch(tagged) is not None:
            problem = _event_problem(pattern, rec, tagged)
            if problem:
                out.append(problem)
            continue
        inner = pattern.message.search(tagged)
        if inner is not None:
            out.append(f"{pattern.name}: matches only bytes {inner.start()}-{inner.end()} of "
                       f"'TAG[PID]: MESSAGE' ({_show(tagged)}); a pattern must match all of it")
            continue
        fit = fits_up_to(pattern, tagged)
        if fit is not None and fit >= MIN_FIT:
            out.append(f"{pattern.name}: 'TAG[PID]: MESSAGE' departs from the pattern at byte "
                       f"{fit}: {_show(tagged[fit:])}")
    return out
