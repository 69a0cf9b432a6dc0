"""IMAP mailbox benchmark: FETCH throughput and its scaling, SELECT with stale UID entries.

Usage: ``python bench/imap.py [--quick]``. Prints a table, never asserts.

The real IMAP service (``relaygate.servers.imap``) runs in this process on its
own event loop in a thread, on a loopback port, over a temporary Maildir; the
client is imaplib in the main thread. Measured, medians of several rounds:

1. ``FETCH 1:* BODY.PEEK[]`` of N x 10 KB messages (N = 1000 and 4000; 500 and
   2000 with ``--quick``), each round a fresh login + SELECT; MB/s and the time
   ratio of the large to the small mailbox (linear: 4.0; target <= 5).
2. SELECT of a mailbox whose ``dovecot-uidlist`` still lists 1000 messages
   that were deleted behind its back (as POP3 DELE does): the first SELECT
   (which prunes) and the next ones (target <= 0.1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from relaygate.config import ImapSettings, Settings
from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.interfaces import Account
from relaygate.mail.directory import StaticDirectory
from relaygate.mail.maildir import deliver, ensure_maildir
from relaygate.metrics import Metrics
from relaygate.servers.imap import service as imap_service
from relaygate.stores.memory import MemoryStore

PASSWORD = "bench-password"
MSG_SIZE = 10 * 1024


def message(i: int) -> bytes:
    head = (f"From: a@example.test\r\nTo: u@example.test\r\nSubject: bench {i}\r\n"
            f"Message-ID: <{i}@bench.example.test>\r\n\r\n").encode()
    line = b"x" * 70 + b"\r\n"
    body = line * ((MSG_SIZE - len(head)) // len(line) + 1)
    return head + body[:MSG_SIZE - len(head)]


class Server:
    def __init__(self, tmp: Path) -> None:
        self.directory = StaticDirectory()
        self.tmp = tmp
        settings = Settings(data_dir=tmp / "data", hostname="imap.bench.test",
                            imap=ImapSettings(listen=("127.0.0.1:0",), listen_tls=()))
        ctx = Context(settings, RelayControl(MemoryStore(), expiry=900.0), Metrics(),
                      self.directory)
        self.service = imap_service.make_service(ctx)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def user(self, name: str) -> Path:
        path = self.tmp / "mail" / name
        ensure_maildir(path)
        self.directory.add(Account(name, "bench.test", path), PASSWORD)
        return path

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def __enter__(self) -> Server:
        self.thread.start()
        self.call(self.service.start())
        self.port = self.service.bound_ports()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.service.stop(2.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def login(port: int, user: str) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", port)
    imap.login(user, PASSWORD)
    return imap


def fetch_all(port: int, user: str) -> tuple[float, int]:
    imap = login(port, user)
    try:
        imap.select("INBOX")
        start = time.perf_counter()
        typ, data = imap.fetch("1:*", "(BODY.PEEK[])")
        elapsed = time.perf_counter() - start
        assert typ == "OK", data
        got = sum(len(item[1]) for item in data if isinstance(item, tuple))
        return elapsed, got
    finally:
        imap.logout()


def select_time(port: int, user: str) -> float:
    imap = login(port, user)
    try:
        start = time.perf_counter()
        typ, _ = imap.select("INBOX")
        elapsed = time.perf_counter() - start
        assert typ == "OK"
        return elapsed
    finally:
        imap.logout()


def fmt(values: list[float], unit: str, scale: float = 1.0) -> str:
    return (f"{statistics.median(values) * scale:.3g} {unit} "
            f"[{min(values) * scale:.3g}-{max(values) * scale:.3g}]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    small, large = (500, 2000) if args.quick else (1000, 4000)
    rounds = 3 if args.quick else 5
    tmp = Path(tempfile.mkdtemp(prefix="relaygate-bench-imap-"))
    rows: list[tuple[str, str, str, str, str]] = []
    try:
        with Server(tmp) as server:
            times: dict[int, list[float]] = {}
            for n in (small, large):
                root = server.user(f"u{n}")
                for i in range(n):
                    deliver(root, message(i), subdir="new")
                fetch_all(server.port, f"u{n}")  # first contact: UIDs assigned
                times[n] = []
                for _ in range(rounds if n == small else max(2, rounds - 2)):
                    elapsed, got = fetch_all(server.port, f"u{n}")
                    assert got >= n * MSG_SIZE, got
                    times[n].append(elapsed)
            mbs = [small * MSG_SIZE / t / 1e6 for t in times[small]]
            print(f"FETCH 1:* BODY.PEEK[] {small} x 10 KB: {fmt(times[small], 's')}, "
                  f"{fmt(mbs, 'MB/s')}")
            print(f"FETCH 1:* BODY.PEEK[] {large} x 10 KB: {fmt(times[large], 's')}")
            ratio = statistics.median(times[large]) / statistics.median(times[small])
            linear = large / small
            rows.append((f"FETCH time {large} / {small} msgs", f"{ratio:.2f}",
                         f"<= {linear + 1:.0f}", f"{ratio / (linear + 1):.2f}",
                         "ok" if ratio <= linear + 1 else "MISS"))
            rows.append((f"FETCH {small} x 10 KB MB/s", f"{statistics.median(mbs):.1f}",
                         "-", "-", "info"))

            root = server.user("stale")
            paths = [deliver(root, message(i), subdir="new") for i in range(1010)]
            select_time(server.port, "stale")  # numbers all 1010
            for path in paths[:1000]:
                for sub in ("new", "cur"):
                    for found in (root / sub).glob(path.name + "*"):
                        found.unlink()
            first = select_time(server.port, "stale")
            later = [select_time(server.port, "stale") for _ in range(rounds)]
            print(f"SELECT with 1000 stale UID entries: first {first:.3f} s, "
                  f"then {fmt(later, 's')}")
            med = statistics.median(later)
            rows.append(("SELECT after pruning 1000 stale (s)", f"{med:.3f}", "<= 0.1",
                         f"{med / 0.1:.2f}", "ok" if med <= 0.1 else "MISS"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"{'target':<40} {'measured':>9} {'limit':>8} {'ratio':>6} verdict")
    for name, measured, limit, ratio_s, verdict in rows:
        print(f"{name:<40} {measured:>9} {limit:>8} {ratio_s:>6} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
