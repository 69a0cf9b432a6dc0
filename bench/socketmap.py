"""Benchmark: relaygate's socketmap service against a server that answers a constant.

Usage: ``python bench/socketmap.py [--quick]``. Prints a table, never asserts.

Lookups per second over persistent connections (20 clients, each sending the
next lookup when the answer arrived, as Sendmail and Postfix do) against
``relaygate socketmap`` (SQLite store; half the clients' addresses have an open
window, so half the answers are ``OK``, half ``NOTFOUND``) vs. a bare asyncio
server that answers ``NOTFOUND`` to every netstring, parsing nothing else. Same
load generator, alternating rounds (which server goes first rotates). Target:
>= 0.8x. Also the CPU time each server spends per answer, and, for reading (not
a target), ``relaygate policyd`` on the same store under bench/postfix.py's load
generator: the same decisions through the Postfix policy protocol.

Medians of the rounds (ranges shown). Everything lives in a temporary directory,
removed at the end; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Scripts in bench/ (queue.py) would shadow the standard library: drop our own directory.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

RELAYGATE = str(Path(sys.executable).with_name("relaygate"))
TARGET = 0.8
CLIENTS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- helper processes (this script re-runs itself) ---------------------------------


def constant_server(port: int) -> None:
    """A bare asyncio socketmap server: NOTFOUND for every netstring, parses only commas
    (the requests contain none)."""

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.t = transport

        def data_received(self, data: bytes) -> None:
            n = data.count(b",")
            if n:
                self.t.write(b"9:NOTFOUND ," * n)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Proto, "127.0.0.1", port, reuse_address=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(main())


def load_client(port: int, clients: int, seconds: float) -> None:
    """N persistent connections, one lookup in flight each; prints answers/s as JSON."""
    requests = []
    for i in range(clients):
        key = f"127.0.{i % 2}.{10 + i}" if i % 4 else f"IPv6:2001:db8::{10 + i:x}"
        payload = f"relaygate {key}".encode()
        requests.append(b"%d:%s," % (len(payload), payload))

    class Proto(asyncio.Protocol):
        def __init__(self, req: bytes, counter: list[int]) -> None:
            self.req, self.counter = req, counter

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.t = transport
            transport.write(self.req)

        def data_received(self, data: bytes) -> None:
            # one answer per request, each a netstring ending in a comma
            n = data.count(b",")
            self.counter[0] += n
            if n:
                self.t.write(self.req)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        counter = [0]
        conns = [await loop.create_connection(lambda r=r: Proto(r, counter), "127.0.0.1", port)
                 for r in requests]
        await asyncio.sleep(0.3)  # warm-up
        start_count, start = counter[0], time.perf_counter()
        await asyncio.sleep(seconds)
        done, took = counter[0] - start_count, time.perf_counter() - start
        for t, _ in conns:
            t.close()
        print(json.dumps({"rate": done / took, "answers": counter[0]}))

    asyncio.run(main())


# -- the measurement -----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(root: Path, rounds: int, seconds: float) -> dict[str, list[float]]:
    store = f"sqlite://{root / 'grants.db'}"
    for i in range(0, CLIENTS, 2):  # half the clients have an open window
        key = f"127.0.{i % 2}.{10 + i}" if i % 4 else f"2001:db8::{10 + i:x}"
        subprocess.run([RELAYGATE, "--store", store, "allow", key, "--ttl", "3600"],
                       check=True, capture_output=True)
    p_rg, p_bare, p_pol = free_port(), free_port(), free_port()
    rg = start([RELAYGATE, "--store", store, "socketmap", "--listen", f"127.0.0.1:{p_rg}",
                "--log-level", "warning"], p_rg)
    bare = start([sys.executable, __file__, "--constant-server", str(p_bare)], p_bare)
    pol = start([RELAYGATE, "--store", store, "policyd", "--listen", f"127.0.0.1:{p_pol}",
                 "--log-level", "warning"], p_pol)
    out: dict[str, list[float]] = {k: [] for k in ("ours", "base", "policy", "cpu_ours",
                                                   "cpu_base", "cpu_policy")}
    try:
        for r in range(rounds):
            order = [("base", bare, p_bare), ("ours", rg, p_rg), ("policy", pol, p_pol)]
            order = order[r % 3:] + order[:r % 3]
            for name, proc, port in order:
                client = HERE / ("postfix.py" if name == "policy" else "socketmap.py")
                before = cpu_seconds(proc.pid)
                res = subprocess.run([sys.executable, str(client), "--client", str(port),
                                      str(CLIENTS), str(seconds)], capture_output=True,
                                     text=True, check=True)
                data = json.loads(res.stdout)
                out[name].append(data["rate"])
                out[f"cpu_{name}"].append(
                    (cpu_seconds(proc.pid) - before) / data["answers"] * 1e6)
    finally:
        stop(rg)
        stop(bare)
        stop(pol)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--constant-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.constant_server:
        constant_server(args.constant_server)
        return 0
    if args.client:
        load_client(int(args.client[0]), int(args.client[1]), float(args.client[2]))
        return 0
    rounds, seconds = (3, 1.0) if args.quick else (7, 3.0)
    root = Path(tempfile.mkdtemp(prefix="relaygate-bench-socketmap-"))
    try:
        m = measure(root, rounds, seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ours, base = statistics.median(m["ours"]), statistics.median(m["base"])
    print(f"socketmap lookups/s, {CLIENTS} persistent connections, {rounds} rounds of "
          f"{seconds:.0f} s (median [min-max]):")
    print(f"  relaygate socketmap (sqlite): {ours:8.0f}  [{min(m['ours']):.0f}-"
          f"{max(m['ours']):.0f}]  CPU {statistics.median(m['cpu_ours']):.1f} us/answer")
    print(f"  constant server:              {base:8.0f}  [{min(m['base']):.0f}-"
          f"{max(m['base']):.0f}]  CPU {statistics.median(m['cpu_base']):.1f} us/answer")
    print(f"  relaygate policyd (sqlite):   {statistics.median(m['policy']):8.0f}  "
          f"[{min(m['policy']):.0f}-{max(m['policy']):.0f}]  CPU "
          f"{statistics.median(m['cpu_policy']):.1f} us/answer  (Postfix policy protocol, "
          "for reading)")
    ratio = ours / base
    ratios = sorted(a / b for a, b in zip(m["ours"], m["base"], strict=True))
    print(f"  ratio per round: {', '.join(f'{r:.2f}' for r in ratios)}")
    print()
    print(f"{'target':<52}{'measured':>10}{'limit':>8}{'ratio':>7}  verdict")
    print("-" * 88)
    verdict = "meets" if ratio >= TARGET else "MISSES"
    print(f"{'socketmap lookups/s vs constant server (x)':<52}{ratio:>10.2f}{TARGET:>8.2f}"
          f"{ratio / TARGET:>7.2f}  {verdict}")
    if args.quick:
        print("\n(--quick: fewer, shorter rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
