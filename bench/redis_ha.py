"""Relay decisions through a Redis Sentinel failover: how long TEMPFAIL, how fast before/after.

Usage: ``python bench/redis_ha.py [--quick] [--rounds N]``. Prints tables and RESULT
lines for bench/run; never asserts.

Each round starts a fresh Sentinel deployment on loopback (tests/stores/redis_servers.py:
master, one replica, three sentinels, ``down-after-milliseconds 1000``), opens 100 windows
through a ``redis+sentinel://`` store and waits until the replica has them (``WAIT``).
Then 4 threads ask for relay decisions non-stop (half for addresses with a window, half
for strangers) while the master is SIGKILLed after 3 s. Measured per round:

- **recovery**: seconds from the SIGKILL until the last decision that was not what it
  should be (TEMPFAIL, or anything but ALLOW/DENY as expected) started;
- **TEMPFAIL**: how many decisions were TEMPFAIL, and over how long (first to last);
- decisions/s in the 3 s before the kill and in the 3 s after recovery (their ratio), and
  the same threads against the master directly with ``redis://`` before the kill (the
  cost of going through Sentinel, side by side);
- wrong answers: a stranger ALLOWed, or a window answered DENY (both must be 0).

Figures are medians over the rounds, with ranges.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT / "src"))

from relaygate.control import RelayControl  # noqa: E402
from relaygate.decision import Verdict  # noqa: E402
from relaygate.stores import open_store  # noqa: E402


def _testbed() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_redis_servers", ROOT / "tests" / "stores" / "redis_servers.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["_redis_servers"] = module
    spec.loader.exec_module(module)
    return module


THREADS = 4
WINDOWS = 100
BEFORE = 3.0
AFTER = 3.0
#: give up on a round whose failover has not finished by then
GIVE_UP = 90.0


class Load:
    def __init__(self, control: RelayControl, known: list[str]) -> None:
        self.control = control
        self.known = known
        self.stop = threading.Event()
        self.logs: list[list[tuple[float, float, bool, Verdict]]] = [[] for _ in range(THREADS)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(THREADS)]

    def _run(self, n: int) -> None:
        log = self.logs[n]
        i = n
        while not self.stop.is_set():
            knows = i % 2 == 0
            ip = self.known[i % len(self.known)] if knows else f"203.0.113.{i % 250}"
            t0 = time.monotonic()
            verdict = self.control.decide(ip).verdict
            log.append((t0, time.monotonic(), knows, verdict))
            i += THREADS

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> list[tuple[float, float, bool, Verdict]]:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        return sorted(e for log in self.logs for e in log)


def rate(log: list[tuple[float, float, bool, Verdict]], start: float, end: float) -> float:
    return sum(1 for e in log if start <= e[0] < end) / (end - start)


def one_round(rs: Any, exe: str, workdir: Path) -> dict[str, float]:
    ss = rs.start_sentinel_set(exe, workdir)
    try:
        known = [f"198.51.100.{i % 250}" if i < 250 else f"198.51.101.{i}" for i in range(WINDOWS)]

        # the same load against the master directly, for the side-by-side rate
        direct = open_store(f"redis://127.0.0.1:{ss.master.port}/0?prefix=bench:")
        dcontrol = RelayControl(direct)
        for ip in known:
            dcontrol.open_window(ip, user="alice", source="pop3")
        dload = Load(dcontrol, known)
        dstart = time.monotonic()
        dload.start()
        time.sleep(BEFORE)
        dlog = dload.join()
        direct_rate = rate(dlog, dstart + 0.5, dstart + BEFORE)
        direct.close()

        store = open_store(ss.url("prefix=bench:"))
        control = RelayControl(store)
        for ip in known:
            control.open_window(ip, user="alice", source="pop3")
        c = ss.master.client()
        c.execute_command("WAIT", 1, 5000)
        c.close()
        load = Load(control, known)
        start = time.monotonic()
        load.start()
        time.sleep(BEFORE)
        killed = time.monotonic()
        ss.master.kill()
        # run until decisions have been right for AFTER seconds in a row
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            snapshot = [e for log in load.logs for e in list(log)]
            bad = [e[0] for e in snapshot if e[0] >= killed and not ok(e)]
            last_bad = max(bad, default=killed)
            if now - last_bad > AFTER + 0.5 or now - killed > GIVE_UP:
                break
        log = load.join()
        store.close()
        wrong = [e for e in log if e[3] is Verdict.ALLOW and not e[2]] + \
                [e for e in log if e[3] is Verdict.DENY and e[2]]
        tempfail = [e for e in log if e[3] is Verdict.TEMPFAIL]
        bad = [e for e in log if e[0] >= killed and not ok(e)]
        recovered = max((e[1] for e in bad), default=killed)
        lat_tf = [e[1] - e[0] for e in tempfail]
        return {
            "recovery_s": recovered - killed,
            "tempfail_n": len(tempfail),
            "tempfail_s": (max(e[1] for e in tempfail) - min(e[0] for e in tempfail))
            if tempfail else 0.0,
            "tempfail_p50_ms": statistics.median(lat_tf) * 1000 if lat_tf else 0.0,
            "before_per_s": rate(log, start + 0.5, killed),
            "after_per_s": rate(log, recovered, min(recovered + AFTER, log[-1][0])),
            "direct_per_s": direct_rate,
            "wrong": len(wrong),
            "decisions": len(log),
        }
    finally:
        ss.stop()


def ok(e: tuple[float, float, bool, Verdict]) -> bool:
    return e[3] is (Verdict.ALLOW if e[2] else Verdict.DENY)


def result(name: str, value: float, target: float, good: bool, unit: str) -> None:
    print("RESULT " + json.dumps({"name": name, "value": round(value, 3), "unit": unit,
                                  "target": target, "ok": good}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round instead of three")
    ap.add_argument("--rounds", type=int)
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    exe = shutil.which("redis-server")
    if not exe:
        print("redis-server is not installed: nothing measured")
        return 0
    rs = _testbed()
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-redis-ha-") as tmp:
        for r in range(rounds):
            res = one_round(rs, exe, Path(tmp) / f"r{r}")
            runs.append(res)
            print(f"round {r + 1}: " + ", ".join(f"{k}={v:.3g}" for k, v in res.items()),
                  flush=True)

    def med(key: str) -> str:
        vals = [r[key] for r in runs]
        return f"{statistics.median(vals):.4g} ({min(vals):.4g}-{max(vals):.4g})"

    ratio_after = [r["after_per_s"] / r["before_per_s"] for r in runs]
    ratio_direct = [r["before_per_s"] / r["direct_per_s"] for r in runs]
    print(f"\nSentinel failover, down-after-milliseconds 1000, {THREADS} threads, "
          f"{rounds} round(s): median (range)")
    rows = [
        ("recovery after SIGKILL of the master (s)", med("recovery_s")),
        ("TEMPFAIL decisions", med("tempfail_n")),
        ("TEMPFAIL period (s)", med("tempfail_s")),
        ("TEMPFAIL decision latency p50 (ms)", med("tempfail_p50_ms")),
        ("decisions/s before the kill (sentinel)", med("before_per_s")),
        ("decisions/s after recovery (sentinel)", med("after_per_s")),
        ("decisions/s before, redis:// to the master", med("direct_per_s")),
        ("after/before ratio", f"{statistics.median(ratio_after):.2f} "
                               f"({min(ratio_after):.2f}-{max(ratio_after):.2f})"),
        ("sentinel/direct ratio", f"{statistics.median(ratio_direct):.2f} "
                                  f"({min(ratio_direct):.2f}-{max(ratio_direct):.2f})"),
        ("wrong answers (stranger ALLOW, window DENY)", med("wrong")),
    ]
    width = max(len(n) for n, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    rec = statistics.median(r["recovery_s"] for r in runs)
    result("sentinel failover: decisions correct again (s)", rec, 15, rec < 15, "s")
    wrong = max(r["wrong"] for r in runs)
    result("sentinel failover: wrong decisions", wrong, 0, wrong == 0, "decisions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
