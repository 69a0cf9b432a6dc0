"""Login benchmark: mailbox logins per second, and server RSS with many idle connections.

Usage: ``python bench/login.py [--quick] [--only pop3]``. Prints tables, never asserts.

For each protocol in :data:`PROTOCOLS` (POP3 here; the IMAP part plugs in as
another :class:`Protocol` entry), in the same run, side by side:

1. **logins per second** against a server in a subprocess on a loopback port,
   each login a full session (connect, greeting, authenticate with the right
   password, window opened in the default SQLite grant store, log out), with
   1 client and with 4 concurrent clients (each its own user, so POP3's
   one-session-per-mailbox lock does not serialize them). Two hash settings:
   the production argon2id parameters (RFC 9106 low-memory: 64 MiB, t=3, p=4;
   the server is the real ``relaygate pop3d``) and a tiny argon2id (8 KiB,
   t=1), which leaves the protocol, store and thread-hop overhead. Medians of
   several rounds. The ``vs raw`` column divides by the rate of bare
   ``PasswordHasher.verify`` calls measured in this process in the same run:
   1.0 would mean the login costs nothing but the hash.
2. **RSS with idle connections**: ``relaygate pop3d``'s VmRSS (from
   /proc/PID/status) before and after opening 500 connections that each read
   the greeting and then sit idle (the cost an idle or hostile client imposes).
3. **IMAP sessions** (IMAP only, on the tiny-hash server so 500 logins are
   quick): RSS and server CPU with no client, with the same number of
   sessions logged in with INBOX selected, and with all of them in IDLE
   (pymap wakes every IDLE session once a second).

The servers' data live in a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import os
import poplib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from argon2 import PasswordHasher

from relaygate.config import AuthSettings
from relaygate.mail.accounts.db import UserDB
from relaygate.mail.accounts.hashes import hasher_description, production_hasher

ROOT = Path(__file__).resolve().parent.parent
#: tiny argon2id parameters: what remains is the cost of everything but the hash
CHEAP = {"time_cost": 1, "memory_cost": 8, "parallelism": 1}
#: concurrent clients in the parallel measurement (each with its own user)
CONCURRENCY = 4
PASSWORD = "bench-password-1"


def cheap_hasher() -> PasswordHasher:
    return PasswordHasher(**CHEAP)


# -- protocols -----------------------------------------------------------------


def pop3_login(host: str, port: int, user: str, password: str) -> None:
    c = poplib.POP3(host, port, timeout=30)
    try:
        c.user(user)
        c.pass_(password)
        c.quit()
    finally:
        c.close()


def imap_login(host: str, port: int, user: str, password: str) -> None:
    c = imaplib.IMAP4(host, port, timeout=30)
    try:
        c.login(user, password)
    finally:
        c.logout()  # also closes the socket


@dataclass(frozen=True)
class Protocol:
    """How to run one protocol's server and log in to it."""

    name: str
    #: the ``relaygate`` subcommand serving it alone, and its listen option
    command: str
    listen_option: str
    #: one complete login session (raises on failure)
    login: Callable[[str, int, str, str], None]
    #: settings for the TOML file the server runs with
    settings: str


PROTOCOLS: dict[str, Protocol] = {
    "pop3": Protocol("pop3", "pop3d", "--listen", pop3_login,
                     "[pop3]\nmax_connections_per_ip = 100000\n"),
    "imap": Protocol("imap", "imapd", "--listen", imap_login,
                     "[imap]\nmax_connections_per_ip = 100000\n"),
}


# -- servers -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as s:
                s.recv(100)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Server:
    """A server subprocess: ``relaygate <command>``, or this script's --serve mode."""

    def __init__(self, proto: Protocol, data: Path, *, cheap: bool) -> None:
        self.port = free_port()
        config = data / "relaygate.toml"
        config.write_text(proto.settings)
        base = [sys.executable, "-m", "relaygate", "--data-dir", str(data), "--config",
                str(config)]
        if cheap:
            argv = [sys.executable, __file__, "--serve", proto.name, "--data",
                    str(data), "--port", str(self.port)]
        else:
            argv = [*base, proto.command, proto.listen_option, f"127.0.0.1:{self.port}",
                    "--log-level", "warning"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(self.port)
        except OSError:
            self.stop()
            raise

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve(proto_name: str, data: Path, port: int) -> None:
    """--serve: the service with the tiny hasher (the CLI always uses production)."""
    from relaygate.config import load_settings
    from relaygate.context import Context
    from relaygate.metrics import Metrics
    from relaygate.runtime import build_control

    settings = load_settings(cli={"data_dir": str(data), f"{proto_name}.listen": [
        f"127.0.0.1:{port}"], "log_level": "warning"},
        config_file=data / "relaygate.toml")
    if proto_name == "pop3":
        from relaygate.servers.pop3 import make_service
    elif proto_name == "imap":
        from relaygate.servers.imap.service import make_service  # type: ignore[assignment]
    else:
        raise SystemExit(f"--serve {proto_name}: not known")
    db = UserDB(data / "users.db", settings.auth, data, hasher=cheap_hasher(),
                default_domain="bench.test")

    async def main() -> None:
        svc = make_service(Context(settings, build_control(settings), Metrics(), db))
        await svc.start()
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, done.set)
        await done.wait()
        await svc.stop(1.0)

    asyncio.run(main())


# -- measurements ----------------------------------------------------------------


def raw_verify_rate(hasher: PasswordHasher, seconds: float) -> float:
    h = hasher.hash(PASSWORD)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        hasher.verify(h, PASSWORD)
        n += 1
    return n / (time.perf_counter() - t0)


def logins_per_second(proto: Protocol, port: int, users: list[str], clients: int,
                      per_client: int) -> float:
    errors: list[BaseException] = []

    def worker(user: str) -> None:
        try:
            for _ in range(per_client):
                proto.login("127.0.0.1", port, user, PASSWORD)
        except BaseException as exc:  # reported below, the bench goes on
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(users[i],)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed: {errors[0]!r}")
    return clients * per_client / elapsed


def idle_rss(server: Server, connections: int) -> tuple[int, int]:
    """(RSS before, RSS after) in KiB with ``connections`` idle clients."""
    time.sleep(0.5)
    before = server.rss_kib()
    socks: list[socket.socket] = []
    try:
        for _ in range(connections):
            s = socket.create_connection(("127.0.0.1", server.port), 10)
            s.recv(200)  # the greeting: the server has set the session up
            socks.append(s)
        time.sleep(1.0)
        after = server.rss_kib()
    finally:
        for s in socks:
            s.close()
    return before, after


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def imap_sessions(server: Server, users: list[str], n: int,
                  seconds: float) -> list[tuple[str, int, float]]:
    """IMAP only: RSS (KiB) and server CPU% with ``n`` logged-in sessions, then in IDLE.

    Each session logs in and SELECTs INBOX; the second measurement sends IDLE
    on all of them (pymap checks the folder once a second per IDLE session).
    """
    def measure(label: str) -> tuple[str, int, float]:
        time.sleep(0.5)
        cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
        time.sleep(seconds)
        cpu = (cpu_seconds(server.proc.pid) - cpu0) / (time.monotonic() - t0) * 100
        return label, server.rss_kib(), cpu

    def until(f: BinaryIO, tag: bytes) -> None:
        while True:
            line = f.readline()
            if not line:
                raise RuntimeError("IMAP server closed the connection")
            if line.startswith(tag):
                return

    out = [measure("none")]
    socks: list[tuple[socket.socket, BinaryIO]] = []
    try:
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", server.port), 30)
            f = s.makefile("rb")
            f.readline()
            user = users[i % len(users)]
            s.sendall(f'a LOGIN {user} "{PASSWORD}"\r\nb SELECT INBOX\r\n'.encode())
            until(f, b"b ")
            socks.append((s, f))
        out.append(measure("logged in"))
        for sock, fh in socks:
            sock.sendall(b"c IDLE\r\n")
            until(fh, b"+ ")
        out.append(measure("in IDLE"))
    finally:
        for sock, fh in socks:
            fh.close()
            sock.close()
    return out


def make_data(root: Path, name: str, hasher: PasswordHasher) -> tuple[Path, list[str]]:
    data = root / name
    db = UserDB(data / "users.db", AuthSettings(), data, hasher=hasher,
                default_domain="bench.test")
    users = [f"user{i}" for i in range(CONCURRENCY)]
    for u in users:
        db.add(u, PASSWORD)
    db.close()
    return data, users


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (fewer rounds)")
    ap.add_argument("--only", action="append", choices=sorted(PROTOCOLS),
                    help="measure only this protocol (repeatable)")
    ap.add_argument("--connections", type=int, default=500, help="idle connections for RSS")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.data, args.port)
        return

    rounds = 2 if args.quick else 5
    verify_seconds = 1.0 if args.quick else 3.0
    # logins per client per round, production / cheap hash
    per_client = {"production": 2 if args.quick else 5, "cheap": 10 if args.quick else 40}
    connections = 100 if args.quick and args.connections == 500 else args.connections
    hashers = {"production": production_hasher(), "cheap": cheap_hasher()}
    raw = {k: raw_verify_rate(h, verify_seconds) for k, h in hashers.items()}
    print(f"relaygate login benchmark ({os.cpu_count()} CPUs, python "
          f"{sys.version.split()[0]}, {'quick' if args.quick else 'full'} run)")
    for k, h in hashers.items():
        print(f"  raw argon2 verify in this process, {hasher_description(h)}: "
              f"{raw[k]:.1f}/s")
    print()
    rows: list[tuple[str, str, int, float, float]] = []
    rss_rows: list[tuple[str, int, int, int]] = []
    session_rows: list[tuple[str, int, float]] = []
    root = Path(tempfile.mkdtemp(prefix="relaygate-bench-login-"))
    try:
        for name in args.only or sorted(PROTOCOLS):
            proto = PROTOCOLS[name]
            for kind, hasher in hashers.items():
                data, users = make_data(root, f"{name}-{kind}", hasher)
                server = Server(proto, data, cheap=(kind == "cheap"))
                try:
                    proto.login("127.0.0.1", server.port, users[0], PASSWORD)  # warm up
                    for clients in (1, CONCURRENCY):
                        rates = [logins_per_second(proto, server.port, users, clients,
                                                   per_client[kind])
                                 for _ in range(rounds)]
                        med = statistics.median(rates)
                        rows.append((name, hasher_description(hasher), clients, med,
                                     med / raw[kind]))
                        print(f"  {name} {kind} clients={clients}: "
                              f"{', '.join(f'{r:.1f}' for r in rates)} logins/s", flush=True)
                    if kind == "production":
                        before, after = idle_rss(server, connections)
                        rss_rows.append((name, connections, before, after))
                    elif name == "imap":  # many logins: the tiny hash keeps it short
                        session_rows = imap_sessions(server, users, connections,
                                                     2.0 if args.quick else 5.0)
                finally:
                    server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"{'protocol':<9} {'argon2 parameters':<30} {'clients':>7} {'logins/s':>9} "
          f"{'vs raw verify/s':>16}")
    for name, params, clients, med, ratio in rows:
        print(f"{name:<9} {params:<30} {clients:>7} {med:>9.1f} {ratio:>16.2f}")
    print()
    print(f"{'protocol':<9} {'idle conns':>10} {'RSS before':>12} {'RSS after':>12} "
          f"{'per conn':>10} {'after/before':>13}")
    for name, n, before, after in rss_rows:
        per = (after - before) / n
        print(f"{name:<9} {n:>10} {before / 1024:>10.1f}MB {after / 1024:>10.1f}MB "
              f"{per:>8.1f}KB {after / before:>13.2f}")

    if session_rows:
        print()
        print(f"imap, {connections} sessions (tiny-hash server): RSS and server CPU")
        print(f"{'sessions':<10} {'RSS':>10} {'CPU %':>7} {'RSS/none':>9}")
        base = session_rows[0][1]
        for label, rss, cpu in session_rows:
            print(f"{label:<10} {rss / 1024:>8.1f}MB {cpu:>7.1f} {rss / base:>9.2f}")


if __name__ == "__main__":
    main()
