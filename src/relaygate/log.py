"""Event logging: one line per event, for syslog/journald/multilog or as JSON.

``event("window.opened", ip=..., user=...)`` writes, in text form::

    relaygate: window.opened ip=127.0.0.2 user=alice source=pop3

and with ``--log-format json`` one JSON object per line. Values are quoted
when they contain spaces or quotes, and control characters are escaped, so a
client cannot forge a log line (e.g. through a MAIL FROM address).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

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


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    """Route every relaygate logger to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("relaygate")
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False
    # aiosmtpd's own logger warns about what clients send ("unrecognised: <their
    # bytes>", raw, to stderr); relaygate logs what matters about clients itself.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


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
