"""Benchmark: ``relaygate smtpd`` against Postfix doing the same work, side by side.

Usage: ``python bench/mta.py [--quick] [--rounds N] [--messages N]``. Prints a table, never
asserts. Needs root and Postfix (``postfix``, ``postconf``, ``smtp-source``).

The work, the same on both sides: ``smtp-source -s 20 -l 1024 -m 2000`` (20
sessions, one message per connection) to one local recipient, each message
accepted and delivered durably into that recipient's Maildir.

- Postfix 3.7: a private instance (``bench/_postfix_testbed.py``: the
  integration tests' configuration) delivering through virtual(8) into a
  Maildir; smtpd/cleanup fsync the queue file before the ``250``, then qmgr
  and virtual deliver it. The round ends when every message is in the
  Maildir.
- relaygate: ``relaygate smtpd`` with one account; the message file and its
  Maildir directory are fsynced before the ``250``.

Rounds alternate which side goes first; before each measurement both
Maildirs are emptied and Postfix's queue is drained. Reported per side:
messages/s as seen by smtp-source (its wall time), and server CPU per message
from ``/proc``: for Postfix every process of the private instance (the
``postfix start-fg`` tree: master, smtpd, cleanup, qmgr, trivial-rewrite,
virtual, postlogd, ...) including children that exited and were reaped
during the round (``cutime``/``cstime``), for relaygate its one process (all
threads). Medians and ranges over the rounds.

Targets (issue 18): msgs/s >= 1.5x Postfix's, CPU per message <= 0.7x.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Scripts in bench/ would shadow the standard library: drop our own directory.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

SMTP_SOURCE = "/usr/sbin/smtp-source"
TARGET_RATE = 1.5
TARGET_CPU = 0.7
SESSIONS = 20
SIZE = 1024
USER = "alice"


def _load_testbed() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_postfix_testbed", HERE / "_postfix_testbed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_postfix_testbed"] = module
    spec.loader.exec_module(module)
    return module


TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and every live descendant, plus the children they reaped.

    A live process's own time is utime+stime; a child that exited is counted
    (once) in its parent's cutime+cstime when the parent reaped it.
    """
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is None:
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        fields = stats.get(pid)
        if fields is None:
            continue
        # fields[0] is the state; utime, stime, cutime, cstime are /proc fields 14-17
        total += sum(int(x) for x in fields[11:15])
        todo.extend(children.get(pid, []))
    return total / TICK


def process_cpu(pid: int) -> float:
    fields = _stat(pid)
    assert fields is not None, f"process {pid} is gone"
    return (int(fields[11]) + int(fields[12])) / TICK


def count_new(maildir: Path) -> int:
    new = maildir / "new"
    return sum(1 for _ in new.iterdir()) if new.is_dir() else 0


def empty(maildir: Path) -> None:
    for sub in ("new", "cur"):
        d = maildir / sub
        if d.is_dir():
            for p in d.iterdir():
                p.unlink(missing_ok=True)


def run_source(port: int, count: int) -> float:
    """Wall seconds smtp-source needs for ``count`` messages."""
    started = time.perf_counter()
    p = subprocess.run([SMTP_SOURCE, "-s", str(SESSIONS), "-l", str(SIZE), "-m", str(count),
                        "-f", "sender@client.relaygate.test", "-t", f"{USER}@example.test",
                        "-M", "client.relaygate.test", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=900)
    took = time.perf_counter() - started
    if p.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({p.returncode}): {p.stderr.strip()[:300]}")
    return took


def wait_for(maildir: Path, count: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while count_new(maildir) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{maildir}: {count_new(maildir)} of {count} messages delivered")
        time.sleep(0.05)


class Relaygate:
    """``relaygate smtpd`` on a fresh data directory with one account."""

    def __init__(self, work: Path, port: int, domain: str) -> None:
        sys.path.insert(0, str(ROOT / "src"))
        from relaygate.config import Settings
        from relaygate.mail.accounts.db import open_directory

        data = work / "data"
        data.mkdir(parents=True)
        users = open_directory(Settings(data_dir=data, domains=(domain,),
                                        hostname="mx.relaygate.test"))
        users.add(USER, "bench password 0123456789", domain=domain,
                  addresses=[f"{USER}@{domain}"])
        users.close()
        config = work / "relaygate.toml"
        config.write_text(
            f'data_dir = "{data}"\nstore = "memory:"\ndomains = ["{domain}"]\n'
            'hostname = "mx.relaygate.test"\n'
            "[smtp]\nmax_connections_per_ip = 5000\n")
        self.maildir = data / "mail" / domain / USER
        self.port = port
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relaygate", "--config", str(config), "smtpd",
             "--listen", f"127.0.0.1:{port}", "--submission", "off"],
            stdout=subprocess.DEVNULL, stderr=self.log, env=env, cwd=ROOT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def median_range(values: list[float], fmt: str = "{:.2f}") -> str:
    return (fmt.format(statistics.median(values)) + " ("
            + fmt.format(min(values)) + "-" + fmt.format(max(values)) + ")")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run: 400 messages, 1 round")
    ap.add_argument("--rounds", type=int, help="rounds (default 5; --quick 1)")
    ap.add_argument("--messages", type=int, help="messages per round (default 2000)")
    ap.add_argument("--only", choices=["relaygate", "postfix"],
                    help="measure one side only (for profiling)")
    args = ap.parse_args()
    for prog in ("/usr/sbin/postfix", "/usr/sbin/postconf", SMTP_SOURCE):
        if not os.access(prog, os.X_OK):
            print(f"bench/mta.py: {prog} is missing (install postfix)", file=sys.stderr)
            return 1
    if os.geteuid() != 0:
        print("bench/mta.py: a private Postfix instance needs root", file=sys.stderr)
        return 1
    rounds = args.rounds or (1 if args.quick else 5)
    count = args.messages or (400 if args.quick else 2000)
    tb = _load_testbed()
    root = tb.make_root("relaygate-bench-mta-")
    pf = tb.PostfixTestbed(root / "postfix", port=tb.free_port(),
                           recipient_restrictions="reject_unauth_destination", users=(USER,))
    rg_port = tb.free_port()
    rg: Relaygate | None = None
    rates: dict[str, list[float]] = {"postfix": [], "relaygate": []}
    cpu: dict[str, list[float]] = {"postfix": [], "relaygate": []}
    pf_maildir = pf.mail / tb.LOCAL_DOMAIN / USER
    sides = ["postfix", "relaygate"] if args.only is None else [args.only]
    try:
        if "postfix" in sides:
            pf.root.mkdir()
            pf.configure()
            pf.start()
        if "relaygate" in sides:
            rg = Relaygate(root / "relaygate", rg_port, tb.LOCAL_DOMAIN)
            tb.wait_port("127.0.0.1", rg_port, 30)
        for side in sides:  # warm-up: spawn Postfix's processes, import relaygate's lazies
            if side == "postfix":
                run_source(pf.port, 100)
                wait_for(pf_maildir, 100)
            else:
                assert rg is not None
                run_source(rg.port, 100)
        order = list(sides)
        for _ in range(rounds):
            for side in order:
                if pf.proc is not None:
                    _drained(pf)
                if rg is not None:
                    empty(rg.maildir)
                empty(pf_maildir)
                if side == "postfix":
                    assert pf.proc is not None
                    before = tree_cpu(pf.proc.pid)
                    took = run_source(pf.port, count)
                    wait_for(pf_maildir, count)
                    _drained(pf)
                    used = tree_cpu(pf.proc.pid) - before
                else:
                    assert rg is not None
                    before = process_cpu(rg.proc.pid)
                    took = run_source(rg.port, count)
                    got = count_new(rg.maildir)
                    if got != count:
                        raise RuntimeError(f"relaygate stored {got} of {count} messages")
                    used = process_cpu(rg.proc.pid) - before
                rates[side].append(count / took)
                cpu[side].append(used / count * 1e6)
            order.reverse()
    finally:
        if rg is not None:
            rg.stop()
        pf.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nsmtp-source -s {SESSIONS} -l {SIZE} -m {count}, one message per connection, "
          f"{rounds} round(s), alternating; median (range)")
    print(f"{'server':<12} {'msgs/s':>22} {'CPU us/msg':>24}")
    for side in sides:
        print(f"{side:<12} {median_range(rates[side], '{:.0f}'):>22} "
              f"{median_range(cpu[side], '{:.0f}'):>24}")
    if len(sides) < 2:
        return 0
    rate_ratios = [r / p for r, p in zip(rates["relaygate"], rates["postfix"], strict=True)]
    cpu_ratios = [r / p for r, p in zip(cpu["relaygate"], cpu["postfix"], strict=True)]
    rate = statistics.median(rate_ratios)
    cpu_ratio = statistics.median(cpu_ratios)
    print(f"per-round ratios relaygate / Postfix: msgs/s {median_range(rate_ratios)}, "
          f"CPU per message {median_range(cpu_ratios)}")
    print()
    print(f"{'name':56s} {'measured':>10s} {'limit':>8s} {'ratio':>8s} verdict")
    rows = [
        ("smtp-source -s 20 msgs/s, relaygate vs Postfix", rate, TARGET_RATE, rate >= TARGET_RATE,
         ">="),
        ("CPU per message, relaygate vs Postfix", cpu_ratio, TARGET_CPU, cpu_ratio <= TARGET_CPU,
         "<="),
    ]
    for name, value, limit, ok, op in rows:
        print(f"{name:56s} {value:>9.2f}x {op + str(limit) + 'x':>8s} {value:>8.2f} "
              f"{'meets' if ok else 'MISSES'}")
    return 0


def _drained(pf: object) -> None:
    root = pf.root / "queue"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if not any(any((root / d).iterdir()) for d in ("maildrop", "incoming", "active",
                                                        "deferred") if (root / d).is_dir()):
            return
        time.sleep(0.05)
    raise RuntimeError("Postfix's queue did not drain")


if __name__ == "__main__":
    sys.exit(main())
