"""Fixtures shared by the store tests: one factory per backend.

``make_store(kind)`` builds a fresh, empty store of that kind in the test's
temporary directory (Redis: the session server with a unique key prefix).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relaygate.stores.base import GrantStore
from relaygate.stores.memory import MemoryStore
from relaygate.stores.redis import RedisStore
from relaygate.stores.spool import SpoolStore
from relaygate.stores.sqlite import SqliteStore

#: The store's window length in these tests; grants use it so the spool (which
#: stores mtime = expires_at - expiry) reads opened_at back exactly.
EXPIRY = 900.0

BACKENDS = ("memory", "spool", "sqlite", "redis")

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
        elif kind == "redis":
            server = request.getfixturevalue("redis_server")
            prefix = f"test{os.getpid()}:{next(_prefixes)}:"
            store = RedisStore.from_url(f"{server.url}?prefix={prefix}")
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
