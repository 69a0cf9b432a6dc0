"""Event logging: one line per event, for syslog/journald/multilog or as JSON.

``event("window.opened", ip=..., user=...)`` writes, in text form::

    relaygate: window.opened ip=127.0.0.2 user=alice source=pop3

and with ``--log-format json`` one JSON object per line. Values are quoted
when they contain spaces or quotes, and control characters are escaped, so a
client cannot forge a log line (e.g. through a MAIL FROM address).

Where lines go (:func:`configure_logging`, the one set-up every command uses):
stderr by default (journald, multilog and syslog add the time); with
``--log-file FILE`` to that file, each text line starting with an ISO 8601
time, the file reopened when logrotate moves it (its inode changes) and on
SIGHUP (:func:`reopen_log_files`); with ``--syslog`` to the local syslog
socket, facility mail, as every MTA logs.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relaygate.config import Settings

_LOGGER = logging.getLogger("relaygate.events")


def _quote(value: object) -> str:
    s = "" if value is None else str(value)
    if s and all(c.isprintable() and c not in ' "=\\' for c in s):
        return s
    return json.dumps(s, ensure_ascii=True)


def format_text(kind: str, fields: dict[str, Any]) -> str:
    parts = [kind] + [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


def event(kind: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event. Fields with value None are left out."""
    if not _LOGGER.isEnabledFor(level):
        return
    _LOGGER.log(level, "%s", format_text(kind, fields),
                extra={"event_kind": kind, "event_fields": fields})


class TextFormatter(logging.Formatter):
    """``relaygate[PID]: LEVEL message`` style lines, no timestamp (syslog adds one)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        msg = msg.replace("\n", "\\n").replace("\r", "\\r")
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"relaygate[{record.process}]: {level}{msg}"
        if record.exc_info:
            text += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return text


class TimestampedFormatter(TextFormatter):
    """Text lines for a log file: an ISO 8601 local time with offset in front
    (``2026-12-02T00:41:07.123+00:00 relaygate[4711]: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{iso_time(record.created)} {super().format(record)}"


def iso_time(t: float) -> str:
    """``2026-12-02T00:41:07.123+00:00``: local time, milliseconds, UTC offset."""
    lt = time.localtime(t)
    off = lt.tm_gmtoff
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", lt) + f".{int(t * 1000) % 1000:03d}"
            f"{sign}{off // 3600:02d}:{off % 3600 // 60:02d}")


class LogFile(logging.handlers.WatchedFileHandler):
    """A log file that follows logrotate: reopened when its inode changes (checked before
    each line, by WatchedFileHandler) and on SIGHUP (:meth:`reopen`)."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.flush()
                self.stream.close()
            self.stream = self._open()
            self._statstream()
        finally:
            self.release()


class SyslogHandler(logging.handlers.SysLogHandler):
    """Syslog, facility mail; a message the socket refuses is dropped, not raised."""

    def __init__(self, address: str) -> None:
        # SysLogHandler defers a failed connect to the first line; say it at start instead
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
        super().__init__(address=address, facility=logging.handlers.SysLogHandler.LOG_MAIL,
                         socktype=socket.SOCK_DGRAM)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        kind = getattr(record, "event_kind", None)
        if kind:
            out["event"] = kind
            out.update({k: v for k, v in getattr(record, "event_fields", {}).items()
                        if v is not None})
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=True)


class LogSetupError(Exception):
    """The log file or the syslog socket cannot be opened (the message says which)."""


def setup_logging(fmt: str = "text", level: str = "info", *, file: str | os.PathLike[str] |
                  None = None, syslog: str | None = None) -> None:
    """Route every relaygate logger to stderr (or ``file``, or the ``syslog`` socket)
    in the chosen format. Raises LogSetupError when the file or socket cannot be opened."""
    handlers: list[logging.Handler] = []
    if file is not None:
        try:
            lf = LogFile(os.fspath(file), encoding="utf-8")
        except OSError as exc:
            raise LogSetupError(f"cannot open the log file {os.fspath(file)}: "
                                f"{exc.strerror or exc}") from None
        lf.setFormatter(JsonFormatter() if fmt == "json" else TimestampedFormatter())
        handlers.append(lf)
    if syslog is not None:
        try:
            sh = SyslogHandler(syslog)
        except OSError as exc:
            raise LogSetupError(f"cannot reach syslog at {syslog}: "
                                f"{exc.strerror or exc}") from None
        # syslog adds the time and host; the tag is relaygate[PID]
        sh.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
        handlers.append(sh)
    if not handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
        handlers.append(handler)
    root = logging.getLogger("relaygate")
    for old in root.handlers:
        if isinstance(old, (LogFile, SyslogHandler)):
            old.close()
    root.handlers[:] = handlers
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False
    # aiosmtpd's own logger warns about what clients send ("unrecognised: <their
    # bytes>", raw, to stderr); relaygate logs what matters about clients itself.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


def configure_logging(settings: Settings) -> None:
    """:func:`setup_logging` from the settings (``log_format``, ``log_level``,
    ``log_file``, ``syslog``); the one call every command makes. A log file or
    syslog socket that cannot be opened is a ConfigError (exit 111)."""
    from relaygate.errors import ConfigError

    try:
        setup_logging(settings.log_format, settings.log_level, file=settings.log_file,
                      syslog=settings.syslog_socket if settings.syslog else None)
    except LogSetupError as exc:
        raise ConfigError(str(exc)) from None


def reopen_log_files() -> bool:
    """SIGHUP: reopen relaygate's log files (after logrotate); True when there is one."""
    found = False
    for handler in logging.getLogger("relaygate").handlers:
        if isinstance(handler, LogFile):
            handler.reopen()
            found = True
    return found


def record_fatal(message: str) -> None:
    """A command is about to exit on ``message`` (already shown on stderr): put it in
    the log file or syslog too, where the admin of a daemon looks first. Nothing when
    logging goes to stderr anyway, or was not set up yet (then the file may not exist)."""
    root = logging.getLogger("relaygate")
    targets = [h for h in root.handlers if isinstance(h, (LogFile, SyslogHandler))]
    if not targets:
        return
    rec = root.makeRecord(root.name, logging.ERROR, __file__, 0, message, (), None)
    for handler in targets:
        handler.handle(rec)


def duration(seconds: float, *, minutes_in_hours: bool = False) -> str:
    """A duration as people read it: ``45s``, ``12m``, ``5h`` (``5h07m`` with
    ``minutes_in_hours``), ``3d``; the one formatter for logs, ``status`` and ``queue``."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m" if minutes_in_hours else f"{s // 3600}h"
    return f"{s // 86400}d"
