"""POP3 RETR throughput: relaygate vs Dovecot on the same Maildir contents.

Usage: ``python bench/pop3.py [--quick] [--messages N]``. Prints a table, never asserts.

Each round fills one Maildir per server with the same N messages of 10 KB
(default 1000; ``new/``, stored with LF line ends as MTAs deliver them), then
one client logs in (not timed) and times ``RETR i`` + ``DELE i`` for every
message and ``QUIT`` (the UPDATE state removes them all). The client is the
same minimal socket client for both servers (one command in flight, reply read
up to its terminator), so its own cost is the same on both sides. Rounds
alternate between the servers; the table prints the median MB/s (wire octets
of the RETR replies per second) and the range, and the ratio relaygate /
Dovecot (target >= 1.0). Server CPU per message comes from /proc (relaygate:
its one process; Dovecot: the pop3 process of the session, read before QUIT).

Dovecot 2.3 runs from ``bench/_postfix_testbed.py`` with a passwd-file; relaygate
runs ``relaygate pop3d`` from this checkout. Both sides' login hash is outside
the timed part, so the hash settings do not matter here (``bench/login.py``
measures logins).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_postfix_testbed", BENCH / "_postfix_testbed.py")
assert _spec is not None and _spec.loader is not None
testbed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(testbed)

USER = "bench"
PASSWORD = "bench-password-1"
MESSAGE_SIZE = 10 * 1024
TARGET = 1.0


def message(i: int) -> bytes:
    head = (f"From: sender{i}@example.test\nTo: {USER}@example.test\n"
            f"Subject: bench message {i}\nMessage-ID: <{i}.bench@example.test>\n\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again. 0123456789\n"
    body = b""
    while len(head) + len(body) + len(line) <= MESSAGE_SIZE:
        body += line
    body += b"." * 3 + b" a dot-stuffed line\n"
    return head + body


def fill(maildir: Path, n: int, owner: tuple[int, int] | None) -> None:
    for sub in ("tmp", "new", "cur"):
        d = maildir / sub
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    base = int(time.time()) - n
    for i in range(n):
        data = message(i)
        p = maildir / "new" / f"{base + i}.M{i:06d}P1Q{i}.bench,S={len(data)}"
        p.write_bytes(data)
        if owner:
            os.chown(p, *owner)
    if owner:
        for p in [maildir, *(maildir / s for s in ("tmp", "new", "cur"))]:
            os.chown(p, *owner)


class Client:
    """One POP3 session over a raw socket: a command, then its whole reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buf = bytearray()
        self.line()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._fill()
        out = bytes(self.buf[:i])
        del self.buf[:i + 2]
        if not out.startswith(b"+OK"):
            raise RuntimeError(f"server said {out!r}")
        return out

    def multiline(self) -> int:
        self.line()
        start = 0
        while True:
            i = self.buf.find(b"\r\n.\r\n", start)
            if i >= 0:
                n = i + 2
                del self.buf[:i + 5]
                return n
            start = max(0, len(self.buf) - 4)
            self._fill()

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def retr(self, i: int) -> int:
        self.sock.sendall(f"RETR {i}\r\n".encode())
        return self.multiline()

    def close(self) -> None:
        self.sock.close()


def cpu_of(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def dovecot_pop3_pids() -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "pop3":
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def session(port: int, n: int, pids: object) -> tuple[float, int, float]:
    """(seconds, wire octets, server CPU seconds) of RETR+DELE of n messages and QUIT."""
    c = Client(port)
    try:
        c.command(f"USER {USER}")
        c.command(f"PASS {PASSWORD}")
        procs = pids() if callable(pids) else list(pids)  # type: ignore[arg-type]
        cpu0 = cpu_of(procs)
        t0 = time.perf_counter()
        octets = 0
        for i in range(1, n + 1):
            octets += c.retr(i)
            c.command(f"DELE {i}")
        cpu1 = cpu_of(procs)
        c.command("QUIT")
        elapsed = time.perf_counter() - t0
    finally:
        c.close()
    return elapsed, octets, cpu1 - cpu0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (fewer rounds)")
    ap.add_argument("--messages", type=int, default=1000)
    args = ap.parse_args()
    rounds = 3 if args.quick else 7
    n = args.messages
    if not Path(testbed.DOVECOT).exists():
        print(f"skipped: {testbed.DOVECOT} is not installed")
        return 0

    root = testbed.make_root("rg-bench-pop3-")
    dovecot = testbed.DovecotTestbed(root / "dovecot", pop3_port=testbed.free_port(),
                                     imap_port=testbed.free_port(), users={USER: PASSWORD})
    data = root / "relaygate"
    data.mkdir()
    config = data / "relaygate.toml"
    config.write_text("[pop3]\nmax_connections_per_ip = 100\n")
    env = dict(os.environ)
    subprocess.run([sys.executable, "-m", "relaygate", "--data-dir", str(data), "--config",
                    str(config), "users", "add", USER],
                   input=PASSWORD.encode(), check=True, capture_output=True, env=env)
    rg_maildir = Path(subprocess.run(
        [sys.executable, "-c", "import sys; from relaygate.config import load_settings; "
         "from relaygate.mail.accounts.db import open_directory; "
         "s = load_settings(cli={'data_dir': sys.argv[1]}, config_file=sys.argv[2]); "
         f"print(open_directory(s).find_account({USER!r}).maildir)", str(data), str(config)],
        check=True, capture_output=True, text=True).stdout.strip())
    rg_port = testbed.free_port()
    rg = subprocess.Popen([sys.executable, "-m", "relaygate", "--data-dir", str(data),
                           "--config", str(config), "pop3d", "--listen",
                           f"127.0.0.1:{rg_port}", "--log-level", "warning"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, list[tuple[float, float]]] = {"relaygate": [], "dovecot": []}
    try:
        dovecot.configure()
        dovecot.start()
        testbed.wait_port("127.0.0.1", rg_port, 30)
        dc_maildir = root / "dovecot" / "mail" / USER
        nobody = testbed._nobody()
        for r in range(rounds):
            order = ["relaygate", "dovecot"] if r % 2 == 0 else ["dovecot", "relaygate"]
            for side in order:
                if side == "relaygate":
                    fill(rg_maildir, n, None)
                    secs, octets, cpu = session(rg_port, n, [rg.pid])
                else:
                    fill(dc_maildir, n, nobody)
                    secs, octets, cpu = session(dovecot.pop3_port, n, dovecot_pop3_pids)
                left = [p for s in ("new", "cur") for p in
                        ((rg_maildir if side == "relaygate" else dc_maildir) / s).iterdir()]
                if left:
                    raise RuntimeError(f"{side}: {len(left)} messages left after QUIT")
                results[side].append((octets / secs / 1e6, cpu / n * 1e6))
                print(f"round {r + 1} {side:9s} {octets / secs / 1e6:7.2f} MB/s "
                      f"{cpu / n * 1e6:6.0f} us CPU/msg", flush=True)
    finally:
        rg.send_signal(signal.SIGTERM)
        try:
            rg.wait(30)
        except subprocess.TimeoutExpired:
            rg.kill()
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)

    def stats(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    rg_mb = [v[0] for v in results["relaygate"]]
    dc_mb = [v[0] for v in results["dovecot"]]
    ratios = [a / b for a, b in zip(rg_mb, dc_mb, strict=True)]
    print(f"\nPOP3 RETR {n} x 10 KB + DELE + QUIT, {rounds} rounds, median (range):")
    for side, mb in (("relaygate", rg_mb), ("dovecot", dc_mb)):
        cpu = stats([v[1] for v in results[side]])
        print(f"  {side:9s} {stats(mb)} MB/s, server CPU {cpu} us/msg")
    print(f"  ratio per round {stats(ratios)}")
    print()
    print(f"{'name':40s} {'measured':>10s} {'limit':>8s} {'ratio':>8s} verdict")
    ratio = statistics.median(ratios)
    print(f"{'pop3 RETR MB/s vs Dovecot':40s} {ratio:10.2f} {'>=1.0':>8s} "
          f"{ratio / TARGET:8.2f} {'ok' if ratio >= TARGET else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
