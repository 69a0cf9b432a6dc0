"""Follow log files (or stdin) and open relay windows for the logins they show.

Theory of operation
-------------------
For POP3/IMAP servers that cannot run a hook, ``relaygate watch-log`` reads
their log as ``tail -F`` does and hands each line (or journald export entry)
to :class:`relaygate.protocols.loglines.LoginMatcher`, whose anchored patterns
decide whether it is a real login line (see that module for the
anti-forgery rules). Each match opens a window (source ``log``).

Following a file (:class:`FileFollower`), polled every ``interval`` seconds:

- start at the end of the file (old logins are history; ``--from-start``
  reads it all), remember its device and inode; when the end is in the middle
  of a line (the daemon is writing it), skip to the next newline: the rest of
  a line is not a line, and a client's text inside it could look like one;
- read what was appended; a partial last line waits for its newline;
- when the file shrinks below our position it was truncated in place
  (logrotate's ``copytruncate``): start again from offset 0;
- when the path names another inode it was rotated by rename: read the old
  file to its end, then open the new one from its start (lines written to the
  old file after that are not seen, as with ``tail -F``);
- a missing path is retried on every poll.

Standard input (``-``) is read as it comes, e.g. from
``journalctl -o export -f _SYSTEMD_UNIT=dovecot.service | relaygate watch-log -``;
its end ends the watcher with exit 111 so a supervisor restarts the pipe.

The format is per source: ``syslog``, ``dovecot-log``, ``qpopper-log``,
``apple-log``, ``journal-export``, or ``auto`` (journald export when the
stream starts like one, else each line is read with the first header shape
that fits it). A store failure is logged and the watcher goes on: a missing
window only means the user cannot relay yet.

Every source's events go, in order, through one
:class:`relaygate.protocols.logsessions.LoginTracker` (two-line logins,
sessions kept open until their logout), driven by an injectable monotonic
clock; between polls the watcher asks it which windows of open sessions need
a refresh.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from relaygate.control import WindowRefused
from relaygate.errors import ConfigError, StoreError
from relaygate.log import event
from relaygate.protocols.loglines import (
    FORMATS,
    JournalExportReader,
    LineSplitter,
    LogEvent,
    LoginEvent,
    LoginMatcher,
    looks_like_journal_export,
    record_from_journal,
)
from relaygate.protocols.logsessions import MAX_SESSION, LoginTracker

if TYPE_CHECKING:
    from relaygate.control import RelayControl

log = logging.getLogger("relaygate.logwatch")

#: Bytes read from one source per poll: bounds the time spent on one file when
#: another (or stdin) also has data, without slowing a busy log much.
READ_CHUNK = 256 * 1024

EXIT_TEMPFAIL = 111


class _Decoder:
    """Bytes of one source -> log events (logins, connects, ...), in the source's format."""

    def __init__(self, matcher: LoginMatcher, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown log format {fmt!r} (one of {', '.join(FORMATS)})")
        self.matcher = matcher
        self.fmt = fmt
        self.mode: str | None = None if fmt == "auto" else fmt
        self.lines = LineSplitter()
        self.journal = JournalExportReader()
        self._head = b""
        #: drop everything up to the next newline (we started inside a line)
        self._skip_partial = False

    def reset(self) -> None:
        self.lines.reset()
        self.journal.reset()
        self._head = b""
        self._skip_partial = False
        if self.fmt == "auto":
            self.mode = None

    def skip_partial_line(self) -> None:
        """The next bytes are the end of a line: ignore them up to its newline."""
        self._skip_partial = True

    def feed(self, data: bytes) -> list[LogEvent]:
        if self._skip_partial:
            nl = data.find(b"\n")
            if nl < 0:
                return []
            self._skip_partial = False
            data = data[nl + 1:]
            if not data:
                return []
        if self.mode is None:
            # Decide on the first complete line (or enough bytes to see one).
            self._head += data
            if b"\n" not in self._head and len(self._head) < 256:
                return []
            data, self._head = self._head, b""
            self.mode = "journal-export" if looks_like_journal_export(data) else "auto-text"
        out: list[LogEvent] = []
        classify = self.matcher.classify
        if self.mode == "journal-export":
            for entry in self.journal.feed(data):
                record = record_from_journal(entry)
                if record is not None:
                    ev = classify(record)
                    if ev is not None:
                        out.append(ev)
            return out
        text_fmt = "auto" if self.mode == "auto-text" else self.mode
        classify_line = self.matcher.classify_line
        for line in self.lines.feed(data):
            ev = classify_line(line, text_fmt)
            if ev is not None:
                out.append(ev)
        return out


class FileFollower:
    """One followed path (see the module docstring for rotation and truncation)."""

    def __init__(self, path: str | Path, decoder: _Decoder, *, from_start: bool = False) -> None:
        self.path = str(path)
        self.decoder = decoder
        self.fd: int | None = None
        self.pos = 0
        self.ident: tuple[int, int] | None = None
        self._open(from_start=from_start, initial=True)

    def _open(self, *, from_start: bool, initial: bool = False) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            if initial:
                log.warning("%s does not exist yet; waiting for it", self.path)
            return False
        except OSError as exc:
            log.warning("cannot open %s: %s", self.path, exc.strerror)
            return False
        st = os.fstat(fd)
        self.fd = fd
        self.ident = (st.st_dev, st.st_ino)
        self.pos = os.lseek(fd, 0, os.SEEK_SET if from_start else os.SEEK_END)
        self.decoder.reset()
        if self.pos > 0 and os.pread(fd, 1, self.pos - 1) != b"\n":
            self.decoder.skip_partial_line()
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def poll(self) -> list[LogEvent]:
        if self.fd is None:
            # Appeared after start-up or after a rotation left nothing behind: read it all.
            if not self._open(from_start=True):
                return []
        events = self._drain()
        assert self.fd is not None
        st = os.fstat(self.fd)
        if st.st_size < self.pos:
            log.info("%s was truncated; reading it from the start", self.path)
            os.lseek(self.fd, 0, os.SEEK_SET)
            self.pos = 0
            self.decoder.reset()
            return events + self._drain()
        try:
            pst = os.stat(self.path)
        except FileNotFoundError:
            return events  # rotated away; the new file is not there yet
        except OSError:
            return events
        if (pst.st_dev, pst.st_ino) != self.ident:
            log.info("%s was rotated; following the new file", self.path)
            events += self._drain()
            self.close()
            if self._open(from_start=True):
                events += self._drain()
        return events

    def _drain(self) -> list[LogEvent]:
        events: list[LogEvent] = []
        if self.fd is None:
            return events
        budget = READ_CHUNK
        while budget > 0:
            try:
                data = os.read(self.fd, min(65536, budget))
            except BlockingIOError:
                break
            if not data:
                break
            self.pos += len(data)
            budget -= len(data)
            events += self.decoder.feed(data)
        return events


Handler = Callable[[LoginEvent], None]


def window_opener(control: RelayControl, *, source: str = "log",
                  clock: Callable[[], float] | None = None) -> Handler:
    """A handler that opens the window for each login (a store failure is logged).

    ``clock``: wall-clock seconds for the grants (default the store's own time).
    """

    def handle(ev: LoginEvent) -> None:
        try:
            grant = control.open_window(ev.ip, user=ev.user, domain=ev.domain, source=source,
                                        now=clock() if clock is not None else None)
        except StoreError as exc:
            log.warning("no relay window for %s (%s login of %s): store unreachable: %s",
                        ev.ip, ev.service, ev.user, exc)
            return
        except WindowRefused:
            # a trusted proxy's address: the server behind it does not read PROXY headers
            log.warning("no relay window for %s (%s login of %s): it is a trusted proxy; "
                        "the server behind it must read PROXY headers", ev.ip, ev.service,
                        ev.user)
            return
        event("window.refreshed" if ev.refresh else "window.opened", ip=grant.ip,
              user=ev.user, source=source, service=ev.service, pattern=ev.pattern,
              expires_in=int(grant.expires_at - grant.opened_at))

    return handle


class LogWatcher:
    """Polls files and reads stdin until :meth:`stop` or the end of stdin.

    ``refresh_every``: how often the window of an address with an open session
    is refreshed (keep it below the expiry: the command uses half of it);
    ``max_session``: how long a session never logged out keeps counting (0:
    sessions off, a login's window simply expires); ``clock``: monotonic
    seconds (tests pass a fake one).
    """

    def __init__(self, paths: Sequence[str], matcher: LoginMatcher, handler: Handler, *,
                 fmt: str = "auto", interval: float = 0.25, from_start: bool = False,
                 stdin_fd: int = 0, refresh_every: float = 450.0,
                 max_session: float = MAX_SESSION,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.handler = handler
        self.interval = interval
        self.clock = clock
        self.tracker = LoginTracker(refresh_every=refresh_every, max_session=max_session)
        self.followers = [FileFollower(p, _Decoder(matcher, fmt), from_start=from_start)
                          for p in paths if p != "-"]
        self.stdin: _Decoder | None = _Decoder(matcher, fmt) if "-" in paths else None
        self.stdin_fd = stdin_fd
        self._stop = threading.Event()
        #: set once every file is open (or waited for): tests and tools wait on it
        self.ready = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Watch until stopped (exit 0) or stdin ends (exit 111)."""
        self.ready.set()
        try:
            while not self._stop.is_set():
                self.poll_once()
                if self.stdin is not None:
                    if not self._read_stdin():
                        log.warning("standard input ended; stopping")
                        return EXIT_TEMPFAIL
                else:
                    self._stop.wait(self.interval)
            return 0
        finally:
            for follower in self.followers:
                follower.close()

    def poll_once(self) -> None:
        """Read what the files hold now, then refresh the windows of open sessions."""
        for follower in self.followers:
            self._dispatch(follower.poll())
        self.refresh()

    def refresh(self) -> None:
        """Refresh the windows of addresses whose sessions are still open."""
        self._handle(self.tracker.due(self.clock()))

    def run_once(self) -> int:
        """Read what the files hold now and stdin to its end, then return 0."""
        self.ready.set()
        try:
            for follower in self.followers:
                # one poll reads at most READ_CHUNK: poll until the end of the file
                while True:
                    before = (follower.fd, follower.pos)
                    self._dispatch(follower.poll())
                    if (follower.fd, follower.pos) == before:
                        break
            if self.stdin is not None:
                while data := os.read(self.stdin_fd, 65536):
                    self._dispatch(self.stdin.feed(data))
            return 0
        finally:
            for follower in self.followers:
                follower.close()

    def _read_stdin(self) -> bool:
        assert self.stdin is not None
        ready, _, _ = select.select([self.stdin_fd], [], [], self.interval)
        if not ready:
            return True
        data = os.read(self.stdin_fd, 65536)
        if not data:
            return False
        self._dispatch(self.stdin.feed(data))
        return True

    def _dispatch(self, events: list[LogEvent]) -> None:
        if not events:
            return
        now = self.clock()
        feed = self.tracker.feed
        self._handle([ev for ev in (feed(e, now) for e in events) if ev is not None])

    def _handle(self, logins: list[LoginEvent]) -> None:
        for ev in logins:
            try:
                self.handler(ev)
            except Exception:
                log.exception("handling login of %s from %s failed", ev.user, ev.ip)


# -- the pattern tester ------------------------------------------------------------------


@dataclass
class TesterSummary:
    """Counts of a ``--test`` run."""

    lines: int = 0
    windows: int = 0
    near_misses: int = 0


def run_tester(lines: Sequence[bytes] | Callable[[], bytes], matcher: LoginMatcher,
               out: TextIO, *, fmt: str = "auto") -> TesterSummary:
    """Explain each line (see :func:`relaygate.protocols.logtester.explain`) on ``out``."""
    from relaygate.protocols.logtester import explain

    tracker = LoginTracker(refresh_every=float("inf"), max_session=0)
    summary = TesterSummary()
    splitter = LineSplitter()
    text_fmt = "auto" if fmt == "journal-export" else fmt

    def chunks() -> Iterator[bytes]:
        if callable(lines):
            last = b"\n"
            while data := lines():
                last = data
                yield data
            if not last.endswith(b"\n"):
                yield b"\n"  # the last line has no newline: it is a line all the same
        else:
            for line in lines:
                yield line + b"\n"

    for data in chunks():
        for line in splitter.feed(data):
            summary.lines += 1
            report = explain(matcher, line, tracker, now=float(summary.lines), fmt=text_fmt)
            if report.window is not None:
                summary.windows += 1
            if report.near_misses:
                summary.near_misses += 1
            out.write(report.render(summary.lines))
    if splitter.dropped:
        out.write(f"({splitter.dropped} line(s) longer than the limit were dropped)\n")
    out.write(f"{summary.lines} line(s), {summary.windows} would open a window, "
              f"{summary.near_misses} near miss(es)\n")
    return summary
