"""IMAP IDLE benchmark: server CPU with many sessions sitting in IDLE on empty mailboxes.

Usage: ``python bench/idle.py [--quick] [--sessions N] [--seconds S] [--rounds R]``.
Prints a table, never asserts.

``relaygate imapd`` (the real command, its default SQLite grant store) and a
private Dovecot 2.3 (``bench/_postfix_testbed.py``: passwd-file, plaintext logins
on loopback, one ``imap`` process per session as Dovecot runs by default) each get
N sessions (500; 100 with ``--quick``): log in, SELECT an empty INBOX, IDLE. The
sessions are spread over users (10 sessions each) and over several 127.0.0.x
source addresses (40 each), so neither relaygate's ``imap.max_connections_per_ip``
nor Dovecot's ``mail_max_userip_connections`` (10 per user and address) refuses
them. With every session idle, each server's CPU time (user + system, from
``/proc/PID/stat``; for Dovecot the sum over its whole process tree) is read
over a fixed window of S seconds (30; 10 with ``--quick``), the two servers'
windows alternating, R rounds (3; 2 with ``--quick``). The idle server's own
CPU with no session is measured once before. At the end every session ends its
IDLE with DONE and must get its tagged OK (counted).

Target: relaygate with N sessions in IDLE <= 1 % of one CPU (pymap's polling
cost 7.6 % for 500). Dovecot's figure is printed for reading (it wakes each
session every 30 s, ``mailbox_idle_check_interval``). Skipped parts are said.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import _postfix_testbed as testbed

from relaygate.config import load_settings
from relaygate.mail.accounts.db import open_directory
from relaygate.mail.accounts.hashes import production_hasher

PASSWORD = "bench-password"
#: sessions per user (Dovecot allows 10 per user and client address)
PER_USER = 10
#: sessions per client address (relaygate allows 50 by default)
PER_ADDRESS = 40
#: target: percent of one CPU with all sessions in IDLE
TARGET_PERCENT = 1.0


def source_of(i: int) -> str:
    return f"127.0.0.{10 + i // PER_ADDRESS}"


class Session:
    """One raw IMAP session: logged in, INBOX selected, in IDLE."""

    def __init__(self, port: int, user: str, source: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(120)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.file: BinaryIO = self.sock.makefile("rb")
        self._expect(b"* ")
        self.sock.sendall(f'a LOGIN {user} "{PASSWORD}"\r\n'.encode())
        self._tagged(b"a")
        self.sock.sendall(b"b SELECT INBOX\r\n")
        self._tagged(b"b")
        self.sock.sendall(b"c IDLE\r\n")
        self._expect(b"+ ")

    def _expect(self, prefix: bytes) -> bytes:
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("the server closed the connection")
            if line.startswith(prefix):
                return line

    def _tagged(self, tag: bytes) -> None:
        line = self._expect(tag + b" ")
        if not line.startswith(tag + b" OK"):
            raise RuntimeError(f"{line!r}")

    def done(self) -> bool:
        """End the IDLE; True if the server answered it (the session survived)."""
        try:
            self.sock.settimeout(30)
            self.sock.sendall(b"DONE\r\n")
            self._tagged(b"c")
            return True
        except (OSError, RuntimeError):
            return False

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def open_sessions(port: int, users: list[str], n: int) -> list[Session]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda i: Session(port, users[i % len(users)], source_of(i)),
                             range(n)))


def tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_percent(root: int, seconds: float, *, whole_tree: bool) -> float:
    """Percent of one CPU used by ``root`` (and its process tree) over ``seconds``."""
    pids = tree(root) if whole_tree else [root]
    before, t0 = cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)
    pids = tree(root) if whole_tree else [root]
    after, t1 = cpu_seconds(pids), time.monotonic()
    used = sum(after[p] - before.get(p, 0.0) for p in after)
    return used / (t1 - t0) * 100


class Relaygate:
    """``relaygate imapd`` in a subprocess over its own data directory."""

    def __init__(self, root: Path, users: list[str]) -> None:
        self.data = root / "relaygate"
        self.data.mkdir(parents=True)
        self.config = self.data / "relaygate.toml"
        self.config.write_text("[auth]\nfailure_delay = 0.0\n")
        settings = load_settings(cli={"data_dir": str(self.data)}, config_file=self.config)
        db = open_directory(settings, hasher=production_hasher())
        for user in users:
            db.add(user, PASSWORD)
        db.close()
        self.port = testbed.free_port()
        self.proc: subprocess.Popen[bytes] | None = None

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
                self.proc.wait()


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} % [{min(values):.2f}-{max(values):.2f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sessions", type=int, help="IDLE sessions per server")
    parser.add_argument("--seconds", type=float, help="length of one CPU window")
    parser.add_argument("--rounds", type=int, help="CPU windows per server")
    args = parser.parse_args()
    n = args.sessions or (100 if args.quick else 500)
    seconds = args.seconds or (10.0 if args.quick else 30.0)
    rounds = args.rounds or (2 if args.quick else 3)
    users = [f"idle{i}" for i in range(max(1, -(-n // PER_USER)))]
    root = testbed.make_root("rg-bench-idle-")
    have_dovecot = Path(testbed.DOVECOT).exists()
    dovecot = testbed.DovecotTestbed(root / "dovecot", pop3_port=testbed.free_port(),
                                     imap_port=testbed.free_port(),
                                     users=dict.fromkeys(users, PASSWORD))
    sessions: dict[str, list[Session]] = {"relaygate": [], "dovecot": []}
    cpu: dict[str, list[float]] = {"relaygate": [], "dovecot": []}
    alive: dict[str, int] = {}
    print(f"{n} IDLE sessions per server on empty mailboxes ({len(users)} users, "
          f"{-(-n // PER_ADDRESS)} source addresses); CPU over {seconds:g} s windows, "
          f"{rounds} rounds")
    try:
        with Relaygate(root, users) as server:
            assert server.proc is not None
            pids: dict[str, tuple[int, bool]] = {"relaygate": (server.proc.pid, False)}
            time.sleep(1.0)
            baseline = cpu_percent(server.proc.pid, seconds, whole_tree=False)
            print(f"relaygate imapd, no session: {baseline:.2f} % of a CPU")
            t0 = time.monotonic()
            sessions["relaygate"] = open_sessions(server.port, users, n)
            print(f"relaygate: {n} sessions in IDLE after {time.monotonic() - t0:.1f} s")
            if have_dovecot:
                dovecot.configure()
                dovecot.start()
                assert dovecot.proc is not None
                pids["dovecot"] = (dovecot.proc.pid, True)
                t0 = time.monotonic()
                sessions["dovecot"] = open_sessions(dovecot.imap_port, users, n)
                print(f"dovecot: {n} sessions in IDLE after {time.monotonic() - t0:.1f} s")
            else:
                print(f"Dovecot comparison skipped: {testbed.DOVECOT} is not installed")
            time.sleep(3.0)  # the first look of every IDLE is over
            order = list(pids)
            for r in range(rounds):
                for side in order if r % 2 == 0 else order[::-1]:
                    pid, whole = pids[side]
                    cpu[side].append(cpu_percent(pid, seconds, whole_tree=whole))
            for side, open_ in sessions.items():
                if open_:
                    alive[side] = sum(s.done() for s in open_)
    finally:
        for open_ in sessions.values():
            for s in open_:
                s.close()
        if have_dovecot:
            dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)
    for side, values in cpu.items():
        if values:
            print(f"{side}: {n} sessions in IDLE: {fmt(values)} of a CPU; "
                  f"{alive.get(side, 0)}/{n} answered DONE")
    med = statistics.median(cpu["relaygate"])
    rows: list[tuple[str, str, str, str, str]] = [
        (f"IDLE {n} sessions, % of a CPU", f"{med:.2f}", f"<={TARGET_PERCENT:g}",
         f"{med / TARGET_PERCENT:.2f}",
         "ok" if med <= TARGET_PERCENT and alive.get("relaygate") == n else "MISS")]
    if cpu["dovecot"]:
        print(f"for reading: Dovecot with the same sessions (whole process tree) "
              f"{statistics.median(cpu['dovecot']):.2f} % of a CPU")
    print()
    print(f"{'target':<40} {'measured':>9} {'limit':>8} {'ratio':>6} verdict")
    for name, measured, limit, ratio, verdict in rows:
        print(f"{name:<40} {measured:>9} {limit:>8} {ratio:>6} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
