"""Shared helpers for the queue and delivery tests (no tests here).

``Sink`` is an aiosmtpd server on 127.0.0.1 (a free port) running in the test's
own event loop; hooks decide per recipient and per message what it answers.
Nothing here ever talks to a non-loopback address: MX lookups go through
``StaticResolver`` and relays through smtproutes lines naming 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from relaygate.config import QueueSettings, Settings
from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.interfaces import Account
from relaygate.mail.directory import StaticDirectory
from relaygate.mail.queue import Queue
from relaygate.metrics import Metrics
from relaygate.stores.memory import MemoryStore


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    tls: bool
    helo: str


@dataclass
class Sink:
    """A loopback SMTP sink. ``rcpt(addr)``/``data(envelope)`` return a reply to refuse."""

    rcpt: Callable[[str], str | None] | None = None
    data: Callable[[Any], str | None] | None = None
    data_delay: float = 0.0
    #: hold DATA replies until this many DATA commands have been in progress at once (max 3 s),
    #: so a concurrency limit is reached without relying on timing
    gather: int = 0
    smtputf8: bool = True
    tls_context: Any = None
    host: str = "127.0.0.1"
    received: list[Received] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    data_started: int = 0
    port: int = 0
    connections: int = 0
    idle_timeout: float = 300.0
    _server: Any = None

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _factory(self) -> SMTP:
        self.connections += 1
        return SMTP(self, enable_SMTPUTF8=self.smtputf8, decode_data=False,
                    hostname="sink.test", ident="test sink", tls_context=self.tls_context,
                    require_starttls=False, timeout=self.idle_timeout)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        reply = self.rcpt(address) if self.rcpt else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.active += 1
        self.data_started += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.data_delay:
                await asyncio.sleep(self.data_delay)
            deadline = time.monotonic() + 3.0
            while self.gather and self.max_active < self.gather and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            reply = self.data(envelope) if self.data else None
            if reply:
                return reply
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content,
                                          list(envelope.mail_options), session.ssl is not None,
                                          session.host_name))
            return "250 2.0.0 OK queued"
        finally:
            self.active -= 1

    def delivered_to(self) -> list[str]:
        return [r for m in self.received for r in m.rcpt_tos]


def make_settings(tmp: Path, *, routes: tuple[str, ...] = (), **queue: Any) -> Settings:
    qs = {"retry_schedule": (0.1,), "connect_timeout": 5.0, "command_timeout": 10.0, **queue}
    return Settings(data_dir=tmp / "data", hostname="relay.test", domains=("local.test",),
                    smtproutes=routes, queue=QueueSettings(**qs))


def make_ctx(settings: Settings, directory: StaticDirectory | None = None) -> Context:
    q = Queue(settings.data_dir / "queue")
    return Context(settings, RelayControl(MemoryStore()), Metrics(), directory, q)


def add_account(directory: StaticDirectory, tmp: Path, login: str,
                domain: str = "local.test") -> Account:
    account = Account(login=f"{login}@{domain}", domain=domain,
                      maildir=tmp / "mail" / domain / login,
                      addresses=(f"{login}@{domain}",))
    directory.add(account, "secret")
    return account


def message(subject: str = "hello", *, sender: str = "alice@local.test",
            to: str = "bob@remote.test", body: str = "Hello.\r\n") -> bytes:
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@local.test>\r\n\r\n{body}").encode()


async def wait_until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def maildir_messages(maildir: Path) -> list[email.message.Message]:
    new = maildir / "new"
    if not new.is_dir():
        return []
    return [email.message_from_bytes(p.read_bytes()) for p in sorted(new.iterdir())]


def dsn_fields(msg: email.message.Message) -> list[dict[str, str]]:
    """The per-message block and the per-recipient blocks of a DSN, as dicts."""
    assert msg.get_content_type() == "multipart/report"
    parts = msg.get_payload()
    assert isinstance(parts, list)
    status = parts[1]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [dict(b.items()) for b in blocks]
