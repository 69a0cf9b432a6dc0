"""The Redis store against a real redis-server: TTLs, the shared view, the key layout."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import RedisServer, free_port, start_redis
from relaygate.control import RelayControl
from relaygate.decision import Verdict
from relaygate.errors import ConfigError, StoreError
from relaygate.grants import Grant
from relaygate.stores import open_store
from relaygate.stores.redis import AGE_BATCH, DEFAULT_PREFIX, RedisStore

_n = iter(range(1_000_000))


def g(ip: str, user: str | None = "alice", opened: float | None = None,
      ttl: float = 900.0) -> Grant:
    t = time.time() if opened is None else opened
    return Grant(ip, user, "example.org", "imap", t, t + ttl)


@pytest.fixture
def prefix() -> str:
    return f"rtest:{next(_n)}:{time.time_ns()}:"


@pytest.fixture
def store(redis_server: RedisServer, prefix: str) -> Any:
    s = RedisStore.from_url(f"{redis_server.url}?prefix={prefix}")
    yield s
    s.close()


@pytest.fixture
def raw(redis_server: RedisServer) -> Any:
    c = redis.Redis(host="127.0.0.1", port=redis_server.port, db=0)
    yield c
    c.close()


def test_key_layout_and_ttl(store: RedisStore, raw: Any, prefix: str) -> None:
    grant = g("2001:db8::1", ttl=600)
    store.put(grant)
    key = prefix + "2001:db8::1"
    fields = raw.hgetall(key)
    assert fields == {
        b"user": b"alice",
        b"domain": b"example.org",
        b"source": b"imap",
        b"opened_at": repr(grant.opened_at).encode(),
        b"expires_at": repr(grant.expires_at).encode(),
    }
    assert 0 < raw.pttl(key) <= 600_000
    assert raw.zscore(prefix + "@expiry", "2001:db8::1") == pytest.approx(grant.expires_at)
    assert raw.smembers(prefix + "@user:alice") == {b"2001:db8::1"}
    assert 0 < raw.pttl(prefix + "@user:alice") <= 600_000


def test_user_set_ttl_follows_the_latest_grant(store: RedisStore, raw: Any, prefix: str) -> None:
    store.put(g("192.0.2.1", ttl=900))
    store.put(g("192.0.2.2", ttl=60))  # a shorter window must not shorten the set's life
    assert raw.pttl(prefix + "@user:alice") > 800_000
    store.put(g("192.0.2.3", ttl=3000))
    assert raw.pttl(prefix + "@user:alice") > 2_900_000


def test_no_user_no_user_field(store: RedisStore, raw: Any, prefix: str) -> None:
    store.put(Grant("192.0.2.1", None, None, "qmail", time.time(), time.time() + 60))
    assert set(raw.hgetall(prefix + "192.0.2.1")) == {b"source", b"opened_at", b"expires_at"}
    assert not [k for k in raw.scan_iter(prefix + "@user:*")]


def test_redis_expires_the_key_itself(store: RedisStore, raw: Any, prefix: str) -> None:
    store.put(g("192.0.2.1", ttl=0.2))
    time.sleep(0.4)
    assert raw.exists(prefix + "192.0.2.1") == 0
    assert store.get("192.0.2.1", time.time()) is None
    assert store.list(time.time()) == []
    # the index still remembers it, so age() can say one window expired
    assert store.age(time.time()) == 1
    assert raw.zcard(prefix + "@expiry") == 0


def test_two_stores_share_one_view(redis_server: RedisServer, prefix: str) -> None:
    pop_host = RedisStore.from_url(f"{redis_server.url}?prefix={prefix}")
    smtp_host = RedisStore.from_url(f"{redis_server.url}?prefix={prefix}")
    other = RedisStore.from_url(f"{redis_server.url}?prefix={prefix}x:")
    try:
        now = time.time()
        pop_host.put(g("198.51.100.4", "carol"))
        got = smtp_host.get("198.51.100.4", now)
        assert got is not None and got.user == "carol"
        assert RelayControl(smtp_host).decide("198.51.100.4").verdict is Verdict.ALLOW
        assert other.get("198.51.100.4", now) is None  # another prefix, another view
        assert smtp_host.delete_user("carol") == 1
        assert pop_host.get("198.51.100.4", now) is None
    finally:
        for s in (pop_host, smtp_host, other):
            s.close()


def test_refresh_moves_the_address_between_users(store: RedisStore, raw: Any,
                                                 prefix: str) -> None:
    store.put(g("192.0.2.1", "alice"))
    store.put(g("192.0.2.1", "bob"))
    assert raw.smembers(prefix + "@user:alice") == set()
    assert raw.smembers(prefix + "@user:bob") == {b"192.0.2.1"}
    assert raw.zcard(prefix + "@expiry") == 1


def test_age_works_in_batches(store: RedisStore, raw: Any, prefix: str) -> None:
    now = time.time()
    n = AGE_BATCH * 2 + 17
    pipe = raw.pipeline(transaction=False)
    for i in range(n):  # fill the index directly: only age() is under test here
        pipe.zadd(prefix + "@expiry", {f"10.0.{i // 256}.{i % 256}": now - 10})
    pipe.execute()
    store.put(g("192.0.2.1"))
    assert store.age(now) == n
    assert raw.zcard(prefix + "@expiry") == 1


def test_list_does_not_use_keys(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        store.put(g(f"192.0.2.{i}", opened=time.time() - i))

    def forbidden(*a: object, **kw: object) -> None:
        raise AssertionError("list() must not walk the keyspace")

    for name in ("keys", "scan", "scan_iter"):
        monkeypatch.setattr(store.client, name, forbidden)
    assert [x.ip for x in store.list(time.time())] == [f"192.0.2.{i}" for i in range(4, -1, -1)]


def test_malformed_record_fails_closed(store: RedisStore, raw: Any, prefix: str) -> None:
    raw.hset(prefix + "192.0.2.1", mapping={"user": "x", "expires_at": "soon"})
    with pytest.raises(StoreError):
        store.get("192.0.2.1", time.time())
    assert RelayControl(store).decide("192.0.2.1").verdict is Verdict.TEMPFAIL


def test_invalid_address_is_never_a_key(store: RedisStore, raw: Any, prefix: str) -> None:
    from relaygate.errors import InvalidAddress

    for bad in ("../x", "*", "fe80::1%eth0", "1.2.3.4.5", ""):
        with pytest.raises(InvalidAddress):
            store.put(g(bad))
        with pytest.raises(InvalidAddress):
            store.get(bad, time.time())
    assert list(raw.scan_iter(prefix + "*")) == []


def test_from_url(redis_server: RedisServer) -> None:
    s = RedisStore.from_url(f"redis://127.0.0.1:{redis_server.port}/3?prefix=a:b:")
    try:
        assert s.prefix == "a:b:"
        kw = s.client.get_connection_kwargs()
        assert kw["db"] == 3 and kw["socket_timeout"] == 1.0 and kw["socket_connect_timeout"] == 1.0
    finally:
        s.close()
    s = RedisStore.from_url(f"redis://127.0.0.1:{redis_server.port}/0")
    assert s.prefix == DEFAULT_PREFIX
    s.close()
    s = RedisStore.from_url("rediss://127.0.0.1:1/0?prefix=x:&socket_timeout=2")
    assert s.client.get_connection_kwargs()["socket_timeout"] == 2.0
    assert "SSL" in s.client.connection_pool.connection_class.__name__
    s.close()
    with pytest.raises(ConfigError):
        RedisStore.from_url("redis://127.0.0.1:1/0?prefix=")
    with pytest.raises(ConfigError):
        RedisStore.from_url("http://127.0.0.1/")
    assert open_store(f"{redis_server.url}?prefix=q:").kind == "redis"


def test_nothing_listening_is_a_store_error() -> None:
    s = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreError):
        s.get("192.0.2.1", time.time())
    assert RelayControl(s).decide("192.0.2.1").verdict is Verdict.TEMPFAIL
    s.close()


def test_a_redis_that_does_not_answer_is_tempfail_within_seconds() -> None:
    """A server that accepts connections and never replies (hung, SIGSTOPped): the
    socket time-outs turn it into TEMPFAIL quickly, never a hang and never ALLOW."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes the handshakes; nobody ever reads
        s = RedisStore.from_url(f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        try:
            started = time.monotonic()
            d = RelayControl(s).decide("192.0.2.1")
            assert d.verdict is Verdict.TEMPFAIL and d.kind == "store"
            with pytest.raises(StoreError):
                s.put(g("192.0.2.1"))
            assert time.monotonic() - started < 15
        finally:
            s.close()


def test_redis_stopped_mid_test(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "r1")
    port = server.port
    s = RedisStore.from_url(f"{server.url}?prefix=mid:")
    try:
        s.put(g("192.0.2.1"))
        control = RelayControl(s)
        assert control.decide("192.0.2.1").verdict is Verdict.ALLOW
        server.stop()
        assert control.decide("192.0.2.1").verdict is Verdict.TEMPFAIL
        with pytest.raises(StoreError):
            s.put(g("192.0.2.2"))
        with pytest.raises(StoreError):
            s.age(time.time())
        # a restarted (empty, no persistence) server is used again without a new store
        server = start_redis(tmp_path / "r2", port=port)
        assert control.decide("192.0.2.1").verdict is Verdict.DENY
        s.put(g("192.0.2.1"))
        assert control.decide("192.0.2.1").verdict is Verdict.ALLOW
    finally:
        s.close()
        server.stop()
