"""The status page: one small HTML page at ``/`` of the metrics listener.

Theory of operation
-------------------
An admin opens ``http://127.0.0.1:PORT/`` (the ``--metrics`` listener) and sees
what ``relaygate status`` prints and a little more: the open relay windows
(address, user, source, time left), relay decisions per minute by verdict for
the last hour, the queue counts and the recent warnings and errors.

- **dependency-free and without JavaScript**: plain HTML with a small inline
  style sheet; it refreshes itself with ``<meta http-equiv="refresh">``;
- **read-only**: only ``GET``/``HEAD``; nothing on the page changes anything;
- **escaped**: every value comes from clients (user names, HELO, log text) or
  the store, so each goes through :func:`html.escape`; the response forbids
  scripts, frames and outside resources (``Content-Security-Policy``);
- **loopback by default**: the page shows addresses and user names, so it is
  served only when the metrics listener is on a loopback address or a UNIX
  socket (``metrics.status_page = "always"`` serves it on any address,
  ``"off"`` never; elsewhere ``/`` answers the metrics as before).

:class:`DecisionRate` turns the ``relaygate_relay_decisions`` counter into
per-minute counts: it samples the counter's totals once a minute and keeps an
hour of differences. :func:`render` is pure (data in, HTML out) so tests feed
it hostile values without a server.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from relaygate.log import duration

#: seconds between automatic reloads of the page
REFRESH_SECONDS = 10
#: minutes of decision history kept and shown
HISTORY_MINUTES = 60
#: most windows listed (the rest is counted): the page must stay small
MAX_WINDOWS = 200
#: verdicts in the order the page shows them
VERDICTS = ("allow", "deny", "tempfail")

#: headers of every page response: no scripts, no frames, nothing fetched from elsewhere
SECURITY_HEADERS = (
    ("Content-Security-Policy",
     "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
     "form-action 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


@dataclass
class DecisionRate:
    """Decisions per minute by verdict, from a counter's running totals."""

    minutes: int = HISTORY_MINUTES
    #: (minute start, totals by verdict) samples, oldest first
    samples: collections.deque[tuple[float, dict[str, float]]] = field(
        default_factory=collections.deque)

    def sample(self, totals: Mapping[str, float], now: float) -> None:
        """Record the counter's totals; at most one sample per minute is kept."""
        minute = now - now % 60
        if not self.samples:
            # the counter started at zero with this process: the baseline of this minute
            self.samples.append((minute - 60, {}))
        if self.samples[-1][0] == minute:
            self.samples[-1] = (minute, dict(totals))
            return
        self.samples.append((minute, dict(totals)))
        while len(self.samples) > self.minutes + 1:
            self.samples.popleft()

    def per_minute(self) -> list[tuple[float, dict[str, int]]]:
        """(minute start, decisions in that minute by verdict), newest first."""
        out: list[tuple[float, dict[str, int]]] = []
        items = list(self.samples)
        for (_, before), (minute, after) in itertools.pairwise(items):
            out.append((minute, {v: max(0, int(after.get(v, 0) - before.get(v, 0)))
                                 for v in VERDICTS}))
        out.reverse()
        return out


def counter_totals(counter: Any) -> dict[str, float]:
    """Totals by ``verdict`` label of a prometheus_client Counter."""
    totals: dict[str, float] = {}
    for metric in counter.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                v = s.labels.get("verdict", "")
                totals[v] = totals.get(v, 0.0) + s.value
    return totals


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _when(t: float) -> str:
    return time.strftime("%H:%M", time.localtime(t))


def render(*, now: float, host: str, windows: Sequence[Any] | None, windows_error: str | None,
           rate: Iterable[tuple[float, Mapping[str, int]]], queue: Mapping[str, Any],
           errors: Sequence[Mapping[str, Any]], processes: Sequence[Mapping[str, Any]] = (),
           refresh: int = REFRESH_SECONDS) -> str:
    """The whole page as text (every value escaped)."""
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{int(refresh)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>relaygate status: {_e(host)}</title>",
        "<style>",
        "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}",
        "h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ccc}",
        "table{border-collapse:collapse}td,th{padding:.2em .8em;text-align:left;"
        "border-bottom:1px solid #eee}th{background:#f4f4f4}",
        "td.n{text-align:right;font-variant-numeric:tabular-nums}",
        ".bar{display:inline-block;height:.8em;background:#4a8}",
        ".deny{background:#c84}.tempfail{background:#c44}",
        ".muted{color:#777}.err{color:#a00}td.t{white-space:nowrap}td.m{overflow-wrap:anywhere}",
        "</style></head><body>",
        f"<h1>relaygate on {_e(host)}</h1>",
        f'<p class="muted">as of {_e(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)))}'
        f"; this page reloads every {int(refresh)} s</p>",
    ]
    if processes:
        out.append("<h2>Processes</h2><table><tr><th>command</th><th>pid</th>"
                   "<th>listeners</th><th>up</th></tr>")
        for p in processes:
            listeners = ", ".join(a for s in p.get("services") or []
                                  for a in s.get("listeners") or [])
            started = p.get("started_at")
            up = duration(now - started, minutes_in_hours=True) if isinstance(
                started, (int, float)) else "?"
            state = "" if p.get("state") == "running" else " (gone: stale record)"
            out.append(f"<tr><td>{_e(p.get('command'))}{_e(state)}</td>"
                       f'<td class="n">{_e(p.get("pid"))}</td><td>{_e(listeners)}</td>'
                       f"<td>{_e(up)}</td></tr>")
        out.append("</table>")
    out.append("<h2>Open relay windows</h2>")
    if windows is None:
        out.append(f'<p class="err">unknown: {_e(windows_error or "store unreachable")}</p>')
    elif not windows:
        out.append("<p>none open</p>")
    else:
        out.append(f"<p>{len(windows)} open</p><table><tr><th>address</th><th>user</th>"
                   "<th>source</th><th>opened</th><th>time left</th></tr>")
        shown = sorted(windows, key=lambda g: -g.opened_at)[:MAX_WINDOWS]
        for g in shown:
            left = duration(max(0.0, g.expires_at - now), minutes_in_hours=True)
            out.append(f"<tr><td>{_e(g.ip)}</td><td>{_e(g.user or '-')}</td>"
                       f"<td>{_e(g.source)}</td><td>{_e(_when(g.opened_at))}</td>"
                       f'<td class="n">{_e(left)}</td></tr>')
        out.append("</table>")
        if len(windows) > len(shown):
            out.append(f'<p class="muted">and {len(windows) - len(shown)} more</p>')
    out.append("<h2>Relay decisions per minute (last hour)</h2>")
    rows = [(m, c) for m, c in rate if any(c.values())]
    if not rows:
        out.append("<p>none in the last hour</p>")
    else:
        peak = max(max(c.values()) for _, c in rows) or 1
        out.append("<table><tr><th>minute</th>"
                   + "".join(f"<th>{v}</th>" for v in VERDICTS) + "<th></th></tr>")
        for minute, counts in rows:
            cells = "".join(f'<td class="n">{int(counts.get(v, 0))}</td>' for v in VERDICTS)
            bars = "".join(
                f'<span class="bar {v}" style="width:{max(1, round(120 * counts[v] / peak))}px">'
                "</span>" for v in VERDICTS if counts.get(v))
            out.append(f"<tr><td>{_e(_when(minute))}</td>{cells}<td>{bars}</td></tr>")
        out.append("</table>")
    out.append("<h2>Queue</h2>")
    if queue.get("error"):
        out.append(f'<p class="err">unreadable: {_e(queue["error"])}</p>')
    else:
        out.append("<table>")
        for key in ("queued", "deferred", "held", "quarantined"):
            if key in queue or key in ("queued", "deferred"):
                out.append(f'<tr><th>{key}</th><td class="n">{_e(queue.get(key, 0))}</td></tr>')
        if "oldest_age" in queue:
            out.append("<tr><th>oldest</th><td class=\"n\">"
                       f"{_e(duration(queue['oldest_age'], minutes_in_hours=True))}</td></tr>")
        out.append("</table>")
    out.append("<h2>Recent warnings and errors</h2>")
    if not errors:
        out.append("<p>none</p>")
    else:
        out.append("<table><tr><th>time</th><th>level</th><th>message</th></tr>")
        for e in list(errors)[::-1]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("ts", 0)))
            out.append(f'<tr><td class="t">{_e(when)}</td><td>{_e(e.get("level"))}</td>'
                       f'<td class="m">{_e(e.get("msg"))}</td></tr>')
        out.append("</table>")
    out.append('<p class="muted">Read-only. Metrics for Prometheus: '
               '<a href="/metrics">/metrics</a>.</p></body></html>')
    return "\n".join(out) + "\n"
