"""Benchmark: memory of ``relaygate serve`` while it receives large messages at once.

Usage: ``python bench/bigmsg.py [--quick] [--rounds N]``. Prints a table, never asserts.

Runs ``relaygate serve`` subprocesses on a free loopback port (one data
directory under /tmp, SQLite store, eight local users), per round:

0. starts a fresh serve process and sends it one small message (warm-up);
1. waits until the process is idle and reads its VmRSS (the baseline);
2. resets the peak (writes ``5`` to ``/proc/PID/clear_refs``, so VmHWM starts
   again from the current RSS);
3. eight clients send one 20 MB message each (--quick: 10 MB), all at once:
   EHLO, MAIL, RCPT to a local user (Maildir delivery, fsynced), DATA with
   70-character lines, written as fast as the server reads them;
4. reads VmHWM (the peak while the messages arrived and were delivered) and,
   after 2 s, VmRSS again (what the transfers left behind).

The target is the issue's: peak growth (VmHWM - baseline) under 100 MB for
eight concurrent 20 MB messages. Each round's figures are printed; the table
gives the median and range over the rounds (the machine is shared and noisy).
Each target is also printed as one ``RESULT {json}`` line for bench/run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "example.org"
CLIENTS = 8
TARGET_GROWTH_MB = 100.0
LINE = b"x" * 70 + b"\r\n"
#: lines written per client write (about 72 KB)
LINES_PER_WRITE = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_mb(pid: int, field_name: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field_name} for pid {pid}")


def reset_peak(pid: int) -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False if not possible."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def make_users(data_dir: Path, count: int) -> None:
    from relaygate.config import AuthSettings
    from relaygate.mail.accounts.db import UserDB

    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = UserDB(data_dir / "users.db", AuthSettings(), data_dir, default_domain=DOMAIN)
    for i in range(count):
        db.add(f"user{i}", "bench password", domain=DOMAIN)
    db.close()


class Serve:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
        me = pwd.getpwuid(os.geteuid()).pw_name
        args = [sys.executable, "-m", "relaygate", "serve",
                "--data-dir", str(workdir / "data"), "--user", me, "--domain", DOMAIN,
                "--smtp", f"127.0.0.1:{self.port}", "--submission", "off",
                "--pop3", "off", "--imap", "off", "--log-level", "warning"]
        self.err = open(workdir / "serve.err", "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.err,
                                     env=env, cwd=workdir)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("serve exited: " + (workdir / "serve.err").read_text())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.err.close()
        return rc


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def send_one(port: int, user: int, size: int) -> tuple[bytes, float]:
    """One message of about ``size`` bytes; (final reply, seconds)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _reply(reader)
        for line in (b"EHLO bench.example", b"MAIL FROM:<bench@example.com>",
                     f"RCPT TO:<user{user}@{DOMAIN}>".encode(), b"DATA"):
            writer.write(line + b"\r\n")
            reply = await _reply(reader)
            if reply[:1] not in (b"2", b"3"):
                return reply, time.perf_counter() - started
        writer.write(b"From: bench@example.com\r\nSubject: big\r\n\r\n")
        block = LINE * LINES_PER_WRITE
        sent = 0
        while sent < size:
            writer.write(block)
            sent += len(block)
            await writer.drain()
        writer.write(b".\r\n")
        reply = await _reply(reader)
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return reply, time.perf_counter() - started
    finally:
        writer.close()


async def one_round(port: int, size: int) -> tuple[list[bytes], float]:
    started = time.perf_counter()
    outcomes = await asyncio.gather(*(send_one(port, i, size) for i in range(CLIENTS)))
    return [r for r, _ in outcomes], time.perf_counter() - started


def wait_idle(pid: int, seconds: float = 1.0) -> float:
    """VmRSS once it stopped moving by more than 1 MB over ``seconds``."""
    last = status_mb(pid, "VmRSS")
    for _ in range(20):
        time.sleep(seconds)
        now = status_mb(pid, "VmRSS")
        if abs(now - last) < 1.0:
            return now
        last = now
    return last


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cpus, Linux {platform.release()}, " \
           f"python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 MB messages, 2 rounds")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick 2)")
    args = ap.parse_args()
    size_mb = 10 if args.quick else 20
    rounds = args.rounds or (2 if args.quick else 3)
    size = size_mb * 1024 * 1024
    work = Path(tempfile.mkdtemp(prefix="relaygate-bench-bigmsg-"))
    growth: list[float] = []
    left: list[float] = []
    walls: list[float] = []
    bad: list[bytes] = []
    rcs: list[int] = []
    try:
        make_users(work / "data", CLIENTS)
        for n in range(rounds):
            # A fresh process each round: what one round leaves behind does not
            # hide in the next round's baseline.
            serve = Serve(work)
            pid = serve.proc.pid
            # Warm-up: one small message, so imports and thread pools are not counted.
            asyncio.run(send_one(serve.port, 0, 1024))
            base = wait_idle(pid)
            exact = reset_peak(pid)
            replies, wall = asyncio.run(one_round(serve.port, size))
            peak = status_mb(pid, "VmHWM")
            time.sleep(2.0)
            after = status_mb(pid, "VmRSS")
            bad += [r for r in replies if not r.startswith(b"250")]
            growth.append(peak - base)
            left.append(after - base)
            walls.append(wall)
            print(f"  .. round {n + 1}: baseline {base:.1f} MB, peak {peak:.1f} MB "
                  f"(+{peak - base:.1f}{'' if exact else ', peak since start'}), "
                  f"after {after:.1f} MB, {wall:.1f} s", file=sys.stderr, flush=True)
            rcs.append(serve.stop())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mode = " (--quick)" if args.quick else ""
    print(f"large messages into relaygate serve{mode}: {machine()}")
    print(f"{CLIENTS} concurrent {size_mb} MB messages to Maildir, {rounds} rounds")
    print()
    head = f"{'measure':<46} {'median':>8} {'range':>15}"
    print(head)
    print("-" * len(head))

    def row(name: str, values: list[float], unit: str) -> None:
        span = f"{min(values):.1f}-{max(values):.1f}"
        print(f"{name:<46} {statistics.median(values):>8.1f} {span:>15} {unit}")

    row("peak RSS growth (VmHWM - idle RSS)", growth, "MB")
    row("RSS left 2 s after the transfers", left, "MB")
    row(f"wall time for {CLIENTS} x {size_mb} MB", walls, "s")
    print(f"{'replies other than 250':<46} {len(bad):>8d}")
    print(f"{'serve exit status after SIGTERM (worst)':<46} {max(rcs):>8d}")
    for r in bad[:3]:
        print(f"  reply sample: {r!r}")
    print()
    name = f"serve peak RSS growth, {CLIENTS} x {size_mb} MB DATA (MB)"
    measured = statistics.median(growth)
    ok = measured <= TARGET_GROWTH_MB and not bad and max(rcs) == 0
    head = f"{'target':<48} {'measured':>9} {'limit':>7} {'ratio':>6}  verdict"
    print(head)
    print("-" * len(head))
    print(f"{name:<48} {measured:>9.1f} {TARGET_GROWTH_MB:>7.1f} "
          f"{measured / TARGET_GROWTH_MB:6.2f}  {'meets' if ok else 'MISSES'}")
    print()
    print("RESULT " + json.dumps({"name": name, "value": round(measured, 1), "unit": "MB",
                                  "target": TARGET_GROWTH_MB, "ok": ok}))


if __name__ == "__main__":
    main()
