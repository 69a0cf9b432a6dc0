"""Benchmark of ``relaygate serve`` as a whole: memory and a mixed load, one process.

Usage: ``python bench/serve.py [--quick]``. Prints tables, never asserts.

Starts one ``relaygate serve`` subprocess on free loopback ports (its own data
directory under /tmp, SQLite store, production argon2id password hashes), then:

1. idle RSS: VmRSS of the serve process 3 s after its listeners answer
   (target <= 60 MB);
2. RSS with N concurrent SMTP sessions (N = 1000; --quick 200), each inside a
   transaction (EHLO, MAIL, RCPT to a local user) and held open while RSS is
   read (target <= 200 MB at 1000);
3. load run: N SMTP sessions (a whole local delivery each: EHLO, MAIL, RCPT,
   DATA with a 2 KB message, QUIT) and M POP3 sessions (M = 500; --quick 50:
   USER/PASS with a real argon2id check, STAT, QUIT; each login also opens a
   relay window) all started at once; counts errors and timeouts (target 0),
   then checks that every 250-acknowledged message is in a Maildir.

Clients come from 100 loopback source addresses (127.1.0.1-100), so the
per-address connection limits (20) see what a real crowd looks like, and
ramp up: at most 64 connections are being opened (until their greeting) at
once, since the listeners keep asyncio's default backlog of 100.
Also printed: the peak RSS (VmHWM) of the run and session latencies (median,
p99) for reading, not judging. Each result is also printed as one
``RESULT {json}`` line for bench/run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import pwd
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "example.org"
PASSWORD = "bench password 0123456789"
#: seconds a client waits for one whole session before counting a timeout (a mail
#: client's patience: Thunderbird gives up on a silent server after 100 s)
SESSION_TIMEOUT = 120.0
#: source addresses the clients spread over (each stays under the per-address limit)
SOURCES = [f"127.1.0.{i}" for i in range(1, 101)]
TARGET_IDLE_MB = 60.0
TARGET_SESSIONS_MB = 200.0
MESSAGE = ("From: bench@example.com\r\nSubject: bench\r\n\r\n"
           + ("x" * 70 + "\r\n") * 28).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field_name} for pid {pid}")


def make_users(data_dir: Path, count: int) -> None:
    """``count`` users user0..userN with one production-cost argon2id hash (computed once)."""
    from relaygate.config import AuthSettings
    from relaygate.mail.accounts.db import UserDB
    from relaygate.mail.accounts.hashes import production_hasher

    stored = production_hasher().hash(PASSWORD)  # the cost serve pays for every login
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = UserDB(data_dir / "users.db", AuthSettings(), data_dir, default_domain=DOMAIN)
    for i in range(count):
        db.add(f"user{i}", "", domain=DOMAIN, password_hash=stored)
    db.close()


@dataclass
class ServeProc:
    workdir: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for name in ("smtp", "pop3"):
            self.ports[name] = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
        me = pwd.getpwuid(os.geteuid()).pw_name
        args = [sys.executable, "-m", "relaygate", "serve",
                "--data-dir", str(self.workdir / "data"), "--user", me, "--domain", DOMAIN,
                "--smtp", f"127.0.0.1:{self.ports['smtp']}", "--submission", "off",
                "--pop3", f"127.0.0.1:{self.ports['pop3']}", "--imap", "off",
                "--log-level", "warning"]
        self.err = open(self.workdir / "serve.err", "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.err,
                                     env=env, cwd=self.workdir)
        deadline = time.monotonic() + 60
        for port in self.ports.values():
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("serve exited: "
                                       + (self.workdir / "serve.err").read_text())
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.err.close()
        return rc


# -- clients ----------------------------------------------------------------------


#: connection attempts in flight at once (each until its greeting arrived): the servers
#: listen with asyncio's default backlog of 100, and a burst of SYNs beyond it leaves
#: clients waiting for a greeting that never comes; real crowds do not arrive in one
#: microsecond, so the clients ramp up
CONNECT_CONCURRENCY = 64
_gate: asyncio.Semaphore | None = None


async def _open(port: int, i: int, greeting: bytes
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect from source address i and read the greeting (through the ramp-up gate)."""
    global _gate
    if _gate is None:
        _gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    async with _gate:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(SOURCES[i % len(SOURCES)], 0))
        line = await reader.readline()
        if not line.startswith(greeting):
            writer.close()
            raise ProtocolError(f"greeting {line[:40]!r}")
        if greeting == b"220":
            while line[3:4] == b"-":
                line = await reader.readline()
        return reader, writer


async def _reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def _cmd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes,
               want: int) -> None:
    writer.write(line + b"\r\n")
    code = await _reply(reader)
    if code != want:
        raise ProtocolError(f"{line.split()[0].decode()} -> {code}")


class ProtocolError(Exception):
    pass


async def smtp_hold(port: int, i: int, users: int, hold: asyncio.Event,
                    opened: list[int]) -> None:
    """A session that stays inside a transaction until ``hold`` is set."""
    reader, writer = await _open(port, i, b"220")
    try:
        await _cmd(reader, writer, b"EHLO bench.test", 250)
        await _cmd(reader, writer, b"MAIL FROM:<bench@example.com>", 250)
        await _cmd(reader, writer, f"RCPT TO:<user{i % users}@{DOMAIN}>".encode(), 250)
        opened.append(i)
        await hold.wait()
        await _cmd(reader, writer, b"QUIT", 221)
    finally:
        writer.close()


async def smtp_send(port: int, i: int, users: int) -> None:
    reader, writer = await _open(port, i, b"220")
    try:
        await _cmd(reader, writer, b"EHLO bench.test", 250)
        await _cmd(reader, writer, b"MAIL FROM:<bench@example.com>", 250)
        await _cmd(reader, writer, f"RCPT TO:<user{i % users}@{DOMAIN}>".encode(), 250)
        await _cmd(reader, writer, b"DATA", 354)
        writer.write(MESSAGE + b".\r\n")
        code = await _reply(reader)
        if code != 250:
            raise ProtocolError(f"end of DATA -> {code}")
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    finally:
        writer.close()


async def pop3_session(port: int, i: int) -> None:
    reader, writer = await _open(port, i, b"+OK")
    try:
        async def ok(line: bytes) -> None:
            writer.write(line + b"\r\n")
            answer = await reader.readline()
            if not answer.startswith(b"+OK"):
                raise ProtocolError(f"{line.split()[0].decode()} -> {answer[:40]!r}")
        await ok(f"USER user{i}".encode())
        await ok(f"PASS {PASSWORD}".encode())
        await ok(b"STAT")
        await ok(b"QUIT")
    finally:
        writer.close()


@dataclass
class Outcome:
    ok: int = 0
    errors: int = 0
    timeouts: int = 0
    latencies: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


async def timed(coro_factory: object, outcome: Outcome, start: asyncio.Event) -> None:
    await start.wait()
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(coro_factory(), SESSION_TIMEOUT)  # type: ignore[operator]
    except TimeoutError:
        outcome.timeouts += 1
    except (OSError, ProtocolError, ConnectionError, ValueError) as exc:
        outcome.errors += 1
        if len(outcome.samples) < 3:
            outcome.samples.append(f"{type(exc).__name__}: {exc}")
    else:
        outcome.ok += 1
        outcome.latencies.append(time.perf_counter() - t0)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def hold_sessions(port: int, n: int, users: int, pid: int) -> tuple[float, int]:
    global _gate
    _gate = None
    hold = asyncio.Event()
    opened: list[int] = []
    tasks = [asyncio.create_task(asyncio.wait_for(smtp_hold(port, i, users, hold, opened),
                                                  SESSION_TIMEOUT * 2))
             for i in range(n)]
    deadline = time.monotonic() + SESSION_TIMEOUT
    while time.monotonic() < deadline:
        if len(opened) + sum(t.done() for t in tasks) >= n:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    rss = rss_mb(pid)
    hold.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return rss, len(opened)


async def load_run(smtp_port: int, pop3_port: int, n_smtp: int, n_pop3: int,
                   users: int) -> tuple[Outcome, Outcome, float]:
    global _gate
    _gate = None
    start = asyncio.Event()
    so, po = Outcome(), Outcome()
    tasks = [asyncio.create_task(timed(lambda i=i: smtp_send(smtp_port, i, users), so, start))
             for i in range(n_smtp)]
    tasks += [asyncio.create_task(timed(lambda i=i: pop3_session(pop3_port, i), po, start))
              for i in range(n_pop3)]
    await asyncio.sleep(0.2)
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    return so, po, time.perf_counter() - t0


def delivered(data_dir: Path) -> int:
    total = 0
    for box in (data_dir / "mail" / DOMAIN).iterdir():
        for sub in ("new", "cur"):
            d = box / sub
            if d.is_dir():
                total += len(os.listdir(d))
    return total


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cpus, {mem:.0f} GiB RAM, Linux {platform.release()}, "
            f"python {platform.python_version()}")


def result(name: str, value: float, unit: str, target: float | None, ok: bool | None) -> None:
    print("RESULT " + json.dumps({"name": name, "value": round(value, 3), "unit": unit,
                                  "target": target, "ok": ok}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="200 SMTP + 50 POP3 sessions instead of 1000 + 500")
    args = ap.parse_args()
    n_smtp, n_pop3 = (200, 50) if args.quick else (1000, 500)
    users = n_pop3
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * (n_smtp + n_pop3) + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="relaygate-bench-serve-"))
    try:
        print(f"  .. creating {users} users", file=sys.stderr, flush=True)
        make_users(work / "data", users)
        serve = ServeProc(work)
        serve.start()
        assert serve.proc is not None
        pid = serve.proc.pid
        time.sleep(3.0)
        idle = rss_mb(pid)
        print(f"  .. idle RSS {idle:.1f} MB; holding {n_smtp} SMTP sessions",
              file=sys.stderr, flush=True)
        held_rss, held = asyncio.run(hold_sessions(serve.ports["smtp"], n_smtp, users, pid))
        print(f"  .. load run: {n_smtp} SMTP + {n_pop3} POP3 sessions", file=sys.stderr,
              flush=True)
        so, po, wall = asyncio.run(load_run(serve.ports["smtp"], serve.ports["pop3"], n_smtp,
                                            n_pop3, users))
        peak = rss_mb(pid, "VmHWM")
        time.sleep(0.5)
        rc = serve.stop()
        stored = delivered(work / "data")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    from relaygate.mail.accounts.hashes import hasher_description, production_hasher

    hashes = hasher_description(production_hasher())
    lost = max(0, so.ok - stored)
    mode = " (--quick)" if args.quick else ""
    print(f"relaygate serve benchmark{mode}: {machine()}")
    print(f"password hashes: {hashes}; client patience {SESSION_TIMEOUT:.0f}s per session")
    print()
    head = f"{'measure':<44} {'value':>10} {'unit':<6}"
    print(head)
    print("-" * len(head))
    rows = [
        ("idle RSS", idle, "MB"),
        (f"RSS with {held} SMTP sessions in a transaction", held_rss, "MB"),
        ("peak RSS of the whole run (VmHWM)", peak, "MB"),
        (f"load run wall time ({n_smtp} SMTP + {n_pop3} POP3)", wall, "s"),
        ("SMTP sessions ok / errors / timeouts", so.ok, f"{so.errors}/{so.timeouts}"),
        ("POP3 sessions ok / errors / timeouts", po.ok, f"{po.errors}/{po.timeouts}"),
        ("SMTP session latency median / p99", statistics.median(so.latencies)
         if so.latencies else float("nan"), f"{pct(so.latencies, 0.99):.2f}s"),
        ("POP3 session latency median / p99", statistics.median(po.latencies)
         if po.latencies else float("nan"), f"{pct(po.latencies, 0.99):.2f}s"),
        ("POP3 logins completed per second", po.ok / wall if wall else 0.0, "1/s"),
        ("messages acknowledged but not in a Maildir", lost, ""),
        ("serve exit status after SIGTERM", rc, ""),
    ]
    for name, value, unit in rows:
        print(f"{name:<44} {value:>10.2f} {unit:<6}")
    for sample in so.samples + po.samples:
        print(f"  error sample: {sample}")
    print()
    failures = so.errors + so.timeouts + po.errors + po.timeouts + lost
    targets = [
        ("serve idle RSS (MB)", idle, TARGET_IDLE_MB),
        (f"serve RSS, {held} SMTP sessions (MB)", held_rss, TARGET_SESSIONS_MB),
        (f"load {n_smtp}+{n_pop3}: errors+timeouts", float(failures), 0.0),
    ]
    head = f"{'target':<40} {'measured':>9} {'limit':>7} {'ratio':>6}  verdict"
    print(head)
    print("-" * len(head))
    results = []
    for name, measured, limit in targets:
        if limit:
            ratio = f"{measured / limit:6.2f}"
            ok = measured <= limit
        else:
            ratio = "     -"
            ok = measured == 0
        print(f"{name:<40} {measured:>9.1f} {limit:>7.1f} {ratio}  "
              f"{'meets' if ok else 'MISSES'}")
        results.append((name, measured, limit, ok))
    print()
    for name, measured, limit, ok in results:
        result(name, measured, "", limit, ok)
    if args.quick:
        print("\n(--quick: 200 SMTP + 50 POP3 sessions; the targets name 1000 + 500)")
    print(f"\n(ran {time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
