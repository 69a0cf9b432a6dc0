"""Stand-in services for testing ``relaygate serve``'s frame without the real servers.

``LineService`` is a tiny line protocol: ``PING`` -> ``PONG``; ``SLOW n`` starts a
"transaction" that answers ``DONE`` after n seconds (it is in flight until then);
``WHO`` -> the effective uid. ``stop(grace)`` stops accepting, lets transactions in
flight finish for up to ``grace`` seconds, then closes, like a real service.

Run as a module it starts a ``Server`` with one LineService (for signal tests)::

    python -m _serve_standins DATA_DIR PORT [USER]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import ssl
import sys
from pathlib import Path
from typing import Any

from relaygate.config import Settings
from relaygate.context import Context
from relaygate.mail.directory import StaticDirectory


class LineService:
    def __init__(self, name: str, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server: asyncio.Server | None = None
        self.inflight: set[asyncio.Task[Any]] = set()
        self.stopped_with: float | None = None
        self.reloaded = 0
        self.conns: set[asyncio.StreamWriter] = set()

    def listeners(self) -> list[str]:
        return [f"{self.host}:{self.port}"]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, self.port,
                                                 ssl=self.ssl_context)

    def reload(self) -> None:
        self.reloaded += 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns.add(writer)
        try:
            while line := await reader.readline():
                words = line.decode().split()
                if words == ["PING"]:
                    writer.write(b"PONG\n")
                elif words[:1] == ["WHO"]:
                    writer.write(f"{os.geteuid()}\n".encode())
                elif words[:1] == ["SLOW"]:
                    task = asyncio.current_task()
                    assert task is not None
                    self.inflight.add(task)
                    writer.write(b"BUSY\n")
                    await writer.drain()
                    await asyncio.sleep(float(words[1]))
                    writer.write(b"DONE\n")
                    self.inflight.discard(task)
                else:
                    writer.write(b"ERR\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.conns.discard(writer)
            writer.close()

    async def stop(self, grace: float = 30.0) -> None:
        self.stopped_with = grace
        if self.server is None:
            return
        self.server.close()
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=grace)
        for w in list(self.conns):
            w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)


def line_factory(host: str, port: int, name: str = "line") -> Any:
    def make(ctx: Context) -> list[LineService]:
        svc = LineService(name, host, port, ctx.ssl_context)
        return [svc]
    return make


def current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def main(argv: list[str]) -> int:
    from relaygate.servers.serve import Server

    data_dir, port = Path(argv[0]), int(argv[1])
    user = argv[2] if len(argv) > 2 else current_user()
    settings = Settings(data_dir=data_dir, store=None, hostname="test.example",
                        user=user, shutdown_grace=10.0)
    server = Server(settings, factories=[("line", line_factory("127.0.0.1", port))],
                    open_directory=lambda s: StaticDirectory(), open_queue=lambda s: None)
    return server.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
