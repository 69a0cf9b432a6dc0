"""Benchmark of ``relaygate smtpd``: throughput against bare aiosmtpd, and idle-session memory.

Usage: ``python bench/smtp.py [--quick]``. Prints tables, never asserts.

1. Throughput, with Postfix's ``smtp-source`` (``-s 20 -l 1024 -m 2000``; one
   message per connection, the program's default), measured in the same run,
   rounds alternating, median of 3 (``--quick``: 400 messages, 1 round), against
   (a) ``relaygate smtpd`` delivering to a local Maildir (fsync of file and
   directory before each 250), (b) a bare aiosmtpd server whose handler
   discards the message, and, for reading, (c) relaygate relaying into the queue
   (fsync too), and (d) the bare aiosmtpd server delivering with the same Maildir code on
   a thread pool, which separates what the disk costs from what relaygate costs.
   Target: (a) >= 0.7 x (b).
2. Memory: VmRSS of a fresh ``relaygate smtpd`` process (and of the bare
   aiosmtpd server, side by side) with N = 1000 idle sessions (``--quick``: 200),
   each greeted and past EHLO, clients spread over 127.1.0.1-50. Target: <= 150 MB
   at 1000.

Each result is also printed as a ``RESULT {json}`` line for ``bench/run``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
RATIO_TARGET = 0.7
RSS_TARGET_MB = 150.0
SOURCES = [f"127.1.0.{i}" for i in range(1, 51)]

BARE_SERVER = r"""
import asyncio, sys
from aiosmtpd.smtp import SMTP

class Discard:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

async def main(port):
    loop = asyncio.get_running_loop()
    await loop.create_server(
        lambda: SMTP(Discard(), hostname="bare.example", ident="bare aiosmtpd", loop=loop),
        "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""

#: (d): the same bare server, but each message durably delivered with relaygate's
#: Maildir code on a thread pool, as relaygate does: isolates the cost of the disk
BARE_DURABLE = BARE_SERVER.replace("""class Discard:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"
""", """from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from relaygate.mail.maildir import deliver
POOL = ThreadPoolExecutor(32)
MAILDIR = Path(sys.argv[2])

class Discard:
    async def handle_DATA(self, server, session, envelope):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(POOL, deliver, MAILDIR, envelope.original_content)
        return "250 OK"
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(512)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def python() -> str:
    return sys.executable


class Server:
    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str]) -> None:
        self.name = name
        self.port = port
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log, env=env,
                                     cwd=ROOT)
        try:
            wait_port(port)
        except OSError:
            self.stop()
            self.log.seek(0)
            sys.stderr.write(self.log.read().decode(errors="replace"))
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def env_with_src() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"),
                                                    env.get("PYTHONPATH", "")) if p)
    return env


def setup_relaygate(work: Path) -> tuple[Path, Path]:
    """A data directory with one user, a config raising the per-address limit, a rules file."""
    sys.path.insert(0, str(ROOT / "src"))
    from relaygate.config import Settings
    from relaygate.mail.accounts.db import open_directory

    data = work / "data"
    data.mkdir()
    users = open_directory(Settings(data_dir=data, domains=(DOMAIN,), hostname="mx.example.org"))
    users.add("bench", "bench password 0123456789", domain=DOMAIN,
              addresses=[f"bench@{DOMAIN}"])
    users.close()
    config = work / "relaygate.toml"
    config.write_text(
        f'data_dir = "{data}"\nstore = "memory:"\ndomains = ["{DOMAIN}"]\n'
        f'hostname = "mx.example.org"\nrules_file = "{work / "rules"}"\n'
        "[smtp]\nmax_connections_per_ip = 5000\n")
    (work / "rules").write_text('127.0.0.1:allow,RELAYCLIENT=""\n')
    return data, config


def start_relaygate(config: Path, port: int) -> Server:
    argv = [python(), "-m", "relaygate", "--config", str(config), "smtpd",
            "--listen", f"127.0.0.1:{port}", "--submission", "off"]
    return Server("relaygate", argv, port, env_with_src())


def start_bare(port: int) -> Server:
    return Server("bare", [python(), "-c", BARE_SERVER, str(port)], port, env_with_src())


def start_bare_durable(port: int, maildir: Path) -> Server:
    return Server("bare+maildir", [python(), "-c", BARE_DURABLE, str(port), str(maildir)], port,
                  env_with_src())


def smtp_source(exe: str, port: int, messages: int, sessions: int, size: int,
                rcpt: str) -> float:
    """Seconds smtp-source needs for ``messages`` messages."""
    argv = [exe, "-s", str(sessions), "-l", str(size), "-m", str(messages),
            "-f", "sender@bench.example", "-t", rcpt, "-M", "bench.example",
            f"127.0.0.1:{port}"]
    started = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - started
    if p.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({p.returncode}): {p.stderr.strip()[:300]}")
    return took


def count_files(directory: Path) -> int:
    return sum(1 for _ in directory.iterdir()) if directory.is_dir() else 0


def throughput(exe: str, quick: bool) -> list[tuple[str, float, int, float, float]]:
    messages = 400 if quick else 2000
    rounds = 1 if quick else 3
    cases = [("bare aiosmtpd, discard", "bare", f"bench@{DOMAIN}"),
             ("relaygate, local Maildir", "relaygate", f"bench@{DOMAIN}"),
             ("bare aiosmtpd + same Maildir", "durable", f"bench@{DOMAIN}"),
             ("relaygate, relay to queue", "relaygate", "someone@remote.invalid")]
    results: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
    stored: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="relaygate-bench-smtp-") as tmp:
        work = Path(tmp)
        data, config = setup_relaygate(work)
        ports = {"relaygate": free_port(), "bare": free_port(), "durable": free_port()}
        servers = {"relaygate": start_relaygate(config, ports["relaygate"]),
                   "bare": start_bare(ports["bare"]),
                   "durable": start_bare_durable(ports["durable"], work / "bare-maildir")}
        try:
            for port in ports.values():  # warm up
                smtp_source(exe, port, 50, 5, 1024, f"bench@{DOMAIN}")
            for _ in range(rounds):
                for name, which, rcpt in cases:
                    pid = servers[which].proc.pid
                    before = cpu_seconds(pid)
                    took = smtp_source(exe, ports[which], messages, 20, 1024, rcpt)
                    after = cpu_seconds(pid)
                    results[name].append(messages / took)
                    cpu[name].append(((after[0] - before[0]) * 1000 / messages,
                                      (after[1] - before[1]) * 1000 / messages))
        finally:
            for server in servers.values():
                server.stop()
        stored["relaygate, local Maildir"] = count_files(
            data / "mail" / DOMAIN / "bench" / "new") - 50
        stored["bare aiosmtpd + same Maildir"] = count_files(work / "bare-maildir" / "new") - 50
        stored["relaygate, relay to queue"] = count_files(data / "queue" / "env")
    return [(name, statistics.median(v), stored.get(name, -1),
             statistics.median(u for u, _ in cpu[name]), statistics.median(k for _, k in cpu[name]))
            for name, v in results.items()]


def open_idle(port: int, n: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = socket.socket()
        s.settimeout(30)
        s.bind((SOURCES[i % len(SOURCES)], 0))
        s.connect(("127.0.0.1", port))
        socks.append(s)
    for s in socks:
        s.recv(512)  # greeting
        s.sendall(b"EHLO idle.example\r\n")
    for s in socks:
        buf = b""
        while b"250 " not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("server closed an idle session")
            buf += chunk
    return socks


def memory(quick: bool) -> tuple[list[tuple[str, float, float]], int]:
    n = 200 if quick else 1000
    out: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="relaygate-bench-smtp-") as tmp:
        _, config = setup_relaygate(Path(tmp))
        for name, start in (("relaygate", lambda p: start_relaygate(config, p)),
                            ("bare aiosmtpd", start_bare)):
            port = free_port()
            server = start(port)
            try:
                time.sleep(1.0)
                base = rss_mb(server.proc.pid)
                socks = open_idle(port, n)
                time.sleep(1.0)
                loaded = rss_mb(server.proc.pid)
                for s in socks:
                    s.close()
            finally:
                server.stop()
            out.append((name, base, loaded))
    return out, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run")
    args = ap.parse_args()
    exe = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))

    if os.access(exe, os.X_OK):
        tp = throughput(exe, args.quick)
        base = tp[0][1]
        messages = 400 if args.quick else 2000
        print(f"\nthroughput: smtp-source -s 20 -l 1024 -m {messages}, one message per "
              f"connection, median of {1 if args.quick else 3}")
        print(f"{'case':<30} {'msgs/s':>8} {'x bare':>7} {'stored':>7} "
              f"{'user ms/msg':>12} {'sys ms/msg':>11}")
        for name, rate, stored, user, system in tp:
            shown = "-" if stored < 0 else str(stored)
            print(f"{name:<30} {rate:8.0f} {rate / base:7.2f} {shown:>7} {user:12.2f} "
                  f"{system:11.2f}")
        ratio = tp[1][1] / base
        print(f"relaygate / bare aiosmtpd with the same durable Maildir delivery: "
              f"{tp[1][1] / tp[2][1]:.2f}")
        print("RESULT " + json.dumps({"name": "smtp msgs/s ratio relaygate Maildir / bare "
                                      "aiosmtpd", "value": round(ratio, 3),
                                      "target": RATIO_TARGET, "ok": ratio >= RATIO_TARGET}))
    else:
        print("smtp-source not found (Debian package postfix): throughput skipped")

    mem, n = memory(args.quick)
    print(f"\nmemory: VmRSS with {n} idle sessions (after EHLO)")
    print(f"{'server':<16} {'idle MB':>8} {f'{n} sess MB':>12} {'KB/session':>11}")
    for name, base_mb, loaded in mem:
        print(f"{name:<16} {base_mb:8.1f} {loaded:12.1f} {(loaded - base_mb) * 1024 / n:11.1f}")
    rg = mem[0][2]
    if n == 1000:
        print("RESULT " + json.dumps({"name": "smtpd RSS MB with 1000 idle sessions",
                                      "value": round(rg, 1), "target": RSS_TARGET_MB,
                                      "ok": rg <= RSS_TARGET_MB}))
    else:
        per = (mem[0][2] - mem[0][1]) / n
        est = mem[0][1] + per * 1000
        print(f"(estimated at 1000 sessions: {est:.1f} MB; run without --quick to measure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
