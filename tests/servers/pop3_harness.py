"""A real POP3 service on loopback for the server tests, and clients bound to 127.0.0.x."""

from __future__ import annotations

import poplib
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from relaygate.config import AuthSettings, Pop3Settings, Settings, TlsSettings
from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.errors import StoreError
from relaygate.grants import Grant
from relaygate.mail.accounts.db import UserDB
from relaygate.metrics import Metrics
from relaygate.servers.pop3 import Pop3Service, make_service
from relaygate.stores.memory import MemoryStore

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
FAST_AUTH = AuthSettings(failure_delay=0.0)


class BrokenStore(MemoryStore):
    """A store whose writes fail, as an unreachable Redis would."""

    kind = "broken"

    def put(self, grant: Grant) -> None:
        raise StoreError("store is down")


@dataclass
class Pop3Harness:
    service: Pop3Service
    ctx: Context
    db: UserDB
    store: MemoryStore
    data_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def port(self, kind: str = "pop3", host: str | None = None) -> int:
        for k, h, p in self.service.addresses():
            if k == kind and (host is None or h == host):
                return p
        raise LookupError(kind)

    def grant(self, ip: str) -> Grant | None:
        return self.store.get(ip, __import__("time").time())

    def metric(self, name: str, **labels: str) -> float:
        value = self.ctx.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)

    async def stop(self) -> None:
        await self.service.stop(1.0)
        self.db.close()


async def start_pop3(
    tmp_path: Path,
    *,
    listen: tuple[str, ...] = ("127.0.0.1:0",),
    listen_tls: tuple[str, ...] = (),
    tls: tuple[Path, Path] | None = None,
    auth: AuthSettings = FAST_AUTH,
    pop3: dict[str, Any] | None = None,
    store: MemoryStore | None = None,
) -> Pop3Harness:
    data = tmp_path / "data"
    settings = Settings(
        data_dir=data, domains=("example.test",), hostname="mx.example.test",
        pop3=Pop3Settings(listen=listen, listen_tls=listen_tls, **(pop3 or {})),
        auth=auth,
        tls=TlsSettings(*tls) if tls else TlsSettings(),
    )
    store = store if store is not None else MemoryStore()
    db = UserDB(data / "users.db", auth, data, hasher=CHEAP, default_domain="example.test")
    ctx = Context(settings, RelayControl(store), Metrics(), db)
    service = make_service(ctx)
    await service.start()
    return Pop3Harness(service, ctx, db, store, data)


class POP3From(poplib.POP3):
    """poplib.POP3 whose socket is bound to a chosen source address (127.0.0.2, ::1)."""

    def __init__(self, host: str, port: int, source: str, timeout: float = 10.0) -> None:
        self.source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


class POP3SSLFrom(poplib.POP3_SSL):
    def __init__(self, host: str, port: int, source: str, context: ssl.SSLContext,
                 timeout: float = 10.0) -> None:
        self.source = source
        super().__init__(host, port, timeout=timeout, context=context)

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)


def raw_session(port: int, lines: list[bytes], source: str = "127.0.0.2",
                host: str = "127.0.0.1") -> list[bytes]:
    """Send command lines one by one; return each reply's first line (greeting first)."""
    with socket.create_connection((host, port), 10, source_address=(source, 0)) as s:
        f = s.makefile("rb")
        out = [f.readline()]
        for line in lines:
            try:
                s.sendall(line)
                out.append(f.readline())
            except ConnectionResetError:
                # the server had closed: a line sent after that draws a reset, not EOF
                out.append(b"")
                break
        return out
