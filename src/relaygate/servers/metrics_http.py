"""The Prometheus scrape listener (``metrics.listen``), as one more asyncio Service.

Theory of operation
-------------------
Prometheus scrapes ``GET /metrics`` over HTTP/1.x (RFC 9112). This is the
smallest server that serves it: read one request head (bounded size and
time), answer ``GET``/``HEAD`` on ``/metrics`` (and ``/``) with
``prometheus_client.generate_latest`` of the registry, anything else with
404/405, and close the connection (``Connection: close``: scrapes are rare,
so keep-alive buys nothing). It runs in serve's event loop, so there is no
extra thread and it stops with the other services. The page holds counters
only, no addresses or user names, but it should still listen on loopback or
a management network only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from relaygate.servers.accept import Peer
from relaygate.servers.listeners import Listen, Listener

log = logging.getLogger("relaygate.metrics")

#: largest request head accepted: a scrape sends a few hundred bytes
MAX_REQUEST_HEAD = 8192
#: seconds a client may take to send its request head (slowloris guard)
REQUEST_TIMEOUT = 10.0
#: concurrent scrape connections; more are closed at once (scrapers are few)
MAX_CONNECTIONS = 32


class MetricsService:
    """Serves the registry's metrics at ``http://LISTEN/metrics``."""

    name = "metrics"

    def __init__(self, listen: Listen, registry: CollectorRegistry) -> None:
        self.listen = listen
        self.registry = registry
        self._listener: Listener | None = None
        self._open = 0

    def listeners(self) -> list[str]:
        if self._listener is not None and self._listener.addresses:
            return list(self._listener.addresses)
        return [str(self.listen)]

    async def start(self) -> None:
        listener = Listener("metrics", self.listen)
        await listener.bind_streams(self._handle, limit=MAX_REQUEST_HEAD)
        self._listener = listener

    def reload(self) -> None:
        """Nothing of its own to re-read."""

    async def stop(self, grace: float = 30.0) -> None:
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
                     head_only: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large"}[status]
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii")
        writer.write(head if head_only else head + body)
        await writer.drain()
