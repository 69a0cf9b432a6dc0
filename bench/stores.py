"""Benchmark of the grant stores: lookups, allows (puts) and aging, side by side.

Usage: ``python bench/stores.py [--quick]``. Prints tables, never asserts.

Per store (sqlite, redis, spool, memory) and size (10k and 1M grants; the
spool at 10k and 100k files):

- lookup p50/p99 in microseconds: ``get()`` of random live addresses (hits),
  and the p50 of misses (most SMTP clients have no window);
- allow throughput: ``put()`` calls per second, refreshing random existing
  grants in a store of that size;
- ``age()`` time with 1% of the grants expired (median of 3 runs; the expired
  1% is planted again between runs).

Setup does not go through ``put()`` where that would be slow: SQLite is filled
with one ``executemany`` transaction, Redis by a server-side Lua loop writing
the store's own key layout; the spool and memory stores are filled with
``put()``. Redis is a private ``redis-server`` on a free loopback port with no
persistence. Then the spool's ``age()`` is compared with
``find DIR -type f -mmin +15 -delete`` on an identical directory in the same
run (1% and 10% of 100k files expired, median of 3), and everything is
checked against the targets of issue 2.

All work happens in a temporary directory under /tmp, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import redis as redis_py

from relaygate.grants import Grant
from relaygate.stores.base import GrantStore
from relaygate.stores.memory import MemoryStore
from relaygate.stores.redis import RedisStore
from relaygate.stores.spool import SpoolStore
from relaygate.stores.sqlite import SqliteStore

EXPIRY = 900.0
#: share of grants expired when age() is measured
EXPIRED_SHARE = 0.01
#: age() repetitions (median)
AGE_RUNS = 3
#: rounds of lookups; p50 and p99 are the medians over the rounds (a shared machine has bursts)
LOOKUP_ROUNDS = 3

# Targets from issue 2, part 8.
TARGET_SQLITE_P99_US = 100.0
TARGET_AGE_S = 1.0
TARGET_SPOOL_VS_FIND = 2.0

#: expired shares for the spool-versus-find comparison: the routine cron run, and a backlog
FIND_SHARES = (0.01, 0.10)


def ip_of(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def miss_ip_of(i: int) -> str:
    return f"172.{16 + ((i >> 16) & 15)}.{(i >> 8) & 255}.{i & 255}"


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


# -- a private redis-server ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server(workdir: Path) -> Iterator[int]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--daemonize", "no", "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- fills (setup, not measured) -------------------------------------------------------

_REDIS_FILL = """
local prefix = ARGV[1]
local first = tonumber(ARGV[2])
local last = tonumber(ARGV[3])
local dead_every = tonumber(ARGV[8])
for i = first, last do
  local ip = '10.' .. (math.floor(i / 65536) % 256) .. '.' .. (math.floor(i / 256) % 256)
             .. '.' .. (i % 256)
  local exp, exp_ms = ARGV[5], ARGV[6]
  if i % dead_every == 0 then exp, exp_ms = ARGV[7], ARGV[9] end
  local k = prefix .. ip
  local user = 'user' .. (i % 1000)
  redis.call('HSET', k, 'user', user, 'domain', 'example.org', 'source', 'bench',
             'opened_at', ARGV[4], 'expires_at', exp)
  redis.call('PEXPIREAT', k, exp_ms)
  redis.call('ZADD', prefix .. '@expiry', exp, ip)
  redis.call('SADD', prefix .. '@user:' .. user, ip)
  redis.call('PEXPIREAT', prefix .. '@user:' .. user, ARGV[6])
end
return last - first + 1
"""


class Plan:
    """Timestamps of one store's run: most grants live, 1% expired at ``age_now``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.base = time.time()
        self.opened = self.base
        self.live_until = self.base + 3600.0  # outlives the run: Redis must not expire them
        self.dead_until = self.base + 600.0  # expired at age_now, still present in Redis
        self.age_now = self.base + 1200.0
        self.dead_every = int(1 / EXPIRED_SHARE)

    def dead(self, i: int) -> bool:
        return i % self.dead_every == 0

    def grant(self, i: int) -> Grant:
        exp = self.dead_until if self.dead(i) else self.live_until
        return Grant(ip_of(i), f"user{i % 1000}", "example.org", "bench", self.opened, exp)

    def live_ips(self, k: int, rng: random.Random) -> list[str]:
        out: list[str] = []
        while len(out) < k:
            i = rng.randrange(self.n)
            if not self.dead(i):
                out.append(ip_of(i))
        return out


def fill_sqlite(path: Path, plan: Plan) -> None:
    store = SqliteStore(path)
    store.age(0.0)  # connects: creates the file and the schema
    store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    rows = ((g.ip, g.user, g.domain, g.source, g.opened_at, g.expires_at)
            for g in map(plan.grant, range(plan.n)))
    conn.executemany("INSERT OR REPLACE INTO grants VALUES (?, ?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def fill_redis(client: redis_py.Redis, prefix: str, plan: Plan) -> None:
    fill = client.register_script(_REDIS_FILL)
    step = 50_000
    for first in range(0, plan.n, step):
        last = min(plan.n, first + step) - 1
        fill(args=[prefix, first, last, repr(plan.opened), repr(plan.live_until),
                   int(plan.live_until * 1000), repr(plan.dead_until), plan.dead_every,
                   int(plan.dead_until * 1000)])


def fill_memory(store: MemoryStore, plan: Plan) -> None:
    grants = store._grants  # setup only: a million put() calls would measure nothing new
    for i in range(plan.n):
        g = plan.grant(i)
        grants[g.ip] = g


def write_grant_file(path: str, i: int, mtime: float) -> None:
    """What SpoolStore.put writes (relay-ctrl's format), without its temp file and rename."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, f"USER=user{i % 1000}\0DOMAIN=example.org\0".encode())
    os.utime(fd, (mtime, mtime))
    os.close(fd)


def fill_spool(directory: Path, plan: Plan) -> None:
    for i in range(plan.n):
        write_grant_file(f"{directory}/{ip_of(i)}", i, plan.grant(i).expires_at - EXPIRY)


def replant_expired(store: GrantStore, plan: Plan) -> None:
    for i in range(0, plan.n, plan.dead_every):
        store.put(plan.grant(i))


# -- measurements ----------------------------------------------------------------------------


class Row:
    def __init__(self, store: str, n: int) -> None:
        self.store = store
        self.n = n
        self.p50 = self.p99 = self.miss_p50 = 0.0
        self.puts_per_s = 0.0
        self.age_s = 0.0
        self.aged = 0


def measure(store: GrantStore, plan: Plan, row: Row, lookups: int, puts: int,
            refill: Callable[[], None]) -> None:
    rng = random.Random(1)
    now = plan.base + 1.0
    get = store.get
    p50s: list[float] = []
    p99s: list[float] = []
    for _ in range(LOOKUP_ROUNDS):
        lat: list[float] = []
        for ip in plan.live_ips(lookups, rng):
            t0 = time.perf_counter_ns()
            g = get(ip, now)
            lat.append((time.perf_counter_ns() - t0) / 1000)
            if g is None:
                raise SystemExit(f"{store.kind}: lookup of {ip} missed")
        p50s.append(pct(lat, 0.50))
        p99s.append(pct(lat, 0.99))
    row.p50, row.p99 = statistics.median(p50s), statistics.median(p99s)
    miss: list[float] = []
    for i in range(min(lookups, 5000)):
        ip = miss_ip_of(i)
        t0 = time.perf_counter_ns()
        get(ip, now)
        miss.append((time.perf_counter_ns() - t0) / 1000)
    row.miss_p50 = pct(miss, 0.50)

    grants = [plan.grant(rng.randrange(plan.n)) for _ in range(puts)]
    put = store.put
    start = time.perf_counter()
    for g in grants:
        put(g)
    row.puts_per_s = puts / (time.perf_counter() - start)

    times: list[float] = []
    for run in range(AGE_RUNS):
        if run:
            refill()
        start = time.perf_counter()
        row.aged = store.age(plan.age_now)
        times.append(time.perf_counter() - start)
    row.age_s = statistics.median(times)


# -- the spool against find(1) -------------------------------------------------------------------


def spool_vs_find(
    work: Path, master: Path, shares: tuple[float, ...], runs: int, started: float
) -> list[tuple[float, int, int, float, float]]:
    """Median seconds of SpoolStore.age() and of find -delete on two identical directories.

    Directories A and B are hard-link copies of ``master`` (the spool the store
    benchmark filled), so they hold the same names, inodes and mtimes, and
    neither tool's unlink frees an inode (that kernel work is the same for both
    and is left out). For each run the chosen share is made two hours old, A is
    aged by SpoolStore.age() and B by find, alternating who goes first, and the
    deleted names are linked again for the next run.
    """
    names = sorted(os.listdir(master))
    fresh = time.time() - 60
    for name in names:
        os.utime(f"{master}/{name}", (fresh, fresh))
    a, b = work / "find-a", work / "find-b"
    for d in (a, b):
        d.mkdir(mode=0o700)
        for name in names:
            os.link(f"{master}/{name}", f"{d}/{name}")
    store = SpoolStore(a, expiry=EXPIRY)
    results = []
    for share in shares:
        old = names[:: max(1, round(1 / share))]
        stale = time.time() - 7200
        for name in old:
            os.utime(f"{master}/{name}", (stale, stale))
        ours: list[float] = []
        theirs: list[float] = []
        for run in range(runs):

            def age_ours(expected: int = len(old)) -> float:
                t0 = time.perf_counter()
                removed = store.age(time.time())
                dt = time.perf_counter() - t0
                if removed != expected:
                    raise SystemExit(f"spool age removed {removed}, expected {expected}")
                return dt

            def age_find() -> float:
                t0 = time.perf_counter()
                subprocess.run(["find", str(b), "-type", "f", "-mmin",
                                f"+{int(EXPIRY // 60)}", "-delete"], check=True)
                return time.perf_counter() - t0

            if run % 2:
                theirs.append(age_find())
                ours.append(age_ours())
            else:
                ours.append(age_ours())
                theirs.append(age_find())
            left_a, left_b = len(os.listdir(a)), len(os.listdir(b))
            if left_a != left_b or left_a != len(names) - len(old):
                raise SystemExit(f"spool age left {left_a} files, find left {left_b}")
            for d in (a, b):
                for name in old:
                    os.link(f"{master}/{name}", f"{d}/{name}")
        fresh = time.time() - 60
        for name in old:
            os.utime(f"{master}/{name}", (fresh, fresh))
        results.append((share, len(names), len(old), statistics.median(ours),
                        statistics.median(theirs)))
        print(f"  .. spool vs find {share:.0%} done ({time.perf_counter() - started:.0f}s)",
              file=sys.stderr)
    return results


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    args = ap.parse_args()
    quick = args.quick
    big = 100_000 if quick else 1_000_000
    spool_big = 20_000 if quick else 100_000
    small = 10_000
    lookups = 2_000 if quick else 10_000
    puts = 2_000 if quick else 5_000
    find_runs = 1 if quick else 3

    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="relaygate-bench-", dir="/tmp"))
    started = time.perf_counter()
    try:
        with redis_server(work) as port:
            client = redis_py.Redis(host="127.0.0.1", port=port)
            for n in (small, big):
                # sqlite
                plan = Plan(n)
                db = work / f"sqlite{n}" / "grants.db"
                fill_sqlite(db, plan)
                sq = SqliteStore(db)
                row = Row("sqlite", n)
                measure(sq, plan, row, lookups, puts, partial(replant_expired, sq, plan))
                sq.close()
                rows.append(row)
                shutil.rmtree(db.parent)
                report_progress(row, started)

                # redis
                plan = Plan(n)
                prefix = f"bench{n}:"
                fill_redis(client, prefix, plan)
                rs = RedisStore.from_url(f"redis://127.0.0.1:{port}/0?prefix={prefix}")
                row = Row("redis", n)
                measure(rs, plan, row, lookups, puts, partial(replant_expired, rs, plan))
                rs.close()
                client.flushall()
                rows.append(row)
                report_progress(row, started)

                # memory
                plan = Plan(n)
                mem = MemoryStore()
                fill_memory(mem, plan)
                row = Row("memory", n)
                measure(mem, plan, row, lookups, puts,
                        partial(replant_expired, mem, plan))
                del mem
                rows.append(row)
                report_progress(row, started)

            for n in (small, spool_big):
                plan = Plan(n)
                d = work / f"spool{n}"
                d.mkdir(mode=0o700)
                sp = SpoolStore(d, expiry=EXPIRY)
                # spool mtimes are real: aim "now" and age_now at wall-clock times
                plan.opened = plan.base
                plan.live_until = plan.base + EXPIRY
                plan.dead_until = plan.base - 10.0
                plan.age_now = plan.base + 5.0
                fill_spool(d, plan)
                row = Row("spool", n)
                measure(sp, plan, row, lookups, puts, partial(replant_expired, sp, plan))
                rows.append(row)
                report_progress(row, started)
                if n == spool_big:
                    replant_expired(sp, plan)  # back to n files: the master for the find runs
                    master = d
                else:
                    shutil.rmtree(d)
            client.close()

        comparisons = spool_vs_find(work, master, FIND_SHARES, find_runs, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print_tables(rows, comparisons, quick, time.perf_counter() - started)


def report_progress(row: Row, started: float) -> None:
    print(f"  .. {row.store} {row.n} done ({time.perf_counter() - started:.0f}s)",
          file=sys.stderr)


def print_tables(rows: list[Row], comparisons: list[tuple[float, int, int, float, float]],
                 quick: bool, elapsed: float) -> None:
    mode = " (--quick)" if quick else ""
    print(f"relaygate store benchmark{mode}: python {sys.version.split()[0]}, "
          f"sqlite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, {elapsed:.0f}s, "
          f"load average {os.getloadavg()[0]:.1f}")
    print()
    head = (f"{'store':<7} {'grants':>9} {'get p50 us':>11} {'get p99 us':>11} "
            f"{'miss p50 us':>12} {'puts/s':>9} {'age 1% ms':>10} {'aged':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.store:<7} {r.n:>9,} {r.p50:>11.1f} {r.p99:>11.1f} {r.miss_p50:>12.1f} "
              f"{r.puts_per_s:>9,.0f} {r.age_s * 1000:>10.1f} {r.aged:>7,}")
    print()
    head = (f"{'spool aging':<24} {'files':>8} {'expired':>8} {'age() s':>9} {'find s':>8} "
            f"{'ratio':>6}")
    print(head)
    print("-" * len(head))
    for _share, files, old, ours, theirs in comparisons:
        print(f"{'vs find -mmin -delete':<24} {files:>8,} {old:>8,} {ours:>9.3f} "
              f"{theirs:>8.3f} {ours / theirs:>6.2f}")
    print()

    def by(store: str) -> Row:
        return max((r for r in rows if r.store == store), key=lambda r: r.n)

    sq, rd = by("sqlite"), by("redis")
    targets = [
        (f"sqlite get p99 at {sq.n:,} (us)", sq.p99, TARGET_SQLITE_P99_US),
        (f"sqlite age {sq.aged:,} of {sq.n:,} (s)", sq.age_s, TARGET_AGE_S),
        (f"redis age {rd.aged:,} of {rd.n:,} (s)", rd.age_s, TARGET_AGE_S),
    ]
    for share, _files, _old, ours, theirs in comparisons:
        targets.append((f"spool age / find, {share:.0%} expired", ours / theirs,
                        TARGET_SPOOL_VS_FIND))
    head = f"{'target':<36} {'measured':>9} {'limit':>7} {'ratio':>6}  verdict"
    print(head)
    print("-" * len(head))
    for name, measured, limit in targets:
        ratio = measured / limit
        print(f"{name:<36} {measured:>9.3f} {limit:>7.1f} {ratio:>6.2f}  "
              f"{'meets' if ratio <= 1 else 'MISSES'}")
    if quick:
        print("\n(--quick: sizes are smaller than the targets name; run without it to judge them)")


if __name__ == "__main__":
    main()
