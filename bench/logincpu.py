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
<= 1.1) with the range, and the medians of both.
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
    subprocess.run([sys.executable, "-m", "relaygate", "--data-dir", str(data), "--config",
                    str(config), "users", "add", USER], input=PASSWORD.encode(), check=True,
                   capture_output=True)
    with sqlite3.connect(data / "users.db") as db:
        stored = db.execute("SELECT password FROM users WHERE login LIKE ?",
                            (f"{USER}%",)).fetchone()[0]
    dovecot = testbed.DovecotTestbed(root / "dovecot", pop3_port=testbed.free_port(),
                                     imap_port=testbed.free_port(), users={USER: PASSWORD})
    dovecot.configure()
    (root / "dovecot" / "users").write_text(f"{USER}:{{ARGON2ID}}{stored}::::::\n")
    rg_port = testbed.free_port()
    rg = subprocess.Popen([sys.executable, "-m", "relaygate", "--data-dir", str(data),
                           "--config", str(config), "pop3d", "--listen",
                           f"127.0.0.1:{rg_port}", "--log-level", "warning"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    per_login: dict[str, list[float]] = {"relaygate": [], "dovecot": []}
    try:
        dovecot.start()
        testbed.wait_port("127.0.0.1", rg_port, 30)
        assert dovecot.proc is not None
        sides = {"relaygate": (rg_port, rg.pid),
                 "dovecot": (dovecot.pop3_port, dovecot.proc.pid)}
        for side in sides:  # warm up: imports, first hash, Dovecot's processes
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
                print(f"round {r + 1} {side:9s} {cpu * 1000:7.1f} ms CPU/login", flush=True)
    finally:
        rg.send_signal(signal.SIGTERM)
        try:
            rg.wait(30)
        except subprocess.TimeoutExpired:
            rg.kill()
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)

    def stats(values: list[float], scale: float = 1.0) -> str:
        vals = [v * scale for v in values]
        return f"{statistics.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"

    ratios = [a / b for a, b in zip(per_login["relaygate"], per_login["dovecot"], strict=True)]
    print(f"\nCPU per POP3 login, {n} logins x {rounds} rounds, median (range):")
    for side, values in per_login.items():
        print(f"  {side:9s} {stats(values, 1000)} ms")
    print(f"  ratio per round {stats(ratios)}")
    print()
    ratio = statistics.median(ratios)
    print(f"{'name':40s} {'measured':>10s} {'limit':>8s} {'ratio':>8s} verdict")
    print(f"{'login CPU vs Dovecot (argon2id prod)':40s} {ratio:10.2f} {'<=1.1':>8s} "
          f"{ratio / TARGET:8.2f} {'ok' if ratio <= TARGET else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
