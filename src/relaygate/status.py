"""What ``relaygate status`` shows, and how ``serve`` hands it over.

Theory of operation
-------------------
``relaygate serve`` and ``relaygate status`` are different processes (often
different users: serve runs as ``--user``, the admin runs status as root), so
they meet in the data directory:

- ``serve`` holds ``relaygate.lock`` (``flock``) for its whole life and writes
  its pid into it; a second ``serve`` on the same data directory is refused;
- every :data:`STATUS_INTERVAL` seconds ``serve`` rewrites ``status.json``
  atomically (temporary file, then ``rename``): its services and listeners,
  the store it uses, the last warnings and errors it logged;
- ``status`` reads that file, checks that the pid in it is alive, and reads
  the grant store and the queue directory itself, so windows and queue are
  shown whether or not serve is running.

Nothing here talks to the network or to serve's sockets.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from relaygate.grants import Grant
from relaygate.log import duration
from relaygate.stores import redact_url

#: the status file ``serve`` refreshes in the data directory
STATUS_FILE = "status.json"
#: the lock file ``serve`` holds for its whole life
LOCK_FILE = "relaygate.lock"
#: seconds between refreshes: fresh enough for an admin, cheap for the server
STATUS_INTERVAL = 2.0
#: a status file older than this while its pid lives means serve is stuck
STALE_AFTER = 10 * STATUS_INTERVAL
#: how many recent warnings/errors serve keeps for ``status``
MAX_ERRORS = 20
#: longest log message kept in the status file (a runaway message must not bloat it)
MAX_ERROR_TEXT = 500

class ErrorRing(logging.Handler):
    """Keeps the last :data:`MAX_ERRORS` warnings and errors for the status file."""

    def __init__(self, size: int = MAX_ERRORS) -> None:
        super().__init__(level=logging.WARNING)
        self._items: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self._mutex = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string must not break logging
            msg = str(record.msg)
        item = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": msg[:MAX_ERROR_TEXT],
        }
        with self._mutex:
            self._items.append(item)

    def items(self) -> list[dict[str, Any]]:
        with self._mutex:
            return list(self._items)


def write_status(data_dir: Path, doc: dict[str, Any]) -> None:
    """Replace the status file atomically (readers never see half a file)."""
    path = data_dir / STATUS_FILE
    tmp = data_dir / f".{STATUS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_status(data_dir: Path) -> dict[str, Any] | None:
    """The last status serve wrote, or None when there is none (or it is unreadable)."""
    try:
        doc = json.loads((data_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def lock_holder(data_dir: Path) -> int | None:
    """The pid written into the lock file (whether or not it still runs)."""
    try:
        text = (data_dir / LOCK_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def serve_state(doc: dict[str, Any] | None, now: float) -> str:
    """``running``, ``stale`` (alive but not refreshing), ``stopped`` or ``never``."""
    if doc is None:
        return "never"
    pid = doc.get("pid")
    if doc.get("state") == "stopped" or not isinstance(pid, int) or not pid_alive(pid):
        return "stopped"
    updated = doc.get("updated_at")
    if isinstance(updated, (int, float)) and now - updated > STALE_AFTER:
        return "stale"
    return "running"


def windows_summary(grants: Iterable[Grant], now: float) -> dict[str, Any]:
    """Count, newest window and count by source."""
    count = 0
    newest: Grant | None = None
    by_source: dict[str, int] = {}
    for g in grants:
        count += 1
        by_source[g.source] = by_source.get(g.source, 0) + 1
        if newest is None or g.opened_at > newest.opened_at:
            newest = g
    out: dict[str, Any] = {"count": count, "by_source": dict(sorted(by_source.items()))}
    if newest is not None:
        out["newest"] = {
            "ip": newest.ip, "user": newest.user, "source": newest.source,
            "opened_at": newest.opened_at, "expires_in": max(0, round(newest.expires_at - now)),
        }
    return out


def queue_summary(queue: Any, queue_dir: Path, now: float) -> dict[str, Any]:
    """Queued and deferred counts and the oldest message's age.

    Uses ``queue.stats()`` when the queue offers it; otherwise counts the files
    of the queue directory (every message's envelope file, any layout).
    """
    stats = getattr(queue, "stats", None) if queue is not None else None
    if callable(stats):
        raw = stats()
        data = raw if isinstance(raw, dict) else getattr(raw, "__dict__", {})
        out: dict[str, Any] = {}
        for key in ("queued", "deferred", "oldest", "total", "quarantined", "held"):
            if key in data and data[key] is not None:
                out[key] = data[key]
        out.setdefault("queued", data.get("total", 0))
        out.setdefault("deferred", 0)
        return _oldest_age(out, now)
    return _count_queue_dir(queue_dir, now)


def _oldest_age(out: dict[str, Any], now: float) -> dict[str, Any]:
    oldest = out.pop("oldest", None)
    if isinstance(oldest, (int, float)) and oldest > 0:
        out["oldest_age"] = max(0, round(now - oldest))
    return out


def _count_queue_dir(queue_dir: Path, now: float) -> dict[str, Any]:
    if not queue_dir.is_dir():
        return {"queued": 0, "deferred": 0}
    queued = 0
    oldest: float | None = None
    for root, _dirs, files in os.walk(queue_dir):
        if os.path.basename(root).startswith(("tmp", ".")):
            continue
        for name in files:
            if name.startswith("."):
                continue
            queued += 1
            with contextlib.suppress(OSError):
                m = os.stat(os.path.join(root, name)).st_mtime
                oldest = m if oldest is None else min(oldest, m)
    out: dict[str, Any] = {"queued": queued, "deferred": 0, "approximate": True}
    if oldest is not None:
        out["oldest"] = oldest
    return _oldest_age(out, now)


def _ago(seconds: float) -> str:
    return duration(seconds, minutes_in_hours=True)


def render_text(report: dict[str, Any], now: float) -> str:
    """The human form of a report built by ``relaygate status``."""
    lines: list[str] = []
    serve = report.get("serve") or {}
    state = serve.get("state", "never")
    if state == "running" or state == "stale":
        started = serve.get("started_at")
        up = f", up {_ago(now - started)}" if isinstance(started, (int, float)) else ""
        note = " (not refreshing its status: stuck?)" if state == "stale" else ""
        lines.append(f"serve: running, pid {serve.get('pid')}{up}{note}")
    elif state == "stopped":
        lines.append("serve: not running"
                     + (f" (last seen {_ago(now - serve['updated_at'])} ago)"
                        if isinstance(serve.get("updated_at"), (int, float)) else ""))
    else:
        lines.append("serve: not running (never started on this data directory)")
    lines.append(f"data directory: {report.get('data_dir')}")
    if state in ("running", "stale"):
        for svc in serve.get("services", []):
            addrs = ", ".join(svc.get("listeners") or []) or "(no listeners)"
            lines.append(f"  {svc.get('name', '?'):<12} {addrs}")
    store = report.get("store", {})
    note = ""
    if store.get("error"):
        note = f" (unreachable: {store['error']})"
    elif state == "running" and serve.get("store_ok") is False:
        note = " (serve's last access failed: relaying by window fails closed)"
    lines.append(f"store: {store.get('url')}{note}")
    win = report.get("windows")
    if isinstance(win, dict):
        text = f"windows: {win.get('count', 0)} open"
        newest = win.get("newest")
        if newest:
            who = newest.get("user") or "unknown user"
            text += (f", newest {newest['ip']} ({who} via {newest['source']},"
                     f" opened {_ago(now - newest['opened_at'])} ago,"
                     f" expires in {_ago(newest['expires_in'])})")
        if win.get("by_source"):
            text += "; by source: " + ", ".join(f"{k} {v}" for k, v in win["by_source"].items())
        lines.append(text)
    else:
        err = str(store.get("error") or "")
        why = err if err.startswith(("memory store", "no grant store")) else "store unreachable"
        lines.append(f"windows: unknown ({why})")
    q = report.get("queue") or {}
    qtext = f"queue: {q.get('queued', 0)} queued, {q.get('deferred', 0)} deferred"
    if "oldest_age" in q:
        qtext += f", oldest {_ago(q['oldest_age'])} old"
    if q.get("held"):
        qtext += f", {q['held']} on hold"
    if q.get("quarantined"):
        qtext += f", {q['quarantined']} quarantined (relaygate queue list --quarantine)"
    if q.get("error"):
        qtext = f"queue: unreadable ({q['error']})"
    lines.append(qtext)
    errors = serve.get("errors") or []
    if errors:
        lines.append("last errors:")
        for e in errors[-10:]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("ts", 0)))
            lines.append(f"  {when} {e.get('level')}: {e.get('msg')}")
    else:
        lines.append("last errors: none")
    return "\n".join(lines)


def build_report(
    *,
    data_dir: Path,
    store_url: str,
    list_grants: Callable[[], list[Grant]] | None,
    queue: Any,
    now: float,
) -> dict[str, Any]:
    """Everything ``relaygate status`` shows, as one JSON-able dict.

    ``list_grants`` raises StoreError when the store is unreachable; that is
    shown, not raised.
    """
    from relaygate.errors import RelaygateError

    doc = read_status(data_dir)
    state = serve_state(doc, now)
    serve: dict[str, Any] = {"state": state}
    if doc is not None:
        for key in ("pid", "started_at", "updated_at", "services", "errors", "version",
                    "metrics", "store_ok"):
            if key in doc:
                serve[key] = doc[key]
    report: dict[str, Any] = {"serve": serve, "data_dir": str(data_dir.absolute())}
    store: dict[str, Any] = {"url": redact_url(store_url)}
    report["store"] = store
    if store_url.startswith("memory:"):
        store["error"] = "memory store: windows live only inside the serve process"
        report["windows"] = None
    elif list_grants is not None:
        try:
            report["windows"] = windows_summary(list_grants(), now)
        except RelaygateError as exc:
            store["error"] = str(exc)
            report["windows"] = None
    try:
        report["queue"] = queue_summary(queue, data_dir / "queue", now)
    except (OSError, RelaygateError, ValueError) as exc:
        report["queue"] = {"error": str(exc)}
    return report
