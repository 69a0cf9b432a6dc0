"""The SQLite store: WAL, several writing processes, locks and damage become StoreError."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from relaygate.control import RelayControl
from relaygate.decision import Verdict
from relaygate.errors import StoreError
from relaygate.grants import Grant
from relaygate.stores import open_store
from relaygate.stores.sqlite import SqliteStore

NOW = float(int(time.time())) + 0.5


def g(ip: str, user: str | None = "alice", opened: float = NOW, ttl: float = 900.0) -> Grant:
    return Grant(ip, user, "example.org", "pop3", opened, opened + ttl)


def test_wal_mode_and_file_modes(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "grants.db"
    store = SqliteStore(path)
    store.put(g("192.0.2.1"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_age_uses_the_expiry_index(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "grants.db")
    store.put(g("192.0.2.1"))
    with sqlite3.connect(tmp_path / "grants.db") as conn:
        plan = " ".join(str(row) for row in conn.execute(
            "EXPLAIN QUERY PLAN DELETE FROM grants WHERE expires_at < ?", (NOW,)))
        assert "grants_expires_at" in plan, plan
        plan = " ".join(str(row) for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM grants WHERE ip = ? AND expires_at >= ?",
            ("192.0.2.1", NOW)))
        assert "USING INDEX" in plan or "PRIMARY KEY" in plan, plan
    store.close()


def _writer(path: str, worker: int, count: int) -> None:
    store = SqliteStore(path)
    for i in range(count):
        store.put(Grant(f"10.{worker}.{i // 256}.{i % 256}", f"user{worker}", None, "pop3",
                        NOW, NOW + 900))
    store.close()


def test_several_processes_write_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "grants.db")  # created by the racing writers themselves
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 200)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    store = SqliteStore(path)
    got = store.list(NOW)
    assert len(got) == 800
    assert {x.user for x in got} == {"user0", "user1", "user2", "user3"}
    assert store.delete_user("user2") == 200
    store.close()


def _first_write(path: str, worker: int) -> None:
    SqliteStore(path).put(Grant(f"10.9.0.{worker}", "u", None, "pop3", NOW, NOW + 900))


def test_a_new_database_first_written_by_many_at_once(tmp_path: Path) -> None:
    # Connections racing to switch a new database to WAL got "database is locked" at
    # once (no busy wait), for a few new databases in a hundred written by 8 threads.
    for n in range(150):
        store = SqliteStore(tmp_path / f"t{n}.db")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda t, s=store: s.put(  # type: ignore[misc]
                Grant(f"10.{t}.0.1", "u", None, "pop3", NOW, NOW + 900)), range(8)))
        assert len(store.list(NOW)) == 8
        store.close()
    # The same across processes (retried until the busy timeout).
    ctx = multiprocessing.get_context("fork")
    for n in range(8):
        path = str(tmp_path / f"p{n}.db")
        procs = [ctx.Process(target=_first_write, args=(path, w)) for w in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 6
        assert len(SqliteStore(path).list(NOW)) == 6


def test_write_lock_held_by_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "grants.db"
    store = SqliteStore(path, busy_timeout=0.05)
    store.put(g("192.0.2.1"))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO grants VALUES ('192.0.2.9', 'x', NULL, 'cli', 0, 0)")
    try:
        with pytest.raises(StoreError, match="locked"):
            store.put(g("192.0.2.2"))
        with pytest.raises(StoreError):
            store.age(NOW)
        # WAL: readers are not blocked by a writer
        assert store.get("192.0.2.1", NOW) is not None
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.put(g("192.0.2.2"))  # recovers once the lock is gone
    assert store.get("192.0.2.2", NOW) is not None
    store.close()


def test_exclusively_locked_database_is_tempfail(tmp_path: Path) -> None:
    path = tmp_path / "grants.db"
    first = SqliteStore(path)
    first.put(g("192.0.2.1"))
    first.close()  # an exclusive lock needs every other connection gone
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("PRAGMA locking_mode = EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    locker.execute("DELETE FROM grants WHERE ip = '192.0.2.77'")
    try:
        store = SqliteStore(path, busy_timeout=0.05)
        with pytest.raises(StoreError):
            store.get("192.0.2.1", NOW)
        d = RelayControl(store).decide("192.0.2.1", NOW)
        assert d.verdict is Verdict.TEMPFAIL and d.kind == "store"
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert store.get("192.0.2.1", NOW) is not None  # reconnects after the failure
    store.close()


def test_truncated_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "grants.db"
    store = SqliteStore(path)
    for i in range(300):
        store.put(g(f"192.0.2.{i % 250}", f"u{i}"))
    store.close()
    data = path.read_bytes() if path.stat().st_size else b""
    wal = Path(f"{path}-wal")
    if wal.exists():
        wal.unlink()
    path.write_bytes(data[:100] + b"\x00\xff" * 2000)
    with pytest.raises(StoreError):
        SqliteStore(path).list(NOW)


def test_thread_connections_are_closed(tmp_path: Path) -> None:
    import threading

    store = SqliteStore(tmp_path / "grants.db")
    threads = [threading.Thread(target=store.put, args=(g(f"192.0.2.{i}"),)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.list(NOW)) == 5
    store.close()
    assert store._connections == []
    assert len(store.list(NOW)) == 5  # usable again after close


def test_open_store_url(tmp_path: Path) -> None:
    store = open_store(f"sqlite://{tmp_path}/x/grants.db")
    assert isinstance(store, SqliteStore)
    store.put(g("2001:db8::1"))
    assert os.path.exists(tmp_path / "x" / "grants.db")
    store.close()


# -- SqliteReader: the non-blocking lookups of the policy service ----------------------


def test_reader_refuses_what_it_must_not_read_or_create(tmp_path: Path) -> None:
    from relaygate.stores.sqlite import SqliteReader

    missing = SqliteReader(tmp_path / "none.db", busy_timeout=0.02)
    with pytest.raises(StoreError):
        missing.get("192.0.2.1", time.time())
    assert not (tmp_path / "none.db").exists()  # never created
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).execute("CREATE TABLE grants (ip TEXT)").connection.commit()
    with pytest.raises(StoreError, match="WAL"):
        SqliteReader(plain, busy_timeout=0.02).get("192.0.2.1", time.time())


def test_reader_batches_share_one_transaction_and_see_changes_after_it(
        tmp_path: Path) -> None:
    from relaygate.grants import Grant
    from relaygate.stores.sqlite import SqliteReader

    store = SqliteStore(tmp_path / "grants.db")
    now = time.time()
    store.put(Grant.opening("192.0.2.1", "alice", None, "pop3", now, 600))
    pending: list[Callable[[], None]] = []
    reader = SqliteReader(store.path, busy_timeout=0.02, end_soon=pending.append)
    try:
        assert reader.get("192.0.2.1", now) is not None
        assert len(pending) == 1 and reader.conn is not None and reader.conn.in_transaction
        store.delete("192.0.2.1")
        assert reader.get("192.0.2.1", now) is not None  # same snapshot within the batch
        assert len(pending) == 1  # one end per batch
        pending.pop()()
        assert reader.get("192.0.2.1", now) is None  # the next batch sees the revocation
        with pytest.raises(sqlite3.OperationalError):
            assert reader.conn is not None
            reader.conn.execute("DELETE FROM grants")  # query_only: it never writes
    finally:
        reader.close()
        store.close()
