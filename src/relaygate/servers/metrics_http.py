"""The Prometheus scrape listener (``metrics.listen``), as one more asyncio Service.

Theory of operation
-------------------
Prometheus scrapes ``GET /metrics`` over HTTP/1.x (RFC 9112). This is the
smallest server that serves it: read one request head (bounded size and
time), answer ``GET``/``HEAD`` on ``/metrics`` (and ``/``) with
``prometheus_client.generate_latest`` of the registry, anything else with
404/405, and close the connection (``Connection: close``: scrapes are rare,
so keep-alive buys nothing). It runs in serve's event loop, so there is no
extra thread and it stops with the other services. The metrics hold counters
only, no addresses or user names, but they should still listen on loopback or
a management network only.

With a :class:`StatusPage` (``serve --metrics`` on a loopback address, or
``metrics.status_page = "always"``), ``GET /`` answers the HTML status page of
:mod:`relaygate.statuspage` instead: windows, decisions per minute, queue,
recent errors. It samples the decision counter every few seconds for the
per-minute history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from relaygate.servers.accept import Peer
from relaygate.servers.listeners import Listen, Listener, resolves_to_loopback
from relaygate.statuspage import SECURITY_HEADERS, DecisionRate, counter_totals, render

if TYPE_CHECKING:
    from relaygate.context import Context

log = logging.getLogger("relaygate.metrics")

#: largest request head accepted: a scrape sends a few hundred bytes
MAX_REQUEST_HEAD = 8192
#: seconds a client may take to send its request head (slowloris guard)
REQUEST_TIMEOUT = 10.0
#: concurrent scrape connections; more are closed at once (scrapers are few)
MAX_CONNECTIONS = 32
#: seconds between samples of the decision counter (per-minute history of the page)
SAMPLE_INTERVAL = 5.0


def status_page_allowed(listen: Listen, mode: str) -> bool:
    """Whether ``/`` may show the status page on this listener (``metrics.status_page``)."""
    if mode == "off":
        return False
    return mode == "always" or resolves_to_loopback(listen)


class StatusPage:
    """What the status page shows, gathered from a running process's Context."""

    def __init__(self, ctx: Context, *, errors: Callable[[], list[dict[str, Any]]],
                 processes: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.ctx = ctx
        self.errors = errors
        self.processes = processes
        self.rate = DecisionRate()

    def sample(self) -> None:
        self.rate.sample(counter_totals(self.ctx.metrics.decisions), time.time())

    def _gather(self) -> str:
        from relaygate.errors import RelaygateError
        from relaygate.status import queue_summary

        ctx, now = self.ctx, time.time()
        self.sample()
        windows: list[Any] | None
        why = None
        try:
            windows = list(ctx.control.list(now))
        except RelaygateError as exc:
            windows, why = None, str(exc)
        try:
            queue = queue_summary(ctx.queue, ctx.settings.data_dir / "queue", now)
        except (OSError, RelaygateError, ValueError) as exc:
            queue = {"error": str(exc)}
        return render(now=now, host=ctx.settings.hostname or socket.gethostname(),
                      windows=windows, windows_error=why, rate=self.rate.per_minute(),
                      queue=queue, errors=self.errors(),
                      processes=self.processes() if self.processes else ())

    async def html(self) -> str:
        # the store and the queue directory are read in a thread, never in the loop
        return await asyncio.to_thread(self._gather)


class MetricsService:
    """Serves the registry's metrics at ``http://LISTEN/metrics``."""

    name = "metrics"

    def __init__(self, listen: Listen, registry: CollectorRegistry, *,
                 page: StatusPage | None = None) -> None:
        self.listen = listen
        self.registry = registry
        #: the HTML status page at /, when it may be shown on this listener
        self.page = page
        self._listener: Listener | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._open = 0

    def listeners(self) -> list[str]:
        if self._listener is not None and self._listener.addresses:
            return list(self._listener.addresses)
        return [str(self.listen)]

    async def start(self) -> None:
        listener = Listener("metrics", self.listen)
        await listener.bind_streams(self._handle, limit=MAX_REQUEST_HEAD)
        self._listener = listener
        if self.page is not None:
            self._sampler = asyncio.create_task(self._sample_loop(self.page), name="page")

    @staticmethod
    async def _sample_loop(page: StatusPage) -> None:
        while True:
            try:
                page.sample()
            except Exception:  # a sampling bug must not end the listener
                log.exception("status page sampling")
            await asyncio.sleep(SAMPLE_INTERVAL)

    def reload(self) -> None:
        """Nothing of its own to re-read."""

    async def stop(self, grace: float = 30.0) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None
        if self._listener is None:
            return
        self._listener.close()
        await self._listener.wait_closed(min(grace, 2.0))
        self._listener = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      peer: Peer) -> None:
        if self._open >= MAX_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except asyncio.LimitOverrunError:
                await self._reply(writer, 431, b"request header too large\n")
                return
            request_line = head.split(b"\r\n", 1)[0]
            parts = request_line.split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                await self._reply(writer, 400, b"bad request\n")
                return
            method, target = parts[0], parts[1].split(b"?", 1)[0]
            if target not in (b"/metrics", b"/"):
                await self._reply(writer, 404, b"not found; try /metrics\n")
                return
            if method not in (b"GET", b"HEAD"):
                await self._reply(writer, 405, b"method not allowed\n")
                return
            if target == b"/" and self.page is not None:
                html = (await self.page.html()).encode("utf-8")
                await self._reply(writer, 200, html, "text/html; charset=utf-8",
                                  head_only=method == b"HEAD", extra=SECURITY_HEADERS)
                return
            body = generate_latest(self.registry)
            await self._reply(writer, 200, body, CONTENT_TYPE_LATEST, head_only=method == b"HEAD")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: int, body: bytes,
                     content_type: str = "text/plain; charset=utf-8", *,
                     head_only: bool = False,
                     extra: tuple[tuple[str, str], ...] = ()) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large"}[status]
        more = "".join(f"{k}: {v}\r\n" for k, v in extra)
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{more}"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii")
        writer.write(head if head_only else head + body)
        await writer.drain()
