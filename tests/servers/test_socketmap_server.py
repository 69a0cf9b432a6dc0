"""The socketmap service over real loopback sockets (in-process, memory store).

Many lookups per connection, answered in order; a malformed netstring closes
the connection; a store failure is TEMP, never OK; idle connections close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relaygate.config import Settings, SocketmapSettings
from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.errors import ConfigError, StoreError
from relaygate.grants import Grant
from relaygate.metrics import Metrics
from relaygate.protocols.socketmap import netstring
from relaygate.rules import RuleSet
from relaygate.servers.socketmap import SocketmapService, make_service
from relaygate.stores.memory import MemoryStore

OK = b"5:OK OK,"
NOTFOUND = b"9:NOTFOUND ,"


class FailingStore(MemoryStore):
    def get(self, ip: str, now: float) -> Grant | None:
        raise StoreError("connection refused by 10.9.8.7:6379")


class SlowStore(MemoryStore):
    """A store whose lookups go to the thread pool (as redis and spool do)."""

    kind = "redis"

    def get(self, ip: str, now: float) -> Grant | None:
        time.sleep(0.01)
        return super().get(ip, now)


def build(store: MemoryStore | None = None, rules: RuleSet | None = None,
          **opts: object) -> tuple[SocketmapService, Context]:
    store = store if store is not None else MemoryStore()
    now = time.time()
    for ip in ("127.0.0.3", "2001:db8::5"):
        store.put(Grant(ip, "alice", "example.org", "pop3", now, now + 600))
    listen = opts.pop("listen", ("127.0.0.1:0",))
    settings = Settings(socketmap=SocketmapSettings(listen=listen, **opts))  # type: ignore[arg-type]
    ctx = Context(settings, RelayControl(store, rules, expiry=600), Metrics())
    return make_service(ctx), ctx


def port_of(service: SocketmapService) -> int:
    return int(service.listeners()[0].rpartition(":")[2])


def lookup(key: str, name: str = "relaygate") -> bytes:
    return netstring(f"{name} {key}".encode())


@pytest.fixture
async def served() -> AsyncIterator[tuple[SocketmapService, Context, int]]:
    service, ctx = build()
    await service.start()
    yield service, ctx, port_of(service)
    await service.stop(1)


async def read_answers(reader: asyncio.StreamReader, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        length = await asyncio.wait_for(reader.readuntil(b":"), 5)
        body = await asyncio.wait_for(reader.readexactly(int(length[:-1]) + 1), 5)
        out.append(length + body)
    return out


async def test_one_connection_many_lookups(served: tuple[SocketmapService, Context, int]
                                           ) -> None:
    service, ctx, port = served
    assert service.listeners()[0].startswith("socketmap 127.0.0.1:")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    cases = [("127.0.0.3", OK), ("127.0.0.4", NOTFOUND), ("IPv6:2001:DB8:0::5", OK),
             ("2001:db8::5", OK), ("POP:127.0.0.3", OK), ("POP:IPv6:2001:db8::6", NOTFOUND),
             ("::ffff:127.0.0.3", OK), ("alice@example.org", NOTFOUND), ("", NOTFOUND)]
    for key, want in cases:
        writer.write(lookup(key))
        assert await read_answers(reader, 1) == [want], key
    writer.close()
    allowed = ctx.metrics.decisions.labels("allow", "grant")._value.get()
    assert allowed == 5


async def test_pipelined_lookups_answered_in_order_on_both_paths() -> None:
    for store in (MemoryStore(), SlowStore()):
        service, _ = build(store)
        await service.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(service))
            keys = ["127.0.0.3", "127.0.0.9", "2001:db8::5"] * 20
            wants = [OK, NOTFOUND, OK] * 20
            # one write, cut in the middle of a netstring
            stream = b"".join(lookup(k) for k in keys)
            writer.write(stream[:101])
            await asyncio.sleep(0.05)
            writer.write(stream[101:])
            assert await read_answers(reader, len(keys)) == wants, store.kind
            writer.close()
        finally:
            await service.stop(1)


async def test_configured_value_and_any_map_name() -> None:
    service, _ = build(value="RELAY")
    await service.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(service))
        writer.write(lookup("127.0.0.3", "popauth") + lookup("127.0.0.3", "x"))
        assert await read_answers(reader, 2) == [b"8:OK RELAY,"] * 2
        writer.close()
    finally:
        await service.stop(1)


async def test_deny_rule_is_notfound_even_with_a_window() -> None:
    rules = RuleSet.parse("127.0.0.3:deny\n127.0.0.10:allow,RELAYCLIENT=\"\"\n")
    service, _ = build(rules=rules)
    await service.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(service))
        writer.write(lookup("127.0.0.3") + lookup("127.0.0.10"))
        assert await read_answers(reader, 2) == [NOTFOUND, OK]
        writer.close()
    finally:
        await service.stop(1)


@pytest.mark.parametrize("store_cls", [FailingStore, type("SlowFailing", (FailingStore,),
                                                           {"kind": "redis"})])
async def test_store_failure_is_temp_never_ok(store_cls: type[MemoryStore],
                                              caplog: pytest.LogCaptureFixture) -> None:
    service, _ = build(store_cls())
    await service.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(service))
        with caplog.at_level(logging.WARNING):
            writer.write(lookup("127.0.0.3") + lookup("127.0.0.4"))
            answers = await read_answers(reader, 2)
        want = netstring(b"TEMP relaygate: grant store unreachable")
        assert answers == [want, want]
        assert "10.9.8.7" not in repr(answers)  # no internals to the client
        assert "unreachable" in caplog.text
        writer.close()
    finally:
        await service.stop(1)


@pytest.mark.parametrize("garbage", [b"x:relaygate 1,", b"5:ab,cd", b"3:abc,",
                                     b"99999999:", b"14:relaygate 127.0.0.3;"])
async def test_malformed_netstring_closes_after_earlier_answers(
        served: tuple[SocketmapService, Context, int], garbage: bytes) -> None:
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(lookup("127.0.0.3") + garbage + lookup("127.0.0.3"))
    got = await asyncio.wait_for(reader.read(), 5)
    assert got == OK  # the good one before the garbage, nothing after, then closed
    writer.close()


async def test_idle_connections_are_closed() -> None:
    service, _ = build(idle_timeout=0.2)
    await service.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(service))
        writer.write(lookup("127.0.0.3"))
        assert await read_answers(reader, 1) == [OK]
        start = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - start < 4
        writer.close()
    finally:
        await service.stop(1)


async def test_client_half_close_gets_its_answers(
        served: tuple[SocketmapService, Context, int]) -> None:
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(lookup("127.0.0.3") + lookup("127.0.0.4"))
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == OK + NOTFOUND
    writer.close()


async def test_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "sm.sock")
    service, _ = build(listen=(f"unix:{path}",), socket_mode="0600")
    await service.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(lookup("IPv6:2001:db8::5"))
        assert await read_answers(reader, 1) == [OK]
        writer.close()
    finally:
        await service.stop(1)
    assert not os.path.exists(path)


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match=r"socketmap\.socket_mode"):
        build(socket_mode="rw")
    with pytest.raises(ConfigError, match=r"socketmap\.value"):
        build(value="")
    with pytest.raises(ConfigError, match=r"socketmap\.value"):
        build(value="OK\r\nX")
    with pytest.raises(ConfigError, match=r"socketmap\.socket_group"):
        build(socket_group="no-such-group-relaygate")


async def test_ok_answers_counted_for_the_migration_report(tmp_path: Path) -> None:
    from relaygate.relaystats import RelayStats, read_report

    store = MemoryStore()
    now = time.time()
    store.put(Grant("127.0.0.3", "alice", "example.org", "pop3", now, now + 600))
    settings = Settings(data_dir=tmp_path,
                        socketmap=SocketmapSettings(listen=("127.0.0.1:0",)))
    rules = RuleSet.parse('127.0.0.9:allow,RELAYCLIENT=""')
    ctx = Context(settings, RelayControl(store, rules, expiry=600), Metrics())
    service = make_service(ctx)
    await service.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(service))
        writer.write(lookup("127.0.0.3") + lookup("POP:127.0.0.3") + lookup("127.0.0.9")
                     + lookup("127.0.0.4"))
        assert await read_answers(reader, 4) == [OK, OK, OK, NOTFOUND]
        writer.close()
    finally:
        await service.stop(1)
    assert isinstance(ctx.relay_stats, RelayStats)
    ctx.relay_stats.flush()
    assert {u.account: u.counts for u in read_report(tmp_path)} == {
        "alice": {"window": 2, "auth": 0, "rule": 0},
        "[127.0.0.9]": {"window": 0, "auth": 0, "rule": 1}}


async def test_client_behind_a_trusted_proxy_is_named_by_its_proxy_header(
        caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(trusted_proxies=("127.0.0.1",),
                        socketmap=SocketmapSettings(listen=("127.0.0.1:0",)))
    ctx = Context(settings, RelayControl(MemoryStore(), None, expiry=600), Metrics())
    service = make_service(ctx)
    await service.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(service))
        with caplog.at_level(logging.WARNING, logger="relaygate.socketmap"):
            writer.write(b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 25\r\n"
                         + lookup("127.0.0.3") + b"x:bad,")
            assert await asyncio.wait_for(reader.read(), 5) == NOTFOUND
        assert "socketmap client 192.0.2.7: " in caplog.text
        assert "closing the connection" in caplog.text
        assert "client 127.0.0.1" not in caplog.text
        writer.close()
    finally:
        await service.stop(1)
