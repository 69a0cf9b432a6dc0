"""The Postfix policy service: its two decision paths (on the event loop for local stores,
in threads for the others), over real loopback sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relaygate.config import PolicySettings, Settings
from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.decision import Decision
from relaygate.errors import StoreError
from relaygate.grants import Grant
from relaygate.metrics import Metrics
from relaygate.protocols.policy import (
    format_request,
)
from relaygate.rules import RuleSet
from relaygate.servers.policy import INLINE_BUSY_TIMEOUT, PolicyService, make_service
from relaygate.stores.base import GrantStore
from relaygate.stores.memory import MemoryStore
from relaygate.stores.sqlite import SqliteStore

# -- the service: decisions on the event loop or in threads ----------------------

def _service(store: GrantStore, **policy: object) -> tuple[PolicyService, Context]:
    settings = Settings(policy=PolicySettings(listen=("127.0.0.1:0",), **policy))  # type: ignore[arg-type]
    ctx = Context(settings, RelayControl(store, expiry=600), Metrics())
    return make_service(ctx), ctx


def _grant(store: GrantStore, ip: str) -> None:
    now = time.time()
    store.put(Grant(ip, "alice", "example.org", "pop3", now, now + 600))


class _Spool(MemoryStore):
    """A store of a kind that is asked from the thread pool."""

    kind = "spool"


class _Failing(MemoryStore):
    def get(self, ip: str, now: float) -> Grant | None:
        raise StoreError("database is locked")


class _FailingSpool(_Failing):
    kind = "spool"


class _FailsOnTheLoop(MemoryStore):
    """Fails in the event loop's thread only: a lock that the thread path rides out."""

    def __init__(self) -> None:
        super().__init__()
        self.loop_thread = threading.get_ident()
        self.gets: list[str] = []

    def get(self, ip: str, now: float) -> Grant | None:
        on_loop = threading.get_ident() == self.loop_thread
        self.gets.append("loop" if on_loop else "thread")
        if on_loop:
            raise StoreError("database is locked")
        return super().get(ip, now)


async def _ask_all(service: PolicyService, ips: list[str]) -> list[bytes]:
    await service.start()
    try:
        port = int(service.listeners()[0].rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = []
        for ip in ips:
            writer.write(format_request({"request": "smtpd_access_policy",
                                         "client_address": ip}))
            answers.append(await asyncio.wait_for(reader.readuntil(b"\n\n"), 10))
        writer.close()
        return answers
    finally:
        await service.stop(1)


OK_B, DUNNO_B = b"action=OK\n\n", b"action=DUNNO\n\n"


@pytest.mark.parametrize("store_class, inline", [(MemoryStore, True), (_Spool, False)])
async def test_both_paths_answer_ok_only_for_an_open_window(store_class: type[MemoryStore],
                                                            inline: bool) -> None:
    store = store_class()
    _grant(store, "127.0.0.3")
    service, ctx = _service(store)
    assert (service.decider is not None) is inline
    submitted: list[str] = []
    submit = service.batcher.submit

    def spy(ip: str, done: Callable[[str, Decision], None]) -> None:
        submitted.append(ip)
        submit(ip, done)

    service.batcher.submit = spy  # type: ignore[method-assign]
    assert await _ask_all(service, ["127.0.0.3", "127.0.0.4", "::ffff:127.0.0.3"]) == \
        [OK_B, DUNNO_B, OK_B]
    # The local store never goes through the thread pool; the spool store always does.
    assert submitted == ([] if inline else ["127.0.0.3", "127.0.0.4", "127.0.0.3"])
    assert ctx.metrics.decisions.labels("allow", "grant")._value.get() == 2


@pytest.mark.parametrize("store_class", [_Failing, _FailingSpool])
async def test_both_paths_fail_closed(store_class: type[MemoryStore],
                                      caplog: pytest.LogCaptureFixture) -> None:
    store = store_class()
    _grant(store, "127.0.0.3")
    service, ctx = _service(store)
    with caplog.at_level(logging.WARNING):
        assert await _ask_all(service, ["127.0.0.3"]) == [DUNNO_B]
    if service.decider is not None:
        assert service.decider.handed_off == 1  # the loop did not answer: the thread did
    # One failure, one warning (the inline attempt is not logged twice).
    warnings = [r for r in caplog.records if r.name == "relaygate.control"]
    assert len(warnings) == 1
    assert ctx.metrics.decisions.labels("tempfail", "store")._value.get() == 1


async def test_a_lookup_that_fails_on_the_loop_is_retried_in_a_thread() -> None:
    store = _FailsOnTheLoop()
    _grant(store, "127.0.0.3")
    service, _ = _service(store)
    assert await _ask_all(service, ["127.0.0.3", "127.0.0.4"]) == [OK_B, DUNNO_B]
    assert store.gets == ["loop", "thread", "loop", "thread"]
    assert service.decider is not None and service.decider.handed_off == 2


async def test_rules_reloaded_into_the_control_apply_on_the_loop() -> None:
    service, ctx = _service(MemoryStore())
    await service.start()
    try:
        port = int(service.listeners()[0].rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        req = format_request({"request": "smtpd_access_policy", "client_address": "10.1.2.3"})
        writer.write(req)
        assert await reader.readuntil(b"\n\n") == DUNNO_B
        # what serve does on SIGHUP
        ctx.control.rules = RuleSet.parse('10.1.:allow,RELAYCLIENT=""\n')
        writer.write(req)
        assert await reader.readuntil(b"\n\n") == OK_B
        writer.close()
    finally:
        await service.stop(1)


async def test_sqlite_on_the_loop_sees_every_revoke_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "grants.db"
    store = SqliteStore(path, busy_timeout=0.2)
    service, _ = _service(store)
    assert service.decider is not None
    other = SqliteStore(path)  # another process: the CLI, the Dovecot hook
    try:
        await service.start()
        port = int(service.listeners()[0].rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def ask(ip: str) -> bytes:
            writer.write(format_request({"request": "smtpd_access_policy",
                                         "client_address": ip}))
            return await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)

        # No database yet: the loop does not create one; the thread path's store does.
        assert await ask("127.0.0.3") == DUNNO_B
        assert service.decider.handed_off == 1
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        _grant(other, "127.0.0.3")
        assert await ask("127.0.0.3") == OK_B
        other.delete("127.0.0.3")
        assert await ask("127.0.0.3") == DUNNO_B  # no answer is remembered
        _grant(other, "127.0.0.3")
        assert await ask("127.0.0.3") == OK_B
        assert service.decider.handed_off == 1  # all of these on the loop
        writer.close()
    finally:
        await service.stop(1)
        other.close()
        store.close()


async def test_sqlite_lock_on_the_loop_is_bounded_and_fails_closed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relaygate.control")
    path = tmp_path / "grants.db"
    setup = SqliteStore(path)
    _grant(setup, "127.0.0.3")
    setup.close()
    # Another process holds the database in exclusive locking mode: no reader gets in.
    locker: sqlite3.Connection | None = sqlite3.connect(path, isolation_level=None)
    assert locker is not None
    locker.execute("PRAGMA locking_mode = EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    locker.execute("DELETE FROM grants WHERE ip = 'nobody'")
    store = SqliteStore(path, busy_timeout=0.3)
    service, _ = _service(store)
    assert service.decider is not None
    gaps: list[float] = []

    async def ticker() -> None:  # how long the loop goes without running a task
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.001)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    await service.start()
    try:
        port = int(service.listeners()[0].rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        req = format_request({"request": "smtpd_access_policy", "client_address": "127.0.0.3"})
        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        writer.write(req)
        # Locked beyond the store's busy timeout: DUNNO (fail closed) ...
        assert await asyncio.wait_for(reader.readuntil(b"\n\n"), 10) == DUNNO_B
        tick.cancel()
        assert service.decider.handed_off == 1
        # ... and the loop never stalled much longer than the inline busy timeout (slack
        # for a busy machine), although the thread path waited 0.3 s for the lock.
        assert max(gaps) < INLINE_BUSY_TIMEOUT + 0.15
        locker.execute("ROLLBACK")
        locker.close()
        locker = None
        writer.write(req)
        assert await asyncio.wait_for(reader.readuntil(b"\n\n"), 10) == OK_B
        assert service.decider.handed_off == 1  # back on the loop
        # The thread path warned about the failure, the loop reported the recovery.
        warned = [r.getMessage() for r in caplog.records if r.name == "relaygate.control"]
        assert len(warned) == 2, warned
        assert warned[0].startswith("grant store unreachable, refusing to relay for 127.0.0.3")
        assert warned[1].startswith("grant store reachable again")
        writer.close()
    finally:
        if locker is not None:
            locker.close()
        await service.stop(1)
        store.close()


async def test_a_client_that_never_reads_its_answers_is_not_read_either() -> None:
    service, _ = _service(MemoryStore())
    await service.start()
    try:
        port = int(service.listeners()[0].rpartition(":")[2])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small before connect
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        while not service.connections:
            await asyncio.sleep(0.01)
        (conn,) = service.connections
        assert conn.transport is not None
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET,
                                                           socket.SO_SNDBUF, 4096)
        req = format_request({"request": "smtpd_access_policy", "client_address": "127.0.0.4"})
        count = (1 << 20) // len(req)
        writer.write(req * count)  # and never read
        for _ in range(500):
            if not conn.transport.is_reading():
                break
            await asyncio.sleep(0.01)
        assert not conn.transport.is_reading()
        # What the server holds stays bounded: a few hundred KiB, not the 260 KiB of
        # answers per MiB of requests times however much the client sends.
        assert conn.transport.get_write_buffer_size() < 512 * 1024
        # Reading the answers lets the rest through, in order, every one answered.
        got = await asyncio.wait_for(reader.readexactly(len(DUNNO_B) * count), 30)
        assert got == DUNNO_B * count
        writer.close()
    finally:
        await service.stop(1)
