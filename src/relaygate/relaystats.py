"""Who still relays through a window: per-account counters for the migration report.

Theory of operation
-------------------
POP/IMAP-before-SMTP is a bridge that sites want to leave for SMTP AUTH
(RFC 4954). To know whom to move, an admin needs, per account, how many
messages each *basis* let through lately and when each was last used:

- ``window``: an open relay window (a POP3/IMAP login, ``relaygate allow``,
  or ``RELAYCLIENT`` set by ``relay-ctrl-check`` for a user);
- ``auth``: an SMTP AUTH session;
- ``rule``: a static rule (the rules file, or ``RELAYCLIENT`` from tcprules).

:func:`count_relayed` is the one place that counts: ``serve``'s SMTP handler
calls it for each accepted relayed message, the policy and socketmap services
for each ``OK`` answer (the MTA asks once per recipient, so there it counts
relayed recipients). It only adds to a dictionary in memory under a lock, so it costs
the hot path about a microsecond; a daemon thread writes the sums every
:data:`FLUSH_INTERVAL` seconds (and once more at exit) into
``<data-dir>/relaystats.db``::

    counts(account TEXT, basis TEXT, day TEXT, n INTEGER, last REAL,
           PRIMARY KEY (account, basis, day))

``day`` is the UTC date (``YYYY-MM-DD``), ``last`` the epoch time of the last
message that day. An account is the login the window or session belongs to;
a window or rule with no user is counted under the client address in
brackets (``[192.0.2.7]``), so a shared NAT address shows up as one account.
Rows older than :data:`KEEP_DAYS` are pruned. A write that fails (disk full,
read-only data directory) is logged once and the sums are kept for the next
try: counting never affects relaying. A SIGKILL loses at most the last
interval's counts.

``relaygate report`` (:func:`read_report`) reads the file and never creates
it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relaygate.context import Context

log = logging.getLogger("relaygate.relaystats")

#: the counters' file in the data directory
STATS_FILE = "relaystats.db"
#: seconds between writes: the report is about days, not seconds
FLUSH_INTERVAL = 10.0
#: days of history kept (a year and a bit: enough to see a migration through)
KEEP_DAYS = 400
#: seconds an SQLite write waits for another process's lock (serve and policyd may share)
BUSY_TIMEOUT = 5.0
#: distinct (account, basis, day) keys kept in memory while writes fail; beyond, new keys
#: are dropped (a broken disk must not turn into unbounded memory)
MAX_PENDING_KEYS = 100_000

BASES = ("window", "auth", "rule")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counts (
    account TEXT NOT NULL,
    basis TEXT NOT NULL,
    day TEXT NOT NULL,
    n INTEGER NOT NULL,
    last REAL NOT NULL,
    PRIMARY KEY (account, basis, day)
)
"""


def basis_of(kind: str, user: str | None) -> str | None:
    """The report's basis for a relay decision or SMTP authority ``kind``; None if not relay."""
    if kind == "grant":
        return "window"
    if kind == "auth":
        return "auth"
    if kind == "rule":
        return "rule"
    if kind == "env":
        # RELAYCLIENT from the environment: relay-ctrl-check names the window's user;
        # tcprules set it for an address.
        return "window" if user else "rule"
    return None


def count_relayed(ctx: Context, kind: str, user: str | None, ip: str | None,
                  n: int = 1) -> None:
    """Count ``n`` relayed messages (or policy OKs) of ``user`` from ``ip`` on ``kind``.

    ``ctx`` is the servers' Context: its data directory names the file, and
    the counter lives in ``ctx.relay_stats`` (one per running process and data
    directory). Never raises: counting must not affect relaying.
    """
    try:
        basis = basis_of(kind, user)
        if basis is None:
            return
        stats = ctx.relay_stats
        if stats is None:
            stats = ctx.relay_stats = RelayStats.for_data_dir(ctx.settings.data_dir)
        if isinstance(stats, RelayStats):
            stats.add(user or f"[{ip or 'unknown'}]", basis, n)
    except Exception:  # pragma: no cover - a counter bug must never refuse mail
        log.exception("relay statistics: cannot count")


@dataclass
class _Pending:
    n: int = 0
    last: float = 0.0


class RelayStats:
    """In-memory sums written to ``relaystats.db`` by a daemon thread."""

    _by_path: dict[Path, RelayStats] = {}
    _registry_lock = threading.Lock()

    def __init__(self, path: Path, *, interval: float = FLUSH_INTERVAL) -> None:
        self.path = path
        self.interval = interval
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str, str], _Pending] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False
        #: the current UTC day and when it ends (strftime once a day, not per message)
        self._day = ""
        self._day_end = 0.0

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> RelayStats | bool:
        """The process's one counter for this data directory (flushed at exit).

        False when the data directory does not exist: a policyd that keeps its
        windows elsewhere (spool, Redis) must not invent one in its working
        directory; counting is then off (logged once).
        """
        if not Path(data_dir).is_dir():
            log.info("relay statistics off: no data directory %s", Path(data_dir).absolute())
            return False
        path = (Path(data_dir) / STATS_FILE).absolute()
        with cls._registry_lock:
            stats = cls._by_path.get(path)
            if stats is None:
                stats = cls._by_path[path] = cls(path)
                atexit.register(stats.flush)
            return stats

    def add(self, account: str, basis: str, n: int = 1, now: float | None = None) -> None:
        t = time.time() if now is None else now
        with self._lock:
            if not self._day_end - 86400 <= t < self._day_end:
                self._day = time.strftime("%Y-%m-%d", time.gmtime(t))
                self._day_end = (t // 86400 + 1) * 86400
            key = (account, basis, self._day)
            item = self._pending.get(key)
            if item is None:
                if len(self._pending) >= MAX_PENDING_KEYS:
                    return
                item = self._pending[key] = _Pending()
            item.n += n
            item.last = max(item.last, t)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="relaygate-relaystats",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write the sums so far; on failure keep them for the next try (logged once)."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            with contextlib.closing(_connect(self.path, create=True)) as db, db:
                db.executemany(
                    "INSERT INTO counts (account, basis, day, n, last) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (account, basis, day) DO UPDATE SET n = n + excluded.n, "
                    "last = max(last, excluded.last)",
                    [(a, b, d, p.n, p.last) for (a, b, d), p in batch.items()])
                cutoff = time.strftime("%Y-%m-%d", time.gmtime(time.time() - KEEP_DAYS * 86400))
                db.execute("DELETE FROM counts WHERE day < ?", (cutoff,))
        except (sqlite3.Error, OSError) as exc:
            if not self._failed:
                log.warning("relay statistics: cannot write %s (%s); counts kept in memory",
                            self.path, exc)
                self._failed = True
            with self._lock:
                for key, p in batch.items():
                    item = self._pending.setdefault(key, _Pending())
                    item.n += p.n
                    item.last = max(item.last, p.last)
            return
        self._failed = False


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    if create:
        uri = f"file:{path}?mode=rwc"
    else:
        uri = f"file:{path}?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT)
    if create:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(_SCHEMA)
    return db


@dataclass
class AccountUsage:
    """One line of the report: an account's relayed counts by basis and last uses."""

    account: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BASES, 0))
    last: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(BASES))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def window_share(self) -> float:
        """The part of this account's relayed mail that still needed a window (0..1)."""
        return self.counts["window"] / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"account": self.account, "counts": dict(self.counts), "total": self.total,
                "window_share": round(self.window_share, 4), "last": dict(self.last)}


class NoStatistics(Exception):
    """There is no statistics file (nothing relayed yet, or the wrong data directory)."""


def read_report(data_dir: Path, *, since_days: float | None = None,
                now: float | None = None) -> list[AccountUsage]:
    """Accounts with relayed mail in the last ``since_days`` days (all when None).

    Sorted by how much they still depend on windows: most window-relayed
    messages first, then the larger window share, then the name. ``last``
    is the last use of each basis over the whole history kept. Raises
    NoStatistics when the file does not exist (it is never created here).
    """
    path = Path(data_dir) / STATS_FILE
    if not path.is_file():
        raise NoStatistics(str(path.absolute()))
    t = time.time() if now is None else now
    first_day = "0000-00-00"
    if since_days is not None:
        first_day = time.strftime("%Y-%m-%d", time.gmtime(t - since_days * 86400))
    usage: dict[str, AccountUsage] = {}
    with contextlib.closing(_connect(path, create=False)) as db:
        rows = db.execute("SELECT account, basis, day, n, last FROM counts").fetchall()
    recent = {account for account, _b, day, _n, _l in rows if day >= first_day}
    for account, basis, day, n, last in rows:
        if account not in recent or basis not in BASES:
            continue
        u = usage.setdefault(account, AccountUsage(account))
        if day >= first_day:
            u.counts[basis] += int(n)
        before = u.last[basis]
        u.last[basis] = last if before is None else max(before, last)
    return sorted(usage.values(),
                  key=lambda u: (-u.counts["window"], -u.window_share, u.account))
