"""CPU per POP3 login with the production argon2id string: relaygate vs Dovecot.

Usage: ``python bench/logincpu.py [--quick] [--logins N]``. Prints a table, never asserts.

One user, one password, one hash: ``relaygate users add`` makes the
production argon2id string (RFC 9106 low-memory: m=64 MiB, t=3, p=4) and
Dovecot 2.3 gets the very same string in its passwd-file as ``{ARGON2ID}...``
(its auth process verifies it with libsodium; its auth cache is off by
default). Each login is a full POP3 session: connect, USER, PASS, QUIT, one at
a time. Rounds alternate between the servers; each round counts the server
side's CPU seconds over N logins:

- relaygate: ``relaygate pop3d``, one process (its verify threads included);
- Dovecot: every process of the instance (master, auth, login and pop3
  processes), plus what the master has reaped (the ``cutime``/``cstime`` of
  short-lived pop3 processes).

The table prints the median ratio relaygate / Dovecot of CPU per login (target
<= 1.1) with the range, and the medians of both. That target compares both
servers with their credential caches off (the default of each).

For reading, not a target, two more servers repeat the same logins in the
same rounds with their caches on: ``relaygate pop3d`` with ``[auth] cache_ttl
= 300`` and a second Dovecot with ``auth_cache_size = 10M`` (``auth_cache_ttl``
1 hour). Every login is the same user and password, so after the warm-up each
is a cache hit. relaygate's cache skips the argon2id check (docs/users.md);
Dovecot's caches the passdb entry, the argon2id string itself, and still
verifies the password against it on a hit. Two more rows print relaygate
cache on / off and relaygate / Dovecot with both caches on.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_postfix_testbed", BENCH / "_postfix_testbed.py")
assert _spec is not None and _spec.loader is not None
testbed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(testbed)
_spec2 = importlib.util.spec_from_file_location("bench_pop3", BENCH / "pop3.py")
assert _spec2 is not None and _spec2.loader is not None
pop3 = importlib.util.module_from_spec(_spec2)
_spec2.loader.exec_module(pop3)

USER = "bench"
PASSWORD = "bench-password-1"
TARGET = 1.1
#: the cache-on servers' settings
RG_CACHE = "[auth]\ncache_ttl = 300\n"
DOVECOT_CACHE = "auth_cache_size = 10M\nauth_cache_ttl = 1 hour\n"


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its live descendants, plus what root reaped."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int(_stat(int(d.name))[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            f = _stat(pid)
        except OSError:
            continue
        total += int(f[11]) + int(f[12])
        if pid == root:
            total += int(f[13]) + int(f[14])
        todo.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


def login(port: int) -> None:
    c = pop3.Client(port)
    try:
        c.command(f"USER {USER}")
        c.command(f"PASS {PASSWORD}")
        c.command("QUIT")
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (fewer rounds)")
    ap.add_argument("--logins", type=int, default=0, help="logins per round")
    args = ap.parse_args()
    rounds = 3 if args.quick else 5
    n = args.logins or (8 if args.quick else 20)
    if not Path(testbed.DOVECOT).exists():
        print(f"skipped: {testbed.DOVECOT} is not installed")
        return 0

    root = testbed.make_root("rg-bench-logincpu-")
    data = root / "relaygate"
    data.mkdir()
    config = data / "relaygate.toml"
    config.write_text("")
    cached_config = data / "relaygate-cache.toml"
    cached_config.write_text(RG_CACHE)
    subprocess.run([sys.executable, "-m", "relaygate", "--data-dir", str(data), "--config",
                    str(config), "users", "add", USER], input=PASSWORD.encode(), check=True,
                   capture_output=True)
    with sqlite3.connect(data / "users.db") as db:
        stored = db.execute("SELECT password FROM users WHERE login LIKE ?",
                            (f"{USER}%",)).fetchone()[0]
    dovecots = {}
    for name, extra in (("dovecot", ""), ("dovecot-cache", DOVECOT_CACHE)):
        d = testbed.DovecotTestbed(root / name, pop3_port=testbed.free_port(),
                                   imap_port=testbed.free_port(), users={USER: PASSWORD})
        d.configure()
        (root / name / "users").write_text(f"{USER}:{{ARGON2ID}}{stored}::::::\n")
        with d.conf.open("a") as f:
            f.write(extra)
        dovecots[name] = d
    rgs = {}
    for name, cfg in (("relaygate", config), ("rg-cache", cached_config)):
        port = testbed.free_port()
        rgs[name] = (port, subprocess.Popen(
            [sys.executable, "-m", "relaygate", "--data-dir", str(data), "--config", str(cfg),
             "pop3d", "--listen", f"127.0.0.1:{port}", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    per_login: dict[str, list[float]] = {
        "relaygate": [], "dovecot": [], "rg-cache": [], "dovecot-cache": []}
    try:
        sides: dict[str, tuple[int, int]] = {}
        for name, d in dovecots.items():
            d.start()
            assert d.proc is not None
            sides[name] = (d.pop3_port, d.proc.pid)
        for name, (port, proc) in rgs.items():
            testbed.wait_port("127.0.0.1", port, 30)
            sides[name] = (port, proc.pid)
        sides = {name: sides[name] for name in per_login}
        for side in sides:  # warm up: imports, first hash (fills caches), Dovecot's processes
            login(sides[side][0])
        print(f"hash: {stored.rsplit('$', 2)[0]}$...")
        for r in range(rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                port, pid = sides[side]
                cpu0 = tree_cpu(pid)
                for _ in range(n):
                    login(port)
                cpu = (tree_cpu(pid) - cpu0) / n
                per_login[side].append(cpu)
                print(f"round {r + 1} {side:13s} {cpu * 1000:7.2f} ms CPU/login", flush=True)
    finally:
        for _, rg in rgs.values():
            rg.send_signal(signal.SIGTERM)
        for _, rg in rgs.values():
            try:
                rg.wait(30)
            except subprocess.TimeoutExpired:
                rg.kill()
        for d in dovecots.values():
            d.stop()
        shutil.rmtree(root, ignore_errors=True)

    def stats(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
        vals = [v * scale for v in values]
        return (f"{statistics.median(vals):.{digits}f} "
                f"({min(vals):.{digits}f}-{max(vals):.{digits}f})")

    def per_round(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(per_login[a], per_login[b], strict=True)]

    ratios = per_round("relaygate", "dovecot")
    cache_gain = per_round("rg-cache", "relaygate")
    both_cached = per_round("rg-cache", "dovecot-cache")
    print(f"\nCPU per POP3 login, {n} logins x {rounds} rounds, median (range):")
    for side, values in per_login.items():
        print(f"  {side:13s} {stats(values, 1000)} ms")
    print(f"  ratio per round, relaygate / dovecot (caches off) {stats(ratios)}")
    print(f"  ratio per round, relaygate cache on / off         {stats(cache_gain, 1, 3)}")
    print(f"  ratio per round, relaygate / dovecot (caches on)  {stats(both_cached, 1, 3)}")
    print()
    ratio = statistics.median(ratios)
    print(f"{'name':44s} {'measured':>10s} {'limit':>8s} {'ratio':>8s} verdict")
    print(f"{'login CPU vs Dovecot (argon2id prod)':44s} {ratio:10.2f} {'<=1.1':>8s} "
          f"{ratio / TARGET:8.2f} {'ok' if ratio <= TARGET else 'MISS'}")
    # For reading, not targets: repeated logins with the credential caches on.
    print(f"{'login CPU cache on / off (relaygate)':44s} "
          f"{statistics.median(cache_gain):10.3f} {'-':>8s} {'-':>8s} info")
    print(f"{'login CPU vs Dovecot, both caches on':44s} "
          f"{statistics.median(both_cached):10.3f} {'-':>8s} {'-':>8s} info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
