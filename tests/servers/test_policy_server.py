"""The policy service over real loopback sockets (in-process, memory store).

Malformed and abusive requests get no answer and a closed connection, as
Postfix's SMTPD_POLICY_README asks; decisions come from RelayControl; a store
failure is DUNNO.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relaygate.config import PolicySettings, Settings
from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.errors import ConfigError, StoreError
from relaygate.grants import Grant
from relaygate.metrics import Metrics
from relaygate.protocols.policy import MAX_ATTRIBUTES, MAX_LINE_LENGTH, format_request
from relaygate.servers.policy import PolicyService, make_service
from relaygate.stores.memory import MemoryStore


def request(ip: str, **extra: str) -> bytes:
    return format_request({"request": "smtpd_access_policy", "protocol_state": "RCPT",
                           "client_address": ip, "recipient": "x@remote.example", **extra})


class FailingStore(MemoryStore):
    def get(self, ip: str, now: float) -> Grant | None:
        raise StoreError("database is locked")


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    def get(self, ip: str, now: float) -> Grant | None:
        self.gets += 1
        return super().get(ip, now)


def build(store: MemoryStore | None = None, **policy: object) -> tuple[PolicyService, Context]:
    store = store if store is not None else MemoryStore()
    now = time.time()
    for ip in ("127.0.0.3", "2001:db8::5"):
        store.put(Grant(ip, "alice", "example.org", "pop3", now, now + 600))
    listen = policy.pop("listen", ("127.0.0.1:0",))
    settings = Settings(policy=PolicySettings(listen=listen, **policy))  # type: ignore[arg-type]
    ctx = Context(settings, RelayControl(store, expiry=600), Metrics())
    return make_service(ctx), ctx


def port_of(service: PolicyService) -> int:
    return int(service.listeners()[0].rpartition(":")[2])


@pytest.fixture
async def served() -> AsyncIterator[tuple[PolicyService, Context, int]]:
    service, ctx = build()
    await service.start()
    yield service, ctx, port_of(service)
    await service.stop(1)


async def ask(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """Send payload, half-close, read everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_ok_for_open_window_dunno_otherwise(served: tuple[PolicyService, Context, int]
                                                 ) -> None:
    _, ctx, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for ip, want in [("127.0.0.3", b"action=OK\n\n"), ("127.0.0.4", b"action=DUNNO\n\n"),
                     ("2001:DB8:0::5", b"action=OK\n\n"), ("::ffff:127.0.0.3", b"action=OK\n\n"),
                     ("bogus", b"action=DUNNO\n\n")]:
        writer.write(request(ip))
        assert await asyncio.wait_for(reader.readuntil(b"\n\n"), 5) == want, ip
    writer.close()
    allowed = ctx.metrics.decisions.labels("allow", "grant")._value.get()
    denied = ctx.metrics.decisions.labels("deny", "none")._value.get()
    assert (allowed, denied) == (3, 1)


async def test_sasl_clients_and_other_requests_get_dunno_without_a_lookup() -> None:
    store = CountingStore()
    service, _ = build(store)
    await service.start()
    try:
        port = port_of(service)
        got = await ask(port, request("127.0.0.3", sasl_username="alice")
                        + format_request({"request": "future_policy",
                                          "client_address": "127.0.0.3"}))
        assert got == b"action=DUNNO\n\naction=DUNNO\n\n"
        assert store.gets == 0
    finally:
        await service.stop(1)


async def test_store_failure_is_dunno_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    service, ctx = build(FailingStore())
    await service.start()
    try:
        with caplog.at_level(logging.WARNING):
            got = await ask(port_of(service), request("127.0.0.3"))
        assert got == b"action=DUNNO\n\n"
        assert ctx.metrics.decisions.labels("tempfail", "store")._value.get() == 1
        assert any("grant store unreachable" in r.getMessage() for r in caplog.records)
    finally:
        await service.stop(1)


async def test_pipelined_requests_are_answered_in_order(
        served: tuple[PolicyService, Context, int]) -> None:
    _, _, port = served
    got = await ask(port, request("127.0.0.4") + request("127.0.0.3") + request("127.0.0.9"))
    assert got == b"action=DUNNO\n\naction=OK\n\naction=DUNNO\n\n"


ABUSE = {
    "no equals sign": b"request=smtpd_access_policy\nhello\n\n",
    "duplicate client_address": b"request=smtpd_access_policy\nclient_address=127.0.0.9\n"
                                b"client_address=127.0.0.3\n\n",
    "over-long line": b"request=smtpd_access_policy\nsender=" + b"x" * (MAX_LINE_LENGTH + 10)
                      + b"\n\n",
    "too many attributes": b"request=smtpd_access_policy\n" + b"a=1\n" * (MAX_ATTRIBUTES + 5)
                           + b"\n",
    "empty request": b"\n",
    "no request attribute": b"client_address=127.0.0.3\n\n",
    "NUL byte": b"request=smtpd_access_policy\nclient_address=127.0.0.3\x00\n\n",
    "binary garbage": os.urandom(64).replace(b"\n", b"") + b"\n\n",
    "HTTP": b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
    "truncated at EOF": b"request=smtpd_access_policy\nclient_address=127.0.0.3\n",
}


@pytest.mark.parametrize("name", sorted(ABUSE))
async def test_malformed_requests_get_no_answer_and_are_closed(
        served: tuple[PolicyService, Context, int], name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    _, _, port = served
    with caplog.at_level(logging.WARNING, logger="relaygate.policy"):
        got = await ask(port, ABUSE[name])
    assert got == b""
    assert any("closing without an answer" in r.getMessage() for r in caplog.records)


async def test_good_request_then_garbage(served: tuple[PolicyService, Context, int]) -> None:
    _, _, port = served
    got = await ask(port, request("127.0.0.3") + b"garbage\n\n" + request("127.0.0.3"))
    assert got == b"action=OK\n\n"


async def test_endless_line_is_cut_off_without_waiting_for_its_end(
        served: tuple[PolicyService, Context, int]) -> None:
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"request=smtpd_access_policy\nsender=" + b"x" * (MAX_LINE_LENGTH * 2))
    # No newline, no EOF: the server must still close.
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_requests_split_across_reads_on_several_connections_do_not_mix(
        served: tuple[PolicyService, Context, int]) -> None:
    # Every connection reads into one buffer the service owns: what a connection
    # has of an unfinished request must be its own copy, untouched by other reads.
    _, _, port = served
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    reqs = [request("127.0.0.3"), request("127.0.0.4"), request("2001:db8::5")]
    for (_, writer), req in zip(conns, reqs, strict=True):
        writer.write(req[:40])
        await writer.drain()
    await asyncio.sleep(0.05)
    for (_, writer), req in zip(reversed(conns), reversed(reqs), strict=True):
        writer.write(req[40:-5])
        await writer.drain()
        await asyncio.sleep(0.01)
    for (_, writer), req in zip(conns, reqs, strict=True):
        writer.write(req[-5:])
    answers = [await asyncio.wait_for(r.readuntil(b"\n\n"), 5) for r, _ in conns]
    assert answers == [b"action=OK\n\n", b"action=DUNNO\n\n", b"action=OK\n\n"]
    for _, writer in conns:
        writer.close()


async def test_many_connections_many_requests(served: tuple[PolicyService, Context, int]
                                              ) -> None:
    _, ctx, port = served

    async def client(n: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ok = 0
        for i in range(20):
            ip = "127.0.0.3" if (n + i) % 2 else f"127.0.1.{n}"
            writer.write(request(ip))
            answer = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
            assert answer == (b"action=OK\n\n" if (n + i) % 2 else b"action=DUNNO\n\n")
            ok += 1
        writer.close()
        return ok

    results = await asyncio.gather(*(client(n) for n in range(50)))
    assert sum(results) == 1000
    total = sum(s.value for m in ctx.metrics.decisions.collect() for s in m.samples
                if s.name.endswith("_total"))
    assert total == 1000


async def test_idle_connections_are_closed() -> None:
    service, _ = build(idle_timeout=0.2)
    await service.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(service))
        writer.write(request("127.0.0.3"))
        assert await reader.readuntil(b"\n\n") == b"action=OK\n\n"
        start = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - start < 4
        writer.close()
    finally:
        await service.stop(1)


async def test_ipv6_listener() -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    service, _ = build(listen=("[::1]:0",))
    await service.start()
    try:
        assert service.listeners()[0].startswith("policy [::1]:")
        assert await ask(port_of(service), request("2001:db8::5"), host="::1") == \
            b"action=OK\n\n"
    finally:
        await service.stop(1)


async def test_unix_socket_mode_group_and_removal(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    path_str = str(path)
    # A stale socket from a crashed run is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path_str)
    stale.close()
    service, _ = build(listen=(f"unix:{path_str}",), socket_mode="0600")
    await service.start()
    try:
        st = os.stat(path_str)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        reader, writer = await asyncio.open_unix_connection(path_str)
        writer.write(request("127.0.0.3"))
        assert await reader.readuntil(b"\n\n") == b"action=OK\n\n"
        writer.close()
    finally:
        await service.stop(1)
    assert not path.exists()

    service, _ = build(listen=(f"unix:{path_str}",))
    await service.start()
    try:
        assert stat.S_IMODE(os.stat(path_str).st_mode) == 0o660
    finally:
        await service.stop(1)


async def test_unix_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "important.txt"
    target.write_text("keep me")
    service, _ = build(listen=(f"unix:{target}",))
    with pytest.raises(ConfigError, match="not a socket"):
        await service.start()
    assert target.read_text() == "keep me"


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match="octal"):
        build(socket_mode="rw-rw----")
    with pytest.raises(ConfigError, match="group"):
        build(socket_group="no-such-group-relaygate")


async def test_ok_answers_counted_for_the_migration_report(tmp_path: Path) -> None:
    from relaygate.relaystats import RelayStats, read_report

    store = MemoryStore()
    now = time.time()
    store.put(Grant("127.0.0.3", "alice", "example.org", "pop3", now, now + 600))
    settings = Settings(data_dir=tmp_path, policy=PolicySettings(listen=("127.0.0.1:0",)))
    from relaygate.rules import RuleSet

    ctx = Context(settings, RelayControl(store, RuleSet.parse('127.0.0.9:allow,RELAYCLIENT=""'),
                                         expiry=600), Metrics())
    service = make_service(ctx)
    await service.start()
    try:
        got = await ask(port_of(service), request("127.0.0.3") + request("127.0.0.3")
                        + request("127.0.0.9") + request("127.0.0.4"))
        assert got.count(b"action=OK") == 3
    finally:
        await service.stop(1)
    assert isinstance(ctx.relay_stats, RelayStats)
    ctx.relay_stats.flush()
    assert {u.account: u.counts for u in read_report(tmp_path)} == {
        "alice": {"window": 2, "auth": 0, "rule": 0},
        "[127.0.0.9]": {"window": 0, "auth": 0, "rule": 1}}
