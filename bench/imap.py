"""IMAP mailbox benchmark: FETCH throughput and its scaling, SELECT with stale UID entries.

Usage: ``python bench/imap.py [--quick]``. Prints a table, never asserts.

``relaygate imapd`` and a private Dovecot 2.3 (``bench/_postfix_testbed.py``,
passwd-file, plaintext logins on loopback) run as subprocesses on loopback ports,
over temporary Maildirs; the client is imaplib. Medians and ranges of several
rounds:

1. ``FETCH 1:* BODY.PEEK[]`` of 1000 x 10 KB, the same messages on both
   servers, rounds alternating which goes first; MB/s and relaygate / Dovecot
   (target >= 0.5). Skipped when Dovecot is not installed.
2. The same FETCH over N x 10 KB messages in relaygate (N = 1000 and 4000; 500
   and 2000 with ``--quick``), each round a fresh login + SELECT; the time ratio
   of the large to the small mailbox (linear: 4.0; target <= 5).
3. SELECT of a mailbox whose ``dovecot-uidlist`` still lists 1000 messages
   that were deleted behind its back (as POP3 DELE does): the first SELECT
   (which prunes) and the next ones (target <= 0.1 s).
"""

from __future__ import annotations

import argparse
import imaplib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _postfix_testbed as testbed

from relaygate.mail.mailbox import delivery_order
from relaygate.mail.maildir import deliver, ensure_maildir

PASSWORD = "bench-password"
MSG_SIZE = 10 * 1024


def message(i: int) -> bytes:
    head = (f"From: a@example.test\r\nTo: u@example.test\r\nSubject: bench {i}\r\n"
            f"Message-ID: <{i}@bench.example.test>\r\n\r\n").encode()
    line = b"x" * 70 + b"\r\n"
    body = line * ((MSG_SIZE - len(head)) // len(line) + 1)
    return head + body[:MSG_SIZE - len(head)]


class Relaygate:
    """``relaygate imapd`` in a subprocess, with its own data directory and users."""

    def __init__(self, root: Path) -> None:
        self.data = root / "relaygate"
        self.data.mkdir(parents=True)
        self.config = self.data / "relaygate.toml"
        self.config.write_text("[auth]\nfailure_delay = 0.0\n")
        self.port = testbed.free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def _cli(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relaygate", "--data-dir", str(self.data),
                               "--config", str(self.config), *args], check=True,
                              capture_output=True, text=True, **kw)

    def user(self, name: str) -> Path:
        self._cli("users", "add", name, input=PASSWORD)
        out = subprocess.run(
            [sys.executable, "-c", "import sys; from relaygate.config import load_settings; "
             "from relaygate.mail.accounts.db import open_directory; "
             "s = load_settings(cli={'data_dir': sys.argv[1]}, config_file=sys.argv[2]); "
             "print(open_directory(s).find_account(sys.argv[3]).maildir)",
             str(self.data), str(self.config), name],
            check=True, capture_output=True, text=True).stdout.strip()
        path = Path(out)
        ensure_maildir(path)
        return path

    def __enter__(self) -> Relaygate:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relaygate", "--data-dir", str(self.data), "--config",
             str(self.config), "imapd", "--listen", f"127.0.0.1:{self.port}",
             "--listen-tls", "off", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        testbed.wait_port("127.0.0.1", self.port, 30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def fill(root: Path, n: int, owner: tuple[int, int] | None = None) -> None:
    for sub in ("new", "cur"):
        for p in (root / sub).iterdir():
            p.unlink()
    for name in ("dovecot-uidlist", "dovecot.index", "dovecot.index.cache",
                 "dovecot.index.log"):
        (root / name).unlink(missing_ok=True)
    for i in range(n):
        path = deliver(root, message(i), subdir="new")
        if owner is not None:
            os.chown(path, *owner)


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
    root = testbed.make_root("rg-bench-imap-")
    rows: list[tuple[str, str, str, str, str]] = []
    have_dovecot = Path(testbed.DOVECOT).exists()
    dovecot = testbed.DovecotTestbed(root / "dovecot", pop3_port=testbed.free_port(),
                                     imap_port=testbed.free_port(), users={"dc": PASSWORD})
    try:
        with Relaygate(root) as server:
            if have_dovecot:
                dovecot.configure()
                dovecot.start()
                dc_root = root / "dovecot" / "mail" / "dc"
                owner = testbed._nobody()
                for sub in ("", "new", "cur", "tmp"):
                    (dc_root / sub).mkdir(parents=True, exist_ok=True)
                    os.chown(dc_root / sub, *owner)
                fill(dc_root, 1000, owner)
                rg_root = server.user("cmp")
                fill(rg_root, 1000)
                mb: dict[str, list[float]] = {"relaygate": [], "dovecot": []}
                for _side, port, user in (("relaygate", server.port, "cmp"),
                                         ("dovecot", dovecot.imap_port, "dc")):
                    fetch_all(port, user)  # first contact: UIDs, Dovecot's index
                for r in range(rounds):
                    order = [("relaygate", server.port, "cmp"),
                             ("dovecot", dovecot.imap_port, "dc")]
                    for side, port, user in order if r % 2 == 0 else order[::-1]:
                        elapsed, got = fetch_all(port, user)
                        assert got >= 1000 * MSG_SIZE, (side, got)
                        mb[side].append(got / elapsed / 1e6)
                for side, values in mb.items():
                    print(f"FETCH 1:* BODY.PEEK[] 1000 x 10 KB {side}: {fmt(values, 'MB/s')}")
                ratio = statistics.median(mb["relaygate"]) / statistics.median(mb["dovecot"])
                rows.append(("FETCH 1000 x 10 KB MB/s vs Dovecot", f"{ratio:.2f}", ">=0.5",
                             f"{ratio / 0.5:.2f}", "ok" if ratio >= 0.5 else "MISS"))
            else:
                print(f"Dovecot comparison skipped: {testbed.DOVECOT} is not installed")

            times: dict[int, list[float]] = {}
            for n in (small, large):
                user_root = server.user(f"u{n}")
                fill(user_root, n)
                fetch_all(server.port, f"u{n}")  # first contact: UIDs assigned
                times[n] = []
                for _ in range(rounds if n == small else max(2, rounds - 2)):
                    elapsed, got = fetch_all(server.port, f"u{n}")
                    assert got >= n * MSG_SIZE, got
                    times[n].append(elapsed)
            print(f"FETCH 1:* BODY.PEEK[] {small} x 10 KB: {fmt(times[small], 's')}")
            print(f"FETCH 1:* BODY.PEEK[] {large} x 10 KB: {fmt(times[large], 's')}")
            ratio = statistics.median(times[large]) / statistics.median(times[small])
            linear = large / small
            rows.append((f"FETCH time {large} / {small} msgs", f"{ratio:.2f}",
                         f"<={linear + 1:.0f}", f"{ratio / (linear + 1):.2f}",
                         "ok" if ratio <= linear + 1 else "MISS"))

            stale_root = server.user("stale")
            fill(stale_root, 1010)
            select_time(server.port, "stale")  # numbers all 1010
            names = sorted((p for p in (stale_root / "cur").iterdir()),
                           key=lambda p: delivery_order(p.name))
            for path in names[:1000]:
                path.unlink()  # as POP3 DELE did before it pruned the list
            first = select_time(server.port, "stale")
            later = [select_time(server.port, "stale") for _ in range(rounds)]
            print(f"SELECT with 1000 stale UID entries: first {first:.3f} s, "
                  f"then {fmt(later, 's')}")
            med = statistics.median(later)
            rows.append(("SELECT after pruning 1000 stale (s)", f"{med:.3f}", "<=0.1",
                         f"{med / 0.1:.2f}", "ok" if med <= 0.1 else "MISS"))
    finally:
        if have_dovecot:
            dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(f"{'target':<40} {'measured':>9} {'limit':>8} {'ratio':>6} verdict")
    for name, measured, limit, ratio_s, verdict in rows:
        print(f"{name:<40} {measured:>9} {limit:>8} {ratio_s:>6} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
