"""Benchmark: what the migration report's counting costs the policy service.

Usage: ``python bench/relaystats.py [--quick]``. Prints a table, never asserts.

Two ``relaygate policyd`` processes on one SQLite store, side by side in one
run: one with an existing ``--data-dir`` (every ``OK`` answer is counted for
``relaygate report``), one whose data directory does not exist (counting off,
as before the report existed). 20 persistent connections, half of the
clients' addresses with an open window (bench/postfix.py's load client). The
rounds alternate between the two; per round, the CPU time each server spends
per answer (user + system, from /proc: steadier than answers/s on a shared
machine) and the answers/s. The ratio counting/not-counting of the medians is
checked against the target: counting costs at most 5% CPU per answer.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Scripts in bench/ would shadow the standard library: drop our own directory.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

RELAYGATE = str(Path(sys.executable).with_name("relaygate"))
CLIENTS = 20
#: counting may cost at most this much CPU per policy answer
TARGET = 1.05


def _start(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    import socket
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"policyd on port {port} did not start")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter rounds")
    args = ap.parse_args()
    rounds, seconds = (3, 2.0) if args.quick else (7, 5.0)
    with tempfile.TemporaryDirectory(prefix="relaygate-bench-stats-") as tmp:
        root = Path(tmp)
        store = f"sqlite://{root / 'grants.db'}"
        for i in range(0, CLIENTS, 2):  # half the clients have an open window
            subprocess.run([RELAYGATE, "--store", store, "allow", f"127.0.0.{10 + i}", "--ttl",
                            "3600"], check=True, capture_output=True)
        (root / "counting").mkdir()
        p_on, p_off = _free_port(), _free_port()
        on = _start([RELAYGATE, "--store", store, "--data-dir", str(root / "counting"),
                     "policyd", "--listen", f"127.0.0.1:{p_on}", "--log-level", "warning"], p_on)
        off = _start([RELAYGATE, "--store", store, "--data-dir", str(root / "missing"),
                      "policyd", "--listen", f"127.0.0.1:{p_off}", "--log-level", "warning"],
                     p_off)
        cpu: dict[str, list[float]] = {"on": [], "off": []}
        rate: dict[str, list[float]] = {"on": [], "off": []}
        try:
            for r in range(rounds):
                order = [("off", off, p_off), ("on", on, p_on)]
                if r % 2:
                    order.reverse()
                for name, proc, port in order:
                    before = _cpu(proc.pid)
                    res = subprocess.run([sys.executable, str(HERE / "postfix.py"), "--client",
                                          str(port), str(CLIENTS), str(seconds)],
                                         capture_output=True, text=True, check=True)
                    data = json.loads(res.stdout)
                    rate[name].append(data["rate"])
                    cpu[name].append((_cpu(proc.pid) - before) / data["answers"] * 1e6)
        finally:
            for proc in (on, off):
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
        counted = (root / "counting" / "relaystats.db").exists()
    med = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = med["on"] / med["off"]
    print(f"policy answers, {CLIENTS} connections, {rounds} alternating rounds of {seconds:g} s"
          f"{' (--quick)' if args.quick else ''}; counts written: {counted}")
    print(f"{'measure':<44} {'counting off':>16} {'counting on':>16}")
    for label, data, unit in (("CPU us per answer, median [range]", cpu, "us"),
                              ("answers/s, median [range]", rate, "/s")):
        cells = [f"{statistics.median(data[k]):.1f} [{min(data[k]):.1f}-{max(data[k]):.1f}]"
                 for k in ("off", "on")]
        print(f"{label:<44} {cells[0]:>16} {cells[1]:>16}  {unit}")
    print(f"policy CPU per answer, counting on / off: {ratio:.3f} (target <= {TARGET})")
    print("RESULT " + json.dumps({"name": "policy CPU per answer, counting on / off (<=)",
                                  "value": round(ratio, 3), "target": TARGET,
                                  "ok": ratio <= TARGET}))


if __name__ == "__main__":
    main()
