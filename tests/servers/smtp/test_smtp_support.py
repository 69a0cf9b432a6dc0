"""Shared harness for the SMTP tests: a real server on loopback, run in a thread.

``SmtpHarness`` starts ``make_services`` on free loopback ports inside its own
event loop thread, with an in-memory grant store, a StaticDirectory and a
small file-writing queue (same ``enqueue`` signature as
``relaygate.mail.queue.Queue``). Tests talk to it with blocking clients
(smtplib, raw sockets, swaks, nmap) bound to 127.0.0.x source addresses.
This module holds no tests of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from relaygate.config import AuthSettings, Settings, SmtpSettings, TlsSettings
from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.interfaces import Account
from relaygate.mail.directory import StaticDirectory
from relaygate.metrics import Metrics
from relaygate.rules import RuleSet
from relaygate.servers.smtp.service import SmtpService, make_services
from relaygate.stores.memory import MemoryStore

LOCAL = "example.org"
WINDOW_IP = "127.0.0.2"
STRANGER_IP = "127.0.0.3"
RULE_IP = "127.0.0.4"
FIXUP_IP = "127.0.0.5"
RULES = f'{RULE_IP}:allow,RELAYCLIENT=""\n{FIXUP_IP}:allow,RELAYCLIENT="@fixup.example.net"\n'
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret"}


class FakeQueue:
    """Writes ``<id>.msg`` and ``<id>.env`` (fsynced), like the real queue's enqueue.

    ``open_message`` gives a writer that appends to ``<id>.part`` as the data
    arrives and renames it to ``<id>.msg`` on commit, as the real queue's does.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.items: list[tuple[str, list[str], bytes]] = []
        #: the disk fails when a message is committed (fail) or opened (fail_open)
        self.fail = False
        self.fail_open = False
        self._n = 0
        self._lock = threading.Lock()

    def enqueue(self, sender: str, recipients: list[str], data: bytes) -> str:
        writer = self.open_message(sender, recipients)
        writer.write(data)
        return writer.commit()

    def open_message(self, sender: str, recipients: list[str]) -> FakeQueueWriter:
        if self.fail_open:
            raise OSError("disk full at /secret/path/queue")
        with self._lock:
            self._n += 1
            qid = f"q{self._n}"
        return FakeQueueWriter(self, qid, sender, list(recipients))

    def partial_files(self) -> list[Path]:
        return sorted(self.directory.glob("*.part"))


class FakeQueueWriter:
    def __init__(self, queue: FakeQueue, qid: str, sender: str, recipients: list[str]) -> None:
        self.queue = queue
        self.qid = qid
        self.sender = sender
        self.recipients = recipients
        self.part = queue.directory / f"{qid}.part"
        self.fd: int | None = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def commit(self) -> str:
        assert self.fd is not None
        if self.queue.fail:
            raise OSError("disk full at /secret/path/queue")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        msg = self.queue.directory / f"{self.qid}.msg"
        os.rename(self.part, msg)
        env = self.queue.directory / f"{self.qid}.env"
        fd = os.open(env, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, "\0".join([self.sender, *self.recipients]).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        with self.queue._lock:
            self.queue.items.append((self.sender, list(self.recipients), msg.read_bytes()))
        return self.qid

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.part.unlink(missing_ok=True)


class FailingStore(MemoryStore):
    """A grant store that is unreachable."""

    def get(self, ip: str, now: float) -> Any:
        from relaygate.errors import StoreError

        raise StoreError("connection refused (redis at 10.9.9.9)")


def make_directory(root: Path) -> StaticDirectory:
    d = StaticDirectory()
    d.add(Account("alice", LOCAL, root / "alice",
                  (f"alice@{LOCAL}", f"a.smith@{LOCAL}", "alice@home.example")),
          PASSWORDS["alice"])
    d.add(Account("bob", LOCAL, root / "bob", (f"bob@{LOCAL}",)), PASSWORDS["bob"])
    d.add(Account("admin", LOCAL, root / "admin", (f"admin@{LOCAL}", f"postmaster@{LOCAL}")),
          "admin-secret")
    return d


class SmtpHarness:
    """A running relaygate SMTP server; call ``stop()`` (fixtures do)."""

    def __init__(self, tmp: Path, *, smtp: dict[str, Any] | None = None,
                 settings: dict[str, Any] | None = None, rules: str = RULES,
                 store: MemoryStore | None = None, tls: TlsSettings | None = None,
                 auth: AuthSettings | None = None, with_queue: bool = True,
                 with_directory: bool = True) -> None:
        self.tmp = tmp
        smtp_opts: dict[str, Any] = {"listen": ("127.0.0.1:0",), "submission": (),
                                     "smtps": ()}
        smtp_opts.update(smtp or {})
        top: dict[str, Any] = {"data_dir": tmp / "data",
                               "domains": (LOCAL, "xn--bcher-kva.example"),
                               "hostname": "mx.example.org"}
        top.update(settings or {})
        self.settings = Settings(smtp=SmtpSettings(**smtp_opts), tls=tls or TlsSettings(),
                                 auth=auth or AuthSettings(), **top)
        self.store = store if store is not None else MemoryStore()
        self.control = RelayControl(self.store, RuleSet.parse(rules, "rules"), expiry=900)
        self.directory = make_directory(tmp / "mail") if with_directory else None
        self.queue = FakeQueue(tmp / "queue") if with_queue else None
        self.metrics = Metrics()
        self.ctx = Context(self.settings, self.control, self.metrics, self.directory,
                           self.queue)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.services: list[SmtpService] = self.call(self._start())

    async def _start(self) -> list[SmtpService]:
        services = make_services(self.ctx)
        for s in services:
            await s.start()
        return [s for s in services if isinstance(s, SmtpService)]

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], Any]) -> Any:
        async def wrapper() -> Any:
            return fn()
        return self.call(wrapper())

    def stop(self, grace: float = 1.0) -> None:
        async def stop_all() -> None:
            for s in self.services:
                await s.stop(grace)
        try:
            self.call(stop_all())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def address(self, service: str = "smtp", family: str = "4") -> tuple[str, int]:
        for s in self.services:
            if s.name != service:
                continue
            for b in s.bound:
                host, _, port = b.rpartition(":")
                host = host.strip("[]")
                if (":" in host) == (family == "6"):
                    return host, int(port)
        raise LookupError(service)

    def port(self, service: str = "smtp") -> int:
        return self.address(service)[1]

    def client(self, source: str = STRANGER_IP, service: str = "smtp",
               timeout: float = 10) -> smtplib.SMTP:
        host, port = self.address(service, "6" if ":" in source else "4")
        c = smtplib.SMTP(host, port, source_address=(source, 0), timeout=timeout)
        c.ehlo("client.example")
        return c

    def open_window(self, ip: str = WINDOW_IP, user: str | None = "alice",
                    ttl: float | None = None) -> None:
        self.control.open_window(ip, user=user, domain=LOCAL, source="pop3", ttl=ttl)

    def maildir_messages(self, login: str) -> list[bytes]:
        new = self.tmp / "mail" / login / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]

    def wait_for(self, pred: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.02)
        return pred()


class RawClient:
    """A line-level SMTP client on a plain socket (for what smtplib will not send)."""

    def __init__(self, host: str, port: int, source: str = STRANGER_IP,
                 timeout: float = 10) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; pending {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> str:
        """One full (possibly multi-line) reply, lines joined with newlines."""
        lines = [self.line()]
        while len(lines[-1]) > 3 and lines[-1][3:4] == b"-":
            lines.append(self.line())
        return "\n".join(x.decode("ascii", "replace") for x in lines)

    def cmd(self, text: str | bytes) -> str:
        data = text.encode() if isinstance(text, str) else text
        self.send(data + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (any pending lines are dropped)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def tls_files(tmp: Path) -> tuple[TlsSettings, ssl.SSLContext]:
    """A trustme CA, a server certificate for mx.example.org/127.0.0.1, and a client context."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("mx.example.org", "127.0.0.1", "::1")
    pem = tmp / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return TlsSettings(cert=pem, key=pem), client


class EventCapture(logging.Handler):
    """Collects relaygate event lines (works whatever setup_logging did to propagation)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger("relaygate.events")
        self._level = self.logger.level

    def __enter__(self) -> EventCapture:
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [dict(getattr(r, "event_fields", {})) for r in self.records
                if getattr(r, "event_kind", None) == kind]
