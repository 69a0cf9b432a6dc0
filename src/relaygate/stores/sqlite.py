"""SQLite grant store: the embedded default.

Theory of operation
-------------------
One table, one row per client address::

    grants(ip TEXT PRIMARY KEY, user, domain, source, opened_at REAL, expires_at REAL)

with an index on ``expires_at`` so ``age()`` is a range delete that costs
what expired, not what exists, and an index on ``user`` so
``revoke --user`` does not scan. ``put`` is ``INSERT OR REPLACE`` (a new login
refreshes the window); ``get`` filters ``expires_at >= now`` so an expired
row is never returned even before it is aged out.

Several processes (the servers, ``relay-ctrl-allow`` chain programs, the
CLI, cron's ``relaygate age``) may write at once: the database runs in WAL
mode (readers never block writers, https://sqlite.org/wal.html) with a busy
timeout, so a writer waits for the lock instead of failing. Each thread gets
its own connection (``asyncio.to_thread`` calls come from a pool of threads);
``synchronous=NORMAL`` is enough because a lost window after a power cut only
means the user logs in again.

The database file is created mode 0600 (WAL and shared-memory files inherit
it) and its parent directories 0700. Every ``sqlite3.Error`` (locked beyond
the busy timeout, unreadable, not a database) and every ``OSError`` becomes
:class:`StoreError`, which callers turn into TEMPFAIL.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable

from relaygate.addresses import require_canonical
from relaygate.errors import StoreError
from relaygate.grants import Grant

#: How long a writer waits for another process's lock before giving up (TEMPFAIL):
#: long enough to ride out a burst of logins, short enough for an SMTP client to wait.
DEFAULT_BUSY_TIMEOUT = 5.0

#: Bytes of the database read through mmap: lookups then cost no read(2) and no copy
#: into each connection's page cache (a million grants is about 100 MB).
MMAP_SIZE = 256 * 1024 * 1024

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS grants ("
    " ip TEXT PRIMARY KEY,"
    " user TEXT,"
    " domain TEXT,"
    " source TEXT NOT NULL,"
    " opened_at REAL NOT NULL,"
    " expires_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS grants_expires_at ON grants(expires_at)",
    "CREATE INDEX IF NOT EXISTS grants_user ON grants(user)",
)

# Whole statements as constants: every value is a bound parameter, never formatted in.
_INSERT = (
    "INSERT OR REPLACE INTO grants (ip, user, domain, source, opened_at, expires_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_GET = (
    "SELECT ip, user, domain, source, opened_at, expires_at FROM grants"
    " WHERE ip = ? AND expires_at >= ?"
)
_LIST = (
    "SELECT ip, user, domain, source, opened_at, expires_at FROM grants"
    " WHERE expires_at >= ? ORDER BY opened_at, ip"
)



def _make_private_dirs(path: str) -> None:
    """mkdir -p with every created level 0700 (os.makedirs applies mode to the last only)."""
    if not path or os.path.isdir(path):
        return
    _make_private_dirs(os.path.dirname(os.path.abspath(path)))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


def _grant(row: tuple[str, str | None, str | None, str, float, float]) -> Grant:
    return Grant(row[0], row[1], row[2], row[3], row[4], row[5])


class SqliteStore:
    """Grants in an SQLite database file (see the module docstring)."""

    kind = "sqlite"

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    ) -> None:
        self.path = os.fspath(path)
        self.busy_timeout = float(busy_timeout)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._init_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._schema_ready = False

    # -- connections -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        _make_private_dirs(os.path.dirname(self.path))
        if self.path != ":memory:" and not os.path.exists(self.path):
            # create it 0600 ourselves: sqlite would use 0644 minus the umask
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,  # autocommit: every statement is its own transaction
            check_same_thread=False,  # close() may run in another thread
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if not self._schema_ready:
                with self._init_lock:
                    if not self._schema_ready:
                        self._initialise(conn)
                        self._schema_ready = True
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _initialise(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the schema, once per store object.

        One thread at a time (``_init_lock``): connections of this process racing to
        switch a new database to WAL made SQLite answer "database is locked" at once,
        without waiting for the busy timeout (measured: 11-13 of 200 new databases
        first written by 8 threads at once). Other processes doing the same at the
        same moment cause the same answer (3 of 180 processes, 6 at a time), so a
        locked database is retried here, up to the busy timeout.
        """
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    raise StoreError(f"sqlite {self.path}: cannot switch to WAL mode ({mode})")
                for statement in _SCHEMA:
                    conn.execute(statement)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _fail(self, what: str, exc: Exception) -> StoreError:
        # A failed connection may be in a bad state: drop it, reconnect next time.
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)
            try:
                conn.close()
            except sqlite3.Error:
                pass
        return StoreError(f"sqlite {self.path}: {what}: {exc}")

    # -- GrantStore ------------------------------------------------------------------

    def put(self, grant: Grant) -> None:
        ip = require_canonical(grant.ip)
        try:
            self._conn().execute(
                _INSERT,
                (ip, grant.user, grant.domain, grant.source, grant.opened_at, grant.expires_at),
            )
        except (sqlite3.Error, OSError) as exc:
            raise self._fail(f"cannot store grant for {ip}", exc) from None

    def get(self, ip: str, now: float) -> Grant | None:
        ip = require_canonical(ip)
        try:
            row = self._conn().execute(_GET, (ip, now)).fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise self._fail(f"cannot read grant for {ip}", exc) from None
        return None if row is None else _grant(row)

    def delete(self, ip: str) -> bool:
        ip = require_canonical(ip)
        try:
            cur = self._conn().execute("DELETE FROM grants WHERE ip = ?", (ip,))
        except (sqlite3.Error, OSError) as exc:
            raise self._fail(f"cannot delete grant for {ip}", exc) from None
        return cur.rowcount > 0

    def delete_user(self, user: str) -> int:
        try:
            cur = self._conn().execute("DELETE FROM grants WHERE user = ?", (user,))
        except (sqlite3.Error, OSError) as exc:
            raise self._fail(f"cannot delete grants of {user}", exc) from None
        return cur.rowcount

    def age(self, now: float) -> int:
        """Delete the rows with ``expires_at < now`` (an index range); return how many."""
        try:
            cur = self._conn().execute("DELETE FROM grants WHERE expires_at < ?", (now,))
        except (sqlite3.Error, OSError) as exc:
            raise self._fail("cannot age grants", exc) from None
        return cur.rowcount

    def list(self, now: float) -> list[Grant]:
        try:
            rows = self._conn().execute(_LIST, (now,)).fetchall()
        except (sqlite3.Error, OSError) as exc:
            raise self._fail("cannot list grants", exc) from None
        return [_grant(r) for r in rows]

    def close(self) -> None:
        """Close every thread's connection; a later call reconnects."""
        with self._lock:
            conns, self._connections = self._connections, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()


class SqliteReader:
    """Read-only grant lookups through a connection of their own (``get`` only).

    For a caller that must not wait: the policy service looks grants up on its
    event loop with a busy timeout of milliseconds instead of the store's
    seconds, and hands a lookup that fails here to the store itself. Same query
    and row mapping as :class:`SqliteStore` (the two cannot disagree);
    ``query_only`` is set, so it never writes. It opens the file without
    creating it (``mode=rw``) and only if it is in WAL mode, the mode the store
    sets on its first connection, where a reader never waits for a writer
    (https://sqlite.org/wal.html); anything else is a StoreError.

    ``end_soon``, when given, batches lookups: the first lookup of a batch
    begins a read transaction and calls ``end_soon(self.end)`` (the policy
    service passes the event loop's ``call_soon``), so the lookups made before
    it runs share one transaction and SQLite takes its file locks once per
    batch instead of once per lookup (two fcntl(2) and an fstat(2) each,
    measured with strace). Without it every lookup is its own transaction.
    Nothing is remembered between transactions: a window revoked meanwhile is
    seen by the next one. A reader serves one thread at a time (the policy
    service's event loop).
    """

    kind = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float,
                 end_soon: Callable[[Callable[[], None]], object] | None = None) -> None:
        self.path = os.fspath(path)
        self.busy_timeout = float(busy_timeout)
        self.end_soon = end_soon
        self.conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=rw"
        conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout,
                               isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA query_only = 1")
            conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
            mode = conn.execute("PRAGMA journal_mode").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise sqlite3.OperationalError(f"not in WAL mode ({mode})")
        except BaseException:
            conn.close()
            raise
        return conn

    def get(self, ip: str, now: float) -> Grant | None:
        """The live grant for canonical ``ip``; StoreError when it cannot be read."""
        try:
            conn = self.conn
            if conn is None:
                conn = self.conn = self._connect()
            if self.end_soon is None:
                row = conn.execute(_GET, (ip, now)).fetchone()
            else:
                if not conn.in_transaction:
                    # The end is scheduled first: no transaction can outlive the batch.
                    self.end_soon(self.end)
                    conn.execute("BEGIN")
                row = conn.execute(_GET, (ip, now)).fetchone()
        except (sqlite3.Error, OSError) as exc:
            self.close()  # a broken connection is not reused
            raise StoreError(f"sqlite {self.path}: cannot read grant for {ip}: {exc}") from None
        return None if row is None else _grant(row)

    def end(self) -> None:
        """End the batch's read transaction (``end_soon`` calls it)."""
        conn = self.conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error:
                self.close()

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
