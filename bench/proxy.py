"""Benchmark: relay decisions through HAProxy (PROXY protocol v2) vs direct, side by side.

Usage: ``python bench/proxy.py [--quick]``. Prints a table, never asserts.

Starts one ``relaygate serve`` (SQLite store, policy service on, ``--trusted-proxy
127.0.0.9``) and one real HAProxy in TCP mode on 127.0.0.9 (``send-proxy-v2``,
``source 127.0.0.9``; see tests/interop/haproxy_harness.py), then measures in
alternating rounds, each path for the same number of seconds:

1. policy decisions per second: C clients (Postfix smtpd style: one connection
   each, one request at a time, the next sent when the answer is in), half the
   requests for an address with an open window (OK), half for a stranger (DUNNO);
2. SMTP RCPT decisions per second: C sessions from 127.0.0.21 (which has a window),
   each repeating MAIL, RCPT to a remote domain (a relay decision), RSET.

Direct clients connect to relaygate; proxied ones to HAProxy, whose header names
the client. Per round and path: decisions per second (what the clients see) and
relaygate's CPU time per decision (utime+stime of the serve process, from /proc:
what the PROXY path costs the server). The figures per round are proxied/direct;
the table gives the median of the rounds and their range (the machine is shared and
noisy). Target: through the proxy at least 0.5 of the direct rate (HAProxy adds one
loopback hop per request; the header is read once per connection).

The load generator is one Python asyncio process, so the rate partly measures it:
HAProxy coalesces replies into fewer segments (three pipelined SMTP replies arrive as
one read), which saves the client wake-ups; a proxied rate above the direct one is
that effect, not a faster server. The server's CPU per decision is the fair figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "interop"), str(ROOT / "src")]

from haproxy_harness import PROXY_ADDRESS, HAProxy, Route  # noqa: E402
from serve_harness import Serve, free_port  # noqa: E402

CLIENT = "127.0.0.21"
STRANGER = "127.0.0.22"
#: concurrent connections per path (under SMTP's 20 per address)
CONNECTIONS = 8
TARGET_RATIO = 0.5
REQUEST = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    "helo_name=client.example.org\nqueue_id=\nsender=alice@example.org\n"
    "recipient=bob@remote.example\nrecipient_count=0\nclient_address={ip}\n"
    "client_name=unknown\nreverse_client_name=unknown\ninstance=1a2b.5f3e.9c1d.0\n"
    "sasl_method=\nsasl_username=\nsasl_sender=\nsize=0\n"
    "server_address=127.0.0.1\nserver_port=25\n\n"
)


async def policy_client(host: str, port: int, stop: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(CLIENT, 0))
    requests = [REQUEST.format(ip=ip).encode() for ip in (CLIENT, STRANGER)]
    n = 0
    loop = asyncio.get_running_loop()
    while loop.time() < stop:
        writer.write(requests[n & 1])
        answer = await reader.readuntil(b"\n\n")
        if not answer.startswith(b"action="):
            raise RuntimeError(f"bad policy answer {answer!r}")
        n += 1
    counts.append(n)
    writer.close()


async def smtp_client(host: str, port: int, stop: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(CLIENT, 0))

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line:
                raise RuntimeError("SMTP server closed the connection")
            if line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO bench.test\r\n")
    await reply()
    n = 0
    loop = asyncio.get_running_loop()
    while loop.time() < stop:
        writer.write(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@remote.example>\r\n"
                     b"RSET\r\n")
        for _ in range(3):
            line = await reply()
        writer.write(b"")
        if not line.startswith(b"250"):
            raise RuntimeError(f"unexpected SMTP reply {line!r}")
        n += 1
    writer.write(b"QUIT\r\n")
    counts.append(n)
    writer.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def rate(kind: str, host: str, port: int, seconds: float,
               pid: int) -> tuple[float, float]:
    """(decisions per second, server CPU microseconds per decision)."""
    client = policy_client if kind == "policy" else smtp_client
    counts: list[int] = []
    start = asyncio.get_running_loop().time()
    cpu = cpu_seconds(pid)
    stop = start + seconds
    await asyncio.gather(*(client(host, port, stop, counts) for _ in range(CONNECTIONS)))
    n = sum(counts)
    used = cpu_seconds(pid) - cpu
    return n / (asyncio.get_running_loop().time() - start), used / max(n, 1) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of 2 s instead of 7 of 5 s")
    args = ap.parse_args()
    rounds, seconds = (3, 2.0) if args.quick else (7, 5.0)
    work = Path(tempfile.mkdtemp(prefix="relaygate-bench-proxy-"))
    policy_port = free_port()
    serve = Serve(work / "serve", expiry=3600, services=("smtp",),
                  extra=("--trusted-proxy", PROXY_ADDRESS, "--policy",
                         f"127.0.0.1:{policy_port}", "--log-level", "warning"))
    serve.start()
    haproxy = None
    try:
        r = serve.relaygate("allow", CLIENT, "--user", "alice")
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        haproxy = HAProxy(work / "haproxy", [
            Route("policy", policy_port), Route("smtp", serve.ports["smtp"])]).start()
        paths = {"policy": (("127.0.0.1", policy_port), (PROXY_ADDRESS, haproxy.ports["policy"])),
                 "smtp": (("127.0.0.1", serve.ports["smtp"]),
                          (PROXY_ADDRESS, haproxy.ports["smtp"]))}
        assert serve.proc is not None
        pid = serve.proc.pid
        measured: dict[str, dict[str, list[float]]] = {
            k: {"direct": [], "proxied": [], "ratio": [], "cpu direct": [],
                "cpu proxied": [], "cpu ratio": []} for k in paths}
        for i in range(rounds):
            for kind, (direct, proxied) in paths.items():
                # alternate which path goes first, so drift hurts both alike
                order = [("direct", direct), ("proxied", proxied)]
                if i % 2:
                    order.reverse()
                got = {}
                for name, (host, port) in order:
                    got[name] = asyncio.run(rate(kind, host, port, seconds, pid))
                m = measured[kind]
                for name in ("direct", "proxied"):
                    m[name].append(got[name][0])
                    m[f"cpu {name}"].append(got[name][1])
                m["ratio"].append(got["proxied"][0] / got["direct"][0])
                m["cpu ratio"].append(got["proxied"][1] / got["direct"][1])
                print(f"  .. round {i + 1}/{rounds} {kind}: direct {got['direct'][0]:.0f}/s "
                      f"({got['direct'][1]:.0f} us CPU each), proxied {got['proxied'][0]:.0f}/s "
                      f"({got['proxied'][1]:.0f} us)", file=sys.stderr, flush=True)
    finally:
        if haproxy is not None:
            haproxy.stop()
        serve.stop()
        shutil.rmtree(work, ignore_errors=True)
    mode = " (--quick)" if args.quick else ""
    print(f"PROXY protocol benchmark{mode}: {rounds} rounds of {seconds:g} s per path, "
          f"{CONNECTIONS} connections, HAProxy send-proxy-v2 on loopback")
    head = f"{'measure':<44} {'median':>9} {'min':>9} {'max':>9}"
    print(head)
    print("-" * len(head))
    labels = {"policy": "policy decisions/s", "smtp": "SMTP RCPT decisions/s"}
    for kind, m in measured.items():
        for name in ("direct", "proxied"):
            v = m[name]
            print(f"{labels[kind] + ', ' + name:<44} {statistics.median(v):>9.0f} "
                  f"{min(v):>9.0f} {max(v):>9.0f}")
        r = m["ratio"]
        print(f"{labels[kind] + ', proxied / direct':<44} {statistics.median(r):>9.2f} "
              f"{min(r):>9.2f} {max(r):>9.2f}")
        short = "policy" if kind == "policy" else "RCPT"
        for name in ("direct", "proxied"):
            v = m[f"cpu {name}"]
            print(f"{'server CPU us per ' + short + ', ' + name:<44} "
                  f"{statistics.median(v):>9.1f} {min(v):>9.1f} {max(v):>9.1f}")
        r = m["cpu ratio"]
        print(f"{'server CPU per ' + short + ', proxied / direct':<44} "
              f"{statistics.median(r):>9.2f} {min(r):>9.2f} {max(r):>9.2f}")
    print()
    head = f"{'target':<44} {'measured':>9} {'limit':>7} {'ratio':>6}  verdict"
    print(head)
    print("-" * len(head))
    for kind, m in measured.items():
        ratio = statistics.median(m["ratio"])
        ok = ratio >= TARGET_RATIO
        name = f"{labels[kind]} via HAProxy / direct"
        print(f"{name:<44} {ratio:>9.2f} {TARGET_RATIO:>7.2f} {ratio / TARGET_RATIO:>6.2f}  "
              f"{'meets' if ok else 'MISSES'}")
    for kind, m in measured.items():
        ratio = statistics.median(m["ratio"])
        print("RESULT " + json.dumps({
            "name": f"{labels[kind]} via HAProxy / direct (median of {rounds})",
            "value": round(ratio, 3), "unit": "x", "target": TARGET_RATIO,
            "ok": ratio >= TARGET_RATIO}))


if __name__ == "__main__":
    main()
