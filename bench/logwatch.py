"""Log watcher benchmark: lines per second through ``watch-log --once --dry-run`` vs grep.

Usage: ``python bench/logwatch.py [--quick] [--lines N] [--rounds N]``. Prints a table
and ``RESULT {json}`` lines for ``bench/run``; never asserts.

A mail log is generated the way a busy Postfix host writes one: 99% Postfix
lines (smtpd connect/disconnect, cleanup, qmgr, smtp deliveries, a few
rejects), 1% POP3/IMAP logins of assorted servers (Dovecot, Courier, UW,
Qpopper, Cyrus, vchkpw, vm-pop3d, Perdition, teapop, popa3d's two-line
logins, ...), 1,000,000 lines (``--quick``: 100,000). Then, alternating, a few
rounds of

- ``relaygate watch-log --once --dry-run FILE`` (the whole CLI: interpreter
  start, reading, header parsing, matching, printing each login), and
- ``grep -c -E REGEX FILE`` with one regex alternation of the login keywords
  (what an admin's one-line check costs: the floor for reading the file),

each timed by wall clock and by the CPU time of the child (user + system: on
a loaded machine the wall clock also measures the other processes); medians
(and ranges) of the rounds, lines per second, and the ratio watch-log / grep.
The start-up of watch-log (reading an empty file) is shown apart. The target,
on CPU time (the wall clock of a shared machine says more about its other
processes): 100,000 lines per CPU second, a hundred times what a very busy
mail host writes at its peak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: lines per second watch-log must sustain
TARGET = 100_000.0
GREP_REGEX = "Login|LOGIN|login success|Authentication passed|logged in|Stats:|Auth:"


def relaygate_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "relaygate"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "relaygate"]


def ip(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(1, 65536):x}"
    return f"198.51.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def qid(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789ABCDEF") for _ in range(10))


def postfix_line(rng: random.Random, ts: str) -> str:
    pid = rng.randrange(1000, 99999)
    q = qid(rng)
    a = ip(rng)
    kind = rng.random()
    if kind < 0.25:
        return f"{ts} mx postfix/smtpd[{pid}]: connect from unknown[{a}]"
    if kind < 0.45:
        return (f"{ts} mx postfix/smtpd[{pid}]: disconnect from unknown[{a}] ehlo=1 mail=1 "
                f"rcpt=1 data=1 quit=1 commands=5")
    if kind < 0.6:
        return f"{ts} mx postfix/cleanup[{pid}]: {q}: message-id=<{q}@client.example>"
    if kind < 0.75:
        return (f"{ts} mx postfix/qmgr[{pid}]: {q}: from=<user{rng.randrange(999)}@example.org>,"
                f" size={rng.randrange(500, 90000)}, nrcpt=1 (queue active)")
    if kind < 0.9:
        return (f"{ts} mx postfix/smtp[{pid}]: {q}: to=<someone@example.net>, relay=mx.example"
                f".net[{a}]:25, delay=0.4, delays=0.1/0/0.1/0.2, dsn=2.0.0, status=sent (250 2"
                f".0.0 Ok: queued as {qid(rng)})")
    if kind < 0.97:
        return f"{ts} mx postfix/qmgr[{pid}]: {q}: removed"
    return (f"{ts} mx postfix/smtpd[{pid}]: NOQUEUE: reject: RCPT from unknown[{a}]: 554 "
            f"5.7.1 <x@example.net>: Relay access denied; from=<spam@example.com> "
            f"to=<x@example.net> proto=ESMTP helo=<client>")


def login_lines(rng: random.Random, ts: str) -> list[str]:
    a = ip(rng)
    u = f"user{rng.randrange(5000)}"
    pid = rng.randrange(1000, 99999)
    shapes = [
        [f"{ts} mx dovecot: imap-login: Login: user=<{u}>, method=PLAIN, rip={a}, "
         f"lip=192.0.2.1, mpid={pid}, TLS, session=<{qid(rng)}>"],
        [f"{ts} mx dovecot: imap({u})<{pid}><{qid(rng)}>: Logged out in=123 out=4567"],
        [f"{ts} mx pop3d: LOGIN, user={u}, ip=[::ffff:198.51.100.{pid % 250}], port=[4321]"],
        [f"{ts} mx imapd[{pid}]: Login user={u} host=client.example.org [{a}]"],
        [f'{ts} mx in.qpopper[{pid}]: (v4.0.9) POP login by user "{u}" at (h.example) {a}'],
        [f"{ts} mx cyrus/imap[{pid}]: login: h.example [{a}] {u} plaintext User logged in"],
        [f"{ts} mx vpopmail[{pid}]: vchkpw-pop3: (PLAIN) login success {u}@example.org:{a}"],
        [f"{ts} mx vm-pop3d[{pid}]: User '{u}' logged in from {a}, nmsgs=3"],
        [f'{ts} mx perdition[{pid}]: Auth: {a}:4000->192.0.2.1:110 client-secure=plaintext '
         f'authorisation_id=NONE authentication_id="{u}" server="10.0.0.2:110" protocol=POP3 '
         f'server-secure=plaintext status="ok"'],
        [f"{ts} mx teapop[{pid}]: Successful login for {u} [192.0.2.1] from h [{a}]"],
        [f"{ts} mx popa3d[{pid}]: Session from {a}",
         f"{ts} mx popa3d[{pid}]: Authentication passed for {u}"],
        [f"{ts} mx dovecot: pop3-login: Disconnected (auth failed, 1 attempts in 2 secs): "
         f"user=<{u}>, method=PLAIN, rip={a}, lip=192.0.2.1, session=<{qid(rng)}>"],
    ]
    return rng.choice(shapes)


def generate(path: Path, n: int, seed: int = 16) -> int:
    """Write about ``n`` lines (1% of them login lines); return the exact count."""
    rng = random.Random(seed)
    written = 0
    with path.open("w") as f:
        while written < n:
            t = written // 200
            ts = f"Dec  1 {t // 3600 % 24:02d}:{t // 60 % 60:02d}:{t % 60:02d}"
            lines = login_lines(rng, ts) if rng.random() < 0.01 else [postfix_line(rng, ts)]
            f.write("\n".join(lines) + "\n")
            written += len(lines)
    return written


def timed(cmd: list[str]) -> tuple[float, float, bytes]:
    """Wall seconds, CPU seconds (user + system of the child) and stdout of one run."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False,
                         timeout=1800).stdout
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall, cpu, out


def result(name: str, value: float, target: float | None, unit: str) -> None:
    print("RESULT " + json.dumps({"name": name, "value": round(value, 3), "target": target,
                                  "unit": unit,
                                  "ok": None if target is None else value >= target}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100,000 lines, 3 rounds")
    ap.add_argument("--lines", type=int, help="lines in the generated log")
    ap.add_argument("--rounds", type=int, help="alternating rounds of each command")
    args = ap.parse_args()
    n = args.lines or (100_000 if args.quick else 1_000_000)
    rounds = args.rounds or (3 if args.quick else 5)
    grep = shutil.which("grep")
    tmp = Path(tempfile.mkdtemp(prefix="relaygate-bench-logwatch-"))
    try:
        log = tmp / "mail.log"
        lines = generate(log, n)
        size = log.stat().st_size
        print(f"log: {lines} lines, {size / 1e6:.1f} MB, 1% logins; {rounds} alternating rounds")
        watch = [*relaygate_cmd(), "--store", "memory:", "watch-log", "--once", "--dry-run",
                 str(log)]
        gcmd = [grep, "-c", "-E", GREP_REGEX, str(log)] if grep else None
        w_times: list[float] = []
        w_cpu: list[float] = []
        g_times: list[float] = []
        g_cpu: list[float] = []
        found = grepped = 0
        for _ in range(rounds):
            dt, cpu, out = timed(watch)
            w_times.append(dt)
            w_cpu.append(cpu)
            found = out.count(b"\n")
            if gcmd:
                dt, cpu, out = timed(gcmd)
                g_times.append(dt)
                g_cpu.append(cpu)
                grepped = int(out.strip() or 0)
        empty = tmp / "empty.log"
        empty.write_bytes(b"")
        start = statistics.median(timed([*watch[:-1], str(empty)])[1] for _ in range(rounds))

        def row(name: str, times: list[float], cpus: list[float], count: int) -> None:
            w, c = statistics.median(times), statistics.median(cpus)
            print(f"{name:<38} {w:>8.3f} {min(times):>7.3f}-{max(times):<7.3f} {c:>8.3f} "
                  f"{min(cpus):>6.3f}-{max(cpus):<6.3f} {lines / w:>11,.0f} {lines / c:>11,.0f} "
                  f"{count:>6}")

        print(f"{'command':<38} {'wall s':>8} {'wall range':>15} {'cpu s':>8} "
              f"{'cpu range':>13} {'lines/s':>11} {'lines/cpu-s':>11} {'found':>6}")
        row("relaygate watch-log --once --dry-run", w_times, w_cpu, found)
        rate = lines / statistics.median(w_times)
        cpu_rate = lines / statistics.median(w_cpu)
        print(f"(watch-log start-up alone, an empty file: {start:.3f} cpu s)")
        if gcmd:
            row("grep -c -E (login keywords)", g_times, g_cpu, grepped)
            ratio = rate / (lines / statistics.median(g_times))
            cpu_ratio = cpu_rate / (lines / statistics.median(g_cpu))
            print(f"watch-log / grep speed: {ratio:.3f} by wall clock, {cpu_ratio:.3f} by CPU "
                  f"time (grep only searches bytes; watch-log parses every header)")
            result("watch-log / grep -c speed ratio (wall)", ratio, None, "ratio")
            result("watch-log / grep -c speed ratio (cpu)", cpu_ratio, None, "ratio")
        result(f"watch-log lines/s ({lines} lines, 1% logins, wall)", rate, None, "lines/s")
        result(f"watch-log lines/cpu-s ({lines} lines, 1% logins)", cpu_rate, TARGET, "lines/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
